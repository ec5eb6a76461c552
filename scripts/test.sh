#!/usr/bin/env bash
# The README's test command: set up, then run the whole suite.
#
# MONAI Label gets a venv of its own (scripts/setup_monailabel.sh; its pins clash with ours). Its
# third-party stack (a CUDA torch: the registry has no CPU torchvision) is mostly unpacking wheels, so
# it starts first, at the lowest CPU priority: beside our own set-up, which leaves a core idle, and
# then in the cores the suite leaves idle, instead of slowing either down. monai-effq goes into it
# after the suite (a few seconds; both set-ups build the editable wheel in this folder), and its HTTP
# round-trip test runs last. MONAI_EFFQ_SKIP_MONAILABEL=1, or any pytest arguments (a subset of the
# suite), leave it out. The suite runs on one pytest-xdist worker per core, a test file per worker at a time
# (its module fixtures, such as bundle copies, are built once), the files with the most slow tests
# first (tests/conftest.py orders them) so that both workers finish together.
set -euo pipefail
cd "$(dirname "$0")/.."
monailabel=0
if [ "$#" -eq 0 ] && [ "${MONAI_EFFQ_SKIP_MONAILABEL:-0}" != "1" ]; then
  monailabel=1
  # a process group of its own (job control on for this one job), so that the trap below ends its pip too:
  # a failing set-up or suite, or Ctrl-C, must not leave MONAI Label's set-up installing behind it
  set -m
  nice -n 19 bash scripts/setup_monailabel.sh third-party > .venv-monailabel.log 2>&1 &
  monailabel_setup=$!
  set +m
  trap 'kill -- -"$monailabel_setup" 2>/dev/null || true' EXIT
fi
# While MONAI Label's set-up runs, pip compiles ours as it installs, on one core: compiling on both
# (scripts/compile_venv.sh) starved that set-up, which then ended 40 s after the suite instead of before
# it (.ci/run 877 s instead of 827 s).
MONAI_EFFQ_PARALLEL_COMPILE="$((1 - monailabel))" bash scripts/setup.sh "test,deploy,fast,dicom"
# Waiting OpenMP threads sleep instead of spinning: a test on two threads (the demo table's) shares the
# two cores with the other worker, and spinning barriers made it take 332 s instead of 35 s (47 s with
# this; the suite 8:52-10:59 -> 8:07 on a 2-core Xeon). Waiting changes no result.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
if [ "$monailabel" = "0" ]; then
  exec .venv/bin/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder tests
fi
suite=0
.venv/bin/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder tests --ignore=tests/bundles/test_monailabel.py || suite=$?
# finished even when the suite failed: a MONAI Label venv without monai-effq would fail a later run's MONAI Label test
if ! wait "$monailabel_setup" || ! bash scripts/setup_monailabel.sh project >> .venv-monailabel.log 2>&1; then
  tail -n 40 .venv-monailabel.log
  echo "scripts/setup_monailabel.sh failed (log above, full log in .venv-monailabel.log)" >&2
  exit 1
fi
trap - EXIT
if [ "$suite" -ne 0 ]; then
  exit "$suite"
fi
.venv/bin/python -m pytest -q tests/bundles/test_monailabel.py
