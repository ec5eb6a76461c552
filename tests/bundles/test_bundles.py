"""The bundle commands end to end, through ``python -m monai.bundle``, on tiny synthetic NIfTI data."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from monai_effq.data import make_brats_demo, make_lits_demo, make_msd_demo

from .conftest import BUNDLES, ROI, ROOT, WORKFLOWS, bundle, config_files, copy_bundle


@pytest.fixture(scope="module", params=list(BUNDLES))
def trained(request, tmp_path_factory):
    """A bundle trained for one epoch on three tiny demo cases, in a scratch folder."""
    name = request.param
    dataset, classes = BUNDLES[name]
    work = tmp_path_factory.mktemp(name)
    make = make_brats_demo if dataset == "brats" else make_lits_demo
    data = make(work / "data", n_cases=3, shape=(32, 32, 32), seed=3)
    common = [
        "--dataset_dir", str(data), "--ckpt_dir", str(work / "models"), "--output_dir", str(work / "eval"),
        "--export_dir", "",  # the export has tests of its own
    ]  # fmt: skip
    bundle(name, "train", *common, "--max_epochs", "1", "--roi_size", ROI)
    assert (work / "models" / "model.pt").is_file()
    return name, work, common, classes


@pytest.mark.slow
def test_quantize_calibrates_on_every_window_of_whole_volumes_by_default(trained):
    name, work, common, _ = trained
    bundle(name, "quantize", *common, "--weight_bits", "4", "--calibration_cases", "2", "--calibration_roi", "[16,16,16]")
    report = json.loads((work / "eval" / "quantization_report_w4a8.json").read_text())
    first = report["layers"][0]
    # two whole 32^3 cases in 16^3 windows: every voxel of both reached the first layer (stride 1 or 2)
    assert first["voxels"] in (2 * 32**3, 2 * 16**3)
    assert any(layer["mse_holdout"] is not None for layer in report["layers"])  # every 4th window held out
    assert all(layer["mse_holdout"] <= layer["mse_holdout_rtn"] for layer in report["layers"] if layer["mse_holdout"] is not None)


@pytest.mark.slow
def test_quantize_and_evaluate_run_from_the_bundle_configs(trained):
    name, work, common, classes = trained
    bundle(name, "quantize", *common, "--weight_bits", "3", "--calibration_crop", ROI)
    assert (work / "models" / "model_w3a8.pt").is_file()
    assert not (ROOT / "bundles" / name / "export" / f"{name}_w3a8").exists()  # --export_dir "" exports nothing
    report = json.loads((work / "eval" / "quantization_report_w3a8.json").read_text())
    # the body: the LiTS UNet's first residual unit has two layers that read the image (first-layer bits)
    assert {layer["weight_bits"] for layer in report["layers"][2 if name == "lits_effq" else 1 : -1]} == {3}
    assert (work / "eval" / "quantization_report_w3a8_layers.png").stat().st_size > 1000

    res = bundle(name, "evaluate", *common, "--weight_bits", "3", "--sw_roi_size", ROI)
    rows = json.loads((work / "eval" / "evaluation_w3a8.json").read_text())
    assert [r["model"] for r in rows] == ["FP32", "W3A8"]
    assert all(0.0 <= r[f"dice_{c}"] <= 1.0 for r in rows for c in classes)
    assert "dice_mean" in res.stdout and (work / "eval" / "evaluation_w3a8.csv").is_file()


@pytest.mark.slow
def test_finetune_from_efficientq_writes_what_quantize_writes_and_evaluate_reads_it(trained):
    name, work, common, classes = trained
    bundle(name, "finetune", *common, "--steps", "3", "--weight_bits", "4", "--act_bits", "6", "--roi_size", ROI, "--calibration_crop", ROI)
    report = json.loads((work / "eval" / "quantization_report_w4a6.json").read_text())
    assert report["method"] == "efficientq+qat"
    assert report["extra"]["finetune"]["steps"] == 3 and report["extra"]["finetune"]["init"] == "efficientq"
    assert {layer["act_bits"] for layer in report["layers"][2 if name == "lits_effq" else 1 : -1]} == {6}
    assert report["extra"]["finetune"]["check"]["kept"] in ("start", "end")  # the held-out check ran
    assert (work / "eval" / "quantization_report_w4a6_finetune_loss.png").is_file()
    bundle(name, "evaluate", *common, "--weight_bits", "4", "--act_bits", "6", "--sw_roi_size", ROI)
    rows = json.loads((work / "eval" / "evaluation_w4a6.json").read_text())
    assert [r["model"] for r in rows] == ["FP32", "W4A6"]


@pytest.mark.slow
def test_finetune_from_fp_with_power_of_two_scales(trained):
    name, work, common, _ = trained
    if name != "lits_effq":
        pytest.skip("one bundle is enough for the FP start")
    bundle(name, "finetune", *common, "--steps", "2", "--init", "fp", "--power_of_two", "True", "--weight_bits", "3", "--roi_size", ROI, "--calibration_crop", ROI)
    report = json.loads((work / "eval" / "quantization_report_w3a6.json").read_text())
    assert report["method"] == "fp+qat" and report["folded_batchnorms"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUNDLES))
def test_bundle_metadata_and_network_shapes_verify(name):
    meta = ROOT / "bundles" / name / "configs" / "metadata.json"
    schema = ROOT / "bundles" / "schema" / "meta_schema.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args in (
        ["verify_metadata", "--meta_file", str(meta), "--filepath", str(schema)],
        ["verify_net_in_out", "network_def", "--meta_file", str(meta), "--config_file", str(meta.parent / "inference.json")],
    ):
        res = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=ROOT, capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "verified with no error" in res.stdout + res.stderr


@pytest.mark.slow
def test_a_decathlon_dataset_can_be_passed_on_the_command_line(tmp_path):
    task = make_msd_demo(tmp_path / "Task01_BrainTumour", task="Task01_BrainTumour", n_cases=3, shape=(32, 32, 32), seed=4)
    common = ["--dataset_dir", str(task), "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval"), "--export_dir", ""]
    bundle("brats_effq", "train", *common, "--max_epochs", "1", "--roi_size", ROI)
    bundle("brats_effq", "quantize", *common, "--weight_bits", "2", "--method", "rtn", "--calibration_crop", ROI)
    assert (tmp_path / "models" / "model_w2a8.pt").is_file()


@pytest.mark.slow
def test_a_wrong_dataset_path_is_a_one_line_error_naming_it(tmp_path):
    res = bundle("lits_effq", "quantize", "--dataset_dir", str(tmp_path / "no_such_data"), check=False)
    assert res.returncode != 0
    assert "no_such_data" in res.stderr.splitlines()[-1] or "no_such_data" in res.stderr


@pytest.mark.slow
def test_a_corrupt_nifti_is_an_error_naming_the_file(tmp_path):
    data = make_lits_demo(tmp_path / "data", n_cases=3, shape=(32, 32, 32), seed=5)
    victim = sorted(data.rglob("volume-*.nii*"))[0]
    victim.write_bytes(victim.read_bytes()[:200])
    res = bundle("lits_effq", "quantize", "--dataset_dir", str(data), "--ckpt_dir", str(tmp_path / "m"), check=False)
    assert res.returncode != 0
    assert victim.name in res.stderr
    assert not (tmp_path / "m").exists() or not list((tmp_path / "m").glob("model_*.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUNDLES))
def test_the_openvino_evaluate_overlay_matches_the_fake_quant_dice_on_the_demo_data(name, tmp_path):
    pytest.importorskip("openvino")
    args = [
        "--fp_checkpoint", str(ROOT / "bundles" / name / "models" / "model.pt"),
        "--quantized_path", str(tmp_path / "model_w4a8.pt"),
        "--output_dir", str(tmp_path / "eval"),
        "--export_dir", "",
    ]  # fmt: skip
    bundle(name, "quantize", *args, "--method", "rtn")
    bundle(name, "evaluate", *args, overlay="evaluate_openvino")
    rows = json.loads((tmp_path / "eval" / "evaluation_w4a8_openvino.json").read_text())
    assert [r["model"] for r in rows] == ["FP32", "W4A8", "W4A8 OpenVINO"]
    assert abs(rows[2]["dice_mean"] - rows[1]["dice_mean"]) <= 0.002, rows
    assert rows[2]["dice_mean"] > 0.5  # the demo networks are trained: a broken export would not get here
    assert (tmp_path / "model_w4a8.onnx").is_file()


@pytest.mark.slow
def test_the_inference_overlay_writes_masks_with_onnx_runtime_and_names_the_extra_when_missing(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    name, work, common, _ = trained
    if name != "lits_effq":
        pytest.skip("one bundle is enough: the OpenVINO evaluate test exports both")
    bundle(name, "quantize", *common, "--weight_bits", "4", "--method", "rtn", "--calibration_crop", ROI)
    seg = tmp_path / "seg"
    bundle(name, "inference", *common, "--sw_roi_size", ROI, "--runtime", "onnxruntime", "--output_dir", str(seg), overlay="inference_openvino")
    assert list(seg.glob("*_seg.nii.gz"))
    assert (work / "models" / "model_w4a8.onnx").is_file()

    hidden = tmp_path / "hide"
    (hidden / "openvino").mkdir(parents=True)
    (hidden / "openvino" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    res = bundle(
        name, "inference", *common, "--sw_roi_size", ROI, "--output_dir", str(seg),
        overlay="inference_openvino", env={"PYTHONPATH": str(hidden)}, check=False,
    )  # fmt: skip
    assert res.returncode != 0
    assert "pip install 'monai-effq[deploy]'" in res.stderr


@pytest.mark.slow
def test_every_workflow_of_both_bundles_has_the_model_zoo_properties(trained):
    from monai.bundle import ConfigWorkflow

    name, work, common, _ = trained
    overrides = dict(zip((k.lstrip("-") for k in common[::2]), common[1::2]))
    for workflow in WORKFLOWS:
        kind = "infer" if workflow == "inference" else "train"
        flow = ConfigWorkflow(
            config_file=config_files(name, workflow), workflow_type=kind, logging_file=False,
            bundle_root=str(ROOT / "bundles" / name), **overrides, steps=1,
        )  # fmt: skip
        flow.initialize()
        assert flow.check_properties() == [], (name, workflow)
        assert "run" in flow.parser, (name, workflow)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUNDLES))
def test_a_copy_of_the_bundle_quantizes_and_infers_from_inside_its_folder_with_default_settings(name, quantized_copy, tmp_path):
    copy, masks, log = quantized_copy(name)  # quantize, then exactly: python -m monai.bundle run --config_file configs/inference.json
    assert (copy / "models" / "model_w4a8.pt").is_file()
    assert masks
    assert "wrote" in log and "INFO" in log  # logging.conf applies: the workflow says what it wrote

    # the exported bundle serves the same masks from its TorchScript file alone
    served = copy / "export" / f"{name}_w4a8"
    assert not (served / "models" / "model.pt").exists()
    bundle(name, "inference", "--dataset_dir", str(copy / "data" / "demo"), "--output_dir", str(tmp_path / "ts"), cwd=served)
    for mask in masks:
        ours, traced = (nib.load(str(p)).get_fdata() for p in (mask, tmp_path / "ts" / mask.name))
        assert np.array_equal(ours, traced), mask.name


@pytest.mark.slow
def test_inference_never_generates_the_demo_data_and_says_how_to_get_images(tmp_path):
    copy = copy_bundle("lits_effq", tmp_path / "lits_effq")
    res = bundle("lits_effq", "inference", cwd=copy, check=False)
    assert res.returncode != 0
    assert "never generates the demo data" in res.stderr and "--dataset_dir" in res.stderr
    assert not (copy / "data").exists()


@pytest.mark.parametrize("name", list(BUNDLES))
def test_the_bundle_folder_has_the_model_zoo_files_and_its_weights_match_large_files_yml(name):
    import hashlib
    import re

    root = ROOT / "bundles" / name
    for part in ("configs/metadata.json", "configs/inference.json", "configs/train.json", "configs/logging.conf",
                 "models/model.pt", "docs/README.md", "docs/data_license.txt", "LICENSE", "large_files.yml"):  # fmt: skip
        assert (root / part).is_file(), part
    listed = re.findall(r'path: "([^"]+)"\s+hash_val: "([0-9a-f]+)"\s+hash_type: "md5"', (root / "large_files.yml").read_text())
    assert listed
    for path, md5 in listed:
        assert hashlib.md5((root / path).read_bytes()).hexdigest() == md5, path
    readme = (root / "docs" / "README.md").read_text()
    for section in ("# Model Overview", "## Data", "## Input", "## Output", "## Performance", "## MONAI Bundle Commands", "# References", "# License"):
        assert f"\n{section}\n" in f"\n{readme}", section
