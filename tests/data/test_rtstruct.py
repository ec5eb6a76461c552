import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage
import torch
from monai.transforms import LoadImage

from monai_effq.data import DatasetError, LoadImageFilesd, lits_transforms, validate_datalist
from monai_effq.data.dicom_seg import LITS_SEG_LABELS, SegLabels
from monai_effq.data.rtstruct import fill_polygon, is_rtstruct, read_rtstruct_labels

from ..dicom import write_dicom_series, write_rtstruct

pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

# a CT as scanners store it (left-right and front-back flipped against RAS), and one tilted in-plane and through-plane
_AFFINES = {
    "axial": np.array([[-0.8, 0, 0, 40.0], [0, -0.9, 0, 30.0], [0, 0, 2.5, -12.0], [0, 0, 0, 1]]),
    "sagittal": np.array([[0, 0, 2.0, -10.0], [0.7, 0, 0, 5.0], [0, -0.75, 0, 60.0], [0, 0, 0, 1]]),
    "oblique": np.array([[0.8 * np.cos(0.3), -0.9 * np.sin(0.3), 0, 1.0], [0.8 * np.sin(0.3), 0.9 * np.cos(0.3), 0, 2.0], [0, 0, 1.5, 3.0], [0, 0, 0, 1]]),
}


def _rectangle(top, left, bottom, right):
    return np.array([[top, left], [top, right], [bottom, right], [bottom, left]], dtype=np.float64)


def _diamond(row, column, radius):
    return np.array([[row - radius, column], [row, column + radius], [row + radius, column], [row, column - radius]], dtype=np.float64)


# what each ROI outlines, per slice: membership of pixel (row, column), as the shapes are defined
def _in_rectangle(r, c, top, left, bottom, right):
    return (top <= r) & (r <= bottom) & (left <= c) & (c <= right)


def _in_diamond(r, c, row, column, radius):
    return np.abs(r - row) + np.abs(c - column) <= radius


def _drawing():
    """ROI name -> contours (slice, polygon), and the expected membership of pixel (slice, row, column) per ROI."""
    rois = {
        # a liver over slices 2-6, with a hole (a second contour inside the first) on slice 5, its border
        # traced through the centres of the liver pixels around it, as a mask's converter traces holes
        "Liver": [(k, _rectangle(3, 4, 12, 15)) for k in range(2, 7)] + [(5, _rectangle(5, 7, 10, 12))],
        "GTV": [(3, _diamond(8, 9, 3)), (4, _diamond(8, 9, 2))],
    }

    def liver(k, r, c):
        inside = np.isin(k, range(2, 7)) & _in_rectangle(r, c, 3, 4, 12, 15)
        return inside & ~((k == 5) & _in_rectangle(r, c, 6, 8, 9, 11))  # the hole: the pixels strictly inside its border

    def tumour(k, r, c):
        return ((k == 3) & _in_diamond(r, c, 8, 9, 3)) | ((k == 4) & _in_diamond(r, c, 8, 9, 2))

    return rois, liver, tumour


def _series(tmp_path, affine, shape=(20, 24, 10), **series):
    voxels = np.random.default_rng(0).integers(-100, 100, shape).astype(np.int16)
    nib.save(nib.Nifti1Image(voxels, affine), str(tmp_path / "ct.nii.gz"))
    return write_dicom_series(tmp_path / "ct.nii.gz", tmp_path / "series", **series)


