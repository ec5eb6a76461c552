#!/usr/bin/env bash
# Creates .venv-monailabel: MONAI Label 0.8.5 beside monai-effq, in a venv of its own.
#
# MONAI Label imports torchvision, and only a torchvision built for the same torch imports, so this
# venv takes torch 2.14.1 + torchvision 0.29.1 together; its DICOM stack needs pydicom<3 and its
# pinned dependencies need numpy<2 and ml_dtypes<0.6 (README.md, section MONAI Label).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-monailabel
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -c constraints-monailabel.txt torch torchvision
"$venv/bin/python" -m pip install --quiet -c constraints-monailabel.txt monailabel -e .
