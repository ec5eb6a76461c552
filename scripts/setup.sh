#!/usr/bin/env bash
# Creates .venv (if missing) and installs monai-effq with the pinned CPU torch.
set -euo pipefail
cd "$(dirname "$0")/.."
# the extras to install, e.g. "test,deploy" (default: test); "" installs the package alone
extras="${1-test}"
target="."
if [ -n "$extras" ]; then
  target=".[${extras}]"
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# pip byte-compiles what it installs one file at a time; compiling on every core once the files are in
# place made this set-up 72 s instead of 88-90 s (2-core AMD EPYC, two runs each, interleaved).
# MONAI_EFFQ_PARALLEL_COMPILE=0 leaves the compiling to pip, on one core (scripts/test.sh, where
# MONAI Label's set-up runs on the other).
parallel="${MONAI_EFFQ_PARALLEL_COMPILE:-1}"
compile=""
if [ "$parallel" = "1" ]; then
  compile="--no-compile"
fi
.venv/bin/python -m pip install --quiet $compile -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install --quiet $compile -c constraints.txt -e "$target"
if [ "$parallel" = "1" ]; then
  bash scripts/compile_venv.sh .venv
fi
