"""The bundles' ``torchrun`` overlays: quantization, evaluation and fine-tuning shared by 2 gloo processes on CPU.

Each test launches ``torchrun --standalone --nproc_per_node=2 -m monai.bundle run ...`` as a user
would, on the demo data, and reads what each rank logged (``--tee 3`` prefixes every line with its
rank) and what rank 0 wrote.
"""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monai_effq.bundle import demo_dataset, rank_cases
from monai_effq.utils.errors import UserInputError

from ..threads import torch_threads
from .conftest import WORKFLOWS, bundle, copy_bundle

TORCHRUN = Path(sys.executable).with_name("torchrun")
NAME = "brats_effq"
RANKS = 2


def torchrun(work: Path, workflow: str, overlay: str, *overrides: str) -> dict[int, str]:
    """Run ``workflow`` of the bundle copy in ``work`` with ``overlay`` on 2 processes; each rank's output."""
    files = [f"configs/{part}.json" for part in [*WORKFLOWS[workflow], overlay]]
    cmd = [
        str(TORCHRUN), "--standalone", f"--nproc_per_node={RANKS}", "--tee", "3",
        # train.json's workflow is its "run" list (its "train" entry holds the trainer's parts)
        "-m", "monai.bundle", "run", "run" if workflow == "train" else workflow, "--config_file", str(files), *overrides,
    ]  # fmt: skip
    # hidden GPUs: the overlays would otherwise give the ranks NCCL and one GPU each, which a one-GPU machine lacks
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path), "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    per_rank: dict[int, list[str]] = {rank: [] for rank in range(RANKS)}
    for line in (res.stdout + res.stderr).splitlines():
        tagged = re.match(r"\[default(\d+)\]:(.*)", line)
        if tagged:
            per_rank[int(tagged[1])].append(tagged[2])
    return {rank: "\n".join(lines) for rank, lines in per_rank.items()}


@pytest.fixture(scope="module")
def demo_copy(tmp_path_factory):
    """A copy of the BraTS bundle with the demo data, and an RTN W4A8 checkpoint quantized from it."""
    work = copy_bundle(NAME, tmp_path_factory.mktemp("distributed") / NAME)
    demo_dataset(work / "data" / "demo", "brats")
    bundle(NAME, "quantize", "--method", "rtn", "--export_dir", "", *_in(work, "eval"))
    return work


def _in(work: Path, output: str) -> list[str]:
    """Overrides that run a workflow on the copy's demo data and checkpoints, writing to ``work/output``."""
    return ["--dataset_dir", str(work / "data" / "demo"), "--ckpt_dir", str(work / "models"), "--output_dir", str(work / output)]


def _per_case(folder: Path) -> list[list[str]]:
    with open(folder / "dice_raw.csv") as f:
        return list(csv.reader(f))


def test_rank_cases_gives_each_case_to_exactly_one_rank_in_contiguous_blocks():
    cases = [{"image": f"case{i}.nii.gz"} for i in range(7)]
    shares = [rank_cases(cases, rank, 3) for rank in range(3)]
    assert [len(s) for s in shares] == [2, 2, 3]
    assert [c for share in shares for c in share] == cases  # in rank order: one process's order
    with pytest.raises(UserInputError, match="at most 7"):
        rank_cases(cases, 0, 8)


@pytest.mark.slow
def test_evaluation_shared_by_two_ranks_gives_the_dice_of_one_process(demo_copy):
    work = demo_copy
    with torch_threads(1):  # as each torchrun worker (OMP_NUM_THREADS=1)
        bundle(NAME, "evaluate", "--method", "rtn", *_in(work, "eval_one"))
    logs = torchrun(work, "evaluate", "multi_gpu_evaluate", "--method", "rtn", *_in(work, "eval_two"))

    one = json.loads((work / "eval_one" / "evaluation_rtn_w4a8.json").read_text())
    two = json.loads((work / "eval_two" / "evaluation_rtn_w4a8.json").read_text())
    assert two == one  # every figure, FP32 and quantized, Dice and HD95, bit for bit
    for model in ("FP32", "rtn_w4a8"):
        cases = _per_case(work / "eval_one" / "evaluation_rtn_w4a8_cases" / model)
        assert _per_case(work / "eval_two" / "evaluation_rtn_w4a8_cases" / model) == cases
    names = [Path(row[0]).name for row in cases[1:]]
    shares = {}
    for rank, text in logs.items():
        (taken,) = re.findall(rf"rank {rank} of {RANKS} takes validation cases \d+-\d+ of {len(names)}: (.*)", text)
        shares[rank] = taken.split(", ")
    assert sorted(shares[0] + shares[1]) == sorted(names) and not set(shares[0]) & set(shares[1])
    assert all(shares.values())  # each rank evaluated a share
    assert "dice_mean" in logs[0] and "dice_mean" not in logs[1]  # rank 0 alone prints the table


