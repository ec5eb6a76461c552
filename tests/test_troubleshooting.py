"""docs/troubleshooting.md cannot drift: every message it lists is raised by a trigger here, and every trigger is listed.

Each trigger is the smallest thing a user could do that earns the message, run in this process;
the bundle command's one-line report of the same errors is tested in tests/bundles/test_errors.py.
"""

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from monai_effq import EfficientQConfig, quantize
from monai_effq.bundle import (
    calibration_datalist,
    check_exportable,
    check_finetune_settings,
    check_inference_inputs,
    check_quantized,
    check_train_settings,
    check_window,
    existing_checkpoint,
    images,
    preprocessing,
    rank_cases,
    refuse_to_overwrite,
    refuse_to_replace_shipped,
)
from monai_effq.data import detect_layout, dicom_series_files, lits_transforms, load_datalist, make_lits_demo, validate_datalist
from monai_effq.handlers.quantization import QuantizedCheckpointLoader, check_calibration_volume
from monai_effq.overlays import PrepareImageBatch, calibration_items, check_attached
from monai_effq.ptq.modules import ActivationQuantizer
from monai_effq.ptq.prepare import available_device, prepare_network
from monai_effq.utils.errors import UserInputError
from monai_effq.utils.io import atomic_write

DOC = Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md"


def documented() -> dict[str, re.Pattern]:
    """Heading template → a pattern for the message (``<...>`` stands for any text)."""
    found = {}
    for template in re.findall(r"^### `(.+)`$", DOC.read_text(encoding="utf-8"), flags=re.MULTILINE):
        parts = re.split(r"<[^<>]+>", template)
        found[template] = re.compile(".+?".join(re.escape(p) for p in parts))
    return found


@pytest.fixture(scope="module")
def lits(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lits")
    make_lits_demo(folder, n_cases=3, shape=(32, 32, 32), seed=0)
    return folder


def _file_in_the_way(tmp: Path, data: Path) -> None:
    (tmp / "eval").write_text("not a folder")
    refuse_to_overwrite(False, tmp / "eval" / "seg" / "case_seg.nii.gz")


def _full_disk(tmp: Path, data: Path) -> None:
    with atomic_write(tmp / "model.pt"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _net(norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 2, 1)]
    return nn.Sequential(*(layers if norm else [m for m in layers if not isinstance(m, nn.BatchNorm3d)])).eval()


def _unet() -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(3, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2), num_res_units=0).eval()


def _nan_weight(tmp_path, lits):
    net = _net()
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0, 0] = float("nan")
    prepare_network(net, torch.rand(1, 1, 8, 8, 8), EfficientQConfig())


def _negative_variance(tmp_path, lits):
    net = _net(norm=True)
    net[1].running_var[0] = -1.0
    prepare_network(net, torch.rand(1, 1, 8, 8, 8), EfficientQConfig())


def _overflowing_layer(tmp_path, lits):
    net = _net()
    with torch.no_grad():
        net[0].weight.fill_(3e38)
    quantize(net, torch.rand(1, 1, 8, 8, 8) + 1, EfficientQConfig(method="rtn", attention=False), progress=False)


def _weight_of_a_damaged_checkpoint(tmp_path, lits):
    net = _net()
    with torch.no_grad():
        net[0].weight.view(-1)[0] = 1e19  # finite outputs, but the next layer's sums overflow float32
    quantize(net, torch.rand(1, 1, 16, 16, 16), EfficientQConfig(attention=False), progress=False)


def _zoo_bundle_without_roi_size(tmp_path, lits):
    from monai.bundle import ConfigParser

    from monai_effq.utils.errors import find_user_error

    parser = ConfigParser({"inferer": {"_target_": "SimpleInferer"}, "calibration_roi": "@inferer#roi_size"})
    try:
        parser.get_parsed_content("calibration_roi")
    except ValueError as e:  # what the bundle command's hook reports
        raise find_user_error(e) from e


def _zoo_bundle_without_dataset(tmp_path, lits):
    from monai.bundle import ConfigParser

    from monai_effq.utils.errors import find_user_error

    parser = ConfigParser({"dataset": {"_target_": "Dataset"}, "calibration_images": "@dataset#data"})
    try:
        parser.get_parsed_content("calibration_images")
    except ValueError as e:
        raise find_user_error(e) from e


def _damaged_fp_checkpoint(tmp: Path, data: Path) -> None:
    (tmp / "model.pt").write_bytes(b"half a checkpoint" * 10)
    existing_checkpoint(tmp / "model.pt")


def _other_networks_checkpoint(tmp: Path, data: Path) -> None:
    torch.save(nn.Conv3d(1, 3, 3).state_dict(), tmp / "model.pt")
    existing_checkpoint(tmp / "model.pt", _unet())


def _wrapped_networks_checkpoint(tmp: Path, data: Path) -> None:
    torch.save(nn.DataParallel(_unet()).state_dict(), tmp / "model.pt")
    existing_checkpoint(tmp / "model.pt", _unet())


