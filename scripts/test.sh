#!/usr/bin/env bash
# The README's test command: set up, then run the whole suite.
#
# MONAI Label gets a venv of its own (scripts/setup_monailabel.sh; its pins clash with ours). That
# set-up is mostly unpacking wheels, so it runs beside the main suite at the lowest CPU priority
# (it takes the cores the suite leaves idle instead of slowing it down); its HTTP round-trip test
# runs last. MONAI_EFFQ_SKIP_MONAILABEL=1, or any pytest arguments (a subset of the suite), leave
# it out. The suite runs on one pytest-xdist worker per core, a test file per worker at a time
# (its module fixtures, such as bundle copies, are built once), the files with the most slow tests
# first (tests/conftest.py orders them) so that both workers finish together.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "test,deploy,fast,dicom"
# Waiting OpenMP threads sleep instead of spinning: a test on two threads (the demo table's) shares the
# two cores with the other worker, and spinning barriers made it take 332 s instead of 35 s (47 s with
# this; the suite 8:52-10:59 -> 8:07 on a 2-core Xeon). Waiting changes no result.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
if [ "${MONAI_EFFQ_SKIP_MONAILABEL:-0}" = "1" ]; then
  exec .venv/bin/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder tests
fi
nice -n 19 bash scripts/setup_monailabel.sh > .venv-monailabel.log 2>&1 &
monailabel_setup=$!
# a failing suite must not leave the set-up running behind it
trap 'kill "$monailabel_setup" 2>/dev/null || true' EXIT
.venv/bin/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder tests --ignore=tests/bundles/test_monailabel.py
if ! wait "$monailabel_setup"; then
  tail -n 40 .venv-monailabel.log
  echo "scripts/setup_monailabel.sh failed (log above, full log in .venv-monailabel.log)" >&2
  exit 1
fi
trap - EXIT
.venv/bin/python -m pytest -q tests/bundles/test_monailabel.py
