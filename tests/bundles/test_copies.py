"""A copy of each bundle as a user gets it (shipped weights, demo data), quantized once per session (``quantized_copy``)
and read by each test: served from inside its folder, from its TorchScript export, and through OpenVINO."""

import csv
import json
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.utils import ensure_tuple

from monai_effq.bundle import images

from ..dicom import write_dicom_series
from .conftest import BUNDLES, bundle, config_files


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUNDLES))
def test_a_copy_of_the_bundle_quantizes_and_infers_from_inside_its_folder_with_default_settings(name, quantized_copy, tmp_path):
    # quantize, then inference.json's workflow, from inside the copy (in this process: the real command line,
    # python -m monai.bundle run in a subprocess, is the overlay and MONAI Label tests' and test_errors.py's)
    copy, masks, log = quantized_copy(name)
    assert (copy / "models" / "model_rtn_w4a8.pt").is_file()
    assert all(mask.parent == copy / "eval" / "seg" / "rtn_w4a8" for mask in masks)  # a folder per model
    assert masks
    assert "wrote" in log and "INFO" in log  # logging.conf applies: the workflow says what it wrote

    # the exported bundle serves the same masks from its TorchScript file alone
    served = copy / "export" / f"{name}_rtn_w4a8"
    assert not (served / "models" / "model.pt").exists()
    bundle(name, "inference", "--dataset_dir", str(copy / "data" / "demo"), "--output_dir", str(tmp_path / "ts"), cwd=served)
    for mask in masks:
        ours, traced = (nib.load(str(p)).get_fdata() for p in (mask, tmp_path / "ts" / mask.name))
        assert np.array_equal(ours, traced), mask.name


@pytest.mark.slow
def test_inference_segments_a_dicom_series_as_its_nifti_and_an_image_failing_mid_run_ends_it_with_one_line(quantized_copy, tmp_path):
    copy, _, _ = quantized_copy("lits_effq")
    volume = sorted((copy / "data" / "demo").glob("volume-*.nii"))[0]
    series = tmp_path / "2.000000-PORTAL-41234"  # one file per slice, in a folder named as TCIA names them
    write_dicom_series(volume, series)
    # a MetaImage that reads (so the up-front check passes) but holds a NaN, which preprocessing refuses
    voxels = np.random.default_rng(0).random((32, 40, 40), dtype=np.float32)
    voxels[3, 4, 5] = np.nan
    nan = tmp_path / "nan.mha"
    itk.imwrite(itk.image_from_array(voxels), str(nan))
    datalist = str([{"image": str(volume)}, {"image": f"{series}/"}, {"image": str(nan)}])  # the slash tab completion adds
    res = bundle("lits_effq", "inference", "--method", "rtn", "--datalist", datalist, "--output_dir", str(tmp_path / "seg"), check=False, cwd=copy)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 1 and "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    assert lines[-1].startswith("error: image") and str(nan) in lines[-1] and "NaN" in lines[-1], lines[-1]
    masks = [f"{volume.name[:-4]}_seg.nii.gz", "2.000000-PORTAL-41234_seg.nii.gz"]  # the folder's whole name
    assert sorted(p.name for p in (tmp_path / "seg").iterdir()) == sorted(masks)
    from_nifti, from_dicom = (nib.load(str(tmp_path / "seg" / name)) for name in masks)
    assert np.array_equal(from_nifti.get_fdata(), from_dicom.get_fdata()) and from_nifti.get_fdata().any()
    assert np.allclose(from_nifti.affine, from_dicom.affine)  # the mask lies on the scanner's grid either way


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUNDLES))
def test_the_openvino_evaluate_overlay_matches_the_fake_quant_dice_on_the_demo_data(name, quantized_copy, tmp_path):
    pytest.importorskip("openvino")
    copy, _, _ = quantized_copy(name)  # the shipped weights and their RTN W4A8 checkpoint, quantized on the demo data
    models = copy / "models"
    args = ["--ckpt_dir", str(models), "--dataset_dir", str(copy / "data" / "demo"), "--output_dir", str(tmp_path / "eval"), "--method", "rtn"]
    bundle(name, "evaluate", *args, overlay="evaluate_openvino")
    rows = json.loads((tmp_path / "eval" / "evaluation_rtn_w4a8_openvino.json").read_text())
    assert [r["model"] for r in rows] == ["FP32", "rtn_w4a8", "rtn_w4a8 OpenVINO"]
    assert abs(rows[2]["dice_mean"] - rows[1]["dice_mean"]) <= 0.002, rows
    assert rows[2]["dice_mean"] > 0.5  # the demo networks are trained: a broken export would not get here
    # the deployed network reproduces the FP network's labels as closely as the fake-quant network does
    assert abs(rows[2]["fp_agreement"] - rows[1]["fp_agreement"]) <= 0.005 and rows[2]["fp_agreement"] > 0.9, rows
    assert (models / "model_rtn_w4a8.onnx").is_file()
    cases = tmp_path / "eval" / "evaluation_rtn_w4a8_openvino_cases"  # each case's Dice, for the runtime too
    per_model = {m: (cases / m / "dice_raw.csv").read_text().splitlines() for m in ("FP32", "rtn_w4a8", "rtn_w4a8_openvino")}
    named = {m: [line.split(",")[0] for line in lines[1:]] for m, lines in per_model.items()}  # MetricsSaver's first column
    assert named["FP32"] and named["FP32"] == named["rtn_w4a8"] == named["rtn_w4a8_openvino"], per_model

    # run on its own (as a benchmark or a user's script runs one evaluator), the deployed evaluator
    # still compares with the FP weights: its handlers load them for the reference
    parser = ConfigParser()
    parser.read_config(config_files(name, "evaluate", "evaluate_openvino", root=copy))
    settings = {"bundle_root": str(copy), "ckpt_dir": str(models), "dataset_dir": str(copy / "data" / "demo"), "method": "rtn"}
    for key, value in settings.items():
        parser[key] = value
    alone = parser.get_parsed_content("deployed#evaluator")
    alone.run()
    agreement = torch.as_tensor(alone.state.metrics["fp_agreement"]).float().mean().item()
    assert agreement == pytest.approx(rows[2]["fp_agreement"], abs=1e-4), (agreement, rows[2])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUNDLES))