def _checkpoint_of_a_wrapped_network(tmp: Path, data: Path) -> None:
    torch.save(_unet().state_dict(), tmp / "model.pt")
    existing_checkpoint(tmp / "model.pt", nn.Sequential(_unet(), nn.Softmax(1)))


def _truncated_nifti(tmp_path, lits):
    cases = calibration_datalist(lits, "lits")
    broken = tmp_path / "volume-9.nii"
    broken.write_bytes(Path(cases[0]["image"]).read_bytes()[:1000])
    validate_datalist([{"image": str(broken)}], read_data=True)


def _slice_image(tmp_path, lits):
    import nibabel as nib

    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16), np.float32), np.eye(4)), str(path))
    validate_datalist([{"image": str(path)}])


def _one_hot_label(tmp_path, lits):
    import nibabel as nib

    image, label = tmp_path / "ct.nii.gz", tmp_path / "onehot.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 8), np.float32), np.eye(4)), str(image))
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8, 3), np.uint8), np.eye(4)), str(label))
    validate_datalist([{"image": str(image), "label": str(label)}])


def _ct_not_in_hounsfield_units(tmp_path, lits):
    import nibabel as nib

    path = tmp_path / "volume-0.nii.gz"
    nib.save(nib.Nifti1Image(np.full((16, 16, 16), -2000.0, np.float32), np.eye(4)), str(path))
    preprocessing("lits", lits, with_label=False)({"image": str(path)})


def _nan_image(tmp_path, lits):
    import nibabel as nib

    path = tmp_path / "volume-0.nii.gz"
    data = np.ones((16, 16, 16), np.float32)
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    preprocessing("lits", lits, with_label=False)({"image": str(path)})


def _link_to_an_unmounted_disk(tmp_path, lits):
    (tmp_path / "Training Batch 2").symlink_to(tmp_path / "unmounted", target_is_directory=True)
    detect_layout(tmp_path)


def _two_segmentation_candidates(tmp_path, lits):
    case = tmp_path / "BraTS20_Training_001"
    case.mkdir()
    for name in ("flair", "t1", "t1ce", "t2"):
        (case / f"BraTS20_Training_001_{name}.nii.gz").write_bytes(b"")
    (case / "W39_Segm.nii.gz").write_bytes(b"")
    (case / "W39_seg_v2.nii.gz").write_bytes(b"")
    load_datalist(tmp_path)


def _nan_quantized_input(tmp_path, lits):
    result = quantize(_net(), torch.rand(1, 1, 8, 8, 8), EfficientQConfig(method="rtn", attention=False), progress=False)
    x = torch.rand(1, 1, 8, 8, 8)
    x[0, 0, 1, 2, 3] = float("inf")
    result.network(x)


def _nan_onnx_input(tmp_path, lits):
    pytest.importorskip("onnxruntime")
    from monai_effq.deploy.runtime import OnnxRuntimeNetwork
    from monai_effq.deploy.export import export_onnx

    result = quantize(_net(), torch.rand(1, 1, 8, 8, 8), EfficientQConfig(method="rtn", attention=False), progress=False)
    network = OnnxRuntimeNetwork(export_onnx(result, tmp_path / "model.onnx", (1, 1, 8, 8, 8)))
    x = torch.rand(1, 1, 8, 8, 8)
    x[0, 0, 1, 2, 3] = float("nan")
    network(x)


