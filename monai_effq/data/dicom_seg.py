"""Masks as DICOM Segmentation objects (SEG) that point at the series they were computed on.

A mask written as NIfTI opens in 3D Slicer and research pipelines, but not in the archive (PACS)
and viewers (OHIF, the scanner's console) that a hospital reads a DICOM series in: those take a
DICOM SEG, one object holding each segment's frames, each frame naming the source slice it lies on,
with the patient and study copied from the series. :class:`DicomSegWriter` writes one for
``SaveImaged``, through ``highdicom`` (the ``dicom`` extra), and moves it into place only once whole.

The frames are placed by geometry, not by order: each source slice's pixel grid (its position,
orientation and pixel spacing) is mapped through the mask's affine onto the mask's voxels, so a
mask that is not on the series' grid is refused instead of being written onto the wrong slices.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import PathLike
from monai.data import ImageWriter
from monai.utils import optional_import

from monai_effq.data.images import dicom_series_files, image_error_reason
from monai_effq.data.layouts import DatasetError
from monai_effq.utils.errors import MissingExtraError, MissingInputError, UserInputError
from monai_effq.utils.imports import deferred_import
from monai_effq.utils.io import atomic_write

hd, has_highdicom = deferred_import("highdicom")
pydicom, _ = optional_import("pydicom")
codes, _ = deferred_import("pydicom.sr.codedict", name="codes")
read_file_meta_info, _ = optional_import("pydicom.filereader", name="read_file_meta_info")
snomed_mapping, _ = deferred_import("pydicom.sr._snomed_dict", name="mapping")

__all__ = [
    "Segment",
    "BRATS_SEGMENTS",
    "LITS_SEGMENTS",
    "DicomSegWriter",
    "check_seg_source",
    "require_highdicom",
    "series_frames",
    "segment_array",
    "SegLabels",
    "LITS_SEG_LABELS",
    "BRATS_NATIVE_SEG_LABELS",
    "BRATS_MSD_SEG_LABELS",
    "BRATS2023_SEG_LABELS",
    "frames_on_grid",
    "is_dicom_seg",
    "read_seg_labels",
    "load_seg",
    "match_segments",
    "media_storage_class",
    "paint_labels",
    "referenced_series",
    "require_series_folder",
    "series_headers",
    "snomed_ct",
]

logger = logging.getLogger(__name__)

# the patient and study attributes a SEG (or RTSTRUCT) copies from its source that are Type 2 there (present,
# possibly empty): anonymisers often delete them outright, and highdicom then refuses the source
TYPE_2_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "StudyID", "AccessionNumber",
)  # fmt: skip
# the attributes a SEG copies or points at, per source slice (all Type 1 in a CT or MR image)
_SOURCE_ATTRIBUTES = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
)
# Segmentation Storage (binary and fractional) and Label Map Segmentation Storage
SEGMENTATION_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")
# explicit VRs whose length takes four bytes (PS3.5 7.1.2)
_LONG_VRS = (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
# a source pixel maps onto a mask voxel centre up to rounding of the positions in the files; further
# off in the slice plane, the mask was resampled onto another grid
_IN_PLANE_TOLERANCE = 0.25


@dataclass(frozen=True)
class Segment:
    """What one segment of a mask is, as a DICOM SEG codes it.

    The codes are keywords of the DICOM context groups the standard lists for each (pydicom's
    ``codes.cid7150`` and so on; SNOMED CT codes mostly), so that a viewer knows what the segment
    is beyond its label.

    Attributes:
        label: the name shown for the segment (``"liver"``).
        category: its segmented property category (CID 7150), e.g. ``"AnatomicalStructure"``.
        property_type: its segmented property type (CID 7151), e.g. ``"Liver"``.
        region: the anatomic region it lies in (CID 4), or None when the type names it.
        modifier: the type's laterality (CID 244), e.g. ``"Left"`` for a left kidney, or None.
    """

    def concepts(self) -> dict[str, Any]:
        """The segment's coded concepts, as ``highdicom.seg.SegmentDescription`` takes them.

        Returns:
            ``segmented_property_category``, ``segmented_property_type`` and ``anatomic_regions``.

        Raises:
            AttributeError: naming a keyword that is not in its context group.
        """
        return {
            "segmented_property_category": getattr(codes.cid7150, self.category),
            "segmented_property_type": getattr(codes.cid7151, self.property_type),
            "anatomic_regions": [getattr(codes.cid4, self.region)] if self.region else None,
        }

    def modifiers(self) -> list[Any]:
        """The segmented property type's modifiers (its laterality), as a SEG's segment description holds them.

        Returns:
            the coded laterality (CID 244), or an empty list.
        """
        return [hd.sr.CodedConcept.from_code(getattr(codes.cid244, self.modifier))] if self.modifier else []

    label: str
    category: str
    property_type: str
    region: str | None = None
    modifier: str | None = None


LITS_SEGMENTS = (
    Segment("liver", "AnatomicalStructure", "Liver"),
    Segment("liver tumour", "MorphologicallyAbnormalStructure", "Neoplasm", "Liver"),
)
"""LiTS labels 1 and 2 (liver, tumour)."""

BRATS_SEGMENTS = (
    Segment("tumour core", "MorphologicallyAbnormalStructure", "Neoplasm", "Brain"),
    Segment("whole tumour", "MorphologicallyAbnormalStructure", "Neoplasm", "Brain"),
    Segment("enhancing tumour", "MorphologicallyAbnormalStructure", "EnhancingLesion", "Brain"),
)
"""BraTS channels TC, WT and ET (overlapping: a SEG's binary segments may overlap)."""


@dataclass(frozen=True)
class SegLabels:
    """How a DICOM SEG's segments become a dataset's label map: each painted with its value, later over earlier.

    Attributes:
        segments: the segments to find in the SEG, in painting order: a :class:`Segment` by its label, else by
            its coded property type; a string by that segment label alone (or, where none has it and the
            string is a whole number, by that segment number); an int by segment number.
        values: the label value of each.
        label_values: the dataset's label values, which the errors list (default: ``values``).
    """

    segments: tuple[Segment | str | int, ...]
    values: tuple[int, ...]
    label_values: tuple[int, ...] = ()

    @classmethod
    def from_mapping(cls, mapping: Mapping[str | int, int], values: Sequence[int], setting: str = "seg_segments") -> SegLabels:
        """The user's own naming: which SEG segment (its label or number) gives which label value.

        Args:
            mapping: segment label or number -> label value, painted in this order (later over earlier),
                e.g. ``{"Segment_1": 1, "Segment_2": 2}`` as 3D Slicer names segments.
            values: the dataset's label values (0, background, is not a segment's).
            setting: the setting's name, for the error.

        Returns:
            the labels.

        Raises:
            UserInputError: (a ``ValueError``) on an empty mapping, a key that is neither a label nor a
                positive segment number, or a value outside ``values``.
        """
        foreground = sorted(int(v) for v in values if int(v) != 0)
        example = ", ".join(f"'Segment_{i}': {v}" for i, v in enumerate(foreground, 1))
        how = f"give {setting} as {{segment label or number: label value}}, e.g. {{{example}}}."
        if not isinstance(mapping, Mapping) or not mapping:
            raise UserInputError(f"{setting} must map DICOM SEG segments to this dataset's labels {foreground}, got {mapping!r}: {how}")
        for key, value in mapping.items():
            number = isinstance(key, int) and not isinstance(key, bool)
            if not ((number and key >= 1) or (isinstance(key, str) and key.strip())):
                raise UserInputError(f"{setting} key {key!r} is not a segment label or a segment number (1 or more): {how}")
            if isinstance(value, bool) or not isinstance(value, int) or value not in foreground:
                raise UserInputError(f"{setting} maps segment {key!r} to {value!r}, which is not one of this dataset's labels {foreground}: {how}")
        return cls(tuple(mapping), tuple(mapping.values()), tuple(foreground))


LITS_SEG_LABELS = SegLabels(LITS_SEGMENTS, (1, 2))
"""LiTS labels from liver and liver tumour segments: 1 liver, 2 tumour (over the liver)."""

# whole tumour, then tumour core over it, then enhancing tumour over that
_NESTED = (BRATS_SEGMENTS[1], BRATS_SEGMENTS[0], BRATS_SEGMENTS[2])
BRATS_NATIVE_SEG_LABELS = SegLabels(_NESTED, (2, 1, 4))
"""Native BraTS labels from TC, WT and ET segments: 2 oedema, 1 necrotic core, 4 enhancing tumour."""

BRATS_MSD_SEG_LABELS = SegLabels(_NESTED, (1, 2, 3))
"""Decathlon Task01 labels from TC, WT and ET segments: 1 oedema, 2 non-enhancing tumour, 3 enhancing tumour."""

BRATS2023_SEG_LABELS = SegLabels(_NESTED, (2, 1, 3))
"""BraTS 2023 labels from TC, WT and ET segments: 2 oedema (SNFH), 1 necrotic core, 3 enhancing tumour."""


def require_highdicom() -> None:
    """Raise a clear error when ``highdicom``, which writes DICOM SEG, is not installed.

    Raises:
        MissingExtraError: (an ``ImportError``) naming the extra to install.
    """
    if not has_highdicom:
        raise MissingExtraError(
            "writing masks as DICOM SEG needs highdicom: pip install 'monai-effq[dicom]' (or pip install highdicom), "
            "or write NIfTI masks (mask_format 'nifti')."
        )


def require_series_folder(image: str | PathLike, kind: str = "a DICOM SEG") -> None:
    """Refuse an image that is not a folder: a DICOM mask points at the series it segments.

    Args:
        image: a case's image (a multi-modal case's first, the one its mask lies on).
        kind: the mask, for the error (``"a DICOM SEG"``, ``"an RTSTRUCT"``).

    Raises:
        MissingInputError: when it does not exist.
        DatasetError: when it is a file.
    """
    if not Path(image).exists():
        raise MissingInputError(f"image {image} does not exist: correct the datalist or --dataset_dir.")
    if not Path(image).is_dir():
        raise DatasetError(
            f"image {image} is a file, and {kind} mask must point at the DICOM series it segments: pass the "
            "series' folder, or write NIfTI masks (--mask_format nifti)."
        )


def check_seg_source(folder: str | PathLike, kind: str = "a DICOM SEG") -> list[Any]:
    """The slice headers of the DICOM series in ``folder``, checked to carry what a SEG (or RTSTRUCT) referencing it needs.

    Args:
        folder: a folder holding one DICOM series (as :func:`monai_effq.data.dicom_series_files` requires).
        kind: what will reference it, ``"a DICOM SEG"`` or ``"an RTSTRUCT"`` (which copies empty values as they are,
            so only a SEG's copied values are checked).

    Returns:
        the slices' headers (``pydicom`` datasets without their voxels), in slice order.

    Raises:
        DatasetError: when the folder is not one evenly sliced series, a slice is a multi-frame image
            or lacks an attribute the SEG copies (its UIDs, frame of reference, position, orientation,
            pixel spacing), or holds a value the SEG cannot copy (a malformed date or patient's sex).
        MissingExtraError: without highdicom.
    """
    require_highdicom()
    headers = series_headers(folder)
    for header in headers:
        missing = [name for name in _SOURCE_ATTRIBUTES if header.get(name) in (None, "")]
        if missing:
            raise DatasetError(
                f"DICOM file {header.filename} of the series in {folder} lacks {', '.join(missing)}, which {kind} "
                "referencing the series needs: write the masks as NIfTI (mask_format 'nifti'), or re-export the "
                "series from the archive with its full headers."
            )
    if kind == "a DICOM SEG":
        _check_copied_values(headers, folder)
    return headers


def series_headers(folder: str | PathLike) -> list[Any]:
    """The slices' headers of the DICOM series in ``folder``, without their voxels.

    Files without the DICOM file header (no preamble, no ``DICM``; older archives export them so) are read as
    ITK reads them, their transfer syntax taken from how their data set was read.

    Args:
        folder: a folder holding one DICOM series (as :func:`monai_effq.data.dicom_series_files` requires).

    Returns:
        ``pydicom`` datasets without their voxels, in the order of :func:`~monai_effq.data.dicom_series_files`.

    Raises:
        DatasetError: for a file pydicom cannot read, or a multi-frame (enhanced) image, whose slices' geometry
            lies in per-frame groups that the SEG and RTSTRUCT code does not read.
        MissingExtraError: without highdicom (and pydicom).
    """
    require_highdicom()
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    headers = []
    for file in dicom_series_files(folder):
        try:
            header = pydicom.dcmread(file, stop_before_pixels=True, force=True)
        except Exception as e:  # noqa: BLE001 - pydicom's errors on a damaged file are of many kinds
            raise DatasetError(f"DICOM file {file} of the series in {folder} cannot be read ({type(e).__name__}: {e}): copy it from the archive again.") from e
        if "TransferSyntaxUID" not in header.file_meta:
            implicit, little = header.original_encoding
            header.file_meta.TransferSyntaxUID = (
                ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
            )
        if int(header.get("NumberOfFrames") or 1) > 1:
            raise DatasetError(
                f"DICOM file {file} in {folder} is a multi-frame (enhanced) image, on which DICOM SEG and RTSTRUCT masks and "
                "labels are not supported yet: write NIfTI masks (mask_format 'nifti'), or give the image and its labels as NIfTI."
            )
        headers.append(header)
    return headers


def _as_highdicom_copies(slices: Sequence[Any]) -> list[Any]:
    """Copies of the slices' headers with what highdicom refuses and the standard allows made explicit.

    A Type 2 patient or study attribute that an anonymiser deleted is present and empty in the copy; a
    character set whose first value is empty (``\\ISO 2022 IR 87``, Japanese names) names the default
    repertoire it stands for; a missing ``SliceThickness`` is the distance between slices.
    """
    thickness = None
    if len(slices) > 1 and "SliceThickness" not in slices[0]:
        step = np.subtract(slices[1].ImagePositionPatient, slices[0].ImagePositionPatient, dtype=float)
        normal = np.cross(*np.reshape(np.asarray(slices[0].ImageOrientationPatient, dtype=float), (2, 3)))
        thickness = round(abs(float(step @ normal)), 6) or None
    copies = []
    for header in slices:
        changes: dict[str, Any] = {name: "" for name in TYPE_2_COPIED if name not in header}
        charset = header.get("SpecificCharacterSet")
        if charset is not None and not isinstance(charset, str) and len(charset) > 1 and not charset[0]:
            changes["SpecificCharacterSet"] = ["ISO 2022 IR 6", *charset[1:]]
        if thickness is not None and "SliceThickness" not in header:
            changes["SliceThickness"] = thickness
        if changes:  # a copy: the caller's headers stay as read
            header = copy.deepcopy(header)
            for name, value in changes.items():
                setattr(header, name, value)
        copies.append(header)
    return copies


def _check_copied_values(headers: Sequence[Any], folder: str | PathLike) -> None:
    """Build a one-frame SEG on the first slice, so that a value highdicom refuses to copy (a patient's sex
    written ``Male``, a date written ``1970-01-01``) is named before the run instead of failing its write."""
    header = headers[0]
    try:
        _segmentation(
            _as_highdicom_copies(headers[:2])[:1], np.zeros((1, int(header.Rows), int(header.Columns)), dtype=np.uint8), LITS_SEGMENTS[:1], "check", "check", "check"
        )
    except (ValueError, TypeError, AttributeError) as e:
        raise DatasetError(
            f"DICOM file {header.filename} of the series in {folder} holds a value a DICOM SEG cannot copy: "
            f"{str(e).strip().splitlines()[0].rstrip('.')}. Correct the header (dcmodify does) or write NIfTI masks "
            "(mask_format 'nifti')."
        ) from e


def segment_array(data: np.ndarray, n_segments: int) -> np.ndarray:
    """The mask as a SEG stores its segments: a label map where they exclude each other, else one channel each.

    Args:
        data: ``(1, X, Y, Z)`` labels 0 (background) to ``n_segments``, or ``(n_segments, X, Y, Z)``
            binary channels (which may overlap, as BraTS' TC, WT and ET do).
        n_segments: how many segments the SEG holds.

    Returns:
        ``(1, X, Y, Z)`` uint8 labels, or ``(n_segments, X, Y, Z)`` bool.

    Raises:
        ValueError: for another number of channels, or labels outside ``0..n_segments``.
    """
    if data.ndim != 4:
        raise ValueError(f"a mask for DICOM SEG must be (channels, X, Y, Z), got shape {tuple(data.shape)}.")
    if data.shape[0] == n_segments > 1:
        return data != 0
    if data.shape[0] != 1:
        raise ValueError(
            f"a mask with {data.shape[0]} channels cannot give {n_segments} segments: give one channel of labels "
            f"or {n_segments} binary channels."
        )
    labels = data if np.issubdtype(data.dtype, np.integer) else np.rint(data)
    low, high = labels.min(), labels.max()
    if low < 0 or high > n_segments:
        raise ValueError(f"mask labels must lie in 0..{n_segments} (one per segment), found {low:g}..{high:g}.")
    return labels.astype(np.uint8, copy=False)


def _slice_name(header: Any, n: int) -> str:
    return str(getattr(header, "filename", None) or f"number {n}")


def _grid_step(step: np.ndarray, count: int, header: Any, n: int) -> tuple[int, int]:
    """The mask axis and direction (+1 or -1) a slice's row or column steps along, one voxel a step."""
    axis = int(np.argmax(np.abs(step)))
    unit = np.zeros(3)
    unit[axis] = np.sign(step[axis])
    if np.abs(step - unit).max() * max(count - 1, 1) > _IN_PLANE_TOLERANCE:
        raise DatasetError(
            f"the mask does not lie on the grid of DICOM slice {_slice_name(header, n)}: its pixels do not step "
            "voxel by voxel along the mask's axes. Write the mask on the series' own grid (SaveImaged with "
            "resample=False after Invertd), or write NIfTI masks."
        )
    return axis, int(unit[axis])


def series_frames(masks: np.ndarray, affine: np.ndarray, slices: Sequence[Any], space: str = "RAS") -> np.ndarray:
    """The masks' voxels on each pixel of each source slice, the slices placed by their geometry.

    The mask is the series as ITK stacked it: the first slice's pixel grid, repeated at one step along
    the slices' normal. Each slice is matched to a plane of the mask by its position along that normal,
    and its pixels to the plane's voxels by the first slice's grid, so a slightly sheared series (a
    gantry tilt within what :func:`~monai_effq.data.dicom_series_files` lets through) gets the voxels the
    network saw on it.

    Args:
        masks: ``(S, X, Y, Z)`` segments or ``(1, X, Y, Z)`` labels (:func:`segment_array`), on the
            voxel grid ``affine`` describes.
        affine: the masks' voxel-to-world affine, 4x4.
        slices: the source slices' headers (``ImagePositionPatient``, ``ImageOrientationPatient``,
            ``PixelSpacing``, ``Rows``, ``Columns``), in the order the SEG lists them.
        space: the world frame of ``affine``: ``"RAS"`` (MONAI's readers' default) or ``"LPS"`` (DICOM's).

    Returns:
        ``(len(slices), rows, columns, S)`` of ``masks``' type, the frames for ``highdicom.seg.Segmentation``.

    Raises:
        DatasetError: when the slices' pixels do not lie on the masks' voxel centres, or fall outside
            them, or two slices fall on one mask plane.
    """
    index = _SliceIndex.of(affine, slices, masks.shape[1:], space)
    return index.view(masks)[index.planes]


def frames_on_grid(frames: np.ndarray, affine: np.ndarray, slices: Sequence[Any], shape: Sequence[int], space: str = "RAS") -> np.ndarray:
    """The inverse of :func:`series_frames`: each source slice's frame put back onto the voxel grid ``affine`` describes.

    Args:
        frames: ``(len(slices), rows, columns, S)``, one frame per source slice.
        affine: the grid's voxel-to-world affine, 4x4 (the series as ITK stacked it).
        slices: the source slices' headers, in the order of ``frames``.
        shape: the grid's spatial shape ``(X, Y, Z)``.
        space: the world frame of ``affine``, ``"RAS"`` or ``"LPS"``.

    Returns:
        ``(S, X, Y, Z)`` of ``frames``' type; voxels on no slice are zero.

    Raises:
        DatasetError: as :func:`series_frames`, when the slices do not lie on the grid.
    """
    index = _SliceIndex.of(affine, slices, tuple(int(s) for s in shape), space)
    grid = np.zeros((frames.shape[-1], *index.shape), dtype=frames.dtype)
    index.view(grid)[index.planes] = frames  # a view of ``grid``: the frames land in it
    return grid


@dataclass(frozen=True)
class _SliceIndex:
    """Where a series' slices lie on a voxel grid: the grid axes of their normal, rows and columns, each
    axis' run of voxels, and the grid plane of each slice (:func:`series_frames` places them)."""

    shape: tuple[int, ...]
    axes: tuple[int, int, int]
    rows: slice
    columns: slice
    planes: np.ndarray

    @classmethod
    def of(cls, affine: np.ndarray, slices: Sequence[Any], shape: Sequence[int], space: str) -> _SliceIndex:
        """The index of ``slices`` on the ``shape`` grid ``affine`` describes (raises as :func:`series_frames`)."""
        shape = tuple(shape)
        to_voxel = np.linalg.inv(np.asarray(affine, dtype=np.float64))
        if str(space).upper() != "LPS":
            to_voxel = to_voxel @ np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM positions are LPS

        def voxel(point: Any) -> np.ndarray:
            return to_voxel[:3, :3] @ np.asarray(point, dtype=np.float64) + to_voxel[:3, 3]

        first = slices[0]
        rows, columns = int(first.Rows), int(first.Columns)
        orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
        row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
        # DICOM: the column index moves along the row direction by the column spacing, the row index along
        # the column direction by the row spacing
        row_axis, row_sign = _grid_step(to_voxel[:3, :3] @ (orientation[3:] * row_spacing), rows, first, 0)
        column_axis, column_sign = _grid_step(to_voxel[:3, :3] @ (orientation[:3] * column_spacing), columns, first, 0)
        if row_axis == column_axis:
            raise DatasetError(
                f"the mask does not lie on the grid of DICOM slice {_slice_name(first, 0)}: its rows and columns both run "
                "along one axis of the mask. Write the mask on the series' own grid, or write NIfTI masks."
            )
        plane_axis = ({0, 1, 2} - {row_axis, column_axis}).pop()
        origins = np.array([voxel(header.ImagePositionPatient) for header in slices])
        in_plane = np.abs(origins[0] - np.rint(origins[0]))[[row_axis, column_axis]].max()
        if in_plane > _IN_PLANE_TOLERANCE:
            raise DatasetError(
                f"the mask does not lie on the grid of DICOM slice {_slice_name(first, 0)}: its first pixel falls "
                f"{in_plane:.2f} voxels from the mask's voxel centres. Write the mask on the series' own grid (SaveImaged "
                "with resample=False after Invertd), or write NIfTI masks."
            )
        grid = (rows, columns, row_spacing, column_spacing)
        for n, header in enumerate(slices[1:], start=1):
            other = (int(header.Rows), int(header.Columns), *(float(v) for v in header.PixelSpacing))
            if not (np.allclose(np.asarray(header.ImageOrientationPatient, dtype=np.float64), orientation, atol=1e-4) and np.allclose(other, grid)):
                raise DatasetError(
                    f"DICOM slice {_slice_name(header, n)} differs from the series' first slice in orientation, size or "
                    "pixel spacing: the series is not one volume. Write NIfTI masks for it."
                )
        # the nearest plane: the series check lets a step differ from the others by up to half of one
        planes = np.rint(origins[:, plane_axis]).astype(np.int64)
        start = np.rint(origins[0]).astype(np.int64)
        ends = {row_axis: start[row_axis] + row_sign * (rows - 1), column_axis: start[column_axis] + column_sign * (columns - 1)}
        outside = [a for a in (row_axis, column_axis) if not (0 <= start[a] < shape[a] and 0 <= ends[a] < shape[a])]
        if outside or planes.min() < 0 or planes.max() >= shape[plane_axis]:
            raise DatasetError(
                f"the DICOM series lies outside the mask (planes {planes.min()}..{planes.max()} of {shape[plane_axis]} along "
                f"its axis {plane_axis}, and {rows}x{columns} pixels from voxel {start.tolist()} in a {list(shape)} mask): the "
                "mask was not computed on this series."
            )
        if len(slices) != shape[plane_axis]:
            raise DatasetError(
                f"the DICOM series has {len(slices)} slices but the mask {shape[plane_axis]} planes across them: the mask "
                "was not computed on this series."
            )
        taken, counts = np.unique(planes, return_counts=True)
        if (counts > 1).any():
            both = np.flatnonzero(planes == taken[counts > 1][0])[:2]
            raise DatasetError(
                f"DICOM slices {_slice_name(slices[both[0]], both[0])} and {_slice_name(slices[both[1]], both[1])} of the "
                f"series both fall on mask plane {taken[counts > 1][0]}: the mask was not computed on this series."
            )

        def run(axis: int, sign: int, count: int) -> slice:
            first_index = int(start[axis])
            stop = first_index + sign * count
            return slice(first_index, stop if stop >= 0 else None, sign)

        return cls(shape, (plane_axis, row_axis, column_axis), run(row_axis, row_sign, rows), run(column_axis, column_sign, columns), planes)

    def view(self, grid: np.ndarray) -> np.ndarray:
        """``(planes, rows, columns, S)`` of an ``(S, X, Y, Z)`` grid: axes moved, then sliced (a view: no voxel gathered one by one)."""
        plane_axis, row_axis, column_axis = self.axes
        ordered = np.moveaxis(grid, (1 + plane_axis, 1 + row_axis, 1 + column_axis, 0), (0, 1, 2, 3))
        return ordered[:, self.rows, self.columns]



class DicomSegWriter(ImageWriter):
    """A ``SaveImaged`` writer that stores a mask as a DICOM SEG referencing the DICOM series it was computed on.

    The image must have been read from a folder holding one DICOM series (its ``filename_or_obj``;
    for a multi-modal case, the first folder), and the mask be on that series' grid (``Invertd``,
    then ``SaveImaged(resample=False)``). Segments with no voxel keep their description; frames
    with no voxel of any segment are left out, as the standard allows.

    Example::

        SaveImaged(keys="pred", output_ext=".dcm", resample=False,
                   writer=functools.partial(DicomSegWriter, segments=LITS_SEGMENTS, algorithm="lits_effq"))

    Args:
        output_dtype: ignored (a SEG stores bits), for ``SaveImage``'s interface.
        scale: ignored, likewise.
        segments: what each label or channel of the mask is, in order.
        algorithm: the algorithm's name in each segment's description (the bundle and model).
        algorithm_version: its version.
        series_description: the SEG's series description, shown by viewers in the series list.
    """

    def __init__(
        self,
        output_dtype: Any = None,
        scale: Any = None,
        *,
        segments: Sequence[Segment],
        algorithm: str = "monai-effq",
        algorithm_version: str = "",
        series_description: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        require_highdicom()
        if not segments:
            raise ValueError("DicomSegWriter needs the segments the mask holds, e.g. segments=LITS_SEGMENTS.")
        self.segments = tuple(segments)
        self.algorithm = algorithm
        self.algorithm_version = algorithm_version or _version()
        self.series_description = series_description or f"{algorithm} segmentation"
        self.affine: np.ndarray | None = None
        self.space = "RAS"
        self.source: str | None = None

    def set_data_array(self, data_array: Any, channel_dim: int | None = 0, squeeze_end_dims: bool = True, **kwargs: Any) -> None:
        """Keep the mask, channel first.

        Args:
            data_array: ``(C, X, Y, Z)`` (or ``(X, Y, Z)`` with ``channel_dim=None``).
            channel_dim: its channel axis.
            squeeze_end_dims: unused (the mask keeps its channels).
            kwargs: unused.
        """
        data = data_array.detach().cpu().numpy() if isinstance(data_array, torch.Tensor) else np.asarray(data_array)
        self.data_obj = data[None] if channel_dim is None else np.moveaxis(data, channel_dim, 0)

    def set_metadata(self, meta_dict: Mapping | None, resample: bool = False, **options: Any) -> None:
        """Keep the mask's affine and the source it was computed on.

        Args:
            meta_dict: the image's metadata (``affine``, ``space``, ``filename_or_obj``).
            resample: must be False: the SEG's frames are the source slices' own grid.
            options: unused.

        Raises:
            ValueError: when resampling is asked for, or the metadata lack the affine or the source.
        """
        if resample:
            raise ValueError("DicomSegWriter writes onto the source series' grid: use SaveImaged(resample=False) after Invertd.")
        meta = dict(meta_dict or {})
        if meta.get("affine") is None or not meta.get("filename_or_obj"):
            raise ValueError("DicomSegWriter needs the image's affine and filename_or_obj in its metadata.")
        affine = meta["affine"]
        self.affine = affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine)
        self.space = str(meta.get("space", "RAS"))
        source = meta["filename_or_obj"]
        self.source = str(source[0] if isinstance(source, (list, tuple)) else source)

    def write(self, filename: PathLike, verbose: bool = False, **kwargs: Any) -> None:
        """Write the SEG to ``filename``, whole or not at all.

        Args:
            filename: the destination (``.dcm``).
            verbose: log the destination.
            kwargs: unused.

        Raises:
            DatasetError: when the source is not a DICOM series folder, or the mask is not on its grid.
        """
        slices, array = self._on_source("a DICOM SEG")
        frames = series_frames(array, self.affine, slices, self.space)
        if array.shape[0] == 1:  # a label map: highdicom splits it into segments (faster than checking a stack for overlap)
            frames = frames[..., 0]
        seg = _segmentation(slices, frames, self.segments, self.algorithm, self.algorithm_version, self.series_description)
        if verbose:
            logger.info(f"writing: {filename}")
        with atomic_write(filename) as tmp:
            seg.save_as(tmp)

    def _on_source(self, kind: str) -> tuple[list[Any], np.ndarray]:
        """The source series' slice headers and the mask as segments (:func:`segment_array`), both checked.

        Args:
            kind: what is written, for the error (``"a DICOM SEG"``).

        Raises:
            ValueError: before :meth:`set_data_array` and :meth:`set_metadata`.
            DatasetError: when the source is not a DICOM series folder.
        """
        if self.source is None or self.affine is None or self.data_obj is None:
            raise ValueError(f"{type(self).__name__}.write needs set_data_array and set_metadata first.")
        require_series_folder(self.source, kind)
        return check_seg_source(self.source, kind), segment_array(self.data_obj, len(self.segments))


def _segmentation(
    slices: Sequence[Any], frames: np.ndarray, segments: Sequence[Segment], algorithm: str, version: str, description: str
) -> Any:
    """The ``highdicom.seg.Segmentation`` of ``frames`` (a label map or one channel per segment) on ``slices``."""
    identification = hd.AlgorithmIdentificationSequence(name=algorithm, family=codes.cid7162.ArtificialIntelligence, version=version)
    descriptions = []
    for number, segment in enumerate(segments, start=1):
        item = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=segment.label,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            **segment.concepts(),
        )
        if segment.modifier:  # highdicom takes no modifier; the standard nests it in the type's code item (PS3.3 C.8.20.2)
            item.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = segment.modifiers()
        descriptions.append(item)
    # highdicom logs each module it copies from the source at INFO, which bundles' logging shows
    with _quiet_highdicom():
        return hd.seg.Segmentation(
            source_images=_as_highdicom_copies(slices),
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=_series_number(slices[0]),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="monai-effq",
            manufacturer_model_name=algorithm,
            software_versions=version,
            device_serial_number="none",
            series_description=description,
            content_qualification="RESEARCH",
            # a mask with no voxel still records that the series was segmented
            omit_empty_frames=bool(frames.any()),
        )