def _expected(image, files, liver, tumour):
    """The labels each voxel of ``image`` should get: its centre taken to the slice and pixel it lies on, by the slices' own geometry."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    shape = image.shape[1:]
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = (image.affine.numpy() @ np.c_[index, np.ones(len(index))].T).T[:, :3] * [-1, -1, 1]  # RAS -> LPS
    orientation = np.asarray(headers[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    depths = np.array([np.asarray(h.ImagePositionPatient, dtype=np.float64) @ normal for h in headers])
    k = np.abs(world @ normal - depths[:, None]).argmin(0)
    offset = world - np.array([h.ImagePositionPatient for h in headers], dtype=np.float64)[k]
    row_spacing, column_spacing = (float(v) for v in headers[0].PixelSpacing)
    r, c = np.rint(offset @ orientation[3:] / row_spacing), np.rint(offset @ orientation[:3] / column_spacing)
    labels = np.where(tumour(k, r, c), 2, np.where(liver(k, r, c), 1, 0))
    return labels.reshape(shape).astype(np.uint8)


def test_a_polygon_fills_the_pixels_whose_centres_lie_inside_or_on_its_edges():
    square = fill_polygon(_rectangle(1, 2, 4, 6), 8, 9)  # corners on pixel centres: the border is the ROI's
    r, c = np.mgrid[:8, :9]
    assert np.array_equal(square, _in_rectangle(r, c, 1, 2, 4, 6))
    assert np.array_equal(fill_polygon(_diamond(4, 4, 3), 9, 9), _in_diamond(*np.mgrid[:9, :9], 4, 4, 3))
    # between centres, a pixel belongs where its centre is inside
    assert np.array_equal(fill_polygon(_rectangle(0.5, 0.5, 2.5, 3.5), 5, 5), _in_rectangle(r[:5, :5], c[:5, :5], 1, 1, 2, 3))
    # a concave L, clipped by the slice's edge
    ell = np.array([[-3, -3], [-3, 2], [1, 2], [1, 5], [3, 5], [3, -3]], dtype=np.float64)
    r, c = np.mgrid[:6, :7]
    assert np.array_equal(fill_polygon(ell, 6, 7), (r <= 3) & (c <= 5) & ((c <= 2) | (r >= 1)))
    # a random convex polygon against the half-planes of its edges, counter-clockwise or not
    rng = np.random.default_rng(1)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
    polygon = np.c_[10 + 7.3 * np.sin(angles), 11 + 8.1 * np.cos(angles)]
    r, c = np.mgrid[:22, :24]
    edges = np.roll(polygon, -1, 0) - polygon
    side = edges[:, 0, None, None] * (c[None] - polygon[:, 1, None, None]) - edges[:, 1, None, None] * (r[None] - polygon[:, 0, None, None])
    inside = (side >= 0).all(0) | (side <= 0).all(0)
    clear = (np.abs(side) / np.linalg.norm(edges, axis=1)[:, None, None]).min(0) > 0.05  # centres off the edges' tolerance
    assert inside.sum() > 100 and np.array_equal(fill_polygon(polygon, 22, 24)[clear], inside[clear])
    assert np.array_equal(fill_polygon(polygon[::-1], 22, 24)[clear], inside[clear])
    # a contour of one or two points (a single pixel, a one-pixel-wide run) is the pixels it passes through
    assert np.array_equal(np.argwhere(fill_polygon(np.array([[3.0, 4.0]]), 8, 9)), [[3, 4]])
    assert np.array_equal(np.argwhere(fill_polygon(np.array([[2.0, 1.0], [2.0, 6.0]]), 8, 9)), [[2, c] for c in range(1, 7)])
    assert np.array_equal(np.argwhere(fill_polygon(np.array([[1.0, 1.0], [4.0, 4.0]]), 8, 9)), [[i, i] for i in range(1, 5)])


@pytest.mark.parametrize("orientation, decimals", [("axial", 4), ("sagittal", 4), ("oblique", 4), ("oblique", 2)])
def test_an_rtstruct_reads_onto_its_series_as_the_shapes_its_contours_outline(tmp_path, orientation, decimals):
    files = _series(tmp_path, _AFFINES[orientation])
    image = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(str(tmp_path / "series"))
    rois, liver, tumour = _drawing()
    path = write_rtstruct(files, tmp_path / "rs.dcm", rois, decimals=decimals)  # 2: mm rounded as many exports write them
    assert is_rtstruct(path) and not is_rtstruct(files[0]) and not is_rtstruct(tmp_path / "ct.nii.gz")
    expected = _expected(image, files, liver, tumour)
    assert (expected == 1).sum() > 100 and (expected == 2).sum() > 10
    labels = SegLabels.from_mapping({"Liver": 1, "GTV": 2}, (0, 1, 2))
    got = read_rtstruct_labels(path, tmp_path / "series", image.affine.numpy(), image.shape[1:], labels)
    assert got.dtype == np.uint8 and np.array_equal(got, expected)
    # loaded beside its series, as a dataset's case
    case = LoadImageFilesd(["image", "label"], seg_labels=labels)({"image": str(tmp_path / "series"), "label": path})
    assert np.array_equal(case["label"].numpy(), expected) and case["label"].meta["filename_or_obj"] == path


def test_rois_named_as_the_dataset_need_no_mapping_and_contours_need_not_name_their_slices(tmp_path):
    files = _series(tmp_path, _AFFINES["axial"])
    image = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(str(tmp_path / "series"))
    rois, liver, tumour = _drawing()
    path = write_rtstruct(files, tmp_path / "rs.dcm", {"Liver": rois["Liver"], "Liver tumor": rois["GTV"]}, reference_images=False)
    got = lits_transforms(train=False)({"image": str(tmp_path / "series"), "label": path})["label"]
    nifti = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(_expected(image, files, liver, tumour), image.affine.numpy()), str(nifti))
    expected = lits_transforms(train=False)({"image": str(tmp_path / "ct.nii.gz"), "label": str(nifti)})["label"]
    assert torch.equal(got, expected) and expected.unique().tolist() == [0, 1, 2]
    validate_datalist([{"image": str(tmp_path / "series"), "label": path}], read_data=True)


def test_rois_named_in_the_clinic_s_language_are_found_by_their_identification_codes(tmp_path):
    files = _series(tmp_path, _AFFINES["axial"])
    image = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(str(tmp_path / "series"))
    rois, liver, tumour = _drawing()
    named = {"Leber": rois["Liver"], "Lebertumor": rois["GTV"]}
    # SNOMED CT liver and neoplasm, the codes a SEG gives these segments
    coded = write_rtstruct(files, tmp_path / "coded.dcm", named, codes={"Leber": ("10200004", "SCT", "Liver"), "Lebertumor": ("108369006", "SCT", "Neoplasm")})
    args = (tmp_path / "series", image.affine.numpy(), image.shape[1:], LITS_SEG_LABELS)
    assert np.array_equal(read_rtstruct_labels(coded, *args), _expected(image, files, liver, tumour))
    # the same concepts in legacy SNOMED RT, as older planning systems code them
    legacy = write_rtstruct(files, tmp_path / "legacy.dcm", named, codes={"Leber": ("T-62000", "SRT", "Liver"), "Lebertumor": ("M-8FFFF", "SRT", "Neoplasm")})
    assert np.array_equal(read_rtstruct_labels(legacy, *args), _expected(image, files, liver, tumour))
    uncoded = write_rtstruct(files, tmp_path / "uncoded.dcm", named)
    with pytest.raises(DatasetError, match="no segment labelled 'liver'; it holds: 1 'Leber', 2 'Lebertumor'"):
        read_rtstruct_labels(uncoded, *args)


def test_an_rtstruct_of_another_series_off_its_slices_or_of_open_contours_is_refused_naming_why(tmp_path):
    files = _series(tmp_path, _AFFINES["axial"])
    folder = tmp_path / "series"
    image = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(str(folder))
    args = (folder, image.affine.numpy(), image.shape[1:], LITS_SEG_LABELS)
    rois = {"liver": [(2, _rectangle(3, 4, 12, 15))], "liver tumour": [(3, _diamond(8, 9, 2))]}
    other = write_rtstruct(files, tmp_path / "other.dcm", rois, series_uid="1.2.3.4", reference_images=False)
    with pytest.raises(DatasetError, match=r"RTSTRUCT label .*other.dcm segments another series than its image .*series"):
        read_rtstruct_labels(other, *args)
    named = write_rtstruct(files, tmp_path / "named.dcm", {"Leber": rois["liver"], "liver tumour": rois["liver tumour"]})
    with pytest.raises(DatasetError, match=r"RTSTRUCT label .*named.dcm has no segment labelled 'liver'; it holds: 1 'Leber', 2 'liver tumour'"):
        read_rtstruct_labels(named, *args)
    open_ = write_rtstruct(files, tmp_path / "open.dcm", rois, contour_type="OPEN_PLANAR")
    with pytest.raises(DatasetError, match=r"ROI 1 holds an OPEN_PLANAR contour, which outlines no area"):
        read_rtstruct_labels(open_, *args)
    between = write_rtstruct(files, tmp_path / "between.dcm", rois)
    ds = pydicom.dcmread(between)
    points = np.asarray(ds.ROIContourSequence[0].ContourSequence[0].ContourData, dtype=float).reshape(-1, 3)
    points[:, 2] += 1.25  # half-way to the next slice (2.5 mm apart)
    ds.ROIContourSequence[0].ContourSequence[0].ContourData = [f"{v:.4f}" for v in points.ravel()]
    ds.save_as(between)
    with pytest.raises(DatasetError, match=r"a contour of ROI 1 does not lie in the plane of a slice of the series \(it is 1.25 mm"):
        read_rtstruct_labels(between, *args)
    with pytest.raises(DatasetError, match=r"is an RTSTRUCT, which lies on the DICOM series it segments, but the image is .*ct.nii.gz"):
        validate_datalist([{"image": str(tmp_path / "ct.nii.gz"), "label": str(between)}])
    with pytest.raises(DatasetError, match=r"is an RTSTRUCT, which this loader cannot turn into labels"):
        LoadImageFilesd(["image", "label"])({"image": str(folder), "label": str(between)})


def test_a_label_file_cut_short_is_named_by_a_full_dataset_check_before_any_run(tmp_path):
    files = _series(tmp_path, _AFFINES["axial"])
    rois, _, _ = _drawing()
    path = write_rtstruct(files, tmp_path / "rs.dcm", {"liver": rois["Liver"], "liver tumour": rois["GTV"]})
    case = {"image": str(tmp_path / "series"), "label": path}
    validate_datalist([case], read_data=True)
    data = open(path, "rb").read()
    for share in (0.5, 0.9, 0.995):  # as a copy interrupted mid-file leaves it: pydicom reads what is there
        open(path, "wb").write(data[: int(len(data) * share)])
        validate_datalist([case])  # the header alone still reads
        with pytest.raises(DatasetError, match=r"cannot read RTSTRUCT label .*rs.dcm: .*; re-export it, or give the labels as NIfTI"):
            validate_datalist([case], read_data=True)
        with pytest.raises(DatasetError, match=r"cannot read RTSTRUCT label .*rs.dcm"):
            lits_transforms(train=False)(case)


def test_a_bare_rtstruct_without_the_file_header_reads_as_one_with_it(tmp_path):
    files = _series(tmp_path, _AFFINES["axial"])
    rois, _, _ = _drawing()
    path = write_rtstruct(files, tmp_path / "rs.dcm", {"liver": rois["Liver"], "liver tumour": rois["GTV"]})
    ds = pydicom.dcmread(path)
    del ds.file_meta
    ds.preamble = None
    bare = tmp_path / "bare.dcm"
    pydicom.dcmwrite(bare, ds, implicit_vr=True, little_endian=True)  # as older planning systems export
    assert open(bare, "rb").read()[128:132] != b"DICM" and is_rtstruct(bare)
    case = {"image": str(tmp_path / "series")}
    expected = lits_transforms(train=False)({**case, "label": path})["label"]
    assert torch.equal(lits_transforms(train=False)({**case, "label": str(bare)})["label"], expected) and expected.any()


def test_reading_an_rtstruct_without_pydicom_names_the_extra(tmp_path, monkeypatch):
    from monai_effq.data import rtstruct
    from monai_effq.utils.errors import MissingExtraError

    files = _series(tmp_path, _AFFINES["axial"])
    path = write_rtstruct(files, tmp_path / "rs.dcm", {"liver": _drawing()[0]["Liver"]})
    monkeypatch.setattr(rtstruct, "has_pydicom", False)
    with pytest.raises(MissingExtraError, match=r"is an RTSTRUCT, and reading it as labels needs pydicom: pip install 'monai-effq\[dicom\]'"):
        lits_transforms(train=False)({"image": str(tmp_path / "series"), "label": path})


def test_a_mapping_that_paints_a_segment_over_entirely_warns_and_one_naming_a_segment_twice_is_refused(tmp_path, caplog):
    files = _series(tmp_path, _AFFINES["axial"])
    image = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(str(tmp_path / "series"))
    rois, _, _ = _drawing()
    path = write_rtstruct(files, tmp_path / "rs.dcm", rois)
    args = (path, tmp_path / "series", image.affine.numpy(), image.shape[1:])
    with caplog.at_level("WARNING", logger="monai_effq.data.dicom_seg"):
        got = read_rtstruct_labels(*args, SegLabels.from_mapping({"GTV": 2, "Liver": 1}, (0, 1, 2)))
    assert 2 not in got and "segment 'GTV' (label 2) is painted over entirely" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="monai_effq.data.dicom_seg"):
        read_rtstruct_labels(*args, SegLabels.from_mapping({"Liver": 1, "GTV": 2}, (0, 1, 2)))
    assert caplog.text == ""
    with pytest.raises(DatasetError, match=r"seg_segments names its segment 1 twice, as 'Liver' and as 'liver'"):
        read_rtstruct_labels(*args, SegLabels.from_mapping({"Liver": 1, "liver": 2}, (0, 1, 2)))


def _write_masks(tmp_path, mask, image, segments, name="rs", **writer):
    import functools

    from monai.data import MetaTensor
    from monai.transforms import SaveImage

    from monai_effq.data import mask_name_formatter
    from monai_effq.data.rtstruct import RtStructWriter

    saver = SaveImage(
        output_dir=str(tmp_path / name), output_postfix="rtstruct", output_ext=".dcm", resample=False, separate_folder=False,
        writer=functools.partial(RtStructWriter, segments=segments, algorithm="lits_effq rtn_w4a8", **writer), output_name_formatter=mask_name_formatter,
    )  # fmt: skip
    saver(MetaTensor(mask, affine=image.affine, meta=image.meta))
    return tmp_path / name / "series_rtstruct.dcm"


@pytest.mark.parametrize("orientation", list(_AFFINES))
def test_masks_written_as_an_rtstruct_read_back_voxel_for_voxel_and_lie_on_the_slices_they_name(tmp_path, orientation):
    from monai_effq.data import BRATS_SEGMENTS, LITS_SEGMENTS

    files = _series(tmp_path, _AFFINES[orientation])
    image = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(str(tmp_path / "series"))
    # labels of smoothed noise: islands, holes and islands in holes, touching the slices' edges and each other at corners
    smooth = scipy.ndimage.uniform_filter(image.numpy().astype(float), size=(1, 3, 3, 1))
    labels = torch.as_tensor(np.digitize(smooth, [0, 15]), dtype=torch.uint8)
    assert 0.1 < (labels == 2).float().mean() < (labels == 1).float().mean() < 0.6
    args = (tmp_path / "series", image.affine.numpy(), image.shape[1:])
    # the liver drawn as a planning system draws organs, around its tumour (nested), or as the label map has it
    for nested in (True, False):
        path = _write_masks(tmp_path, labels, image, LITS_SEGMENTS, name=f"rs{nested}", nested=nested)
        assert np.array_equal(read_rtstruct_labels(path, *args, LITS_SEG_LABELS), labels[0].numpy())
        liver = read_rtstruct_labels(path, *args, SegLabels.from_mapping({"liver": 1}, (0, 1)))
        assert np.array_equal(liver, (labels[0] >= 1 if nested else labels[0] == 1).numpy())

    ds = pydicom.dcmread(path)
    source = {h.SOPInstanceUID: h for h in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["liver", "liver tumour"] and ds.Modality == "RTSTRUCT"
    observations = ds.RTROIObservationsSequence
    assert [(o.RTROIIdentificationCodeSequence[0].CodeValue, o.RTROIIdentificationCodeSequence[0].CodingSchemeDesignator) for o in observations] == [
        ("10200004", "SCT"), ("108369006", "SCT")
    ]  # fmt: skip
    assert [o.RTROIInterpretedType for o in observations] == ["ORGAN", ""]
    # renamed in a planning system, the ROIs are still found, by the codes written with them
    for roi, name in zip(ds.StructureSetROISequence, ("Leber", "Lebertumor")):
        roi.ROIName = name
    renamed = tmp_path / "renamed.dcm"
    ds.save_as(renamed)
    assert np.array_equal(read_rtstruct_labels(renamed, *args, LITS_SEG_LABELS), read_rtstruct_labels(path, *args, LITS_SEG_LABELS))
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian and ds.StructureSetName == "lits_effq rtn_w4a8"
    first = next(iter(source.values()))
    assert ds.PatientID == first.PatientID and ds.StudyInstanceUID == first.StudyInstanceUID
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            header = source[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            orientation_ = np.asarray(header.ImageOrientationPatient, dtype=float)
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            depth = (points - np.asarray(header.ImagePositionPatient, dtype=float)) @ np.cross(orientation_[:3], orientation_[3:])
            assert np.abs(depth).max() < 1e-2 and len(points) == contour.NumberOfContourPoints >= 3

    # overlapping channels (BraTS' TC, WT, ET): each an ROI of its own
    channels = torch.as_tensor(scipy.ndimage.uniform_filter(np.random.default_rng(1).random((3, *image.shape[1:])), (1, 3, 3, 1)) > 0.55)
    path = _write_masks(tmp_path, channels.to(torch.uint8), image, BRATS_SEGMENTS, name="brats")
    for k in range(3):
        got = read_rtstruct_labels(path, *args, SegLabels.from_mapping({k + 1: 1}, (0, 1)))
        assert np.array_equal(got, channels[k].numpy()), k


def test_an_rtstruct_write_that_fails_half_way_leaves_no_file(tmp_path, monkeypatch):
    from monai_effq.data import LITS_SEGMENTS

    _series(tmp_path, _AFFINES["axial"])
    image = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(str(tmp_path / "series"))

    def broken(path, *args, **kwargs):
        open(path, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(pydicom, "dcmwrite", broken)
    with pytest.raises(Exception, match="disk full"):
        _write_masks(tmp_path, torch.ones((1, *image.shape[1:]), dtype=torch.uint8), image, LITS_SEGMENTS)
    assert not (tmp_path / "rs" / "series_rtstruct.dcm").exists() and list((tmp_path / "rs").glob("*")) == []


def test_a_long_jagged_border_and_an_empty_segment_write_a_structure_set_that_reads_back(tmp_path):
    from monai_effq.data import LITS_SEGMENTS

    # a 600 x 600 slice with a disc of ragged border: one contour of thousands of vertices, more than 64 KiB of coordinates
    rows, columns = np.mgrid[:600, :600]
    teeth = np.floor(np.arctan2(rows - 300, columns - 300) * 500 / np.pi) % 2  # 1000 teeth around the disc
    ragged = np.hypot(rows - 300, columns - 300) < 250 + 4 * teeth
    nib.save(nib.Nifti1Image(np.zeros((600, 600, 2), dtype=np.int16), np.diag([0.7, 0.7, 2.0, 1.0])), str(tmp_path / "ct.nii.gz"))
    write_dicom_series(tmp_path / "ct.nii.gz", tmp_path / "series")
    image = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(str(tmp_path / "series"))
    mask = torch.as_tensor(np.stack([ragged.T, np.zeros_like(ragged)], -1)[None], dtype=torch.uint8)  # no tumour anywhere
    path = _write_masks(tmp_path, mask, image, LITS_SEGMENTS)
    ds = pydicom.dcmread(path)
    longest = max(ds.ROIContourSequence[0].ContourSequence, key=lambda c: int(c.NumberOfContourPoints))
    assert len("\\".join(str(v) for v in longest.ContourData)) > 65535 and "ContourSequence" not in ds.ROIContourSequence[1]
    got = read_rtstruct_labels(path, tmp_path / "series", image.affine.numpy(), image.shape[1:], LITS_SEG_LABELS)
    assert np.array_equal(got, mask[0].numpy())