class _SizedMask(nn.Module):
    """A convolution plus a buffer sized for 8x8x8 inputs (as SwinUNETR's attention mask is)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.register_buffer("mask", torch.rand(1, 1, 512))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x)
        return (f.flatten(2) + self.mask).reshape(f.shape)


def _onnx_run_at_another_size(tmp_path, lits):
    pytest.importorskip("onnxruntime")
    from monai_effq.deploy.export import export_onnx
    from monai_effq.deploy.runtime import OnnxRuntimeNetwork

    result = quantize(_SizedMask().eval(), torch.rand(1, 1, 8, 8, 8), EfficientQConfig(method="rtn", attention=False), progress=False)
    OnnxRuntimeNetwork(export_onnx(result, tmp_path / "model.onnx", (1, 1, 8, 8, 8)))(torch.rand(1, 1, 16, 16, 16))


def _onnx_with_fixed_axes_run_at_another_size(tmp_path, lits):
    pytest.importorskip("onnxruntime")
    from monai_effq.deploy.export import export_onnx
    from monai_effq.deploy.runtime import OnnxRuntimeNetwork

    result = quantize(_net(), torch.rand(1, 1, 8, 8, 8), EfficientQConfig(method="rtn", attention=False), progress=False)
    path = export_onnx(result, tmp_path / "model.onnx", (1, 1, 8, 8, 8), dynamic_spatial=False, dynamic_batch=True)
    OnnxRuntimeNetwork(path)(torch.rand(1, 1, 16, 8, 8))


def _operator_openvino_cannot_convert(tmp_path, lits):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("openvino")
    from onnx import TensorProto, helper

    from monai_effq.deploy.runtime import OpenVINONetwork

    value = helper.make_tensor_value_info
    node = helper.make_node("Foo", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "g", [value("x", TensorProto.FLOAT, [1, 1])], [value("y", TensorProto.FLOAT, [1, 1])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.example", 1)]), path)
    OpenVINONetwork(path)


def _no_cuda(tmp_path, lits):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    available_device("cuda:7")


def _rank_past_the_gpus(tmp_path, lits):
    from unittest import mock

    from monai_effq.utils.distributed import rank_device

    # a one-GPU workstation running torchrun --nproc_per_node=2: the second process
    with mock.patch.dict("os.environ", {"LOCAL_RANK": "1"}), mock.patch("torch.cuda.is_available", return_value=True):
        with mock.patch("torch.cuda.device_count", return_value=1):
            rank_device()


def _ranks_given_other_weights(tmp_path, _):
    from unittest import mock

    from monai_effq.ptq import pipeline

    def other_rank_differs(mine):  # the fingerprints differ; any other value gathered is the same on both ranks
        return [mine, {**mine, "FP weights": "another copy"} if isinstance(mine, dict) else mine]

    with mock.patch.object(pipeline, "get_world_size", return_value=2), mock.patch.object(pipeline, "all_gather_objects", other_rank_differs):
        quantize(_net(), torch.rand(1, 1, 8, 8, 8), progress=False)


def _journal_in_use(tmp_path, _):
    from monai_effq.ptq.journal import QuantizationJournal

    with QuantizationJournal(tmp_path / "model.pt.journal", {"config": "a"}):  # the first run, still going
        QuantizationJournal(tmp_path / "model.pt.journal", {"config": "b"})


def _unfinished_run(tmp_path, _):
    (tmp_path / "model_efficientq_w4a8.pt.journal").mkdir()
    check_quantized(tmp_path / "model_efficientq_w4a8.pt", _net())


def _unattached_loader(tmp_path, lits):
    from ignite.engine import Engine

    check_attached(Engine(lambda engine, batch: None), object(), "handlers")


def _metadata_without_channels(tmp_path, lits):
    from monai_effq.handlers import output_channels

    (tmp_path / "metadata.json").write_text(json.dumps({"network_data_format": {"inputs": {}, "outputs": {"pred": {"type": "image"}}}}))
    output_channels(tmp_path / "metadata.json")


def _misspelt_seg_code(tmp_path, lits):
    pytest.importorskip("highdicom")
    from monai_effq.data import channel_segments

    channel_segments({"0": "background", "1": "liver"}, {"liver": ["AnatomicalStructure", "Livr"]})


def _unexportable_bundle(tmp_path, lits):
    (tmp_path / "configs").mkdir()
    initialize = ["$@network.load_state_dict(torch.load(@bundle_root + '/models/model.pt'))"]
    (tmp_path / "configs" / "inference.json").write_text(json.dumps({"initialize": initialize}))
    check_exportable(tmp_path, tmp_path / "export")


def _pickled_network(tmp_path, lits):
    torch.save(_unet(), tmp_path / "model.pt")
    existing_checkpoint(tmp_path / "model.pt", _unet())


def _two_named_alike(tmp_path, lits):
    image = next(lits.glob("volume-*.nii"))
    return [shutil.copy(image, tmp_path / "ct.nii"), shutil.copy(image, tmp_path / "ct.nrrd")]


def _cut_short_metaimage(tmp_path, lits):
    import itk

    path = tmp_path / "ct.mha"
    itk.imwrite(itk.imread(str(next(lits.glob("volume-*.nii")))), str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    check_inference_inputs([{"image": str(path)}], tmp_path / "masks")


def _series(tmp_path: Path, lits: Path, *uids: str) -> Path:
    from tests.dicom import write_dicom_series

    for n, uid in enumerate(uids):
        write_dicom_series(next(lits.glob("volume-*.nii")), tmp_path / "series", series_uid=uid, prefix=f"S{n}_")
    return tmp_path / "series"


def _two_series(tmp_path, lits):
    check_inference_inputs([{"image": str(_series(tmp_path, lits, "1.2.3.1", "1.2.3.2"))}], tmp_path / "masks")


def _damaged_slice(tmp_path, lits):
    folder = _series(tmp_path, lits, "1.2.3.1")
    slice_file = sorted(folder.iterdir())[5]
    slice_file.write_bytes(slice_file.read_bytes()[:-1000])
    dicom_series_files(folder)


def _missing_slice(tmp_path, lits):
    folder = _series(tmp_path, lits, "1.2.3.1")
    sorted(folder.iterdir())[5].unlink()
    dicom_series_files(folder)


def _two_echoes(tmp_path, lits):
    from tests.dicom import write_dicom_series

    for echo in ("E1_", "E2_"):
        write_dicom_series(next(lits.glob("volume-*.nii")), tmp_path / "series", prefix=echo)
    dicom_series_files(tmp_path / "series")


def _tilted(tmp_path, lits):
    from tests.dicom import write_dicom_series

    write_dicom_series(next(lits.glob("volume-*.nii")), tmp_path / "series", shift_per_slice=(0.0, 0.3))
    dicom_series_files(tmp_path / "series")


def _one_slice(tmp_path, lits):
    check_inference_inputs([{"image": str(sorted(_series(tmp_path, lits, "1.2.3.1").iterdir())[3])}], tmp_path / "masks")


def _seg_of_a_file(tmp_path, lits):
    pytest.importorskip("highdicom")
    image = str(next(lits.glob("volume-*.nii")))
    check_inference_inputs([{"image": image}], tmp_path / "masks", ext=".dcm", mask_format="dicom_seg")


def _seg_source_without_frame_of_reference(tmp_path, lits):
    pydicom = pytest.importorskip("pydicom")
    from monai_effq.data import check_seg_source

    folder = _series(tmp_path, lits, "1.2.3.1")
    slice_file = sorted(folder.iterdir())[2]
    header = pydicom.dcmread(slice_file)
    del header.FrameOfReferenceUID
    header.save_as(slice_file)
    check_seg_source(folder)


def _seg_source_with_a_malformed_value(tmp_path, lits):
    pydicom = pytest.importorskip("pydicom")
    from monai_effq.data import check_seg_source

    folder = _series(tmp_path, lits, "1.2.3.1")
    for slice_file in folder.iterdir():
        header = pydicom.dcmread(slice_file)
        header.PatientSex = "Male"
        header.save_as(slice_file)
    check_seg_source(folder)


def _foreign_export_dir(tmp_path, lits):
    (tmp_path / "export" / "notes.txt").parent.mkdir()
    (tmp_path / "export" / "notes.txt").write_text("mine")
    refuse_to_overwrite(True, tmp_path / "export")


def _seg_source_multi_frame(tmp_path, lits):
    pydicom = pytest.importorskip("pydicom")
    from monai_effq.data import check_seg_source

    folder = _series(tmp_path, lits, "1.2.3.1")
    slice_file = sorted(folder.iterdir())[0]
    header = pydicom.dcmread(slice_file)
    header.NumberOfFrames = 2
    header.save_as(slice_file)
    check_seg_source(folder)


def _seg_case(tmp_path: Path, lits: Path) -> dict:
    """The first LiTS demo case as an archive holds it: a DICOM series and a DICOM SEG label on it."""
    pytest.importorskip("highdicom")
    from monai_effq.data import LITS_SEGMENTS
    from tests.dicom import write_dicom_case

    image = next(lits.glob("volume-*.nii"))
    return write_dicom_case({"image": str(image), "label": str(image.with_name(image.name.replace("volume", "segmentation")))}, tmp_path / "case", LITS_SEGMENTS)


def _seg_of_another_series(tmp_path, lits):
    from monai_effq.data import lits_transforms

    lits_transforms(train=False)({"image": str(_series(tmp_path, lits, "1.2.3.9")), "label": _seg_case(tmp_path, lits)["label"]})


def _seg_without_a_segment(tmp_path, lits):
    import pydicom

    from monai_effq.data import lits_transforms

    case = _seg_case(tmp_path, lits)
    seg = pydicom.dcmread(case["label"])
    seg.SegmentSequence[0].SegmentLabel = "kidney"  # as another tool names and codes its segments
    seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue = "64033007"
    seg.save_as(case["label"])
    lits_transforms(train=False)(case)


def _seg_mapping_a_missing_segment(tmp_path, lits):
    from monai_effq.data import lits_transforms

    lits_transforms(train=False, seg_segments={"liver": 1, "Segment_2": 2})(_seg_case(tmp_path, lits))


def _rtstruct_case(tmp_path, lits, **written):
    from tests.dicom import write_rtstruct

    folder = _series(tmp_path, lits, "1.2.3.9")
    square = [[2.0, 2.0], [2.0, 6.0], [6.0, 6.0], [6.0, 2.0]]
    files = dicom_series_files(folder)
    path = write_rtstruct(files, tmp_path / "rs.dcm", {"liver": [(1, square)], "liver tumour": [(1, square)]}, **written)
    return {"image": str(folder), "label": path}


def _rtstruct_off_the_slices(tmp_path, lits):
    import pydicom

    from monai_effq.data import lits_transforms

    case = _rtstruct_case(tmp_path, lits)
    ds = pydicom.dcmread(case["label"])
    contour = ds.ROIContourSequence[0].ContourSequence[0]
    contour.ContourData = [float(v) + (0.0 if i % 3 < 2 else 0.4) for i, v in enumerate(contour.ContourData)]  # off along z
    ds.save_as(case["label"])
    lits_transforms(train=False)(case)


def _rtstruct_cut_short(tmp_path, lits):
    case = _rtstruct_case(tmp_path, lits)
    data = Path(case["label"]).read_bytes()
    Path(case["label"]).write_bytes(data[: len(data) // 2])
    validate_datalist([case], read_data=True)


def _rtstruct_without_scikit_image(tmp_path, lits):
    from monai_effq.data import rtstruct

    folder = _series(tmp_path, lits, "1.2.3.9")
    saved, rtstruct.has_skimage = rtstruct.has_skimage, False
    try:
        check_inference_inputs([{"image": str(folder)}], tmp_path / "masks", ext=".dcm", mask_format="rtstruct")
    finally:
        rtstruct.has_skimage = saved


def _rtstruct_of_open_contours(tmp_path, lits):
    from monai_effq.data import lits_transforms

    lits_transforms(train=False)(_rtstruct_case(tmp_path, lits, contour_type="OPEN_PLANAR"))


def _seg_mapping_a_segment_twice(tmp_path, lits):
    lits_transforms(train=False, seg_segments={"liver": 1, "Liver": 2})(_seg_case(tmp_path, lits))


def _seg_label_of_a_file(tmp_path, lits):
    validate_datalist([{"image": str(next(lits.glob("volume-*.nii"))), "label": _seg_case(tmp_path, lits)["label"]}])


def _seg_label_loaded_beside_a_file(tmp_path, lits):
    from monai_effq.data import lits_transforms

    lits_transforms(train=False)({"image": str(next(lits.glob("volume-*.nii"))), "label": _seg_case(tmp_path, lits)["label"]})


def _case_off_one_grid(tmp_path, lits):
    import nibabel as nib

    image = next(lits.glob("volume-*.nii"))
    moved = tmp_path / "moved.nii.gz"
    header = nib.load(str(image))
    nib.save(nib.Nifti1Image(np.asanyarray(header.dataobj), header.affine @ np.diag([1.0, 1.0, 2.0, 1.0])), str(moved))
    check_inference_inputs([{"image": [str(image), str(moved)]}], tmp_path / "masks")


def _label_off_its_image(tmp_path, lits):
    import nibabel as nib

    folder = shutil.copytree(lits, tmp_path / "lits")
    labels = np.asarray(nib.load(str(folder / "segmentation-0.nii")).dataobj).copy()  # not memory-mapped: rewritten below
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(folder / "segmentation-0.nii"))  # an exporter's identity affine
    calibration_datalist(folder, "lits")


def _liver_given_to_brats(tmp_path, lits):
    from monai_effq.data import make_msd_demo

    calibration_datalist(make_msd_demo(tmp_path / "Task03_Liver", "Task03_Liver", n_cases=2, shape=(32, 32, 32)), "brats")


def _ct_of_two_phases(tmp_path, lits):
    import nibabel as nib

    folder = shutil.copytree(lits, tmp_path / "lits")
    volume = nib.load(str(folder / "volume-0.nii"))
    phases = np.stack([np.asarray(volume.dataobj)] * 2, axis=-1)  # arterial and venous in one 4D file
    nib.save(nib.Nifti1Image(phases, volume.affine), str(folder / "volume-0.nii"))
    calibration_datalist(folder, "lits")


def _seg_off_the_grid(tmp_path, lits):
    pydicom = pytest.importorskip("pydicom")
    from monai_effq.data.dicom_seg import series_frames

    folder = _series(tmp_path, lits, "1.2.3.1")
    slices = [pydicom.dcmread(f, stop_before_pixels=True) for f in dicom_series_files(folder)]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[0, 3] = 0.5  # half a voxel off: a mask resampled elsewhere
    series_frames(np.ones((1, 32, 32, 32), dtype=bool), affine, slices)


def _flat_brats_case(tmp_path, lits):
    from monai_effq.data import make_brats_demo

    case = load_datalist(make_brats_demo(tmp_path / "brats", n_cases=1, shape=(32, 32, 32)))[0]
    calibration_datalist(tmp_path, "brats", images=case["image"])


def _earlier_output(tmp_path, lits):
    (tmp_path / "model_efficientq_w4a8.pt").write_bytes(b"an earlier run's checkpoint")
    refuse_to_overwrite(False, tmp_path / "model_efficientq_w4a8.pt")


def _stale_export(tmp_path, lits):
    from monai_effq.bundle import EXPORTED_FROM, stale_export

    export = tmp_path / "export" / "lits_effq_efficientq_w4a8"
    (export / "configs").mkdir(parents=True)
    (export / "configs" / "metadata.json").write_text(json.dumps({EXPORTED_FROM: str(tmp_path / "model_efficientq_w4a8.pt")}))
    refuse_to_overwrite(False, tmp_path / "model_efficientq_w4a8.pt", "", stale=stale_export("", export, tmp_path / "model_efficientq_w4a8.pt"))


def _shipped_checkpoint(tmp_path, lits):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"shipped weights")
    digest = hashlib.md5(b"shipped weights").hexdigest()
    (tmp_path / "large_files.yml").write_text(f'large_files:\n  - path: "models/model.pt"\n    hash_val: "{digest}"\n    hash_type: "md5"\n')
    refuse_to_replace_shipped(False, tmp_path / "models" / "model.pt", tmp_path)


TRIGGERS = {
    "dataset folder <folder> does not exist or is not a folder.": lambda t, d: calibration_datalist(t / "absent", "lits"),
    "dataset folder <folder> does not exist: inference reads images, it never generates the demo data.": (
        lambda t, d: images(t / "absent", "lits")
    ),
    "could not recognise the dataset layout of <folder>": lambda t, d: detect_layout(t),
    "<path> is a link to <target>, which does not exist": _link_to_an_unmounted_disk,
    "BraTS case <case> has no <case>_seg.nii.gz and several files that could be its segmentation": _two_segmentation_candidates,
    "corrupt or unreadable NIfTI file <file>: <reason>; re-export or remove it.": _truncated_nifti,
    "image <file> has <n> spatial axes (<shape>); monai-effq segments 3D volumes": _slice_image,
    "label <file> is <shape> voxels, not one 3D volume": _one_hot_label,
    "image <file> has no voxel above -500 HU, so the body crop left nothing": _ct_not_in_hounsfield_units,
    "image <file> holds <n> NaN or Inf voxel(s)": _nan_image,
    "cannot read image file(s) [<file>]: <reason>; re-export or remove them.": _cut_short_metaimage,
    "folder <folder> holds no DICOM series": lambda t, d: dicom_series_files(t),
    "the DICOM series in <folder> has about <n> slices at each position: several echoes, phases or time points in one series": _two_echoes,
    "the slices of the DICOM series in <folder> are sheared by <angle> degrees against their normal (a gantry tilt)": _tilted,
    "image <file> is one slice of a DICOM series of <n> files: pass its folder": _one_slice,
    "calibration image <file> is one 3D image, but a BraTS case is its four contrasts": _flat_brats_case,
    "folder <folder> holds <n> DICOM series (<series>), and MONAI would read only the first": _two_series,
    "DICOM file <file> in folder <folder> cannot be read (damaged or cut short)": _damaged_slice,
    "the DICOM series in <folder> is not evenly sliced: <file> and <file> are <gap> mm apart where its other slices are <step> mm apart": (
        _missing_slice
    ),
    "calibration_case <n> is past the end of the <count> training cases of <folder>": (
        lambda t, d: calibration_datalist(d, "lits", case=99)
    ),
    "each calibration_crop size must be an integer of at least 1, got <value>.": (
        lambda t, d: preprocessing("lits", d, crop=[-1, -1, -1])
    ),
    "sw_roi_size <window> does not fit the network": (
        lambda t, d: check_window(torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, stride=2), torch.nn.Flatten(), torch.nn.Linear(16, 2)), [20, 20, 20])
    ),
    "calibration batch of shape <shape> does not fit the network": (
        lambda t, d: prepare_network(_unet(), torch.rand(1, 1, 12, 12, 12), EfficientQConfig())
    ),
    "FP checkpoint <file> does not exist: run the train workflow first or set --fp_checkpoint.": (
        lambda t, d: existing_checkpoint(t / "model.pt")
    ),
    "FP checkpoint <file> is damaged or not a PyTorch state dict (<error>): train again with the train workflow or restore the file.": (
        _damaged_fp_checkpoint
    ),
    "FP checkpoint <file> holds the weights of another network (<weights>): use it with the network_def it was trained with, or train this network.": (
        _other_networks_checkpoint
    ),
    "FP checkpoint <file> was saved from a <wrapper> wrapper (every weight's name starts with <prefix>)": (
        _wrapped_networks_checkpoint
    ),
    "FP checkpoint <file> holds the weights of <part>, a part of the network (<kinds>): the bundle's network wraps the one the checkpoint was saved from": (
        _checkpoint_of_a_wrapped_network
    ),
    "quantized checkpoint <file> does not exist: run the quantize workflow first": (
        lambda t, d: QuantizedCheckpointLoader(t / "model_w4a8.pt")
    ),
    "the calibration data loader is empty, so nothing would be quantized": None,  # tests/handlers/test_handlers.py
    "there is no calibration image: the bundle's dataset (dataset#data) is empty or missing.": lambda t, d: calibration_items([], 1),
    "the bundle's evaluator does not run the handlers listed in <key>, so the quantized network would never replace the FP one": _unattached_loader,
    "the config refers to @<ref>, which none of its files defines": _zoo_bundle_without_dataset,
    "the bundle's inferer has no roi_size, which the overlay takes as its window": _zoo_bundle_without_roi_size,
    "the bundle's configs/inference.json loads FP weights in <keys> (<how>), in a form the export for MONAI Label cannot take out": _unexportable_bundle,
    "the calibration batch has no <key> (it holds <keys>): name the key the bundle's transforms put the image under with --image_key": (
        lambda t, d: PrepareImageBatch()({"img": torch.zeros(1, 1, 4, 4, 4), "img_meta_dict": {}})
    ),
    "calibration image <file> does not exist: correct --calibration_images (or the bundle's --dataset_dir).": (
        lambda t, d: calibration_items([str(t / "case0.nii.gz")], 1)
    ),
    "weight_bits must be an integer from 2 to 8, got <value>": lambda t, d: EfficientQConfig(weight_bits=4.0),
    "per_channel must be True or False, got <value>": lambda t, d: EfficientQConfig(per_channel="false"),
    "skip must be a list of layer-name patterns, got the string <pattern>": lambda t, d: EfficientQConfig(skip="model.0.conv"),
    "target_memory_mib must be an integer of at least 1, got <value>.": lambda t, d: EfficientQConfig(target_memory_mib=0),
    "device <device> was asked for but this machine has no CUDA GPU: set device to 'cpu'.": _no_cuda,
    "config names layer pattern <pattern>, which matches no quantizable layer": (
        lambda t, d: EfficientQConfig(skip=["model.9.*"]).plan(["model.0.conv", "model.1.conv"])
    ),
    "unknown EfficientQConfig keys <keys>": lambda t, d: EfficientQConfig.from_dict({"weight_bit": 4}),
    "<tensor> holds <n> NaN or Inf value(s) of <m>: the checkpoint is corrupt or its training diverged": _nan_weight,
    "<tensor> holds negative variances": _negative_variance,
    "calibration volume <file> (after preprocessing) holds <n> NaN or Inf value(s)": (
        lambda t, d: check_calibration_volume(torch.tensor([[1.0, float("nan")]]), "calibration volume case-0.nii")
    ),
    "calibration volume <file> (after preprocessing) is one value (<v>) everywhere": (
        lambda t, d: check_calibration_volume(torch.zeros(1, 1, 8, 8, 8), "calibration volume case-0.nii")
    ),
    "the calibration input of layer <layer> is one value (<v>) everywhere": (
        lambda t, d: quantize(_net(), torch.zeros(1, 1, 8, 8, 8), EfficientQConfig(attention=False), progress=False)
    ),
    "<output> exists from an earlier run: pass --overwrite True to replace it, or point the setting that names it elsewhere": _earlier_output,
    "<output> would replace <input>, which this run reads": (
        lambda t, d: refuse_to_overwrite(True, t / "models", inputs=[t / "models" / "model.pt"])
    ),
    "<folder> would be replaced whole by this run's export and holds <output>, another of its outputs": (
        lambda t, d: refuse_to_overwrite(True, t / "out" / "model_q.pt", t / "out")
    ),
    "<folder> holds files that no monai-effq export wrote": _foreign_export_dir,
    "<folder> was exported from the checkpoint this run replaces and is not exported again": _stale_export,
    "<file> is the checkpoint this bundle ships (large_files.yml) and training would replace it": _shipped_checkpoint,
    # /proc/1 is a folder no one may create files in, root included
    "cannot write <output>: the folder <folder> is not writable": lambda t, d: refuse_to_overwrite(False, Path("/proc/1/eval/report.json")),
    "cannot write <output>: <path> is a file, so no folder can be made inside it": _file_in_the_way,
    "could not write <output>: <cause>; free space, or point the setting that names it": _full_disk,
    "FP checkpoint <file> holds a pickled <class> object, not a state dict": _pickled_network,
    "overwrite must be True or False, got <value>": lambda t, d: refuse_to_overwrite("false", t / "model.pt"),
    "inference datalist entry <entry> is not a case: give each as {'image': path}": (
        lambda t, d: check_inference_inputs(["ct.nii.gz"], t / "masks")
    ),
    "the inference datalist must be a non-empty list of cases": lambda t, d: check_inference_inputs({"image": "ct.nii.gz"}, t / "masks"),
    "image <file> does not exist: correct the datalist or --dataset_dir.": (
        lambda t, d: check_inference_inputs([{"image": str(t / "ct.nii.gz")}], t / "masks")
    ),
    "images <file> and <file> would both write the mask <name> in <folder>": (
        lambda t, d: check_inference_inputs([{"image": str(p)} for p in _two_named_alike(t, d)], t / "masks")
    ),
    "mask_format must be one of 'nifti', 'dicom_seg', 'rtstruct', got <value>": (
        lambda t, d: check_inference_inputs([{"image": "ct.nii.gz"}], t / "masks", mask_format="dicom")
    ),
    "mask_ext <ext> does not match mask_format <format>": (
        lambda t, d: check_inference_inputs([{"image": "ct.nii.gz"}], t / "masks", ext=".dcm")
    ),
    "image <file> is a file, and <a DICOM SEG or an RTSTRUCT> mask must point at the DICOM series it segments": _seg_of_a_file,
    "DICOM file <file> of the series in <folder> lacks <attributes>, which <a DICOM SEG or an RTSTRUCT> referencing the series needs": (
        _seg_source_without_frame_of_reference
    ),
    "the mask does not lie on the grid of DICOM slice <file>": _seg_off_the_grid,
    "DICOM file <file> of the series in <folder> holds a value a DICOM SEG cannot copy: <reason>": _seg_source_with_a_malformed_value,
    "DICOM file <file> in <folder> is a multi-frame (enhanced) image, on which DICOM SEG and RTSTRUCT masks and labels are not supported yet": (
        _seg_source_multi_frame
    ),
    "<DICOM SEG or RTSTRUCT> label <file> segments another series than its image <folder>": _seg_of_another_series,
    "<DICOM SEG or RTSTRUCT> label <file> has <no segment or several segments> labelled <name>; it holds: <segments>": _seg_without_a_segment,
    "<DICOM SEG or RTSTRUCT> label <file>: seg_segments names its segment <n> twice, as <key> and as <key>": _seg_mapping_a_segment_twice,
    "<DICOM SEG or RTSTRUCT> label <file> has no segment labelled or numbered <segment>; it holds: <segments>": _seg_mapping_a_missing_segment,
    "seg_segments maps segment <segment> to <value>, which is not one of this dataset's labels <labels>": (
        lambda t, d: lits_transforms(train=False, seg_segments={"Segment_1": 4})
    ),
    "dataset entry <n>: label <file> is <a DICOM SEG or an RTSTRUCT>, which lies on the DICOM series it segments, but the image is <file>": (
        _seg_label_of_a_file
    ),
    "<DICOM SEG or RTSTRUCT> label <file> needs its image read from the DICOM series it segments": _seg_label_loaded_beside_a_file,
    "cannot read <DICOM SEG or RTSTRUCT> label <file>: <reason>": _rtstruct_cut_short,
    "writing masks as RTSTRUCT needs scikit-image": _rtstruct_without_scikit_image,
    "RTSTRUCT label <file>: a contour of ROI <n> does not lie in the plane of a slice of the series": _rtstruct_off_the_slices,
    "RTSTRUCT label <file>: ROI <n> holds an <type> contour, which outlines no area": _rtstruct_of_open_contours,
    "the images of one case are not on one grid: <file> is <grid> where <file> is <grid>": _case_off_one_grid,
    "label <file> is not on the grid of its image <file>": _label_off_its_image,
    "<case> (<files>) holds <n> image channel(s), but the network takes <m>": _ct_of_two_phases,
    "<dataset.json> declares <n> labels (<labels>) where a <dataset> network segments <n> (<labels>)": _liver_given_to_brats,
    "learning_rate must be a positive number such as 1e-4, got <value>": lambda t, d: check_finetune_settings(300, 25, 0.0, 2),
    "max_epochs must be an integer of at least 1, got <value>": lambda t, d: check_train_settings(0, 50, 3e-3, 2),
    "body_mask holds <n> value(s) that are not whole numbers (such as <value>)": (
        lambda t, d: quantize(_net(), torch.rand(1, 1, 8, 8, 8), body_mask=torch.full((1, 8, 8, 8), 0.5), progress=False)
    ),
    "body_mask selects no voxel of the calibration data": (
        lambda t, d: quantize(_net(), torch.rand(1, 1, 8, 8, 8), body_mask=torch.zeros(1, 8, 8, 8, dtype=torch.bool), progress=False)
    ),
    "the network's output on the calibration sample of shape <shape> holds NaN or Inf": _overflowing_layer,
    "the <layer> layer's <inputs or outputs> are too large for its float32 least-squares system (sums up to <n>, beyond float32's 3.4e38)": _weight_of_a_damaged_checkpoint,
    "the calibration input of layer <layer> holds <n> NaN or Inf value(s)": (
        lambda t, d: ActivationQuantizer.calibrate(torch.tensor([1.0, float("inf")]), 8, name="model.3.conv")
    ),
    "the journal <journal> is in use by another quantization run writing the same checkpoint": _journal_in_use,
    "the quantize run that writes <file> did not finish (its journal <journal> is there)": _unfinished_run,
    "<n> validation cases cannot be shared by <m> processes": lambda t, d: rank_cases([{"image": "a.nii.gz"}], 0, 2),
    "the ranks were given different <what>: rank(s) <ranks> differ from rank 0": _ranks_given_other_weights,
    "local rank <n> has no GPU of its own: this machine has <m> CUDA GPU(s) and NCCL takes one per process.": _rank_past_the_gpus,
    "the bundle's metadata <file> has no network_data_format.outputs.pred.channel_def naming the output channels": _metadata_without_channels,
    "seg_codes for <name>: <keyword> is not a type of <category>": _misspelt_seg_code,
    "the input of the quantized <network> holds <n> NaN or Inf voxel(s)": _nan_quantized_input,
    "the input to <model.onnx> holds <n> NaN or Inf voxel(s)": _nan_onnx_input,
    "<runtime> could not run <model.onnx> on a <size> input (<reason>); it was exported on <size>": _onnx_run_at_another_size,
    "<model.onnx> was exported for inputs of shape <shape> (? marks a dynamic axis) and cannot run a <shape> input": (
        _onnx_with_fixed_axes_run_at_another_size
    ),
    "<runtime> cannot convert <operator> in <model.onnx>: the file is ONNX, but this <runtime> version cannot read that operator as written": _operator_openvino_cannot_convert,
}


def test_every_documented_message_has_a_trigger_and_every_trigger_is_documented():
    assert set(documented()) == set(TRIGGERS)


@pytest.mark.parametrize("template", [t for t, trigger in TRIGGERS.items() if trigger is not None])
def test_each_documented_message_is_what_its_trigger_raises(template, tmp_path, lits):
    with pytest.raises(UserInputError) as info:
        TRIGGERS[template](tmp_path, lits)
    message = str(info.value)
    assert documented()[template].search(message), f"{message!r} does not match the documented {template!r}"
    assert "\n" not in message, "a message is one line"