@contextlib.contextmanager
def _quiet_highdicom() -> Iterator[None]:
    logger_ = logging.getLogger("highdicom")
    level = logger_.level
    logger_.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger_.setLevel(level)


def _series_number(source: Any) -> int:
    """A series number beside the source's, as scanners number derived series (its number plus 1000)."""
    number = source.get("SeriesNumber")
    return int(number) + 1000 if number not in (None, "") else 1000


def _version() -> str:
    from monai_effq import __version__

    return f"monai-effq {__version__}"


def media_storage_class(path: str | PathLike) -> str:
    """The Media Storage SOP Class UID in a DICOM file's meta header: what kind of object the file holds.

    The header is read by pydicom where the ``dicom`` extra is installed, else by a reader of the
    standard layout, so that a DICOM image file is told apart without it. A ``.dcm`` file without the
    header (a bare dataset) gives its SOP Class UID, where pydicom reads it.

    Args:
        path: any path.

    Returns:
        the UID, or ``""`` for anything but a DICOM file with a meta header, also a file that cannot be
        read (the image reader names it).
    """
    path = Path(path)
    try:
        if not path.is_file():
            return ""
        with open(path, "rb") as stream:
            head = stream.read(132)
            if head[128:132] != b"DICM":
                # a bare dataset without the Part 10 header, as older planning systems export, is read by its own SOP class
                if path.suffix.lower() == ".dcm" and has_highdicom:
                    return str(pydicom.dcmread(path, force=True, stop_before_pixels=True, specific_tags=["SOPClassUID"]).get("SOPClassUID", ""))
                return ""
            if has_highdicom:  # and so pydicom
                return str(read_file_meta_info(path).get("MediaStorageSOPClassUID", ""))
            return _media_storage_class(stream.read(4096))
    except Exception:  # unreadable, or a damaged meta header
        return ""


