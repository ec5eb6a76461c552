#!/usr/bin/env bash
# The suite at the two ends of the versions pyproject.toml admits, each in a venv of its own:
#   oldest: every dependency at the floor pyproject.toml states (constraints-oldest.txt), on the
#           oldest Python it admits;
#   newest: the newest release of every dependency (no constraints), on a new Python.
# Not part of CI: each end installs a CUDA build of torch from PyPI (several GB). Run both when a
# floor, a supported Python or a dependency changes, and record the result in README.md
# ("Supported versions").
#
# usage: bash scripts/check_versions.sh oldest|newest [PYTHON [PYTEST ARGS...]]
#   PYTHON: the interpreter that makes the venv (default python3.10 / python3.13)
#   PYTEST ARGS: a subset of the suite (default: all of it but MONAI Label, which pins its own versions)
set -euo pipefail
cd "$(dirname "$0")/.."
end="${1:-}"
case "$end" in
  oldest) python="${2:-python3.10}"; constraints=(-c constraints-oldest.txt) ;;
  newest) python="${2:-python3.13}"; constraints=() ;;
  *) echo "usage: bash scripts/check_versions.sh oldest|newest [PYTHON [PYTEST ARGS...]]" >&2; exit 2 ;;
esac
shift $(( $# < 2 ? $# : 2 ))
venv=".venv-$end"
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "${constraints[@]}" -e ".[test,deploy,fast]"
"$venv/bin/python" --version
"$venv/bin/python" -m pip list 2>/dev/null | grep -iE '^(torch|monai|numpy|onnx|onnxscript|onnxruntime|openvino|pytorch-ignite|numba|itk|nibabel) '
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
if [ "$#" -eq 0 ]; then
  set -- -n auto --dist loadfile tests --ignore=tests/bundles/test_monailabel.py
fi
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
