"""Radiotherapy structure sets (RTSTRUCT) as labels: each ROI's contours filled on the slices they outline.

Where a hospital plans radiotherapy, its organ and tumour annotations are kept as an RTSTRUCT beside
the planning CT: per ROI, closed polygons in patient coordinates (mm), one or more per slice. To
score a network against them, each polygon is put on the slice whose plane it lies in (by geometry,
as a DICOM SEG's frames are) and filled there. The polygons of one ROI on one slice combine by parity,
so a contour inside another cuts a hole, as planning systems draw a ring; a pixel whose centre lies on
any of the contours belongs to the ROI, so contours traced through the centres of a mask's border
pixels, outer and hole borders alike (as mask-to-RTSTRUCT converters such as rt-utils write them),
give the mask back. The filled slices are then placed on the image's voxel grid exactly as a SEG's
frames are (:func:`~monai_effq.data.dicom_seg.frames_on_grid`).

The other way, :class:`RtStructWriter` writes an inference mask as a structure set on its series, for a
radiotherapy planning system, whose contours this reader fills back to the mask.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.config import PathLike
from monai.utils import optional_import

from monai_effq.data.dicom_seg import (
    SEGMENTATION_CLASSES,
    TYPE_2_COPIED,
    DicomSegWriter,
    Segment,
    SegLabels,
    frames_on_grid,
    is_dicom_seg,
    match_segments,
    media_storage_class,
    paint_labels,
    referenced_series,
    series_frames,
)
from monai_effq.data.images import image_error_reason
from monai_effq.data.layouts import DatasetError
from monai_effq.utils.errors import MissingExtraError
from monai_effq.utils.imports import deferred_import
from monai_effq.utils.io import atomic_write

hd, _ = deferred_import("highdicom")
pydicom, has_pydicom = optional_import("pydicom")
find_contours, has_skimage = optional_import("skimage.measure", name="find_contours")

__all__ = ["RTSTRUCT_CLASS", "dicom_label_kind", "is_rtstruct", "fill_polygon", "load_rtstruct", "read_rtstruct_labels", "RtStructWriter", "require_skimage"]

logger = logging.getLogger(__name__)

RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
"""RT Structure Set Storage."""

# a pixel centre this close to an edge (in pixels) lies on it: coordinates written with two decimals
# (in mm, as many exports round them) move a traced border by up to 0.01 px on a 0.5 mm grid
_EDGE_TOLERANCE = 0.02
# a contour further than this from a slice's plane (in slice steps) lies between slices
_PLANE_TOLERANCE = 0.25
# the patient and study, copied from the series into the structure set
_COPIED = ("SpecificCharacterSet", "StudyInstanceUID", *TYPE_2_COPIED)
# ROI display colours, one per segment in turn
_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255))


def is_rtstruct(path: str | PathLike) -> bool:
    """Whether ``path`` is an RTSTRUCT file, by its file meta header.

    Args:
        path: any path.

    Returns:
        True for an RT Structure Set; False for anything else, also a file that cannot be read.

    Raises:
        MissingExtraError: for an RTSTRUCT when the ``dicom`` extra, which reads it, is not installed.
    """
    if media_storage_class(path) != RTSTRUCT_CLASS:
        return False
    if not has_pydicom:
        raise MissingExtraError(
            f"{path} is an RTSTRUCT, and reading it as labels needs pydicom: pip install 'monai-effq[dicom]' "
            "(or pip install pydicom), or give the labels as NIfTI files."
        )
    return True


def dicom_label_kind(value: Any) -> str | None:
    """What kind of DICOM label object ``value`` names, from one read of its file header.

    Args:
        value: a case's label (a path, or anything else).

    Returns:
        ``"a DICOM SEG"``, ``"an RTSTRUCT"``, or None for anything else (a NIfTI file, a folder, an array).

    Raises:
        MissingExtraError: for a SEG or RTSTRUCT when the ``dicom`` extra, which reads it, is not installed.
    """
    if not isinstance(value, (str, os.PathLike)):
        return None
    sop_class = media_storage_class(value)
    if sop_class in SEGMENTATION_CLASSES:
        return "a DICOM SEG" if is_dicom_seg(value) else None
    if sop_class == RTSTRUCT_CLASS:
        return "an RTSTRUCT" if is_rtstruct(value) else None
    return None


def require_skimage() -> None:
    """Raise a clear error when scikit-image, which traces an RTSTRUCT's contours, is not installed.

    Raises:
        MissingExtraError: (an ``ImportError``) naming the extra to install.
    """
    if not has_skimage:
        raise MissingExtraError(
            "writing masks as RTSTRUCT needs scikit-image: pip install 'monai-effq[dicom]' (or pip install scikit-image), "
            "or write NIfTI or DICOM SEG masks (mask_format 'nifti' or 'dicom_seg')."
        )


def fill_polygon(points: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """The pixels of a ``rows`` x ``columns`` slice whose centres lie inside a closed polygon or on its edge.

    Args:
        points: ``(K, 2)`` vertices as (row, column) pixel coordinates, pixel centres at whole numbers;
            the last vertex joins the first (one vertex is a point, two a line).
        rows: the slice's rows.
        columns: the slice's columns.

    Returns:
        ``(rows, columns)`` bool.
    """
    inside, edge = _polygon_pixels(np.asarray(points, dtype=np.float64).reshape(-1, 2), rows, columns)
    return inside | edge


def _polygon_pixels(points: np.ndarray, rows: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """The pixels whose centres lie strictly inside a polygon, and those on its edges."""
    edge = np.zeros((rows, columns), dtype=bool)
    for a, b in zip(points, np.roll(points, -1, axis=0)):
        along = 0 if abs(b[0] - a[0]) >= abs(b[1] - a[1]) else 1
        if a[along] == b[along]:  # one point (a repeated vertex, or a one-point contour)
            hit = np.abs(a - np.rint(a)) <= _EDGE_TOLERANCE
            r, c = (np.rint(a[:1]), np.rint(a[1:])) if hit.all() else (np.empty(0), np.empty(0))
        else:
            steps = np.arange(np.ceil(min(a[along], b[along]) - _EDGE_TOLERANCE), np.floor(max(a[along], b[along]) + _EDGE_TOLERANCE) + 1)
            across = a[1 - along] + (steps - a[along]) * (b[1 - along] - a[1 - along]) / (b[along] - a[along])
            hit = np.abs(across - np.rint(across)) <= _EDGE_TOLERANCE
            r, c = (steps[hit], np.rint(across[hit])) if along == 0 else (np.rint(across[hit]), steps[hit])
        keep = (r >= 0) & (r < rows) & (c >= 0) & (c < columns)
        edge[r[keep].astype(np.int64), c[keep].astype(np.int64)] = True
    inside = np.zeros((rows, columns), dtype=bool)
    y0, x0 = points[:, 0], points[:, 1]
    y1, x1 = np.roll(y0, -1), np.roll(x0, -1)
    first, last = max(int(np.ceil(y0.min())), 0), min(int(np.floor(y0.max())), rows - 1)
    if len(points) < 3 or first > last:
        return inside, edge
    # each row's centres between pairs of the edges it crosses (half-open, so a vertex is crossed once)
    y = np.arange(first, last + 1, dtype=np.float64)[:, None]
    crosses = ((y0 <= y) & (y < y1)) | ((y1 <= y) & (y < y0))
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.sort(np.where(crosses, x0 + (y - y0) * (x1 - x0) / (y1 - y0), np.nan), axis=1)  # NaN last
    pairs = 2 * (x.shape[1] // 2)  # each row crosses an even number of edges
    starts, stops = x[:, 0:pairs:2], x[:, 1:pairs:2]
    keep = ~np.isnan(starts) & ~np.isnan(stops)
    row = np.broadcast_to(np.arange(len(y))[:, None], starts.shape)[keep]
    lo = np.clip(np.ceil(starts[keep]), 0, columns).astype(np.int64)
    hi = np.clip(np.floor(stops[keep]) + 1, 0, columns).astype(np.int64)
    spans = np.zeros((len(y), columns + 1), dtype=np.int64)
    np.add.at(spans, (row[lo < hi], lo[lo < hi]), 1)
    np.add.at(spans, (row[lo < hi], hi[lo < hi]), -1)
    inside[first : last + 1] = np.cumsum(spans, axis=1)[:, :columns] > 0
    return inside & ~edge, edge


def _rois(ds: Any) -> list[tuple[int, str, tuple[str, str] | None]]:
    """Each ROI of a structure set: its number, name and identification code ``(value, scheme)`` or None.

    Planning systems name ROIs in the clinic's language and conventions (``Leber``, ``LIVER_AI``); an
    ROI's observation may also code what it is (RT ROI Identification Code Sequence, e.g. SNOMED CT
    10200004 for the liver, the code a SEG gives its segment), which
    :func:`~monai_effq.data.dicom_seg.match_segments` tries where no name matches. Legacy SNOMED RT
    codes match as the SNOMED CT codes they became (:func:`~monai_effq.data.dicom_seg.snomed_ct`); codes
    of other schemes (FMA) do not; the first coded observation of an ROI counts.
    """
    codes = {}
    for observation in ds.get("RTROIObservationsSequence", []):
        identification = observation.get("RTROIIdentificationCodeSequence")
        if not identification or observation.get("ReferencedROINumber") is None:
            continue
        code = identification[0]
        value = next((code.get(k) for k in ("CodeValue", "LongCodeValue", "URNCodeValue") if code.get(k)), None)
        if value and code.get("CodingSchemeDesignator"):
            codes.setdefault(int(observation.ReferencedROINumber), (str(value), str(code.CodingSchemeDesignator)))
    return [
        (int(item.ROINumber), str(item.get("ROIName", "")), codes.get(int(item.ROINumber))) for item in ds.get("StructureSetROISequence", [])
    ]


def _references(ds: Any) -> tuple[set[str], set[str]]:
    """The slices (from the contours) and series (from the frame of reference) an RTSTRUCT references."""
    sops = {
        str(image.ReferencedSOPInstanceUID)
        for roi in ds.get("ROIContourSequence", [])
        for contour in roi.get("ContourSequence", [])
        for image in contour.get("ContourImageSequence", [])
    }
    series = {
        str(item.SeriesInstanceUID)
        for frame in ds.get("ReferencedFrameOfReferenceSequence", [])
        for study in frame.get("RTReferencedStudySequence", [])
        for item in study.get("RTReferencedSeriesSequence", [])
    }
    return sops, series


def _slice_frames(ds: Any, numbers: Sequence[int], slices: Sequence[Any], source: str) -> np.ndarray:
    """``(len(slices), rows, columns, len(numbers))`` bool: each ROI's closed contours filled on the slices they lie in."""
    first = slices[0]
    rows, columns = int(first.Rows), int(first.Columns)
    orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    along_row, along_column = orientation[:3], orientation[3:]  # the directions of increasing column, row index
    normal = np.cross(along_row, along_column)
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    origins = np.array([np.asarray(h.ImagePositionPatient, dtype=np.float64) for h in slices])
    depths = origins @ normal
    step = float(np.median(np.abs(np.diff(np.sort(depths))))) if len(slices) > 1 else 1.0
    frames = np.zeros((len(slices), rows, columns, len(numbers)), dtype=bool)
    edges = np.zeros_like(frames)
    by_number = {int(item.ReferencedROINumber): item for item in ds.get("ROIContourSequence", [])}
    for k, number in enumerate(numbers):
        for contour in by_number[number].get("ContourSequence", []) if number in by_number else []:
            kind = str(contour.get("ContourGeometricType", "CLOSED_PLANAR"))
            if kind == "POINT":  # a marker, with no area
                continue
            if kind != "CLOSED_PLANAR":
                raise DatasetError(
                    f"{source}: ROI {number} holds an {kind} contour, which outlines no area: give labels as closed contours, "
                    "as a DICOM SEG, or as NIfTI."
                )
            points = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            depth = points @ normal
            n = int(np.argmin(np.abs(depths - depth.mean())))
            if np.abs(depth - depths[n]).max() > _PLANE_TOLERANCE * step:
                raise DatasetError(
                    f"{source}: a contour of ROI {number} does not lie in the plane of a slice of the series (it is "
                    f"{np.abs(depth - depths[n]).max():.2f} mm from the nearest, slices {step:.2f} mm apart): the structure set "
                    "was not drawn on this series' slices; give labels drawn on them, or as NIfTI."
                )
            offset = points - origins[n]
            pixels = np.stack([offset @ along_column / row_spacing, offset @ along_row / column_spacing], axis=1)
            inside, edge = _polygon_pixels(pixels, rows, columns)
            frames[n, :, :, k] ^= inside
            edges[n, :, :, k] |= edge
    return frames | edges  # a pixel on a hole's border is the ROI's too (a mask's traced hole runs through them)


