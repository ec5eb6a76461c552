#!/usr/bin/env bash
# Byte-compiles a venv's site-packages on every core (what pip does file by file unless --no-compile).
#
# Usage: bash scripts/compile_venv.sh <venv>. Once done, it compiles only the files pip has written
# since (compileall itself would re-read every file, 7 s, and pip rewrites the editable install's
# finder on every run). A few files that packages ship for newer Pythons (torch's py312_intrinsics.py)
# do not compile: pip skips them silently, and so does this (they are imported only on those Pythons).
set -euo pipefail
venv="$1"
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
stamp="$venv/.compiled"
if [ -e "$stamp" ]; then
  find "$site" -name '*.py' -cnewer "$stamp" -print0 | xargs -0 -r "$venv/bin/python" -m compileall -qq || true
else
  "$venv/bin/python" -m compileall -qq -j 0 "$site" || true
fi
touch "$stamp"
