import functools

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage, SaveImage

from monai_effq.data import BRATS_SEGMENTS, LITS_SEGMENTS, DatasetError, DicomSegWriter, check_seg_source, mask_name_formatter
from monai_effq.data import dicom_seg
from monai_effq.data.dicom_seg import segment_array, series_frames

from ..dicom import BRATS_COMPARTMENTS, write_dicom_case, write_dicom_series

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

# a CT as scanners store it (left-right and front-back flipped against RAS), one turned to lie sagittal, one oblique
_AFFINES = {
    "axial": np.array([[-0.8, 0, 0, 40.0], [0, -0.9, 0, 30.0], [0, 0, 2.5, -12.0], [0, 0, 0, 1]]),
    "sagittal": np.array([[0, 0, 2.0, -10.0], [0.7, 0, 0, 5.0], [0, -0.75, 0, 60.0], [0, 0, 0, 1]]),
    "oblique": np.array([[0.8 * np.cos(0.3), -0.9 * np.sin(0.3), 0, 1.0], [0.8 * np.sin(0.3), 0.9 * np.cos(0.3), 0, 2.0], [0, 0, 1.5, 3.0], [0, 0, 0, 1]]),
}


def _series(tmp_path, affine, shape=(20, 24, 10), **series):
    """A NIfTI volume, its labels (0, 1, 2 by intensity) and the DICOM series made from it."""
    voxels = np.random.default_rng(0).integers(-100, 100, shape).astype(np.int16)
    nib.save(nib.Nifti1Image(voxels, affine), str(tmp_path / "ct.nii.gz"))
    files = write_dicom_series(tmp_path / "ct.nii.gz", tmp_path / "series", **series)
    labels = np.digitize(voxels, [0, 60]).astype(np.uint8)  # 0, 1, 2
    return voxels, labels, files


def _read(folder):
    return LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(str(folder))


@pytest.mark.parametrize("orientation", list(_AFFINES))
def test_each_source_slice_gets_the_mask_voxels_it_covers_whatever_the_orientation(tmp_path, orientation):
    voxels, labels, files = _series(tmp_path, _AFFINES[orientation])
    image = _read(tmp_path / "series")
    # ITK stacks the slices along their normal: the sagittal affine is left-handed, so it reverses them
    assert np.array_equal(image[0].numpy(), voxels[:, :, ::-1] if orientation == "sagittal" else voxels)
    slices = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    frames = series_frames(segment_array(np.digitize(image.numpy(), [0, 60]), 2), image.affine.numpy(), slices)
    # the frames follow the files given (as written: file k from NIfTI plane k, row y, column x), not ITK's order
    assert frames.shape == (10, 24, 20, 1) and np.array_equal(frames[..., 0], labels.transpose(2, 1, 0))
    # overlapping channels (BraTS) keep a frame per channel
    channels = np.concatenate([image.numpy() >= 0, image.numpy() >= 60])
    frames = series_frames(segment_array(channels, 2), image.affine.numpy(), slices)
    assert np.array_equal(frames, np.stack([labels >= 1, labels == 2], axis=-1).transpose(2, 1, 0, 3))


def test_a_slightly_tilted_series_gets_the_voxels_itk_stacked_straight_on_each_slice(tmp_path):
    # 0.4 degrees, under the tilt the series check refuses: over 60 slices the last lies 0.5 pixel aside
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    _, labels, files = _series(tmp_path, affine, shape=(12, 14, 60), shift_per_slice=(np.tan(np.radians(0.4)), 0.0))
    image = _read(tmp_path / "series")
    slices = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    frames = series_frames(segment_array(np.digitize(image.numpy(), [0, 60]), 2), image.affine.numpy(), slices)
    assert np.array_equal(frames[..., 0], labels.transpose(2, 1, 0))


def test_the_affine_may_be_given_in_dicoms_own_lps_frame(tmp_path):
    _, labels, files = _series(tmp_path, _AFFINES["oblique"])
    image = _read(tmp_path / "series")
    slices = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    labels = segment_array(np.digitize(image.numpy(), [0, 60]), 2)
    ras = series_frames(labels, image.affine.numpy(), slices)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine.numpy()
    assert np.array_equal(series_frames(labels, lps, slices, "LPS"), ras)