def load_rtstruct(path: str | PathLike) -> Any:
    """An RTSTRUCT read in full, its ROIs and contours checked to be whole, or an error naming the file.

    Args:
        path: the RTSTRUCT file (a Part 10 file, or a bare dataset as older planning systems export).

    Returns:
        the pydicom dataset.

    Raises:
        DatasetError: when it cannot be read, is not a structure set, lists no ROI, or an ROI or contour
            is incomplete (a file cut short: pydicom reads what is there without complaint).
        MissingExtraError: without the ``dicom`` extra.
    """
    if not has_pydicom:
        raise MissingExtraError(f"reading RTSTRUCT label {path} needs pydicom: pip install 'monai-effq[dicom]', or give the labels as NIfTI files.")
    try:
        ds = pydicom.dcmread(path, force=True)
        if str(ds.get("SOPClassUID", "")) != RTSTRUCT_CLASS:
            raise ValueError(f"its SOP class is {ds.get('SOPClassUID', 'missing')!r}, not an RT Structure Set's")
        if not [int(item.ROINumber) for item in ds.StructureSetROISequence]:
            raise ValueError("it lists no ROI")
        for roi in ds.ROIContourSequence:
            int(roi.ReferencedROINumber)
            for contour in roi.get("ContourSequence", []):
                points = np.asarray(contour.ContourData, dtype=np.float64)
                count = contour.get("NumberOfContourPoints")
                if points.size % 3 or not np.isfinite(points).all():
                    raise ValueError(f"a contour of ROI {roi.ReferencedROINumber} holds {points.size} coordinates, not finite x, y, z triplets")
                if count not in (None, "") and int(count) * 3 != points.size:
                    raise ValueError(f"a contour of ROI {roi.ReferencedROINumber} holds {points.size // 3} of its {int(count)} points")
    except Exception as e:  # pydicom raises many unrelated types for a damaged file
        reason = image_error_reason(e)
        reason = reason if len(reason) <= 200 else reason[:200] + "..."  # a damaged value may be kilobytes of coordinates
        raise DatasetError(f"cannot read RTSTRUCT label {path}: {reason}; re-export it, or give the labels as NIfTI.") from e
    return ds