@pytest.mark.slow
def test_finetune_on_two_ranks_trains_with_one_held_out_decision_and_saves_once(demo_copy, tmp_path):
    work = demo_copy
    logs = torchrun(
        work, "finetune", "multi_gpu_finetune",
        "--method", "rtn", "--calibration_cases", "2", "--steps", "2", "--roi_size", "[32,32,32]", "--calibration_crop", "[32,32,32]",
        "--ckpt_dir", str(tmp_path / "models"), "--fp_checkpoint", str(work / "models" / "model.pt"),
        "--output_dir", str(tmp_path / "eval"), "--export_dir", str(tmp_path / "export"),
    )  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["model_finetuned_rtn_w4a6.pt"]
    assert (tmp_path / "export" / "models" / "model.ts").is_file()  # rank 0 exported
    report = json.loads((tmp_path / "eval" / "quantization_report_finetuned_rtn_w4a6.json").read_text())
    finetune = report["extra"]["finetune"]
    assert finetune["steps"] == 2 and len(finetune["losses"]) == 2
    # the held-out check scored both ranks' windows (2 batches of the 4 training cases each rank samples)
    assert finetune["check"]["windows"] == 2 * RANKS
    assert logs[0].count("fine-tuned quantized checkpoint written to") == 1 and "by rank 0 of 2" in logs[0]
    assert "checkpoint written" not in logs[1] and "rank 1 of 2 finished the fine-tune; rank 0 writes" in logs[1]
    decisions = {rank: re.findall(r"fine-tune (?:starts|ends) at held-out .*|made the network worse.*", text) for rank, text in logs.items()}
    assert decisions[0] and decisions[0] == decisions[1]  # the same scores and the same choice on both ranks
    shutil.rmtree(tmp_path / "export")


@pytest.mark.slow
def test_quantization_shared_by_two_ranks_writes_the_checkpoint_of_one_process(demo_copy, tmp_path):
    work = demo_copy
    # EfficientQ on 2 cases of two windows each: each rank holds one case's windows
    settings = [
        "--calibration_cases", "2", "--calibration_crop", "[48,32,32]", "--sw_roi_size", "[32,32,32]", "--export_dir", "",
        "--dataset_dir", str(work / "data" / "demo"), "--fp_checkpoint", str(work / "models" / "model.pt"),
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    # as each torchrun worker (OMP_NUM_THREADS=1): on 2 threads one process wrote another checkpoint, although the
    # calibration passes give the same bits on 1 and 2 threads (tests/ptq/test_batch_invariance.py)
    with torch_threads(1):
        bundle(NAME, "quantize", *settings, "--ckpt_dir", str(one), "--output_dir", str(tmp_path / "eval_one"))
    logs = torchrun(work, "quantize", "multi_gpu_quantize", *settings, "--ckpt_dir", str(two), "--output_dir", str(tmp_path / "eval_two"))

    (written,) = one.iterdir()
    assert sorted(p.name for p in two.iterdir()) == [written.name]  # rank 0 alone wrote
    report = json.loads((tmp_path / "eval_two" / f"quantization_report_{written.stem[len('model_'):]}.json").read_text())
    assert report["method"] == "efficientq"
    shares = {rank: re.findall(rf"rank {rank} of {RANKS}: calibration windows (\d+) to (\d+) of (\d+)", text) for rank, text in logs.items()}
    (first, last, total), (second, end, total_too) = shares[0][0], shares[1][0]
    assert (int(first), int(last) + 1, int(end) + 1) == (0, int(second), int(total)) and total == total_too == "4"  # each its own case's two windows
    assert all("all-reduce:" in text for text in logs.values())
    assert (two / written.name).read_bytes() == written.read_bytes()  # codes, scales, biases, report: bit for bit


@pytest.mark.slow
def test_training_on_two_ranks_validates_on_both_and_rank_zero_keeps_the_best_weights(demo_copy, tmp_path):
    work = demo_copy
    logs = torchrun(
        work, "train", "multi_gpu_train",
        "--max_epochs", "2", "--val_interval", "1", "--roi_size", "[32,32,32]", "--dataset_dir", str(work / "data" / "demo"),
        "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval"),
    )  # fmt: skip
    models = tmp_path / "models"
    assert sorted(p.name for p in models.iterdir()) == ["model.pt", "model_best.pt", "model_final.pt"]
    assert (models / "model.pt").read_bytes() == (models / "model_best.pt").read_bytes()
    chosen = re.findall(r"the weights of the best validation \((\d\.\d{4}) at epoch ([12])\)", logs[0])
    assert len(chosen) == 1 and "the weights of the best validation" not in logs[1]
    # the key metric gathered both ranks' validation cases: rank 0 logged it for the epoch it chose
    scores = dict(re.findall(r"Epoch\[(\d)\] Metrics -- .*?mean_dice: (\d\.\d{4})", logs[0]))
    assert scores.get(chosen[0][1]) == chosen[0][0], logs[0][-3000:]
    torch.load(models / "model.pt", weights_only=True)  # a plain state dict, as train.json writes it
