"""What a user sees when a bundle workflow gets bad input: one line on stderr, no traceback, nothing written.

Each case runs the real command, ``python -m monai.bundle run``, in a subprocess (about 5 s of
imports each), on a small LiTS-layout dataset of this test's own.
"""

from pathlib import Path

import pytest
import torch

from monai_effq.bundle import datalist
from monai_effq.data import make_lits_demo
from monai_effq.utils.errors import DEBUG_ENV

from .conftest import bundle


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Three small LiTS cases; calibration uses training case 0."""
    folder = tmp_path_factory.mktemp("lits")
    make_lits_demo(folder, n_cases=3, shape=(32, 32, 32), seed=0)
    return folder


@pytest.fixture(scope="module")
def truncated(tmp_path_factory, dataset) -> tuple[Path, Path]:
    """A copy of the dataset whose calibration image is cut short (its header still parses)."""
    folder = tmp_path_factory.mktemp("lits_truncated")
    for path in dataset.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    image = Path(datalist(folder, "lits", "train")[0]["image"])
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    return folder, image


def _outputs(root: Path) -> tuple[str, ...]:
    out = root / "out"
    return (
        "--output_dir", str(out), "--quantized_path", str(out / "model_q.pt"), "--export_dir", str(out / "export"),
    )


def _assert_one_line(res, root: Path, message: str) -> None:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode != 0, res.stdout[-2000:]
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    assert lines[-1].startswith("error: "), res.stderr[-3000:]
    assert message in lines[-1], lines[-1]
    assert not (root / "out").exists() or not any((root / "out").rglob("*")), "the failed run wrote output"


CASES = {
    "missing dataset folder": ((), "does not exist or is not a folder"),
    "weight bits as a word": (("--weight_bits", "four"), "weight_bits must be an integer from 2 to 8, got 'four'"),
    "weight bits out of range": (("--weight_bits", "9"), "weight_bits must be an integer from 2 to 8, got 9."),
    "calibration case past the end": (("--calibration_case", "99"), "calibration_case 99 is past the end of the 2 training cases"),
    "zero calibration crop": (("--calibration_crop", "[0,0,0]"), "each calibration_crop size must be an integer of at least 1, got 0"),
    "crop smaller than the downsampling": (
        ("--calibration_crop", "[12,12,12]", "--calibration_roi", "[12,12,12]"),
        "does not fit the network",
    ),
    "missing checkpoint": (("--fp_checkpoint", "missing/model.pt"), "FP checkpoint"),
    "a GPU this machine lacks": (("--device", "cuda:7"), "device 'cuda:7' was asked for but this machine has"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_quantize_input_ends_with_one_line_and_writes_nothing(case, dataset, tmp_path):
    overrides, message = CASES[case]
    if case == "a GPU this machine lacks" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    folder = tmp_path / "absent" if case == "missing dataset folder" else dataset
    res = bundle("lits_effq", "quantize", "--dataset_dir", str(folder), *_outputs(tmp_path), *overrides, check=False)
    _assert_one_line(res, tmp_path, message)


def test_truncated_calibration_image_is_named_before_the_network_runs(truncated, tmp_path):
    folder, image = truncated
    res = bundle("lits_effq", "quantize", "--dataset_dir", str(folder), *_outputs(tmp_path), check=False)
    _assert_one_line(res, tmp_path, f"corrupt or unreadable NIfTI file {image}")


def test_debug_switch_keeps_the_traceback(dataset, tmp_path):
    res = bundle(
        "lits_effq", "quantize", "--dataset_dir", str(dataset), *_outputs(tmp_path), "--weight_bits", "9",
        check=False, env={DEBUG_ENV: "1"},
    )
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "UserInputError: weight_bits must be an integer" in res.stderr


def test_inference_on_a_gpu_this_machine_lacks_ends_with_one_line_and_writes_nothing(dataset, tmp_path):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    res = bundle(
        "lits_effq", "inference", "--dataset_dir", str(dataset), "--output_dir", str(tmp_path / "out"),
        "--device", "cuda:7", check=False,
    )  # fmt: skip
    _assert_one_line(res, tmp_path, "device 'cuda:7' was asked for but this machine has")
