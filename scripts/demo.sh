#!/usr/bin/env bash
# The README's main command: set up, then quantize both demo bundles (W4A8, W2A8) and print
# FP vs quantized Dice per class, model size and time; the table goes to outputs/demo/results.md (the
# README and docs are rewritten only by `python -m monai_effq.demo --publish`).
set -euo pipefail
cd "$(dirname "$0")/.."
# the package with its compiled column loops (matplotlib, for the plots, is a core dependency);
# MONAI_EFFQ_EXTRAS replaces the extras (keep "fast" in it, e.g. "fast,deploy")
bash scripts/setup.sh "${MONAI_EFFQ_EXTRAS-fast}"
.venv/bin/python -m monai_effq.demo "$@"
