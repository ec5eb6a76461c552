#!/usr/bin/env bash
# The checks that need a CUDA GPU, which CI never has: the tests that take another path where CUDA is
# visible (the solver on CUDA tensors, NCCL as the default backend, the zoo overlays' cuda device,
# torchrun's ranks), then the demo on the GPU and on this machine's CPU (and where their checkpoints
# differ), a short fine-tune on the GPU, and the network PTQ benchmark on both.
# Each step has its own time limit and log, so one failure does not hide the others.
#
# Usage: bash scripts/gpu_check.sh [OUT_DIR]      (PYTHON=... for an interpreter other than python3;
# it needs torch with CUDA and the package's dependencies importable; the repository is put on PYTHONPATH).
# GPU_CHECK_STEPS="demo_cuda network_ptq" runs only those steps (tests_cuda demo_cuda demo_cpu
# compare_demo_runs finetune_cuda network_ptq); on an H200 host with 16 cores tests_cuda, the demos
# and finetune_cuda took 6.5 minutes together.
# A CUDA image with torch alone lacks, as wheels for its Python: monai nibabel pytorch-ignite fire
# termcolor jsonschema jsonschema-specifications referencing rpds-py (openvino for the OpenVINO tests).
set -u
cd "$(dirname "$0")/.."
out=${1:-outputs/gpu_check}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $out/NAME.log, print one status line
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    [[ " ${GPU_CHECK_STEPS:-$name} " == *" $name "* ]] || return 0
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "== $name: rc $rc in $((SECONDS - t0)) s (log $out/$name.log)"
    tail -n 25 "$out/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$py" -c "import torch, monai; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), '| monai', monai.__version__, '| cpu threads', torch.get_num_threads())"
grep -m1 "model name" /proc/cpuinfo

# a test that hangs (an NCCL collective waiting for a rank that died) fails alone where pytest-timeout is installed
per_test=$("$py" -c "import pytest_timeout" 2>/dev/null && echo "--timeout 100")
# -v names each test as it ends, so a run cut off by its limit still says which failed; 8 workers of
# 2 threads each, as 8 workers of all the cores' threads ran fixtures past the per-test limit
step tests_cuda 200 env OMP_NUM_THREADS=2 "$py" -m pytest -v -p no:cacheprovider -n 8 -rfE $per_test \
    tests/solver/test_device.py tests/utils/test_distributed.py tests/utils/test_precision.py tests/ptq/test_report.py \
    tests/test_troubleshooting.py tests/bundles/test_errors.py \
    tests/overlays tests/bundles/test_distributed.py
step demo_cuda 150 "$py" -m monai_effq.demo --device cuda --output-dir "$out/demo_cuda"
step demo_cpu 120 "$py" -m monai_effq.demo --device cpu --output-dir "$out/demo_cpu"
step compare_demo_runs 90 "$py" scripts/compare_demo_runs.py "$out/demo_cuda" "$out/demo_cpu"
step finetune_cuda 100 "$py" -m monai.bundle run finetune --bundle_root bundles/brats_effq \
    --config_file "['bundles/brats_effq/configs/train.json','bundles/brats_effq/configs/quantize.json','bundles/brats_effq/configs/finetune.json']" \
    --fp_checkpoint bundles/brats_effq/models/model.pt --ckpt_dir "$out/finetune/models" --output_dir "$out/finetune/eval" \
    --export_dir "" --weight_bits 4 --act_bits 6 --steps 40 --device cuda
step network_ptq 200 "$py" benchmarks/network_ptq.py --devices cpu cuda --methods efficientq rtn
