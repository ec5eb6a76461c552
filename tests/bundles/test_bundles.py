"""The bundle commands end to end, through ``python -m monai.bundle``, on tiny synthetic NIfTI data.

The copies of the shipped bundles are tested in test_copies.py, a user's own set-ups (a Decathlon
folder, a umask) in test_user_setups.py: files of their own, so that pytest-xdist can run them
beside this one.
"""

import csv
import json
import logging
import math
import os
import re
from pathlib import Path

import pytest
import torch
from monai.utils import ensure_tuple

from monai_effq.bundle import datalist
from monai_effq.data import LITS_SEGMENTS, make_brats_demo, make_lits_demo, split_datalist
from monai_effq.utils.errors import find_user_error

from ..brats2023 import as_brats2023
from ..dicom import BRATS_COMPARTMENTS, write_dicom_case, write_dicom_series, write_rtstruct_case
from .conftest import BUNDLES, ROI, ROOT, WORKFLOWS, bundle, config_files


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
    # validated after each epoch: model.pt is then the checkpoint of the best validation
    res = bundle(name, "train", *common, "--max_epochs", "2", "--val_interval", "1", "--roi_size", ROI)
    models = work / "models"
    # the run list reads the validator's own record (equal files alone would not show it: the best is often the last)
    assert re.search(r"model\.pt: the weights of the best validation \(\d\.\d{4} at epoch [12]\)", res.stdout), res.stdout[-2000:]
    assert (models / "model_best.pt").read_bytes() == (models / "model.pt").read_bytes()
    assert (models / "model_final.pt").is_file()
    return name, work, common, classes


@pytest.fixture(scope="module")
def rtn_w4a8(trained):
    """The trained bundle quantized by round-to-nearest at W4A8 (``models/model_rtn_w4a8.pt``), for the tests
    that need a quantized checkpoint but not a particular one."""
    name, work, common, classes = trained
    bundle(name, "quantize", *common, "--weight_bits", "4", "--method", "rtn", "--calibration_crop", ROI, "--overwrite", "True")
    return name, work, common, classes


@pytest.mark.slow
def test_quantize_calibrates_on_every_window_of_whole_volumes_by_default(trained):
    name, work, common, _ = trained
    bundle(name, "quantize", *common, "--weight_bits", "4", "--calibration_cases", "2", "--calibration_roi", "[16,16,16]")
    report = json.loads((work / "eval" / "quantization_report_efficientq_w4a8.json").read_text())
    first = report["layers"][0]
    # two whole 32^3 cases in 16^3 windows: every voxel of both reached the first layer (stride 1 or 2)
    assert first["voxels"] in (2 * 32**3, 2 * 16**3)
    assert any(layer["mse_holdout"] is not None for layer in report["layers"])  # every 4th window held out
    assert all(layer["mse_holdout"] <= layer["mse_holdout_rtn"] for layer in report["layers"] if layer["mse_holdout"] is not None)


@pytest.mark.slow
def test_quantize_calibrates_on_unlabelled_images_as_on_the_labelled_training_case_they_are(trained, tmp_path):
    name, work, common, _ = trained
    dataset = BUNDLES[name][0]
    train = datalist(work / "data", dataset, "train")
    fast = ["--method", "rtn", "--calibration_crop", ROI, "--calibration_roi", ROI, "--ckpt_dir", str(work / "models"), "--export_dir", ""]

    def quantized(tag: str, *calibration: str) -> dict:
        out = tmp_path / tag
        bundle(name, "quantize", "--dataset_dir", str(work / "data"), "--output_dir", str(out), "--quantized_path", str(out / "q.pt"), *fast, *calibration)
        archive = torch.load(out / "q.pt", weights_only=True)
        return {"codes": archive["codes"], **{f"data.{k}": v for k, v in archive["data"].items()}}

    # the first training case, as a scanner's archive hands it out: DICOM series, no label
    images = list(ensure_tuple(train[0]["image"]))  # BraTS: its four contrasts
    series = [str(tmp_path / "series" / str(i)) for i in range(len(images))]
    for i, (image, folder) in enumerate(zip(images, series)):
        write_dicom_series(image, folder, series_uid=f"1.2.826.0.1.3680043.2.1125.{i + 1}")
    labelled = quantized("labelled")  # the default: training case 0 with its label
    from_series = quantized("series", "--calibration_images", repr([series if dataset == "brats" else series[0]]))
    other = quantized("other", "--calibration_images", repr([train[1]["image"]]))
    assert all(torch.equal(labelled[k], from_series[k]) for k in labelled)
    if dataset == "brats":  # the four contrasts without the list around them: four one-channel cases
        with pytest.raises(Exception) as flat:
            quantized("flat", "--calibration_images", repr(images))
        assert "is one 3D image, but a BraTS case is its four contrasts" in str(find_user_error(flat.value))
    assert not all(torch.equal(labelled[k], other[k]) for k in labelled)  # the calibration data decides the activation grids