def read_rtstruct_labels(
    path: str | PathLike,
    series: str | PathLike | Sequence[str | PathLike],
    affine: np.ndarray,
    shape: Sequence[int],
    labels: SegLabels,
    space: str = "RAS",
) -> np.ndarray:
    """An RTSTRUCT as a label map on the grid of the series its contours were drawn on, in a dataset's label convention.

    ROIs are found by name (the ``label`` of each :class:`~monai_effq.data.dicom_seg.Segment` of
    ``labels``), else by the identification code of their observation (as a SEG's segments by their
    coded type), or by the name or ROI number a user's mapping gives.

    Args:
        path: the RTSTRUCT file.
        series: the folder of the DICOM series it outlines (the image's), or a multi-contrast case's
            folders, all on one grid.
        affine: the image's voxel-to-world affine, 4x4.
        shape: the image's spatial shape ``(X, Y, Z)``.
        labels: which ROIs to read and the label value of each.
        space: the world frame of ``affine``, ``"RAS"`` or ``"LPS"``.

    Returns:
        ``(X, Y, Z)`` uint8 labels, 0 outside every ROI read.

    Raises:
        DatasetError: when the file is not a readable RTSTRUCT, outlines another series, lacks an ROI of
            ``labels`` or holds it twice, or a contour lies off the series' slices or is not closed.
        MissingExtraError: without the ``dicom`` extra.
    """
    source = f"RTSTRUCT label {path}"
    ds = load_rtstruct(path)
    rois = _rois(ds)
    sops, series_uids = _references(ds)
    _, slices = referenced_series(series, sops, source, series_uids)
    numbers = match_segments(rois, labels, source)
    frames = _slice_frames(ds, numbers, slices, source)
    return paint_labels(frames_on_grid(frames, affine, slices, shape, space), labels, source)


