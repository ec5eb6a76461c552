#!/usr/bin/env bash
# Makes the venv given as $1, with pip, on Python 3.10 or newer; makes it again where it is not one.
#
# A set-up interrupted while venv ran ensurepip leaves a folder whose bin/python runs but holds no pip:
# every later set-up, demo and test run then stopped with "No module named pip". A venv of a Python
# older than 3.10 (made while such a python3 came first on PATH) is made again too. The Python is
# $PYTHON, else python3.11 (CI's and the README's figures'), else python3.
set -euo pipefail
venv="$1"
works() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; }
if [ -x "$venv/bin/python" ] && works "$venv/bin/python" && "$venv/bin/python" -c 'import pip' 2>/dev/null; then
  exit 0
fi
python="${PYTHON:-$(command -v python3.11 || command -v python3 || true)}"
if [ -z "$python" ] || ! works "$python"; then
  found="no python3.11 or python3 on PATH"
  if [ -n "$python" ] && ! command -v "$python" > /dev/null; then
    found="$python does not exist"
  elif [ -n "$python" ]; then
    found="$python is $("$python" -V 2>&1 | head -n 1)"
  fi
  echo "monai-effq needs Python 3.10 or newer (CI and the README's figures use 3.11), and $found: install Python 3.11, or name one with PYTHON=/path/to/python3.11 before the command." >&2
  exit 1
fi
if [ -e "$venv" ]; then
  echo "$venv is not a working venv of Python 3.10 or newer (a set-up interrupted while it was made?): making it again with $python" >&2
  rm -rf "$venv"
fi
"$python" -m venv "$venv"