def test_inference_writes_a_dicom_seg_whose_frames_are_the_nifti_mask_on_each_source_slice(name, quantized_copy, tmp_path):
    hd = pytest.importorskip("highdicom")
    pydicom = pytest.importorskip("pydicom")
    copy, masks, _ = quantized_copy(name)
    dataset = BUNDLES[name][0]
    case = images(copy / "data" / "demo", dataset, "val")[0]
    files = list(ensure_tuple(case["image"]))  # BraTS: its four contrasts, each a series of its own
    series = [tmp_path / f"{i}.000000-SERIES-{i}" for i in range(len(files))]
    slices = [write_dicom_series(f, s, series_uid=f"1.2.826.0.1.3680043.2.1125.{i + 1}") for i, (f, s) in enumerate(zip(files, series))]
    datalist = str([{"image": [str(s) for s in series] if dataset == "brats" else str(series[0])}])
    bundle(name, "inference", "--method", "rtn", "--datalist", datalist, "--output_dir", str(tmp_path / "seg"), "--mask_format", "dicom_seg", cwd=copy)
    assert [p.name for p in (tmp_path / "seg").iterdir()] == ["0.000000-SERIES-0_seg.dcm"]

    seg = hd.seg.segread(tmp_path / "seg" / "0.000000-SERIES-0_seg.dcm")
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in slices[0]]
    assert seg.PatientID == sources[0].PatientID and seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    labels = [seg.get_segment_description(n).segment_label for n in seg.get_segment_numbers()]
    assert labels == ["tumour core", "whole tumour", "enhancing tumour"] if dataset == "brats" else ["liver", "liver tumour"]
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[s.SOPInstanceUID for s in sources], combine_segments=False
    )  # (slices, rows, columns, segments), the slices in the series' order

    # the NIfTI mask of the same image (written by the copy's own inference), voxel (x, y, z) on slice z, row y, column x
    nifti = next(m for m in masks if m.name.startswith(Path(files[0]).name.split(".")[0]))
    voxels = np.asarray(nib.load(str(nifti)).dataobj).reshape(*nib.load(str(nifti)).shape[:3], -1)
    expected = voxels == np.arange(1, 3) if dataset == "lits" else voxels.astype(bool)  # LiTS: labels; BraTS: channels
    expected = np.transpose(expected, (2, 1, 0, 3))  # (z, y, x, segments)
    assert expected.any() and np.array_equal(frames.astype(bool), expected)

    # the exported bundle (TorchScript) writes the same SEG, naming the model it serves
    served = copy / "export" / f"{name}_rtn_w4a8"
    bundle(name, "inference", "--datalist", datalist, "--output_dir", str(tmp_path / "ts"), "--mask_format", "dicom_seg", cwd=served)
    traced = hd.seg.segread(tmp_path / "ts" / "0.000000-SERIES-0_seg.dcm")
    assert traced.get_segment_description(1).algorithm_identification[0].AlgorithmName == f"{dataset}_effq rtn_w4a8"
    assert np.array_equal(traced.get_pixels_by_source_instance(source_sop_instance_uids=[s.SOPInstanceUID for s in sources], combine_segments=False), frames)


