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
#   PYTHON: the interpreter that makes the venv ("" or absent: python3.10 / python3.13); the oldest
#           end needs one its pinned wheels exist for (numpy 1.24.4: Python 3.8-3.11)
#   PYTEST ARGS: what to run instead of the whole suite but MONAI Label (which pins its own
#           versions), e.g. bash scripts/check_versions.sh oldest "" -n 2 tests/deploy
# The venv (.venv-oldest or .venv-newest) is made afresh each time, so that nothing of an earlier
# run's versions stays in it.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash scripts/check_versions.sh oldest|newest [PYTHON [PYTEST ARGS...]]"
end="${1:-}"
python="${2:-}"
case "$end" in
  oldest) python="${python:-python3.10}"; constraints=(-c constraints-oldest.txt) ;;
  newest) python="${python:-python3.13}"; constraints=() ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
if ! command -v "$python" > /dev/null; then
  echo "$python not found: give the interpreter to make the venv with, e.g. bash scripts/check_versions.sh $end /usr/bin/python3.x" >&2
  exit 2
fi
shift $(( $# < 2 ? $# : 2 ))
venv=".venv-$end"
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# ${a[@]+...}: an empty array under set -u is an error in bash before 4.4
"$venv/bin/python" -m pip install --quiet --no-compile ${constraints[@]+"${constraints[@]}"} -e ".[test,deploy,fast,dicom]"
bash scripts/compile_venv.sh "$venv"
"$venv/bin/python" --version
"$venv/bin/python" -m pip list 2>/dev/null | grep -iE '^(torch|monai|numpy|onnx|onnxscript|onnxruntime|openvino|pytorch-ignite|numba|itk|nibabel|highdicom|pydicom) '
# as scripts/test.sh: waiting OpenMP threads sleep, so the two xdist workers do not spin against each other
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
if [ "$#" -eq 0 ]; then
  set -- -n auto --dist loadfile tests --ignore=tests/bundles/test_monailabel.py
fi
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