@pytest.mark.slow
def test_calibration_flips_calibrate_on_the_crop_and_its_mirror_images(trained):
    name, work, common, _ = trained
    bundle(name, "quantize", *common, "--method", "rtn", "--weight_bits", "5", "--calibration_crop", ROI, "--calibration_roi", ROI, "--calibration_flips", "True")
    report = json.loads((work / "eval" / "quantization_report_rtn_w5a8.json").read_text())
    # the crop (one window) and its 7 mirror images reached the first layer (the LiTS UNet's has stride 2)
    crop = math.prod(json.loads(ROI)) // (8 if name == "lits_effq" else 1)
    assert report["layers"][0]["voxels"] == 8 * crop


@pytest.mark.slow
def test_quantize_and_evaluate_run_from_the_bundle_configs(trained):
    name, work, common, classes = trained
    bundle(name, "quantize", *common, "--weight_bits", "3", "--calibration_crop", ROI)
    assert (work / "models" / "model_efficientq_w3a8.pt").is_file()
    assert not (ROOT / "bundles" / name / "export" / f"{name}_efficientq_w3a8").exists()  # --export_dir "" exports nothing
    report = json.loads((work / "eval" / "quantization_report_efficientq_w3a8.json").read_text())
    # the body: the LiTS UNet's first residual unit has two layers that read the image (first-layer bits)
    assert {layer["weight_bits"] for layer in report["layers"][2 if name == "lits_effq" else 1 : -1]} == {3}
    assert (work / "eval" / "quantization_report_efficientq_w3a8_layers.png").stat().st_size > 1000

    res = bundle(name, "evaluate", *common, "--weight_bits", "3", "--sw_roi_size", ROI)
    rows = json.loads((work / "eval" / "evaluation_efficientq_w3a8.json").read_text())
    assert [r["model"] for r in rows] == ["FP32", "efficientq_w3a8"]
    assert all(0.0 <= r[f"dice_{c}"] <= 1.0 for r in rows for c in classes)
    assert "dice_mean" in res.stdout and (work / "eval" / "evaluation_efficientq_w3a8.csv").is_file()
    # the quantized network's labels against the FP network's, which the loader left FP for the comparison
    assert "fp_agreement" not in rows[0] and 0.5 < rows[1]["fp_agreement"] <= 1.0
    assert "fp_agreement" in res.stdout