def is_dicom_seg(path: str | PathLike) -> bool:
    """Whether ``path`` is a DICOM Segmentation (SEG) file, binary, fractional or label map, by its file meta header.

    Args:
        path: any path.

    Returns:
        True for a file whose media storage SOP class is a Segmentation's (:func:`media_storage_class`);
        False for anything else, also a file that cannot be read (the image reader names it).

    Raises:
        MissingExtraError: for a SEG when highdicom (the ``dicom`` extra), which reads it, is not installed.
    """
    if media_storage_class(path) not in SEGMENTATION_CLASSES:
        return False
    if not has_highdicom:
        raise MissingExtraError(
            f"{path} is a DICOM SEG, and reading it as labels needs highdicom: pip install 'monai-effq[dicom]' "
            "(or pip install highdicom), or give the labels as NIfTI files."
        )
    return True


def _media_storage_class(meta: bytes) -> str:
    """The Media Storage SOP Class UID (0002,0002) of a file meta group (explicit VR little endian), or ``""``."""
    offset = 0
    while offset + 8 <= len(meta):
        group, element = int.from_bytes(meta[offset : offset + 2], "little"), int.from_bytes(meta[offset + 2 : offset + 4], "little")
        if group != 0x0002:
            break
        vr = meta[offset + 4 : offset + 6]
        if vr in _LONG_VRS:  # a 4-byte length after two reserved bytes
            length, offset = int.from_bytes(meta[offset + 8 : offset + 12], "little"), offset + 12
        else:
            length, offset = int.from_bytes(meta[offset + 6 : offset + 8], "little"), offset + 8
        if element == 0x0002:
            return meta[offset : offset + length].rstrip(b"\0 ").decode("ascii", "replace")
        offset += length
    return ""


