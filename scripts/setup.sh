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
.venv/bin/python -m pip install --quiet -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install --quiet -c constraints.txt -e "$target"