@pytest.mark.slow
def test_evaluation_on_dicom_series_with_seg_or_rtstruct_labels_scores_each_case_as_on_its_nifti_files(rtn_w4a8, tmp_path):
    pytest.importorskip("highdicom")
    name, work, common, classes = rtn_w4a8
    dataset = BUNDLES[name][0]
    task = tmp_path / "dicom"  # a Decathlon-style dataset.json naming series folders and SEG files
    entries = []
    # BraTS: SEGs of necrosis, oedema and enhancing tumour, which --seg_segments maps to the Decathlon's labels
    segments, mapping = (BRATS_COMPARTMENTS, ["--seg_segments", "{'NCR': 2, 'ED': 1, 'ET': 3}"]) if dataset == "brats" else (LITS_SEGMENTS, [])
    cases = datalist(work / "data", dataset, "all")
    # LiTS: the labels of the first evaluated case, and of every other training case, are a radiotherapy plan's contours
    evaluated = [i for i, case in enumerate(cases) if case in split_datalist(cases)[1]]
    contoured = {evaluated[0]} | set(range(1, len(cases), 2)) - set(evaluated[1:]) if dataset == "lits" else set()
    for i, case in enumerate(cases):
        if i in contoured:
            entry = write_rtstruct_case(case, task / f"case{i}", {"liver": (1, 2), "liver tumour": (2,)})
        else:
            entry = write_dicom_case(case, task / f"case{i}", segments)
        entries.append({k: [f"./{os.path.relpath(p, task)}" for p in v] if isinstance(v, list) else f"./{os.path.relpath(v, task)}" for k, v in entry.items()})
    (task / "dataset.json").write_text(json.dumps({"name": dataset, "training": entries}))
    scores, archives = {}, {}
    for source, data in (("nifti", work / "data"), ("dicom", task)):
        out, given = tmp_path / source, ["--dataset_dir", str(data), "--output_dir", str(tmp_path / source), *(mapping if source == "dicom" else [])]
        bundle(name, "evaluate", *common, "--method", "rtn", "--sw_roi_size", ROI, *given)
        cases = out / "evaluation_rtn_w4a8_cases"
        scores[source] = {
            model: [row[1:] for row in csv.reader((cases / model / "dice_raw.csv").open())][1:] for model in ("FP32", "rtn_w4a8")
        }
        if dataset == "lits":  # EfficientQ's class attention weighs each calibration voxel by its label (one bundle is enough)
            bundle(name, "quantize", *common, "--calibration_crop", ROI, "--quantized_path", str(out / "q.pt"), *given)
            archives[source] = torch.load(out / "q.pt", weights_only=True)
    if dataset == "lits":  # training crops around the labels the SEGs give
        bundle(name, "train", *common, "--max_epochs", "1", "--roi_size", ROI, "--dataset_dir", str(task), "--ckpt_dir", str(tmp_path / "trained"))
        assert (tmp_path / "trained" / "model.pt").is_file()
    # BraTS: the layout of a dataset.json is the Decathlon's, whose label convention --seg_segments paints the SEG in
    assert scores["dicom"] == scores["nifti"] and all(len(rows) >= 1 for rows in scores["nifti"].values())
    assert any(float(v) > 0 for row in scores["nifti"]["FP32"] for v in row)
    if archives:
        nifti, dicom = ({"codes": a["codes"], **{f"data.{k}": v for k, v in a["data"].items()}} for a in archives.values())
        assert [k for k in nifti if not torch.equal(nifti[k], dicom[k])] == []


@pytest.mark.slow
def test_a_brats_2023_release_folder_evaluates_each_case_as_the_2020_release_of_it(rtn_w4a8, tmp_path):
    name, work, common, _ = rtn_w4a8
    if BUNDLES[name][0] != "brats":
        pytest.skip("the BraTS 2023 layout is a BraTS release")
    release_2023 = as_brats2023(work / "data", tmp_path / "BraTS2023")
    scores = {}
    for source, data in (("2020", work / "data"), ("2023", release_2023)):
        bundle(name, "evaluate", *common, "--method", "rtn", "--sw_roi_size", ROI, "--dataset_dir", str(data), "--output_dir", str(tmp_path / source))
        cases = tmp_path / source / "evaluation_rtn_w4a8_cases"
        scores[source] = {model: [row[1:] for row in csv.reader((cases / model / "dice_raw.csv").open())][1:] for model in ("FP32", "rtn_w4a8")}
    # the same cases, TC/WT/ET from 2023's labels (ET 3, not 4; TC necrosis and enhancing tumour)
    assert scores["2023"] == scores["2020"] and any(float(v) > 0 for row in scores["2020"]["FP32"] for v in row)