def test_a_mask_off_the_series_grid_or_of_another_series_is_refused(tmp_path):
    _, _, files = _series(tmp_path, _AFFINES["axial"])
    image = _read(tmp_path / "series")
    slices = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    masks = np.ones((1, *image.shape[1:]), dtype=bool)
    shifted = image.affine.numpy().copy()
    shifted[:3, 3] += shifted[:3, 0] / 2  # half a voxel along the first axis: a mask resampled elsewhere
    with pytest.raises(DatasetError, match="does not lie on the grid of DICOM slice"):
        series_frames(masks, shifted, slices)
    with pytest.raises(DatasetError, match="lies outside the mask"):
        series_frames(masks[:, :, :12], image.affine.numpy(), slices)  # a smaller volume's mask
    with pytest.raises(DatasetError, match="both fall on mask plane"):
        series_frames(masks, image.affine.numpy(), [slices[0], slices[0], *slices[2:]])
    with pytest.raises(DatasetError, match="has 9 slices but the mask 10 planes"):
        series_frames(masks, image.affine.numpy(), slices[1:])


def test_labels_stay_a_label_map_and_channels_become_one_binary_mask_each():
    labels = np.array([[[[0.0, 1.0, 2.0]]]])  # AsDiscrete's argmax, in floating point
    assert segment_array(labels, 2).dtype == np.uint8 and segment_array(labels, 2).tolist() == [[[[0, 1, 2]]]]
    channels = np.array([[[[1, 1, 0]]], [[[1, 0, 0]]], [[[0, 0, 0]]]])  # BraTS TC, WT, ET may overlap
    assert segment_array(channels, 3).tolist() == channels.astype(bool).tolist()
    with pytest.raises(ValueError, match=r"mask labels must lie in 0..2"):
        segment_array(labels + 1, 2)
    with pytest.raises(ValueError, match="a mask with 2 channels cannot give 3 segments"):
        segment_array(channels[:2], 3)


def test_every_segment_of_both_datasets_is_coded_from_the_standards_context_groups():
    for segment in (*LITS_SEGMENTS, *BRATS_SEGMENTS):
        codes = segment.concepts()
        assert codes["segmented_property_type"].value and codes["segmented_property_category"].value
    assert LITS_SEGMENTS[0].concepts()["segmented_property_type"].value == "10200004"  # SNOMED CT liver


def _save(tmp_path, mask, image, **writer):
    saver = SaveImage(
        output_dir=str(tmp_path / "seg"), output_postfix="seg", output_ext=".dcm", resample=False, separate_folder=False,
        writer=functools.partial(DicomSegWriter, **{"segments": LITS_SEGMENTS, "algorithm": "lits_effq rtn_w4a8", **writer}),
        output_name_formatter=mask_name_formatter,
    )  # fmt: skip
    saver(MetaTensor(mask, affine=image.affine, meta=image.meta))
    return tmp_path / "seg" / "series_seg.dcm"


def test_the_seg_written_through_save_image_reads_back_as_the_mask_and_names_its_source(tmp_path):
    _, labels, files = _series(tmp_path, _AFFINES["axial"])
    image = _read(tmp_path / "series")
    mask = torch.as_tensor(np.digitize(image.numpy(), [0, 60]), dtype=torch.uint8)
    seg = hd.seg.segread(_save(tmp_path, mask, image))
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.PatientID == "EFFQ-TEST-1" and seg.ContentQualification == "RESEARCH"
    assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == ["liver", "liver tumour"]
    assert seg.get_segment_description(1).algorithm_identification[0].AlgorithmName == "lits_effq rtn_w4a8"
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    assert np.array_equal(frames, labels.transpose(2, 1, 0))


def test_an_empty_mask_still_writes_a_seg_recording_that_the_series_was_segmented(tmp_path):
    _series(tmp_path, _AFFINES["axial"])
    image = _read(tmp_path / "series")
    seg = hd.seg.segread(_save(tmp_path, torch.zeros_like(image, dtype=torch.uint8), image))
    assert seg.NumberOfFrames > 0 and not seg.pixel_array.any()