@pytest.mark.slow
def test_inference_writes_an_rtstruct_whose_contours_fill_back_to_the_nifti_mask(quantized_copy, tmp_path):
    pytest.importorskip("skimage")
    from monai.transforms import LoadImage

    from monai_effq.data import LITS_SEG_LABELS, read_rtstruct_labels

    copy, masks, _ = quantized_copy("lits_effq")
    case = images(copy / "data" / "demo", "lits", "val")[0]
    series = tmp_path / "1.000000-CT-1"
    write_dicom_series(case["image"], series)
    datalist = str([{"image": str(series)}])
    bundle("lits_effq", "inference", "--method", "rtn", "--datalist", datalist, "--output_dir", str(tmp_path / "rt"), "--mask_format", "rtstruct", cwd=copy)
    assert [p.name for p in (tmp_path / "rt").iterdir()] == ["1.000000-CT-1_rtstruct.dcm"]  # not the SEG's name
    image = LoadImage(reader="ITKReader", image_only=True)(str(series))
    labels = read_rtstruct_labels(tmp_path / "rt" / "1.000000-CT-1_rtstruct.dcm", series, image.affine.numpy(), image.shape, LITS_SEG_LABELS)
    # the NIfTI mask of the same image, written by the copy's own inference on its NIfTI file: the same grid, voxel for voxel
    nifti = next(m for m in masks if m.name.startswith(Path(case["image"]).name.split(".")[0]))
    expected = np.asarray(nib.load(str(nifti)).dataobj)
    assert expected.any() and labels.shape == expected.shape and np.array_equal(labels, expected)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUNDLES))
def test_inference_on_images_alone_measures_the_agreement_with_fp_that_evaluate_measures_with_labels(name, quantized_copy, tmp_path):
    copy, _, _ = quantized_copy(name)
    bundle(name, "evaluate", "--method", "rtn", "--output_dir", str(tmp_path / "eval"), cwd=copy)
    (row,) = [r for r in json.loads((tmp_path / "eval" / "evaluation_rtn_w4a8.json").read_text()) if r["model"] == "rtn_w4a8"]
    # the validation images without their labels, as a hospital's own scans come
    bundle(name, "inference", "--method", "rtn", "--output_dir", str(tmp_path / "seg"), overlay="inference_agreement", cwd=copy)
    header, *cases = list(csv.reader((tmp_path / "seg" / "fp_agreement_raw.csv").open()))
    masks = sorted(p.name for p in (tmp_path / "seg").glob("*_seg.nii.gz"))
    assert header[0] == "filename" and len(cases) == len(masks) >= 1  # one row per segmented image
    per_case = [float(c[-1]) for c in cases]
    assert all(0.5 < a <= 1.0 for a in per_case), per_case
    # on the grid the masks are written on (inverted to each image's), the same labels as evaluate's
    assert sum(per_case) / len(per_case) == pytest.approx(row["fp_agreement"], abs=1e-5), (per_case, row)
    # a run on other images into the folder would replace the per-case rows: refused, naming the file
    other = str(images(copy / "data" / "demo", BUNDLES[name][0], "train")[:1])
    res = bundle(
        name, "inference", "--method", "rtn", "--datalist", other, "--output_dir", str(tmp_path / "seg"), overlay="inference_agreement", check=False, cwd=copy
    )
    assert res.returncode == 1 and "fp_agreement_raw.csv exists from an earlier run" in res.stderr, res.stderr[-2000:]