@pytest.mark.slow
def test_finetune_from_efficientq_writes_its_own_checkpoint_and_evaluate_reads_it_by_its_tag(trained):
    name, work, common, classes = trained
    bundle(name, "finetune", *common, "--steps", "3", "--weight_bits", "4", "--act_bits", "6", "--roi_size", ROI, "--calibration_crop", ROI)
    assert (work / "models" / "model_finetuned_efficientq_w4a6.pt").is_file()
    assert not (work / "models" / "model_efficientq_w4a6.pt").exists()  # the PTQ start is not a checkpoint of the run
    report = json.loads((work / "eval" / "quantization_report_finetuned_efficientq_w4a6.json").read_text())
    assert report["method"] == "efficientq+qat"
    assert report["extra"]["finetune"]["steps"] == 3 and report["extra"]["finetune"]["init"] == "efficientq"
    assert {layer["act_bits"] for layer in report["layers"][2 if name == "lits_effq" else 1 : -1]} == {6}
    assert report["extra"]["finetune"]["check"]["kept"] in ("start", "end")  # the held-out check ran
    assert (work / "eval" / "quantization_report_finetuned_efficientq_w4a6_finetune_loss.png").is_file()
    bundle(name, "evaluate", *common, "--model_tag", "finetuned_efficientq_w4a6", "--sw_roi_size", ROI)
    rows = json.loads((work / "eval" / "evaluation_finetuned_efficientq_w4a6.json").read_text())
    assert [r["model"] for r in rows] == ["FP32", "finetuned_efficientq_w4a6"]


@pytest.mark.slow
def test_finetune_from_fp_with_power_of_two_scales(trained):
    name, work, common, _ = trained
    if name != "lits_effq":
        pytest.skip("one bundle is enough for the FP start")
    # an earlier run's export of the checkpoint this run rewrites without exporting (--export_dir ""): named, then removed
    from monai_effq.bundle import EXPORTED_FROM

    stale = work / "export" / "lits_effq_finetuned_fp_w3a6"
    (stale / "configs").mkdir(parents=True)
    (stale / "configs" / "metadata.json").write_text(json.dumps({EXPORTED_FROM: str(work / "models" / "model_finetuned_fp_w3a6.pt")}))
    args = [*common, "--default_export_dir", str(stale), "--steps", "2", "--init", "fp", "--power_of_two", "True", "--weight_bits", "3"]
    with pytest.raises(Exception) as refused:
        bundle(name, "finetune", *args)
    assert f"{stale} was exported from the checkpoint this run replaces" in str(find_user_error(refused.value))
    bundle(name, "finetune", *args, "--roi_size", ROI, "--calibration_crop", ROI, "--overwrite", "True")
    report = json.loads((work / "eval" / "quantization_report_finetuned_fp_w3a6.json").read_text())
    assert report["method"] == "fp+qat" and report["folded_batchnorms"]
    assert not stale.exists()


def test_a_window_that_spans_an_axis_calibrates_and_is_served_as_given(rtn_w4a8, tmp_path):
    name, work, common, _ = rtn_w4a8
    if name != "lits_effq":
        pytest.skip("one bundle is enough: the ROI is read by the same code")
    export = tmp_path / "export"
    quantize = [*common, "--method", "rtn", "--weight_bits", "3", "--calibration_crop", ROI, "--sw_roi_size", "[32,32,-1]"]
    bundle(name, "quantize", *quantize, "--export_dir", str(export))
    assert json.loads((export / "configs" / "inference.json").read_text())["sw_roi_size"] == [32, 32, -1]
    assert (export / "models" / "model.ts").is_file()


@pytest.mark.parametrize("name", list(BUNDLES))
def test_bundle_metadata_and_network_shapes_verify(name):
    # MONAI's functions behind `python -m monai.bundle verify_*`, in this process: the README's
    # commands, which test_readme runs through the command line, pay the imports for the CLI path
    from monai.bundle import verify_metadata, verify_net_in_out

    meta = ROOT / "bundles" / name / "configs" / "metadata.json"
    schema = ROOT / "bundles" / "schema" / "meta_schema.json"
    said = []
    listener = logging.Handler(logging.INFO)
    listener.emit = lambda record: said.append(record.getMessage())
    log = logging.getLogger("monai.bundle.scripts")
    log.addHandler(listener)
    try:
        verify_metadata(meta_file=str(meta), filepath=str(schema))
        verify_net_in_out("network_def", meta_file=str(meta), config_file=str(meta.parent / "inference.json"))
    finally:
        log.removeHandler(listener)
    assert [m for m in said if "verified with no error" in m] == [
        "metadata is verified with no error.",
        "data shape of network is verified with no error.",
    ]