def read_seg_labels(
    path: str | PathLike,
    series: str | PathLike | Sequence[str | PathLike],
    affine: np.ndarray,
    shape: Sequence[int],
    labels: SegLabels,
    space: str = "RAS",
) -> np.ndarray:
    """A DICOM SEG as a label map on the grid of the series it segments, in a dataset's label convention.

    Each frame is placed by the source slice it names (its referenced SOP instance), that slice by its
    geometry, as :func:`series_frames` places a mask's frames: the labels land on the voxels the image
    read from ``series`` has.

    Args:
        path: the SEG file.
        series: the folder of the DICOM series it segments (the image's), or a multi-contrast case's
            folders, all on one grid: the SEG is placed on the one it references.
        affine: the image's voxel-to-world affine, 4x4.
        shape: the image's spatial shape ``(X, Y, Z)``.
        labels: which segments to read and the label value of each.
        space: the world frame of ``affine``, ``"RAS"`` or ``"LPS"``.

    Returns:
        ``(X, Y, Z)`` uint8 labels, 0 where no segment is.

    Raises:
        DatasetError: when the file is not a readable SEG, segments another series, lacks a segment of
            ``labels`` or holds it twice, or its frames do not lie on the series' slices.
        MissingExtraError: without highdicom.
    """
    seg = load_seg(path)
    folder, slices = referenced_series(series, {uid for _, _, uid in seg.get_source_image_uids()}, f"DICOM SEG label {path}")
    ours = [str(header.SOPInstanceUID) for header in slices]
    numbers = match_segments(_seg_segments(seg), labels, f"DICOM SEG label {path}")
    try:
        with _quiet_highdicom():
            frames = seg.get_pixels_by_source_instance(ours, segment_numbers=numbers, assert_missing_frames_are_empty=True)
    except Exception as e:  # highdicom's ValueError/RuntimeError on frames it cannot place
        raise DatasetError(
            f"cannot place the frames of DICOM SEG label {path} on the slices of {folder}: {image_error_reason(e)}; re-export "
            "the SEG on this series, or give the label as NIfTI."
        ) from e
    frames = np.asarray(frames)
    # a fractional segment counts where its value is at least half
    return paint_labels(frames_on_grid(frames >= (0.5 if frames.dtype.kind == "f" else 1), affine, slices, shape, space), labels, f"DICOM SEG label {path}")


