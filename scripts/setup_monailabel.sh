#!/usr/bin/env bash
# Creates .venv-monailabel: MONAI Label 0.8.5 beside monai-effq, in a venv of its own.
#
# MONAI Label imports torchvision, and only a torchvision built for the same torch imports, so this
# venv takes torch 2.14.1 + torchvision 0.29.1 together; its DICOM stack needs pydicom<3 and its
# pinned dependencies need numpy<2 and ml_dtypes<0.6 (README.md, section MONAI Label).
#
# Usage: bash scripts/setup_monailabel.sh [all|third-party|project]. "third-party" installs MONAI Label
# and its torch stack, "project" monai-effq (editable) into the venv, "all" (the default) both. The
# project step builds its editable wheel in this folder, as scripts/setup.sh does: scripts/test.sh
# runs the long third-party step beside its own set-up and this step only once that one is done.
set -euo pipefail
cd "$(dirname "$0")/.."
step="${1:-all}"
case "$step" in
  all|third-party|project) ;;
  *) echo "unknown step '$step': give all, third-party or project" >&2; exit 2 ;;
esac
venv=.venv-monailabel
bash scripts/make_venv.sh "$venv"
if [ "$step" != project ]; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -c constraints-monailabel.txt torch torchvision
  "$venv/bin/python" -m pip install --quiet -c constraints-monailabel.txt monailabel
fi
if [ "$step" != third-party ]; then
  "$venv/bin/python" -m pip install --quiet -c constraints-monailabel.txt -e .
fi