@pytest.mark.slow
def test_the_inference_overlay_writes_masks_with_onnx_runtime_and_names_the_extra_when_missing(rtn_w4a8, tmp_path):
    pytest.importorskip("onnxruntime")
    name, work, common, _ = rtn_w4a8
    if name != "lits_effq":
        pytest.skip("one bundle is enough: the OpenVINO evaluate test exports both")
    seg = tmp_path / "seg"
    bundle(name, "inference", *common, "--method", "rtn", "--sw_roi_size", ROI, "--runtime", "onnxruntime", "--output_dir", str(seg), overlay="inference_openvino")
    assert list(seg.glob("*_seg.nii.gz"))
    assert (work / "models" / "model_rtn_w4a8.onnx").is_file()

    hidden = tmp_path / "hide"
    (hidden / "openvino").mkdir(parents=True)
    (hidden / "openvino" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    res = bundle(
        name, "inference", *common, "--method", "rtn", "--sw_roi_size", ROI, "--output_dir", str(tmp_path / "seg_openvino"),
        overlay="inference_openvino", env={"PYTHONPATH": str(hidden)}, check=False,
    )  # fmt: skip
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and "pip install 'monai-effq[deploy]'" in res.stderr


@pytest.mark.slow
def test_every_workflow_of_both_bundles_has_the_model_zoo_properties(rtn_w4a8):
    from monai.bundle import ConfigWorkflow

    name, work, common, _ = rtn_w4a8  # the inference workflow's network is the quantized checkpoint
    overrides = {**dict(zip((k.lstrip("-") for k in common[::2]), common[1::2])), "method": "rtn"}
    for workflow in WORKFLOWS:
        kind = "infer" if workflow == "inference" else "train"
        flow = ConfigWorkflow(
            config_file=config_files(name, workflow), workflow_type=kind, logging_file=False,
            bundle_root=str(ROOT / "bundles" / name), **overrides, steps=1,
        )  # fmt: skip
        flow.initialize()
        assert flow.check_properties() == [], (name, workflow)
        assert "run" in flow.parser, (name, workflow)


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


def test_output_names_say_what_made_the_model():
    from monai_effq.bundle import model_tag

    assert model_tag("efficientq", 4, 8) == "efficientq_w4a8"
    assert model_tag("gptq", 4, 8) != model_tag("efficientq", 4, 8)
    # a signed Q0.4 word has 5 bits: named by its format, not as 4- or 5-bit weights
    assert model_tag("finetuned_fp", 5, 6, "Q0.4", "Q6.0") == "finetuned_fp_q0.4aq6.0"
    assert model_tag("finetuned_efficientq", 4, 6) != model_tag("efficientq", 4, 6)
    assert model_tag("rtn", 4, None) == "rtn_w4afp"


@pytest.mark.parametrize("weights, acts", [(" Q0.4", "Q6.0 "), ("Q 0.4", "q6 .0"), ("Q00.04", "Q06.0")])
def test_one_fixed_point_config_written_otherwise_names_its_outputs_alike(weights, acts):
    from monai_effq.bundle import model_tag

    # the config reads these as Q0.4 and Q6.0; evaluate --weight_format Q0.4 must find what quantize wrote
    assert model_tag("finetuned_fp", 5, 6, weights, acts) == "finetuned_fp_q0.4aq6.0"


def test_an_existing_output_stops_a_run_unless_overwrite_is_asked(tmp_path):
    from monai_effq.bundle import EXPORTED_FROM, refuse_to_overwrite

    (tmp_path / "model.pt").write_bytes(b"earlier")
    (tmp_path / "seg").mkdir()
    refuse_to_overwrite(False, tmp_path / "new.pt", tmp_path / "seg", None, "")  # missing files and empty folders are free
    (tmp_path / "seg" / "case_seg.nii.gz").write_bytes(b"mask")
    for taken in ("model.pt", "seg"):
        with pytest.raises(FileExistsError, match=rf"{taken} exists from an earlier run: pass --overwrite True"):
            refuse_to_overwrite(False, tmp_path / taken)
    refuse_to_overwrite(True, tmp_path / "model.pt")
    # a folder output is replaced whole (an export): only an earlier export is, never a folder of other files
    with pytest.raises(FileExistsError, match="seg holds files that no monai-effq export wrote"):
        refuse_to_overwrite(True, tmp_path / "seg")
    (tmp_path / "export" / "configs").mkdir(parents=True)
    (tmp_path / "export" / "configs" / "metadata.json").write_text(json.dumps({EXPORTED_FROM: str(tmp_path / "model.pt")}))
    refuse_to_overwrite(True, tmp_path / "model.pt", tmp_path / "export")


@pytest.mark.parametrize("name", list(BUNDLES))
def test_inference_adds_masks_to_a_folder_of_earlier_ones_and_refuses_only_one_it_would_replace(name, tmp_path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_files(name, "inference"))
    parser["bundle_root"], parser["output_dir"] = str(ROOT / "bundles" / name), str(tmp_path / "seg")
    (tmp_path / "seg").mkdir()
    (tmp_path / "seg" / "old_seg.nii.gz").write_bytes(b"an earlier run's mask")
    parser["datalist"] = [{"image": str(tmp_path / "new.nii.gz")}]
    parser.get_parsed_content("check_outputs", lazy=False)  # a new image's mask takes a free name
    parser["datalist"] = [{"image": str(tmp_path / "new.nii.gz")}, {"image": str(tmp_path / "old.nii.gz")}]
    with pytest.raises(Exception) as raised:
        parser.get_parsed_content("check_outputs", lazy=False)
    assert "old_seg.nii.gz exists from an earlier run:" in str(find_user_error(raised.value))
    (tmp_path / "seg" / "new_seg.nii.gz").write_bytes(b"another earlier mask")
    with pytest.raises(Exception) as raised:
        parser.get_parsed_content("check_outputs", lazy=False)
    assert "new_seg.nii.gz exists from an earlier run (and 1 more of this run's outputs)" in str(find_user_error(raised.value))
    parser["mask_ext"] = ".nii"  # SaveImaged's extension, which the check follows: no name is taken then
    parser.get_parsed_content("check_outputs", lazy=False)
    assert parser.get_parsed_content("postprocessing", lazy=False).transforms[-1].saver.output_ext == ".nii"


@pytest.mark.parametrize("name", list(BUNDLES))
def test_the_workflows_check_cases_against_the_channels_the_network_def_takes(name, tmp_path):
    from monai.bundle import ConfigParser

    from monai_effq.data import DatasetError

    dataset, _ = BUNDLES[name]
    data = (make_brats_demo if dataset == "brats" else make_lits_demo)(tmp_path / "data", n_cases=2, shape=(32, 32, 32), seed=1)
    cases = datalist(data, dataset, "all")
    for workflow, key in (("train", "validate#dataset#data"), ("inference", "check_inputs")):
        parser = ConfigParser()
        parser.read_config(config_files(name, workflow))
        parser["bundle_root"], parser["dataset_dir"], parser["output_dir"] = str(ROOT / "bundles" / name), str(data), str(tmp_path / "seg")
        parser["datalist"] = [{"image": case["image"]} for case in cases]
        parser.get_parsed_content(key, lazy=False)  # the shipped network takes the dataset's channels
        shipped = parser["network_def#in_channels"]
        parser["network_def#in_channels"] = shipped + 1  # a user's network of one more channel
        with pytest.raises(Exception) as raised:
            parser.get_parsed_content(key, lazy=False)
        error = find_user_error(raised.value)
        assert isinstance(error, DatasetError) and f"holds {shipped} image channel(s), but the network takes {shipped + 1}" in str(error)


@pytest.mark.parametrize("name", list(BUNDLES))
def test_inference_refuses_to_serve_a_checkpoint_whose_quantize_run_is_unfinished(name, tmp_path):
    from monai.bundle import ConfigParser

    from monai_effq.ptq.journal import journal_path
    from monai_effq.utils.errors import UserInputError

    dataset, _ = BUNDLES[name]
    data = (make_brats_demo if dataset == "brats" else make_lits_demo)(tmp_path / "data", n_cases=1, shape=(32, 32, 32), seed=1)
    parser = ConfigParser()
    parser.read_config(config_files(name, "inference"))
    parser["bundle_root"], parser["ckpt_dir"], parser["output_dir"] = str(ROOT / "bundles" / name), str(tmp_path), str(tmp_path / "seg")
    parser["datalist"] = [{"image": case["image"]} for case in datalist(data, dataset, "all")]  # images that pass their checks
    checkpoint = parser.get_parsed_content("quantized_path")
    Path(checkpoint).write_bytes(b"an earlier run's checkpoint")
    journal_path(checkpoint).mkdir()  # a run with --overwrite True, killed while it rewrites the checkpoint
    with pytest.raises(Exception) as raised:
        parser.get_parsed_content("inference", lazy=False)
    error = find_user_error(raised.value)
    assert isinstance(error, UserInputError) and "did not finish" in str(error)


def test_only_the_shipped_unchanged_checkpoint_is_protected_from_training(tmp_path):
    import hashlib

    from monai_effq.bundle import refuse_to_replace_shipped, shipped_files

    (tmp_path / "models").mkdir()
    ckpt = tmp_path / "models" / "model.pt"
    ckpt.write_bytes(b"shipped weights")
    refuse_to_replace_shipped(False, ckpt, tmp_path)  # no large_files.yml: a copy whose weights are its own (MONAI Label)
    md5 = hashlib.md5(b"shipped weights").hexdigest()
    (tmp_path / "large_files.yml").write_text(f'large_files:\n  - path: "models/model.pt"\n    hash_val: "{md5}"\n    hash_type: "md5"\n')
    assert shipped_files(tmp_path) == {ckpt.resolve(): md5}
    with pytest.raises(FileExistsError, match="is the checkpoint this bundle ships"):
        refuse_to_replace_shipped(False, ckpt, tmp_path)
    refuse_to_replace_shipped(True, ckpt, tmp_path)
    refuse_to_replace_shipped(False, tmp_path / "models" / "other.pt", tmp_path)
    ckpt.write_bytes(b"weights trained since")  # no longer the shipped file: retraining replaces it
    refuse_to_replace_shipped(False, ckpt, tmp_path)


@pytest.mark.slow
def test_runs_that_differ_in_method_format_or_start_write_different_files_and_a_rerun_refuses_to_replace_them(trained):
    name, work, common, _ = trained
    if name != "lits_effq":
        pytest.skip("one bundle is enough: the names come from the same configs")
    fast = [*common, "--calibration_crop", ROI, "--weight_bits", "2"]
    bundle(name, "quantize", *fast, "--method", "rtn")
    bundle(name, "quantize", *fast, "--method", "gptq")
    bundle(name, "finetune", *common, "--init", "fp", "--weight_format", "Q0.4", "--act_format", "Q6.0", "--steps", "1", "--roi_size", ROI, "--calibration_crop", ROI)
    models = {p.name for p in (work / "models").glob("model_*.pt")}
    assert {"model_rtn_w2a8.pt", "model_gptq_w2a8.pt", "model_finetuned_fp_q0.4aq6.0.pt"} <= models
    report = json.loads((work / "eval" / "quantization_report_finetuned_fp_q0.4aq6.0.json").read_text())
    body = report["layers"][2:-1]  # the LiTS UNet has two layers that read the image (first-layer bits)
    assert {layer["weight_bits"] for layer in body} == {5}  # Q0.4 is a 5-bit word

    checkpoint = work / "models" / "model_rtn_w2a8.pt"
    before = checkpoint.read_bytes()
    with pytest.raises(Exception) as stopped:  # MONAI wraps what a config expression raises
        bundle(name, "quantize", *fast, "--method", "rtn", "--per_channel", "True")
    assert "model_rtn_w2a8.pt exists from an earlier run" in str(_cause(stopped.value, FileExistsError))
    assert checkpoint.read_bytes() == before
    bundle(name, "quantize", *fast, "--method", "rtn", "--per_channel", "True", "--overwrite", "True")
    assert checkpoint.read_bytes() != before
    bundle(name, "evaluate", *common, "--method", "rtn", "--weight_bits", "2", "--sw_roi_size", ROI)
    with pytest.raises(Exception) as stopped:
        bundle(name, "evaluate", *common, "--method", "rtn", "--weight_bits", "2", "--sw_roi_size", ROI)
    assert "evaluation_rtn_w2a8.json exists" in str(_cause(stopped.value, FileExistsError))


def _cause(error: BaseException, kind: type) -> BaseException | None:
    """The first exception of type ``kind`` in ``error``'s chain (what the user reads in the traceback)."""
    while error is not None and not isinstance(error, kind):
        error = error.__cause__ or error.__context__
    return error