def load_seg(path: str | PathLike, decode: bool = False) -> Any:
    """A DICOM SEG read by highdicom, or an error naming the file.

    Args:
        path: the SEG file.
        decode: decode its frames too, so that a file cut short fails here rather than mid-run.

    Returns:
        the ``highdicom.seg.Segmentation``.

    Raises:
        DatasetError: when highdicom cannot read it (damaged, cut short, or not a SEG).
        MissingExtraError: without highdicom.
    """
    require_highdicom()
    try:
        with _quiet_highdicom():
            seg = hd.seg.segread(path)
            if decode:
                seg.pixel_array  # noqa: B018
    except Exception as e:  # pydicom and highdicom raise many unrelated types for a damaged file
        raise DatasetError(
            f"cannot read DICOM SEG label {path}: {image_error_reason(e)}; re-export it (a label-map SEG needs highdicom 0.24 or later)."
        ) from e
    return seg


def referenced_series(
    series: str | PathLike | Sequence[str | PathLike], sop_uids: set[str], source: str, series_uids: set[str] | None = None
) -> tuple[str | PathLike, list[Any]]:
    """The folder, of a case's series, that a label object was drawn on, and its slices' headers.

    Args:
        series: the case's series folder, or its folders (a multi-contrast case).
        sop_uids: the slices (SOP Instance UIDs) the object references.
        source: the object as the error names it (``"DICOM SEG label <file>"``).
        series_uids: the series (Series Instance UIDs) it references, where it names them.

    Returns:
        the folder and its slices' headers, in the order of :func:`~monai_effq.data.dicom_series_files`.

    Raises:
        DatasetError: when it references none of the folders' slices or series.
    """
    folders = [series] if isinstance(series, (str, PathLike)) else list(series)
    for folder in folders:
        slices = series_headers(folder)
        ours = {str(header.SOPInstanceUID) for header in slices}
        if sop_uids & ours or str(slices[0].get("SeriesInstanceUID", "")) in (series_uids or set()):
            return folder, slices
    raise DatasetError(
        f"{source} segments another series than its image {', '.join(str(f) for f in folders)} (it references none of "
        "their slices nor series): pair each image with the labels drawn on it."
    )


