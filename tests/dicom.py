"""Write a 3D image as a DICOM series, one file per slice, as a scanner's archive hands it out."""

from __future__ import annotations

import locale
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import itk
import numpy as np

__all__ = ["BRATS_COMPARTMENTS", "write_dicom_case", "write_dicom_series", "write_non_image_dicom", "write_rtstruct", "write_rtstruct_case"]


def _compartments() -> tuple:
    from monai_effq.data.dicom_seg import Segment

    return (
        Segment("NCR", "MorphologicallyAbnormalStructure", "Necrosis", "Brain"),
        Segment("ED", "MorphologicallyAbnormalStructure", "Edema", "Brain"),
        Segment("ET", "MorphologicallyAbnormalStructure", "EnhancingLesion", "Brain"),
    )


# native BraTS labels 1, 2, 4 as three disjoint segments, as a tool that keeps BraTS' compartments writes them
BRATS_COMPARTMENTS = _compartments()


def write_dicom_series(
    image_path: str | os.PathLike,
    folder: str | os.PathLike,
    series_uid: str = "1.2.826.0.1.3680043.2.1125.1",
    prefix: str = "IM",
    shift_per_slice: tuple[float, float] = (0.0, 0.0),
) -> list[str]:
    """Write ``image_path`` (any 3D integer image ITK reads) as CT slices carrying their position and orientation.

    Args:
        image_path: the volume to convert; its geometry goes into each slice's patient position and orientation.
        folder: where the slices go (created if needed).
        series_uid: the Series Instance UID of every slice; two calls with different UIDs make two series.
        prefix: the slice files' name prefix, so that two series can share a folder.
        shift_per_slice: mm each slice lies further along the image's first and second axes than the
            one before, as a gantry tilt shears a CT series.

    Returns:
        the slice files written.
    """
    image = itk.imread(str(image_path))
    voxels = itk.array_view_from_image(image)  # (z, y, x)
    if voxels.min() < -32768 or voxels.max() > 32767:
        raise ValueError(f"{image_path} holds values outside int16, which these CT slices store")
    direction = np.asarray(image.GetDirection())
    origin, spacing = np.asarray(image.GetOrigin()), np.asarray(image.GetSpacing())
    os.makedirs(folder, exist_ok=True)
    files = []
    saved = locale.setlocale(locale.LC_ALL)
    try:
        for k in range(voxels.shape[0]):
            piece = itk.image_from_array(np.ascontiguousarray(voxels[k].astype(np.int16)))
            piece.SetSpacing([float(spacing[0]), float(spacing[1])])  # GDCM writes Pixel Spacing from the image's
            tags = piece.GetMetaDataDictionary()
            shear = direction[:, 0] * shift_per_slice[0] + direction[:, 1] * shift_per_slice[1]
            position = origin + (direction[:, 2] * spacing[2] + shear) * k
            for tag, value in {
                "0008|0060": "CT",
                "0020|000d": "1.2.826.0.1.3680043.2.1125.9",
                "0020|000e": series_uid,
                "0020|0052": "1.2.826.0.1.3680043.2.1125.8",  # Frame of Reference UID
                "0010|0020": "EFFQ-TEST-1",  # Patient ID
                "0020|0013": str(k + 1),
                "0020|0032": "\\".join(f"{v:.6f}" for v in position),
                "0020|0037": "\\".join(f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])),
                "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}",
                "0018|0050": f"{spacing[2]:.6f}",
            }.items():
                tags[tag] = value
            io = itk.GDCMImageIO.New()
            io.KeepOriginalUIDOn()  # the series UID above, not a new one per file
            files.append(os.path.join(folder, f"{prefix}{k:04d}.dcm"))
            itk.ImageFileWriter[type(piece)].New(Input=piece, ImageIO=io, FileName=files[-1]).Update()
    finally:
        # GDCM leaves the process in the C locale after writing text tags, and Python's default text
        # encoding would turn ASCII for the rest of the test session (reading leaves it alone)
        locale.setlocale(locale.LC_ALL, saved)
    return files


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    value += b"\0" * (len(value) % 2)
    return struct.pack("<HH", group, element) + vr + struct.pack("<H", len(value)) + value


def write_non_image_dicom(path: str | os.PathLike, sop_class_uid: str, modality: str, series_uid: str = "1.2.826.0.1.3680043.2.1125.99") -> None:
    """Write a DICOM object without voxels (a structure set, a report), as exports put beside a series.

    Args:
        path: the file.
        sop_class_uid: e.g. ``1.2.840.10008.5.1.4.1.1.481.3``, RT Structure Set.
        modality: e.g. ``RTSTRUCT``, ``SR``.
        series_uid: its own series.
    """
    meta = _element(0x0002, 0x0002, b"UI", sop_class_uid.encode()) + _element(0x0002, 0x0003, b"UI", b"1.2.3.4.5.6") + _element(
        0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2.1"
    )
    body = (
        _element(0x0008, 0x0016, b"UI", sop_class_uid.encode())
        + _element(0x0008, 0x0018, b"UI", b"1.2.3.4.5.6")
        + _element(0x0008, 0x0060, b"CS", modality.encode())
        + _element(0x0020, 0x000D, b"UI", b"1.2.826.0.1.3680043.2.1125.9")
        + _element(0x0020, 0x000E, b"UI", series_uid.encode())
    )
    group_length = struct.pack("<HH", 0x0002, 0x0000) + b"UL" + struct.pack("<HI", 4, len(meta))  # its value is 4 bytes
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM" + group_length + meta + body)


