#!/usr/bin/env bash
# The README's test command: set up, then run the whole suite.
#
# MONAI Label gets a venv of its own (scripts/setup_monailabel.sh; its pins clash with ours). Its
# third-party stack (a CUDA torch: the registry has no CPU torchvision) is mostly unpacking wheels,
# 129 s and 121 CPU-seconds alone on a 2-core AVX2 EPYC, so it starts first, beside our own set-up
# (55 s, pip on one core). At the lowest CPU priority the suite then starved it: MONAI Label's test
# waited about 100 s for it on one worker while the other ran. At the normal priority it takes its
# share of the cores once and is done early in the suite. monai-effq goes into it
# once our own set-up is done (a few seconds; both set-ups build the editable wheel in this folder).
# Its HTTP round-trip test runs inside the suite, after the files with slow tests, and waits for that
# set-up (MONAI_EFFQ_MONAILABEL_SETUP names the file its exit status lands in): run after the suite, it
# had a core to itself and left the other idle for about a minute. MONAI_EFFQ_SKIP_MONAILABEL=1, or any
# pytest arguments (a subset of the suite), leave the set-up out. The suite runs on one pytest-xdist
# worker per core, a test file per worker at a time (its module fixtures, such as bundle copies, are
# built once), the files with the most slow tests first (tests/conftest.py orders them) so that both
# workers finish together.
set -euo pipefail
cd "$(dirname "$0")/.."
monailabel=0
if [ "$#" -eq 0 ] && [ "${MONAI_EFFQ_SKIP_MONAILABEL:-0}" != "1" ]; then
  monailabel=1
  # a process group of its own (job control on for this one job), so that the trap below ends its pip too:
  # a failing set-up or suite, or Ctrl-C, must not leave MONAI Label's set-up installing behind it
  status=$(mktemp -d)
  set -m
  (
    # monai-effq goes in only once our own set-up has built its editable wheel here (the file "ours");
    # the exit status is written whole (renamed into place), and only once the set-up has ended
    rc=0
    { bash scripts/setup_monailabel.sh third-party &&
      until [ -e "$status/ours" ]; do sleep 1; done &&
      bash scripts/setup_monailabel.sh project; } > .venv-monailabel.log 2>&1 || rc=$?
    echo "$rc" > "$status/monailabel.tmp" && mv "$status/monailabel.tmp" "$status/monailabel"
  ) &
  monailabel_setup=$!
  set +m
  trap 'kill -- -"$monailabel_setup" 2>/dev/null || true; rm -rf "$status"' EXIT
  export MONAI_EFFQ_MONAILABEL_SETUP="$status/monailabel"
fi
# No byte-compiling of the whole venv: the suite's processes compile what they import, once (cached in
# the venv; PYTHONDONTWRITEBYTECODE, where the environment sets it, is unset for that below). Compiling
# all of it took 47 s of the set-up on one core (on both, it starved MONAI Label's set-up beside it).
MONAI_EFFQ_BYTECODE=lazy bash scripts/setup.sh "test,deploy,fast,dicom"
if [ "$monailabel" = "1" ]; then
  touch "$status/ours"
fi
# Waiting OpenMP threads sleep instead of spinning: a test on two threads (the demo table's) shares the
# two cores with the other worker, and spinning barriers made it take 332 s instead of 35 s (47 s with
# this; the suite 8:52-10:59 -> 8:07 on a 2-core Xeon). Waiting changes no result.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
unset PYTHONDONTWRITEBYTECODE
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
# not exec: where MONAI Label's set-up runs beside the suite, the trap must end it if the suite ends first,
# and remove its status folder
suite=0
.venv/bin/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder tests || suite=$?
exit "$suite"