def paint_labels(masks: np.ndarray, labels: SegLabels, source: str = "") -> np.ndarray:
    """``(S, X, Y, Z)`` segment masks as one ``(X, Y, Z)`` uint8 label map, each painted with its value, later over earlier.

    A user's mapping (segments named by label or number) that paints a segment over entirely is logged
    as a warning: listing a segment before the one that contains it (a tumour before its liver) loses it.
    """
    out = np.zeros(masks.shape[1:], dtype=np.uint8)
    for value, mask in zip(labels.values, masks):
        out[mask] = value
    for segment, value, mask in zip(labels.segments, labels.values, masks):
        if not isinstance(segment, Segment) and mask.any() and not (out[mask] == value).any():
            logger.warning(
                f"{source}: segment {segment!r} (label {value}) is painted over entirely by segments seg_segments lists "
                "after it; list the segment that contains another first (e.g. the liver before its tumour)."
            )
    return out


def _normalised(label: str) -> str:
    return " ".join(str(label).casefold().replace("tumor", "tumour").replace("_", " ").split())


def _seg_segments(seg: Any) -> list[tuple[int, str, tuple[str, str] | None]]:
    """Each segment of a SEG: its number, label and coded property type ``(value, scheme)``."""
    found = []
    for item in seg.SegmentSequence:
        code = item.get("SegmentedPropertyTypeCodeSequence")
        # CodedConcept reads a code value from any of its three forms (short, long, URN)
        concept = hd.sr.CodedConcept.from_dataset(code[0]) if code else None
        key = (str(concept.value), str(concept.scheme_designator)) if concept is not None else None
        found.append((int(item.SegmentNumber), str(item.get("SegmentLabel", "")), key))
    return found