class RtStructWriter(DicomSegWriter):
    """A ``SaveImaged`` writer that stores a mask as an RTSTRUCT of contours on the DICOM series it was computed on.

    A radiotherapy planning system imports structure sets, not DICOM SEG. Each segment becomes an ROI;
    on each slice its border is traced between the mask's pixel centres (marching squares at half-way,
    by scikit-image), so that every contour is closed, a hole is a contour inside another, and filling the
    contours (:func:`read_rtstruct_labels`) gives the mask back. Input, metadata and checks are those of
    :class:`~monai_effq.data.dicom_seg.DicomSegWriter` (a mask on the series' grid, ``resample=False``).

    Args:
        output_dtype: ignored, for ``SaveImage``'s interface.
        scale: ignored, likewise.
        segments: what each label or channel of the mask is, in order (their labels name the ROIs).
        algorithm: the algorithm's name, in each ROI's generation description (the bundle and model).
        algorithm_version: its version.
        series_description: the structure set's series description.
        nested: a label map whose later labels lie inside earlier ones (LiTS' tumour inside its liver): ROI ``k``
            outlines labels ``k`` and above, as a planning system's organ includes its tumour (read back in
            order, the labels are the same).
    """

    def __init__(
        self, output_dtype: Any = None, scale: Any = None, *, segments: Sequence[Segment], nested: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(output_dtype, scale, segments=segments, **kwargs)
        require_skimage()
        self.nested = nested

    def write(self, filename: PathLike, verbose: bool = False, **kwargs: Any) -> None:
        """Write the RTSTRUCT to ``filename``, whole or not at all (arguments and errors as :meth:`DicomSegWriter.write`)."""
        slices, array = self._on_source("an RTSTRUCT")
        if array.shape[0] > 1:
            masks = array
        else:
            masks = np.stack([(array[0] >= n) if self.nested else (array[0] == n) for n in range(1, len(self.segments) + 1)])
        frames = series_frames(masks, self.affine, slices, self.space)  # (slices, rows, columns, segments)
        ds = _structure_set(slices, [_contours(frames[..., k], slices) for k in range(len(self.segments))], self)
        if verbose:
            logger.info(f"writing: {filename}")
        with atomic_write(filename) as tmp:
            pydicom.dcmwrite(tmp, ds, enforce_file_format=True)  # implicit VR: a long contour's coordinates need no 64 KiB cap


def _contours(frames: np.ndarray, slices: Sequence[Any]) -> list[tuple[int, np.ndarray]]:
    """Each slice's closed contours of one segment: ``(slice index, (K, 3) points in patient mm)``."""
    out = []
    for n in np.flatnonzero(frames.reshape(len(frames), -1).any(1)):
        header = slices[n]
        orientation = np.asarray(header.ImageOrientationPatient, dtype=np.float64)
        row_spacing, column_spacing = (float(v) for v in header.PixelSpacing)
        origin = np.asarray(header.ImagePositionPatient, dtype=np.float64)
        # padded so that a border touching the slice's edge is closed too
        for line in find_contours(np.pad(frames[n].astype(np.float32), 1), 0.5):
            pixels = _without_collinear(line[:-1] - 1.0)  # closed: its last point repeats its first
            points = origin + pixels[:, :1] * row_spacing * orientation[3:] + pixels[:, 1:] * column_spacing * orientation[:3]
            out.append((int(n), points))
    return out


def _without_collinear(points: np.ndarray) -> np.ndarray:
    """A closed polygon's vertices without those on a straight line between their neighbours (the same polygon).

    Marching squares puts a vertex on every pixel edge; a straight border needs only its ends.
    """
    before, after = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    cross = (points[:, 0] - before[:, 0]) * (after[:, 1] - points[:, 1]) - (points[:, 1] - before[:, 1]) * (after[:, 0] - points[:, 0])
    keep = np.abs(cross) > 1e-9
    return points[keep] if keep.sum() >= 3 else points


def _structure_set(slices: Sequence[Any], contours: Sequence[list[tuple[int, np.ndarray]]], writer: RtStructWriter) -> Any:
    """The RTSTRUCT dataset: the source's patient and study, one ROI per segment, its contours on the slices they lie on."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ImplicitVRLittleEndian, generate_uid

    def item(**values: Any) -> Any:
        out = Dataset()
        for key, value in values.items():
            setattr(out, key, value)
        return out

    first = slices[0]
    now = datetime.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_CLASS, ds.file_meta.MediaStorageSOPInstanceUID
    for name in _COPIED:
        if name in first:
            setattr(ds, name, first.data_element(name).value)
        elif name != "SpecificCharacterSet":  # the others are type 2: present, empty where the series has none
            setattr(ds, name, "")
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    ds.OperatorsName = ""
    ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "RTSTRUCT", generate_uid(), 1
    number = first.get("SeriesNumber")
    ds.SeriesNumber = int(number) + 2000 if number not in (None, "") else 2000
    ds.SeriesDescription = writer.series_description
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "monai-effq", writer.algorithm, writer.algorithm_version
    ds.StructureSetLabel = writer.algorithm.split(" ")[0][:16]  # a short string; the name holds the whole
    ds.StructureSetName = writer.algorithm[:64]
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    images = [item(ReferencedSOPClassUID=s.SOPClassUID, ReferencedSOPInstanceUID=s.SOPInstanceUID) for s in slices]
    series = item(SeriesInstanceUID=first.SeriesInstanceUID, ContourImageSequence=DicomSequence(images))
    study = item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1", ReferencedSOPInstanceUID=first.StudyInstanceUID)
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = item(FrameOfReferenceUID=first.FrameOfReferenceUID, RTReferencedStudySequence=DicomSequence([study]))
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])
    ds.StructureSetROISequence = DicomSequence(
        [
            item(ROINumber=k, ReferencedFrameOfReferenceUID=first.FrameOfReferenceUID, ROIName=segment.label,
                 ROIGenerationAlgorithm="AUTOMATIC", ROIGenerationDescription=f"{writer.algorithm} {writer.algorithm_version}")
            for k, segment in enumerate(writer.segments, start=1)
        ]
    )  # fmt: skip
    roi_contours = []
    for k, lines in enumerate(contours, start=1):
        sequence = []
        for n, points in lines:
            image = item(ReferencedSOPClassUID=slices[n].SOPClassUID, ReferencedSOPInstanceUID=slices[n].SOPInstanceUID)
            contour = item(ContourGeometricType="CLOSED_PLANAR", NumberOfContourPoints=len(points))
            contour.ContourImageSequence = DicomSequence([image])
            contour.ContourData = [f"{v:.3f}" for v in points.ravel()]  # 0.001 mm: far below a pixel
            sequence.append(contour)
        roi = item(ROIDisplayColor=list(_COLOURS[(k - 1) % len(_COLOURS)]), ReferencedROINumber=k)
        if sequence:  # a segment with no voxel is an ROI without contours (an empty sequence is not allowed)
            roi.ContourSequence = DicomSequence(sequence)
        roi_contours.append(roi)
    ds.ROIContourSequence = DicomSequence(roi_contours)
    observations = []
    for k, segment in enumerate(writer.segments, start=1):
        # an organ is an organ; whether a predicted tumour is a GTV is the planner's call, so it stays uninterpreted
        interpreted = "ORGAN" if segment.category == "AnatomicalStructure" else ""
        observation = item(ObservationNumber=k, ReferencedROINumber=k, RTROIInterpretedType=interpreted, ROIInterpreter="")
        concept = segment.concepts()["segmented_property_type"]
        # highdicom's coded item: the code value in the attribute its length needs, as the SEG has it
        code = hd.sr.CodedConcept(concept.value, concept.scheme_designator, concept.meaning)
        if segment.modifier:  # a side, nested in the code item as in a SEG (PS3.3 C.8.8.8)
            code.SegmentedPropertyTypeModifierCodeSequence = segment.modifiers()
        observation.RTROIIdentificationCodeSequence = DicomSequence([code])
        observations.append(observation)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    return ds