def write_dicom_case(case: dict, folder: str | os.PathLike, segments: Sequence) -> dict:
    """``case`` as an archive holds it: each image a DICOM series, the label a DICOM SEG on the first series.

    Args:
        case: a dataset case of NIfTI files (``"image"`` one path or a list, ``"label"`` a path).
        folder: where the series (``series<i>/``) and the SEG (``series0_seg.dcm``) go.
        segments: ``LITS_SEGMENTS`` (the label map as is), ``BRATS_SEGMENTS`` (native labels as TC, WT, ET) or
            :data:`BRATS_COMPARTMENTS` (native labels 1, 2, 4 as segments 1, 2, 3).

    Returns:
        the case with the series folders as its image and the SEG as its label.
    """
    import functools

    import torch
    from monai.data import MetaTensor
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClassesd, LoadImaged, ResampleToMatchd, SaveImage

    from monai_effq.data import BRATS_SEGMENTS, DicomSegWriter, mask_name_formatter

    folder = Path(folder)
    case_uid = zlib.crc32(str(folder.resolve()).encode())  # each case's series UIDs its own, as an archive's are
    files = list(case["image"]) if isinstance(case["image"], (list, tuple)) else [case["image"]]
    series = [folder / f"series{i}" for i in range(len(files))]
    for i, (file, target) in enumerate(zip(files, series)):
        write_dicom_series(file, target, series_uid=f"1.2.826.0.1.3680043.2.1125.{case_uid}.{i + 1}")
    loaded = LoadImaged(["image", "label"], image_only=True, ensure_channel_first=True)({"image": str(series[0]), "label": case["label"]})
    loaded = ResampleToMatchd("label", key_dst="image", mode="nearest")(loaded)  # the label on the series as ITK reads it
    if segments is BRATS_SEGMENTS:
        loaded = ConvertToMultiChannelBasedOnBratsClassesd("label")(loaded)  # TC, WT, ET
    elif segments is BRATS_COMPARTMENTS:
        loaded["label"] = torch.where(loaded["label"] == 4, 3, loaded["label"])
    saver = SaveImage(
        output_dir=str(folder), output_postfix="seg", output_ext=".dcm", resample=False, separate_folder=False,
        writer=functools.partial(DicomSegWriter, segments=segments), output_name_formatter=mask_name_formatter,
    )  # fmt: skip
    saver(MetaTensor(torch.as_tensor(np.asarray(loaded["label"]), dtype=torch.uint8), affine=loaded["image"].affine, meta=loaded["image"].meta))
    return {"image": [str(s) for s in series] if len(series) > 1 else str(series[0]), "label": str(folder / "series0_seg.dcm")}