def match_segments(found: Sequence[tuple[int, str, tuple[str, str] | None]], labels: SegLabels, source: str) -> list[int]:
    """The number of each segment ``labels`` names, among those of a label object.

    Args:
        found: the object's segments (a SEG's segments, an RTSTRUCT's ROIs): number, label, and coded
            property type ``(value, scheme)`` or None.
        labels: the segments to find (by label, code or number, see :class:`SegLabels`).
        source: the object as the error names it (``"DICOM SEG label <file>"``).

    Returns:
        a segment number per segment of ``labels``, in its order.

    Raises:
        DatasetError: listing what the object holds, when a segment is missing or matches several.
    """
    segments = labels.segments
    listed = ", ".join(f"{n} {label!r}" + (f" ({code[1]} {code[0]})" if code else "") for n, label, code in found)
    numbers = []
    for segment in segments:
        if isinstance(segment, Segment):
            match, wanted = _by_label_or_code(found, segment, segments)
        else:
            match = [n for n, label, _ in found if isinstance(segment, str) and _normalised(label) == _normalised(segment)]
            if not match and str(segment).strip().isdigit():
                match = [n for n, _, _ in found if n == int(str(segment).strip())]
        if len(match) != 1:
            why = "several segments" if len(match) > 1 else "no segment"
            mapping = (
                f"with --seg_segments \"{{'<segment label or number>': <label value>, ...}}\" (label values {sorted(set(labels.label_values or labels.values))}, "
                "painted in that order)"
            )
            if isinstance(segment, Segment):
                coded = wanted is not None and any(code for _, _, code in found)  # an RTSTRUCT's ROIs often carry none
                named = f"labelled {segment.label!r}" + (f" or coded {wanted.meaning} ({wanted.scheme_designator} {wanted.value})" if coded else "")
                fix = f"Name its segments {[s.label for s in segments if isinstance(s, Segment)]}, or map them {mapping}"
            else:
                named = f"labelled or numbered {segment!r}"
                fix = f"Map the segments it holds {mapping}"
            raise DatasetError(f"{source} has {why} {named}; it holds: {listed}. {fix}, or give the labels as NIfTI files.")
        if match[0] in numbers:
            twice = segments[numbers.index(match[0])]
            raise DatasetError(
                f"{source}: seg_segments names its segment {match[0]} twice, as {twice!r} and as {segment!r}; name each segment once."
            )
        numbers.append(match[0])
    return numbers


