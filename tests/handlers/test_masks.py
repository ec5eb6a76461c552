"""DicomMaskSaver writes any bundle's masks as DICOM SEG or RTSTRUCT, its segments coded from the bundle's channels."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.transforms import LoadImage

from monai_effq.data import DatasetError
from monai_effq.data.dicom_seg import SegLabels, read_seg_labels
from monai_effq.handlers import DicomMaskSaver, output_channels
from monai_effq.utils.errors import MissingInputError, OutputWriteError, UserInputError, find_user_error

from ..dicom import write_dicom_series

hd = pytest.importorskip("highdicom")
pytest.importorskip("skimage")

CHANNELS = {"0": "background", "1": "kidney_left", "2": "liver tumour"}


def _ct(folder, centre=(12, 12, 6)):
    """A DICOM series whose voxels hold ten times their distance from ``centre``, and the image read from it."""
    grid = np.stack(np.meshgrid(*(np.arange(n) - c for n, c in zip((24, 24, 12), centre)), indexing="ij"))
    voxels = (np.sqrt((grid**2).sum(0)) * 10).astype(np.int16)
    affine = np.array([[-0.8, 0, 0, 40.0], [0, -0.8, 0, 30.0], [0, 0, 2.5, -12.0], [0, 0, 0, 1]])
    folder.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(voxels, affine), str(folder.parent / "ct.nii.gz"))
    write_dicom_series(folder.parent / "ct.nii.gz", folder)
    return LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(str(folder))


@pytest.fixture
def case(tmp_path):
    """A DICOM series and a prediction on its grid: label 2 a ball of radius 3.5, label 1 the shell around it to 8."""
    image = _ct(tmp_path / "2.000000-VENOUS-1234")
    labels = np.digitize(image.numpy(), [35, 80])  # 0 within 3.5 voxels of the centre, 1 to 8, 2 beyond
    labels = np.array([2, 1, 0], dtype=np.uint8)[labels]
    return MetaTensor(torch.as_tensor(labels), affine=image.affine, meta=image.meta), image


def _dice(a, b, label):
    return 2 * ((a == label) & (b == label)).sum() / ((a == label).sum() + (b == label).sum())


def _evaluate(pred, saver):
    """Run one iteration whose post-processed output is ``pred``, with ``saver`` attached."""
    engine = Engine(lambda e, batch: [{"pred": pred}])
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    return engine


def test_a_label_map_becomes_a_seg_whose_segments_are_named_and_coded_from_the_bundles_channels(tmp_path, case):
    pred, image = case
    _evaluate(pred, DicomMaskSaver("dicom_seg", output_dir=tmp_path / "eval", channel_def=CHANNELS, algorithm="monai-effq efficientq_w4a8"))
    path = tmp_path / "eval" / "2.000000-VENOUS-1234_seg.dcm"  # the series folder's whole name
    seg = hd.seg.segread(path)
    kidney, tumour = seg.get_segment_description(1), seg.get_segment_description(2)
    assert (kidney.segment_label, kidney.segmented_property_type.value) == ("kidney_left", "64033007")  # SNOMED CT kidney
    assert kidney.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Left"
    assert (tumour.segmented_property_type.meaning, tumour.anatomic_regions[0].meaning) == ("Neoplasm", "Liver")
    assert kidney.algorithm_identification[0].AlgorithmName == "monai-effq efficientq_w4a8"
    segments = SegLabels(("kidney_left", "liver tumour"), (1, 2))
    read = read_seg_labels(path, tmp_path / "2.000000-VENOUS-1234", image.affine.numpy(), image.shape[1:], segments)
    assert np.array_equal(read, pred[0].numpy()) and set(np.unique(read)) == {0, 1, 2}


def test_an_rtstruct_is_written_from_the_channels_of_the_bundles_metadata(tmp_path, case):
    from monai_effq.data.rtstruct import load_rtstruct, read_rtstruct_labels

    pred, image = case
    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps({"network_data_format": {"outputs": {"pred": {"channel_def": CHANNELS}}}}))
    _evaluate(pred, DicomMaskSaver("rtstruct", output_dir=tmp_path / "eval", metadata_file=meta))
    path = tmp_path / "eval" / "2.000000-VENOUS-1234_rtstruct.dcm"
    assert [roi.ROIName for roi in load_rtstruct(path).StructureSetROISequence] == ["kidney_left", "liver tumour"]
    segments = SegLabels(("kidney_left", "liver tumour"), (1, 2))
    read = read_rtstruct_labels(path, tmp_path / "2.000000-VENOUS-1234", image.affine.numpy(), image.shape[1:], segments)
    # contours filled again: an edge voxel may move, so per label (the kidney is 178 voxels of 6912)
    assert _dice(read, pred[0].numpy(), 1) > 0.9 and _dice(read, pred[0].numpy(), 2) > 0.9
    codes = [o.RTROIIdentificationCodeSequence[0] for o in load_rtstruct(path).RTROIObservationsSequence]
    assert codes[0].CodeValue == "64033007" and codes[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Left"


def test_the_bundles_own_nifti_masks_need_nothing_more_and_no_handler_is_attached(tmp_path):
    engine = Engine(lambda e, batch: None)
    DicomMaskSaver("nifti", output_dir=tmp_path, metadata_file=tmp_path / "missing.json").attach(engine)
    assert not engine._event_handlers[Events.ITERATION_COMPLETED]  # and the missing metadata was never read


def test_a_dicom_mask_folder_that_cannot_be_made_is_named_before_the_first_case(tmp_path):
    (tmp_path / "eval").write_text("a file where the folder would be")
    saver = DicomMaskSaver("dicom_seg", output_dir=tmp_path / "eval" / "masks", channel_def=CHANNELS)
    with pytest.raises(OutputWriteError, match="eval is a file, so no folder can be made inside it"):
        saver.attach(Engine(lambda e, batch: None))


def test_a_mask_format_channels_or_image_it_cannot_write_is_named(tmp_path, case):
    pred, _ = case
    with pytest.raises(UserInputError, match="mask_format must be 'nifti', 'dicom_seg' or 'rtstruct', got 'seg'"):
        DicomMaskSaver("seg")
    with pytest.raises(MissingInputError, match=r"metadata .*missing.json does not exist.*--channel_def"):
        _evaluate(pred, DicomMaskSaver("dicom_seg", metadata_file=tmp_path / "missing.json"))
    (tmp_path / "metadata.json").write_text(json.dumps({"network_data_format": {"outputs": {"pred": {"type": "image"}}}}))
    with pytest.raises(UserInputError, match=r"no network_data_format.outputs.pred.channel_def"):
        output_channels(tmp_path / "metadata.json")
    (tmp_path / "metadata.json").write_text("{")
    with pytest.raises(UserInputError, match=r"cannot read the bundle's metadata"):
        output_channels(tmp_path / "metadata.json")
    nifti = MetaTensor(pred.as_tensor(), affine=pred.affine, meta={**pred.meta, "filename_or_obj": str(tmp_path / "ct.nii.gz")})
    with pytest.raises(RuntimeError) as refused:  # SaveImage reports its writer's error as its own
        _evaluate(nifti, DicomMaskSaver("dicom_seg", output_dir=tmp_path / "eval", channel_def=CHANNELS))
    error = find_user_error(refused.value)  # what the bundle CLI prints as one line
    assert isinstance(error, DatasetError) and "ct.nii.gz is a file, and a DICOM SEG mask must point at the DICOM series" in str(error)


def test_the_evaluators_cases_are_checked_before_the_first_and_a_one_hot_background_is_left_out(tmp_path, case):
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedEvaluator

    pred, image = case
    other = _ct(tmp_path / "patient2" / "2.000000-VENOUS-1234")  # a second patient's series, named as the first's

    def evaluator(folders):
        loader = DataLoader(Dataset([{"image": str(f)} for f in folders]), batch_size=1)
        return SupervisedEvaluator(torch.device("cpu"), loader, torch.nn.Identity(), decollate=True)

    saver = DicomMaskSaver("dicom_seg", output_dir=tmp_path / "eval", channel_def=CHANNELS)
    with pytest.raises(UserInputError, match=r"images .*2.000000-VENOUS-1234 and .*patient2/2.000000-VENOUS-1234 would both write the mask 2.000000-VENOUS-1234_seg.dcm"):
        saver.attach(evaluator([tmp_path / "2.000000-VENOUS-1234", tmp_path / "patient2" / "2.000000-VENOUS-1234"]))
    with pytest.raises(DatasetError, match=r"ct.nii.gz is a file, and a DICOM SEG mask"):
        DicomMaskSaver("dicom_seg", channel_def=CHANNELS).attach(evaluator([tmp_path / "ct.nii.gz"]))
    with pytest.raises(MissingInputError, match=r"image .*absent does not exist"):
        DicomMaskSaver("dicom_seg", channel_def=CHANNELS).attach(evaluator([tmp_path / "absent"]))

    # a spleen bundle's AsDiscreted(argmax=True, to_onehot=2): two channels, the first the background
    spleen = MetaTensor(torch.stack([pred[0] == 0, pred[0] != 0]).to(torch.uint8), affine=pred.affine, meta=pred.meta)
    _evaluate(spleen, DicomMaskSaver("dicom_seg", output_dir=tmp_path / "spleen", channel_def={"0": "background", "1": "spleen"}))
    seg = hd.seg.segread(tmp_path / "spleen" / "2.000000-VENOUS-1234_seg.dcm")
    assert seg.get_segment_description(1).segmented_property_type.meaning == "Spleen" and seg.NumberOfFrames > 0

    # AsDiscreted(argmax=True, to_onehot=3): three channels, the first the background
    one_hot = MetaTensor(torch.stack([pred[0] == k for k in range(3)]).to(torch.uint8), affine=pred.affine, meta=pred.meta)
    _evaluate(one_hot, DicomMaskSaver("dicom_seg", output_dir=tmp_path / "eval", channel_def=CHANNELS))
    segments = SegLabels(("kidney_left", "liver tumour"), (1, 2))
    read = read_seg_labels(tmp_path / "eval" / "2.000000-VENOUS-1234_seg.dcm", tmp_path / "2.000000-VENOUS-1234", image.affine.numpy(), image.shape[1:], segments)
    assert np.array_equal(read, pred[0].numpy()) and other.shape == image.shape