def write_rtstruct(
    series: Sequence[str | os.PathLike],
    path: str | os.PathLike,
    rois: dict[str, list[tuple[int, np.ndarray]]],
    series_uid: str | None = None,
    contour_type: str = "CLOSED_PLANAR",
    reference_images: bool = True,
    decimals: int = 4,
    codes: dict[str, tuple[str, str, str]] | None = None,
) -> str:
    """Write an RTSTRUCT whose ROIs outline polygons drawn in pixel coordinates on slices of ``series``.

    Args:
        series: the series' slice files, in their order (as :func:`write_dicom_series` returns them).
        path: the RTSTRUCT file to write.
        rois: ROI name -> contours, each ``(slice index, (K, 2) vertices as (row, column) pixel coordinates)``;
            the ROIs are numbered from 1 in this order.
        series_uid: the Referenced Series UID (default: the slices' own).
        contour_type: the Contour Geometric Type of every contour.
        reference_images: name each contour's slice in its Contour Image Sequence (some exports do not).
        decimals: the decimals of each coordinate (mm) as written.
        codes: ROI name -> the identification code ``(value, scheme, meaning)`` of its observation; the
            ROIs named here get an observation.

    Returns:
        ``path``.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from monai_effq.data.rtstruct import RTSTRUCT_CLASS

    headers = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in series]
    first = headers[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = RTSTRUCT_CLASS, meta.MediaStorageSOPInstanceUID, "RTSTRUCT"
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = first.PatientID, first.StudyInstanceUID, generate_uid()
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.StructureSetLabel = "test"

    def item(**values) -> Dataset:
        out = Dataset()
        for key, value in values.items():
            setattr(out, key, value)
        return out

    series_item = item(SeriesInstanceUID=series_uid or first.SeriesInstanceUID)
    study = item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1", ReferencedSOPInstanceUID=first.StudyInstanceUID)
    study.RTReferencedSeriesSequence = DicomSequence([series_item])
    frame = item(FrameOfReferenceUID=first.FrameOfReferenceUID)
    frame.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])
    ds.StructureSetROISequence = DicomSequence(
        [item(ROINumber=n, ROIName=name, ReferencedFrameOfReferenceUID=first.FrameOfReferenceUID) for n, name in enumerate(rois, 1)]
    )
    roi_contours = []
    for n, contours in enumerate(rois.values(), 1):
        sequence = []
        for index, pixels in contours:
            header = headers[index]
            orientation = np.asarray(header.ImageOrientationPatient, dtype=np.float64)
            row_spacing, column_spacing = (float(v) for v in header.PixelSpacing)
            origin = np.asarray(header.ImagePositionPatient, dtype=np.float64)
            pixels = np.asarray(pixels, dtype=np.float64)
            points = origin + pixels[:, :1] * row_spacing * orientation[3:] + pixels[:, 1:] * column_spacing * orientation[:3]
            contour = item(ContourGeometricType=contour_type, NumberOfContourPoints=len(points))
            contour.ContourData = [f"{v:.{decimals}f}" for v in points.ravel()]
            if reference_images:
                image = item(ReferencedSOPClassUID=header.SOPClassUID, ReferencedSOPInstanceUID=header.SOPInstanceUID)
                contour.ContourImageSequence = DicomSequence([image])
            sequence.append(contour)
        roi = item(ReferencedROINumber=n, ROIDisplayColor=[255, 0, 0])
        roi.ContourSequence = DicomSequence(sequence)
        roi_contours.append(roi)
    ds.ROIContourSequence = DicomSequence(roi_contours)
    observations = []
    for n, name in enumerate(rois, 1):
        if name in (codes or {}):
            value, scheme, meaning = codes[name]
            observation = item(ObservationNumber=n, ReferencedROINumber=n, RTROIInterpretedType="", ROIInterpreter="")
            observation.RTROIIdentificationCodeSequence = DicomSequence([item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)])
            observations.append(observation)
    if observations:
        ds.RTROIObservationsSequence = DicomSequence(observations)
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    return str(path)


def write_rtstruct_case(case: dict, folder: str | os.PathLike, rois: dict[str, Sequence[int]]) -> dict:
    """A LiTS-like ``case`` as a planning system keeps it: the image a DICOM series, the label an RTSTRUCT of contours.

    Each ROI's voxels are outlined slice by slice as one rectangle per run of voxels along a row, its
    edges half a pixel out from the centres (so that filling it gives exactly those voxels back).

    Args:
        case: a case of NIfTI files (``"image"`` one path, ``"label"`` a label map).
        folder: where the series (``series0/``) and the RTSTRUCT (``rtstruct.dcm``) go.
        rois: ROI name -> the label values it covers (LiTS: ``{"liver": (1, 2), "liver tumour": (2,)}``).

    Returns:
        the case with the series folder as its image and the RTSTRUCT as its label.
    """
    import pydicom
    from monai.transforms import LoadImaged, ResampleToMatchd

    from monai_effq.data.dicom_seg import series_frames

    folder = Path(folder)
    files = write_dicom_series(case["image"], folder / "series0", series_uid=f"1.2.826.0.1.3680043.2.1125.{zlib.crc32(str(folder.resolve()).encode())}.1")
    loaded = LoadImaged(["image", "label"], image_only=True, ensure_channel_first=True)({"image": str(folder / "series0"), "label": case["label"]})
    loaded = ResampleToMatchd("label", key_dst="image", mode="nearest")(loaded)  # the label on the series as ITK reads it
    label = np.asarray(loaded["label"])[0]
    masks = np.stack([np.isin(label, values) for values in rois.values()])
    slices = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    frames = series_frames(masks, loaded["image"].affine.numpy(), slices)  # (slices, rows, columns, ROIs)
    drawn: dict[str, list] = {name: [] for name in rois}
    for k, name in enumerate(rois):
        for n, frame in enumerate(frames[..., k]):
            for row, line in enumerate(frame):
                edges = np.flatnonzero(np.diff(np.r_[0, line.astype(np.int8), 0]))  # run starts and ends
                for start, stop in zip(edges[::2], edges[1::2]):
                    rectangle = [[row - 0.5, start - 0.5], [row - 0.5, stop - 0.5], [row + 0.5, stop - 0.5], [row + 0.5, start - 0.5]]
                    drawn[name].append((n, np.asarray(rectangle)))
    return {"image": str(folder / "series0"), "label": write_rtstruct(files, folder / "rtstruct.dcm", drawn)}