def test_a_write_that_fails_half_way_leaves_no_file_under_the_segs_name(tmp_path, monkeypatch):
    _series(tmp_path, _AFFINES["axial"])
    image = _read(tmp_path / "series")

    def half_then_fail(self, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"DICM" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(hd.seg.Segmentation, "save_as", half_then_fail)
    with pytest.raises(RuntimeError):  # SaveImage reports the writer's error as its own
        _save(tmp_path, torch.ones_like(image, dtype=torch.uint8), image)
    assert not list((tmp_path / "seg").iterdir())


def test_a_series_missing_what_a_seg_copies_is_refused_naming_the_attribute(tmp_path):
    _, _, files = _series(tmp_path, _AFFINES["axial"])
    slice_ = pydicom.dcmread(files[3])
    del slice_.FrameOfReferenceUID
    slice_.save_as(files[3])
    with pytest.raises(DatasetError, match=r"lacks FrameOfReferenceUID, which a DICOM SEG referencing the series needs"):
        check_seg_source(tmp_path / "series")


@pytest.mark.parametrize(
    "attribute, value, reason",
    [("PatientSex", "Male", "is not a valid PatientSexValues"), ("PatientBirthDate", "1970-01-01", "1970-01-01")],
)
def test_a_header_value_a_seg_cannot_copy_is_named_before_any_mask(tmp_path, attribute, value, reason):
    _, _, files = _series(tmp_path, _AFFINES["axial"])
    for file in files:  # as an anonymiser writes them, into every slice
        header = pydicom.dcmread(file)
        setattr(header, attribute, value)
        header.save_as(file)
    with pytest.raises(DatasetError, match=rf"holds a value a DICOM SEG cannot copy: .*{reason}.*Correct the header"):
        check_seg_source(tmp_path / "series")


def test_a_multi_frame_image_is_refused_as_such_not_as_missing_its_geometry(tmp_path):
    _, _, files = _series(tmp_path, _AFFINES["axial"])
    header = pydicom.dcmread(files[4])
    header.NumberOfFrames = 3
    header.save_as(files[4])
    with pytest.raises(DatasetError, match=r"is a multi-frame \(enhanced\) image, on which DICOM SEG and RTSTRUCT masks and labels are not supported"):
        check_seg_source(tmp_path / "series")


def test_without_highdicom_the_error_names_the_extra(monkeypatch):
    monkeypatch.setattr(dicom_seg, "has_highdicom", False)
    with pytest.raises(ImportError, match=r"pip install 'monai-effq\[dicom\]'"):
        dicom_seg.require_highdicom()


@pytest.mark.parametrize("orientation", list(_AFFINES))
def test_a_seg_label_reads_back_onto_its_series_as_the_mask_it_was_written_from(tmp_path, orientation):
    _series(tmp_path, _AFFINES[orientation])
    image = _read(tmp_path / "series")
    mask = torch.as_tensor(np.digitize(image.numpy(), [0, 60]), dtype=torch.uint8)
    path = _save(tmp_path, mask, image)
    assert dicom_seg.is_dicom_seg(path) and not dicom_seg.is_dicom_seg(next((tmp_path / "series").iterdir()))
    labels = dicom_seg.read_seg_labels(path, tmp_path / "series", image.affine.numpy(), image.shape[1:], dicom_seg.LITS_SEG_LABELS)
    assert labels.dtype == np.uint8 and np.array_equal(labels, mask[0].numpy())


@pytest.mark.parametrize("dataset", ["lits", "brats"])
def test_a_case_of_dicom_series_and_a_seg_label_preprocesses_as_its_nifti_case_in_each_label_convention(tmp_path, dataset):
    from monai_effq.bundle import datalist, demo_dataset
    from monai_effq.data import brats_transforms, lits_transforms, validate_datalist

    case = datalist(demo_dataset(tmp_path / "demo", dataset), dataset, "train")[0]
    dicom = write_dicom_case(case, tmp_path, BRATS_SEGMENTS if dataset == "brats" else LITS_SEGMENTS)
    validate_datalist([dicom], read_data=True)
    expected = (brats_transforms("native", train=False) if dataset == "brats" else lits_transforms(train=False))(case)
    # a BraTS SEG's TC, WT and ET give the native labels or the Decathlon's, as the dataset's layout has them
    conventions = [brats_transforms("native", train=False), brats_transforms("msd", train=False)] if dataset == "brats" else [lits_transforms(train=False)]
    for preprocessing in conventions:
        got = preprocessing(dicom)
        assert got["label"].shape == expected["label"].shape and torch.equal(got["label"], expected["label"])
        assert got["label"].meta["filename_or_obj"] == dicom["label"]
        assert torch.allclose(got["image"], expected["image"], atol=1e-4)
    assert expected["label"].sum() > 0
    if dataset == "brats":  # a SEG drawn on another contrast than the first is placed on the series it references
        later = {**dicom, "image": [*dicom["image"][1:], dicom["image"][0]]}
        assert torch.equal(brats_transforms("native", train=False)(later)["label"], expected["label"])


def test_segments_coded_in_legacy_snomed_rt_as_older_slicer_segs_are_read_by_their_snomed_ct_codes(tmp_path):
    from monai_effq.data import lits_transforms

    _series(tmp_path, _AFFINES["axial"])
    image = _read(tmp_path / "series")
    mask = torch.as_tensor(np.digitize(image.numpy(), [0, 60]), dtype=torch.uint8)
    ours = _save(tmp_path / "ours", mask, image)
    legacy = pydicom.dcmread(_save(tmp_path, mask, image, segments=_SLICER))
    for item, value in zip(legacy.SegmentSequence, ("T-62000", "M-8FFFF")):  # liver, neoplasm
        code = item.SegmentedPropertyTypeCodeSequence[0]
        code.CodeValue, code.CodingSchemeDesignator = value, "SRT"
    legacy.save_as(tmp_path / "legacy.dcm")
    got = lits_transforms(train=False)({"image": str(tmp_path / "series"), "label": str(tmp_path / "legacy.dcm")})["label"]
    expected = lits_transforms(train=False)({"image": str(tmp_path / "series"), "label": str(ours)})["label"]
    assert torch.equal(got, expected) and expected.unique().tolist() == [0, 1, 2]
    assert dicom_seg.snomed_ct(("7197", "FMA")) == ("7197", "FMA")  # other schemes stay as they are


def test_a_seg_of_another_series_or_without_the_datasets_segments_is_refused_naming_what_it_holds(tmp_path):
    from monai_effq.data import LoadImageFilesd, lits_transforms, validate_datalist

    _series(tmp_path, _AFFINES["axial"])
    image = _read(tmp_path / "series")
    mask = torch.as_tensor(np.digitize(image.numpy(), [0, 60]), dtype=torch.uint8)
    kidney = (dicom_seg.Segment("kidney", "AnatomicalStructure", "Kidney"), LITS_SEGMENTS[1])
    path = _save(tmp_path, mask, image, segments=kidney)
    with pytest.raises(DatasetError, match=r"has no segment labelled 'liver' or coded Liver \(SCT 10200004\); it holds: 1 'kidney' \(SCT .*\), 2 'liver tumour'"):
        lits_transforms(train=False)({"image": str(tmp_path / "series"), "label": str(path)})
    other = tmp_path / "other"
    other.mkdir()
    _series(other, _AFFINES["axial"], series_uid="1.2.826.0.1.3680043.2.1125.7")
    with pytest.raises(DatasetError, match=r"segments another series than its image .*other/series"):
        lits_transforms(train=False)({"image": str(other / "series"), "label": str(path)})
    nifti = str(tmp_path / "ct.nii.gz")
    with pytest.raises(DatasetError, match=r"is a DICOM SEG, which lies on the DICOM series it segments, but the image is .*ct.nii.gz"):
        validate_datalist([{"image": nifti, "label": str(path)}])
    with pytest.raises(DatasetError, match=r"needs its image read from the DICOM series it segments"):
        lits_transforms(train=False)({"image": nifti, "label": str(path)})
    with pytest.raises(DatasetError, match=r"is a DICOM SEG, which this loader cannot turn into labels"):
        LoadImageFilesd(["image", "label"])({"image": str(tmp_path / "series"), "label": str(path)})


def test_a_seg_is_told_from_a_dicom_image_by_its_header_and_only_a_seg_needs_highdicom(tmp_path, monkeypatch):
    _, _, files = _series(tmp_path, _AFFINES["axial"])
    image = _read(tmp_path / "series")
    path = _save(tmp_path, torch.zeros((1, *image.shape[1:]), dtype=torch.uint8), image)
    monkeypatch.setattr(dicom_seg, "has_highdicom", False)
    assert not dicom_seg.is_dicom_seg(files[0]) and not dicom_seg.is_dicom_seg(tmp_path / "ct.nii.gz")
    with pytest.raises(ImportError, match=r"is a DICOM SEG, and reading it as labels needs highdicom: pip install 'monai-effq\[dicom\]'"):
        dicom_seg.is_dicom_seg(path)



# as 3D Slicer names and codes segments by default
_SLICER = (dicom_seg.Segment("Segment_1", "Tissue", "Tissue"), dicom_seg.Segment("Segment_2", "Tissue", "Tissue"))


def test_a_seg_with_its_own_segment_names_reads_as_the_datasets_labels_once_seg_segments_maps_them(tmp_path):
    from monai_effq.data import lits_transforms

    _series(tmp_path, _AFFINES["axial"])
    image = _read(tmp_path / "series")
    mask = torch.as_tensor(np.digitize(image.numpy(), [0, 60]), dtype=torch.uint8)
    case = {"image": str(tmp_path / "series"), "label": str(_save(tmp_path, mask, image, segments=_SLICER))}
    with pytest.raises(DatasetError, match=r"has no segment labelled 'liver' or coded Liver \(SCT 10200004\); it holds: 1 'Segment_1' \(SCT 85756007\), 2 'Segment_2' .* map them with --seg_segments .* \(label values \[1, 2\]"):
        lits_transforms(train=False)(case)
    expected = lits_transforms(train=False)({"image": case["image"], "label": str(_save(tmp_path / "ours", mask, image))})["label"]
    # by label, by number (as fire reads it, or as a JSON key), and by label in another case and spacing
    for mapping in ({"Segment_1": 1, "Segment_2": 2}, {1: 1, "2": 2}, {"segment 1": 1, "SEGMENT_2": 2}):
        got = lits_transforms(train=False, seg_segments=mapping)(case)["label"]
        assert torch.equal(got, expected), mapping
    assert expected.unique().tolist() == [0, 1, 2]
    with pytest.raises(DatasetError, match=r"has no segment labelled or numbered 'Segment_3'; it holds: 1 'Segment_1'"):
        lits_transforms(train=False, seg_segments={"Segment_1": 1, "Segment_3": 2})(case)


@pytest.mark.parametrize(
    "mapping, why",
    [
        ({}, r"seg_segments must map DICOM SEG segments to this dataset's labels \[1, 2\], got \{\}"),
        ([1, 2], r"seg_segments must map .* got \[1, 2\]"),
        ({"Segment_1": 3}, r"seg_segments maps segment 'Segment_1' to 3, which is not one of this dataset's labels \[1, 2\]"),
        ({"Segment_1": 0}, r"to 0, which is not one of"),
        ({"Segment_1": True}, r"to True, which is not one of"),
        ({0: 1}, r"seg_segments key 0 is not a segment label or a segment number \(1 or more\)"),
        ({" ": 1}, r"seg_segments key ' ' is not"),
    ],
)
def test_a_seg_segments_mapping_that_names_no_segment_or_label_is_refused_before_any_file_is_read(mapping, why):
    from monai_effq.data import lits_transforms
    from monai_effq.utils.errors import UserInputError

    with pytest.raises(UserInputError, match=why + r".*e\.g\. \{'Segment_1': 1, 'Segment_2': 2\}"):
        lits_transforms(train=False, seg_segments=mapping)


def test_a_brats_seg_of_necrosis_oedema_and_enhancing_tumour_maps_onto_the_labels_of_either_convention(tmp_path):
    from monai_effq.bundle import datalist, demo_dataset
    from monai_effq.data import brats_transforms

    case = datalist(demo_dataset(tmp_path / "demo", "brats"), "brats", "train")[0]
    dicom = write_dicom_case(case, tmp_path / "dicom", BRATS_COMPARTMENTS)
    with pytest.raises(DatasetError, match=r"has no segment labelled 'whole tumour'; it holds: 1 'NCR' \(SCT .*\), 2 'ED' .*label values \[1, 2, 4\]"):
        brats_transforms("native", train=False)(dicom)
    expected = brats_transforms("native", train=False)(case)["label"]
    got = brats_transforms("native", train=False, seg_segments={"NCR": 1, "ED": 2, "ET": 4})(dicom)["label"]
    assert torch.equal(got, expected) and expected.sum() > 0
    # the Decathlon's convention names the same compartments 2 (non-enhancing), 1 (oedema), 3 (enhancing)
    msd = brats_transforms("msd", train=False, seg_segments={"NCR": 2, "ED": 1, "ET": 3})(dicom)["label"]
    assert torch.equal(msd, expected)
    swapped = brats_transforms("native", train=False, seg_segments={"NCR": 2, "ED": 1, "ET": 4})(dicom)["label"]
    assert not torch.equal(swapped, expected)  # each segment is read as itself: mapping them otherwise changes the labels


def test_a_seg_label_cut_short_is_named_by_a_full_dataset_check_before_any_run(tmp_path):
    from monai_effq.data import validate_datalist

    _series(tmp_path, _AFFINES["axial"])
    image = _read(tmp_path / "series")
    mask = torch.as_tensor(np.digitize(image.numpy(), [0, 60]), dtype=torch.uint8)
    case = {"image": str(tmp_path / "series"), "label": str(_save(tmp_path, mask, image))}
    validate_datalist([case], read_data=True)
    data = open(case["label"], "rb").read()
    open(case["label"], "wb").write(data[: len(data) - 200])  # frames cut short, the header whole
    validate_datalist([case])
    with pytest.raises(DatasetError, match=r"cannot read DICOM SEG label .*series_seg.dcm: .*; re-export it"):
        validate_datalist([case], read_data=True)


def _rewrite(files, change):
    for file in files:
        header = pydicom.dcmread(file)
        change(header)
        header.save_as(file)


def _seg_round_trip(tmp_path):
    """The SEG written on the series in ``tmp_path`` (as a bundle writes it), its source's first header, and the
    labels read back from the SEG against the mask it was written from."""
    image = _read(tmp_path / "series")
    mask = torch.as_tensor(np.digitize(image.numpy(), [0, 60]), dtype=torch.uint8)
    path = _save(tmp_path, mask, image)
    labels = dicom_seg.read_seg_labels(path, tmp_path / "series", image.affine.numpy(), image.shape[1:], dicom_seg.LITS_SEG_LABELS)
    assert np.array_equal(labels, mask[0].numpy())
    return hd.seg.segread(path)


def test_a_series_without_the_dicom_file_header_gets_its_seg_as_itk_reads_it(tmp_path):
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset

    _, _, files = _series(tmp_path, _AFFINES["axial"])
    for file in files:  # as older archives export: no preamble, no DICM, no file meta group
        header = pydicom.dcmread(file)
        with open(file, "wb") as f:
            write_dataset(DicomFileLike(f), header)
    assert open(files[0], "rb").read(132)[128:] != b"DICM"
    seg = _seg_round_trip(tmp_path)
    assert seg.PatientID == "EFFQ-TEST-1"


def test_a_series_an_anonymiser_stripped_of_optional_patient_and_study_attributes_gets_its_seg(tmp_path):
    stripped = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber",
                "ReferringPhysicianName", "StudyID", "SliceThickness")  # fmt: skip
    _, _, files = _series(tmp_path, _AFFINES["axial"])
    _rewrite(files, lambda header: [delattr(header, name) for name in stripped if name in header])
    check_seg_source(tmp_path / "series")
    seg = _seg_round_trip(tmp_path)
    assert seg.PatientID == "" and seg.AccessionNumber == ""
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == pytest.approx(2.5)  # the distance between the slices
    assert "PatientID" not in pydicom.dcmread(files[0], stop_before_pixels=True)  # the series' headers stay as read