def _by_label_or_code(found: Sequence[tuple[int, str, Any]], segment: Segment, segments: Sequence[Segment | str | int]) -> tuple[list[int], Any]:
    """The segment numbers that match ``segment`` by label, else by coded type, and the code looked for (or None)."""
    by_label = [n for n, label, _ in found if _normalised(label) == _normalised(segment.label)]
    # a type two of ``segments`` share (BraTS' core and whole tumour are both neoplasms) tells them not apart
    same_type = [s for s in segments if isinstance(s, Segment) and s.property_type == segment.property_type]
    wanted = segment.concepts()["segmented_property_type"] if len(same_type) == 1 else None
    if by_label or wanted is None:
        return by_label, wanted
    key = (str(wanted.value), str(wanted.scheme_designator))
    return [n for n, _, code in found if snomed_ct(code) == key], wanted


def snomed_ct(code: tuple[str, str] | None) -> tuple[str, str] | None:
    """A code as SNOMED CT gives it: a legacy SNOMED RT code (schemes ``SRT``, ``SNM3``), as older
    3D Slicer SEGs and planning systems write them, becomes the SNOMED CT code it was retired for.

    Args:
        code: ``(value, scheme)``, or None.

    Returns:
        ``(SNOMED CT value, "SCT")`` for a SNOMED RT code pydicom's mapping knows (``T-62000``, the liver,
        is ``10200004``), else ``code`` as given.
    """
    if code is None or code[1] not in ("SRT", "SNM3"):
        return code
    value = snomed_mapping.get("SRT", {}).get(code[0])
    return (str(value), "SCT") if value else code
