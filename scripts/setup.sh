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
bash scripts/make_venv.sh .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# pip byte-compiles what it installs one file at a time; compiling on every core once the files are in
# place made this set-up 72 s instead of 88-90 s (2-core AMD EPYC, two runs each, interleaved).
# MONAI_EFFQ_BYTECODE=lazy compiles nothing now: Python compiles each module when a process first
# imports it and caches it (scripts/test.sh, whose suite imports about a third of the 12,800 files: its
# set-up took 36 s instead of 83 s with pip compiling on one core, and the first import of monai-effq's
# modules 16.6 s instead of 7.0 s, once).
bytecode="${MONAI_EFFQ_BYTECODE:-parallel}"
case "$bytecode" in
  parallel|lazy) ;;
  *) echo "MONAI_EFFQ_BYTECODE must be 'parallel' or 'lazy', got '$bytecode'" >&2; exit 2 ;;
esac
# The CPU build. PyPI's torch 2.13.0 for Linux is the CUDA one (29 packages with its nvidia and triton
# wheels), so the pin names the CPU build's local version: from pip's configured sources first (CI's
# machines hold its wheel on disk: seconds), else from PyTorch's CPU index; where neither has it (macOS,
# whose PyPI wheel is the CPU build), the pinned version as the sources give it.
if ! .venv/bin/python -m pip install --quiet --no-compile -c constraints.txt "torch==2.13.0+cpu" > /dev/null 2>&1; then
  echo "torch 2.13.0+cpu is not in pip's configured sources: trying PyTorch's CPU index" >&2
  if ! .venv/bin/python -m pip install --quiet --no-compile --retries 1 --timeout 60 -c constraints.txt \
    --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu"; then
    echo "PyTorch's CPU index has no torch 2.13.0+cpu for this machine: installing torch 2.13.0 as pip's sources give it" >&2
    .venv/bin/python -m pip install --quiet --no-compile -c constraints.txt torch==2.13.0
  fi
fi
.venv/bin/python -m pip install --quiet --no-compile -c constraints.txt -e "$target"
if [ "$bytecode" = "parallel" ]; then
  bash scripts/compile_venv.sh .venv
fi