def test_a_series_whose_character_set_starts_empty_as_japanese_names_do_gets_its_seg(tmp_path):
    _, _, files = _series(tmp_path, _AFFINES["axial"])
    name = "Yamada^Tarou=山田^太郎=やまだ^たろう"

    def japanese(header):
        header.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        header.PatientName = name

    _rewrite(files, japanese)
    seg = _seg_round_trip(tmp_path)
    assert str(seg.PatientName) == name


def test_seg_labels_on_a_multi_frame_image_are_refused_by_the_dataset_check_and_by_the_reader(tmp_path):
    from monai_effq.data import validate_datalist

    _, _, files = _series(tmp_path, _AFFINES["axial"])
    image = _read(tmp_path / "series")
    mask = torch.as_tensor(np.digitize(image.numpy(), [0, 60]), dtype=torch.uint8)
    case = {"image": str(tmp_path / "series"), "label": str(_save(tmp_path, mask, image))}
    _rewrite(files[:1], lambda header: setattr(header, "NumberOfFrames", 2))
    multi_frame = r"is a multi-frame \(enhanced\) image, on which DICOM SEG and RTSTRUCT masks and labels are not supported"
    with pytest.raises(DatasetError, match=multi_frame):
        validate_datalist([case])
    with pytest.raises(DatasetError, match=multi_frame):
        dicom_seg.read_seg_labels(case["label"], case["image"], image.affine.numpy(), image.shape[1:], dicom_seg.LITS_SEG_LABELS)
