"""The bundle workflows with a user's own set-up: a Decathlon dataset folder, a restrictive umask, less memory."""

import os

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_effq.bundle import datalist
from monai_effq.data import DatasetError, make_lits_demo, make_msd_demo
from monai_effq.utils.errors import UserInputError, find_user_error

from .conftest import ROI, ROOT, bundle, config_files


@pytest.mark.slow
def test_a_decathlon_dataset_can_be_passed_on_the_command_line(tmp_path):
    task = make_msd_demo(tmp_path / "Task01_BrainTumour", task="Task01_BrainTumour", n_cases=3, shape=(32, 32, 32), seed=4)
    common = ["--dataset_dir", str(task), "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval"), "--export_dir", ""]
    bundle("brats_effq", "train", *common, "--max_epochs", "1", "--roi_size", ROI)
    bundle("brats_effq", "quantize", *common, "--weight_bits", "2", "--method", "rtn", "--calibration_crop", ROI)
    assert (tmp_path / "models" / "model_rtn_w2a8.pt").is_file()


@pytest.mark.slow
def test_every_workflow_output_gets_the_mode_the_umask_gives(tmp_path):
    data = make_lits_demo(tmp_path / "data", n_cases=3, shape=(32, 32, 32), seed=6)
    out = tmp_path / "out"
    common = ["--dataset_dir", str(data), "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval"), "--method", "rtn"]
    old = os.umask(0o027)
    try:
        bundle("lits_effq", "train", *common, "--max_epochs", "1", "--roi_size", ROI)
        bundle("lits_effq", "quantize", *common, "--calibration_crop", ROI, "--export_dir", str(out / "export"))
        bundle("lits_effq", "evaluate", *common, "--sw_roi_size", ROI)
        bundle("lits_effq", "inference", *common, "--sw_roi_size", ROI, "--output_dir", str(out / "seg"))
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".pt", ".json", ".csv", ".png", ".ts", ".gz"} <= kinds, kinds
    assert {p.relative_to(out).as_posix(): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o777 != 0o640} == {}
    folders = [p for p in out.rglob("*") if p.is_dir()]
    assert {p.relative_to(out).as_posix(): oct(p.stat().st_mode & 0o777) for p in folders if p.stat().st_mode & 0o777 != 0o750} == {}


def test_training_stopped_by_a_bad_validation_label_keeps_its_last_weights(tmp_path):
    data = make_lits_demo(tmp_path / "data", n_cases=3, shape=(32, 32, 32), seed=6)
    (case,) = datalist(data, "lits", "val")
    label = nib.load(case["label"])
    values = np.asarray(label.dataobj).copy()
    values[0, 0, 0] = 5  # found only when validation reads it (--cache_rate 0 reads no case before training)
    nib.save(nib.Nifti1Image(values, label.affine, label.header), case["label"])
    models = tmp_path / "models"
    with pytest.raises(RuntimeError) as stopped:  # the bundle command reports the DatasetError in its chain
        bundle(
            "lits_effq", "train", "--dataset_dir", str(data), "--ckpt_dir", str(models), "--max_epochs", "1",
            "--val_interval", "1", "--cache_rate", "0", "--roi_size", ROI,
        )
    error = find_user_error(stopped.value)
    assert isinstance(error, DatasetError) and "has values {5} outside the allowed set" in str(error)
    assert sorted(p.name for p in models.iterdir()) == ["model_final.pt"]  # the epoch's weights; no model.pt of an unfinished run
    assert torch.load(models / "model_final.pt", weights_only=True)


@pytest.mark.parametrize("rate, cached", [(0.0, 0), (0.5, 1), (1.0, 3)])  # MONAI rounds down
def test_cache_rate_sets_how_many_training_cases_are_kept_in_memory(tmp_path, rate, cached):
    from monai.bundle import ConfigParser

    data = make_lits_demo(tmp_path / "data", n_cases=4, shape=(32, 32, 32), seed=2)  # 3 training cases, 1 validation
    parser = ConfigParser()
    parser.read_config(config_files("lits_effq", "train"))
    for key, value in {"bundle_root": str(ROOT / "bundles" / "lits_effq"), "dataset_dir": str(data), "cache_rate": rate}.items():
        parser[key] = value
    dataset = parser.get_parsed_content("train#dataset")
    assert len(dataset) == 3 and dataset.cache_num == cached


@pytest.mark.parametrize("rate", [1.5, -0.2, "half", True])
def test_a_cache_rate_outside_0_to_1_is_refused_naming_the_setting(rate):
    from monai_effq.bundle import cache_rate

    with pytest.raises(UserInputError, match=r"cache_rate must be a number from 0 to 1 .*got"):
        cache_rate(rate)
