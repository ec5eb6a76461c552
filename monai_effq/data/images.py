"""Checks that one image, a file or a folder holding a DICOM series, is there and reads in full.

Inference takes what a hospital has: NIfTI from research pipelines, NRRD and MetaImage from 3D Slicer
or MONAI Label clients, and DICOM series straight from the scanner's archive, one folder per series.
MONAI's ``ITKReader`` reads such a folder, but it stacks whatever it finds there: a folder holding
several series (a CT's arterial and venous phases, a localizer) makes it warn and read the first it
lists, a slice file it cannot parse is left out, and slices that are not evenly spaced along their
normal (a missing slice, a gantry tilt) are stacked at one step, so every slice after the gap lies
at the wrong depth. These checks refuse such folders before a run, and decode every image in full
so that a truncated file is named before any mask is written.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.utils import optional_import

from monai_effq.data.layouts import NIFTI_SUFFIXES, DatasetError, check_nifti_volume

itk, _ = optional_import("itk")

logger = logging.getLogger("monai_effq")

__all__ = [
    "dicom_series_files",
    "series_shape",
    "series_grid",
    "file_channels",
    "check_image",
    "check_case_grids",
    "check_label_grid",
    "check_series_grids",
    "image_error_reason",
]

# the tags that hold an image's voxels: Pixel Data, Float Pixel Data, Double Float Pixel Data
# (little endian, as every transfer syntax in use writes them)
_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")
# a missing or doubled slice changes one step by a whole step; positions rounded in the file text
# move a step by far less than half of one
_STEP_TOLERANCE = 0.5
# a gantry tilt above this (degrees) shears the volume by more than rounding does
_TILT_TOLERANCE_DEGREES = 0.5
# images of one case whose affines differ by less than this (mm) in every entry are on one grid:
# the rounding of one grid written by two programs, far below a voxel
_GRID_TOLERANCE_MM = 1e-3
# a slice's header (where the pixel data element starts) fits in this many bytes in all but odd files
_HEADER_BYTES = 1 << 16


def image_error_reason(error: BaseException) -> str:
    """The part of an image reader's error that says what is wrong, for a one-line message.

    ITK's errors start with the source file and line that raised them; the reason follows
    ``ITK ERROR: <class>(<address>):``.

    Args:
        error: what the reader raised.

    Returns:
        one line, without a trailing full stop.
    """
    text = str(error).strip()
    found = re.search(r"ITK ERROR: \w+\(0x[0-9a-fA-F]+\):\s*(.+)", text)
    if found:
        return found.group(1).strip().rstrip(".")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].rstrip(".") if lines else type(error).__name__


def _series_names(folder: str | os.PathLike) -> Any:
    """GDCM's series lister on ``folder``, set up as MONAI's ``ITKReader`` sets it up."""
    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction("0008|0021")  # Series Date, as MONAI's ITKReader
    shown = itk.Object.GetGlobalWarningDisplay()
    itk.Object.SetGlobalWarningDisplay(False)  # an empty folder's warning would precede the error saying the same
    try:
        names.SetDirectory(str(folder))
        names.GetSeriesUIDs()
    finally:
        itk.Object.SetGlobalWarningDisplay(shown)
    return names


def dicom_series_files(folder: str | os.PathLike) -> list[str]:
    """The files of the one DICOM series in ``folder``, in the order MONAI's ``ITKReader`` reads them.

    The series are told apart as ``ITKReader`` tells them apart (series UID and details, series
    date). Files that are DICOM but hold no image (a structure set, a report, ``DICOMDIR``) may lie
    beside the series; sub-folders are not read.

    Args:
        folder: a folder of DICOM files (``.dcm`` or without an extension).

    Returns:
        the series' file paths, sorted by slice position.

    Raises:
        DatasetError: when the folder holds no DICOM series or more than one, an image file beside the
            series cannot be parsed (its slice would be left out), or the slices are not evenly spaced
            along their normal (a missing or doubled slice, several echoes or phases, a gantry tilt).
    """
    names = _series_names(folder)
    series = list(names.GetSeriesUIDs())
    if not series:
        raise DatasetError(
            f"folder {folder} holds no DICOM series: pass an image file (.nii.gz, .nrrd, .mha) or a folder "
            "holding the DICOM files of one series."
        )
    if len(series) > 1:
        sizes = ", ".join(f"{uid} ({len(names.GetFileNames(uid))} files)" for uid in series[:4])
        more = f" and {len(series) - 4} more" if len(series) > 4 else ""
        raise DatasetError(
            f"folder {folder} holds {len(series)} DICOM series ({sizes}{more}), and MONAI would read only the "
            "first: put each series in a folder of its own and pass the folder of the series to segment."
        )
    files = [str(f) for f in names.GetFileNames(series[0])]
    _check_unlisted(folder, files)
    for file in files:
        if _cut_short(Path(file)):
            raise _damaged(Path(file), folder)
    _check_slice_geometry(folder, files)
    return files


def series_shape(files: Sequence[str]) -> tuple[int, int, int]:
    """The spatial shape MONAI's ``ITKReader`` gives a DICOM series, from its first slice's header.

    Args:
        files: the series' files, as :func:`dicom_series_files` returns them.

    Returns:
        ``(columns, rows, slices)``, the axis order of the volume MONAI reads.
    """
    return _shape_of(_slice_header(files[0]), len(files))


def _shape_of(io: Any, files: int) -> tuple[int, int, int]:
    # an enhanced (multi-frame) series is one file of many frames; a classic one, a frame per file
    frames = int(io.GetDimensions(2)) if io.GetNumberOfDimensions() > 2 else 1
    return int(io.GetDimensions(0)), int(io.GetDimensions(1)), frames * files


def series_grid(files: Sequence[str]) -> tuple[tuple[int, int, int], np.ndarray]:
    """The spatial shape and voxel-to-RAS affine MONAI's ``ITKReader`` gives a DICOM series, from the headers
    of its first and last slices (no voxel is decoded).

    Args:
        files: the series' files, as :func:`dicom_series_files` returns them (sorted along the slice normal).

    Returns:
        ``(columns, rows, slices)`` and the 4x4 affine, as :func:`check_case_grids` compares NIfTI headers.
    """
    first = _slice_header(files[0])
    origin = np.array([first.GetOrigin(i) for i in range(3)], dtype=np.float64)
    direction = np.array([first.GetDirection(i) for i in range(3)], dtype=np.float64).T  # a column per voxel axis
    spacing = np.array([first.GetSpacing(i) for i in range(3)], dtype=np.float64)
    if len(files) > 1:  # a slice per file: ITK steps from slice to slice along the normal
        last = _slice_header(files[-1])
        span = np.array([last.GetOrigin(i) for i in range(3)], dtype=np.float64) - origin
        spacing[2] = abs(float(span @ direction[:, 2])) / (len(files) - 1)
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = origin
    return _shape_of(first, len(files)), np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # DICOM's frame is LPS


def file_channels(path: str | os.PathLike) -> int:
    """How many channels MONAI's ``ITKReader`` makes of an image file in another format than NIfTI, from its header:
    its pixel components (a vector NRRD or MetaImage holds several) times the size of any axis past the third.

    Args:
        path: an image file ITK reads (NRRD, MetaImage, ...).

    Returns:
        the channels; 1 for a file ITK cannot open (:func:`check_image` names it).
    """
    io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        return 1
    io.SetFileName(str(path))
    try:
        io.ReadImageInformation()
    except RuntimeError:  # a damaged header: check_image names the file when it reads it
        return 1
    extra = int(np.prod([io.GetDimensions(axis) for axis in range(3, io.GetNumberOfDimensions())]))
    return int(io.GetNumberOfComponents()) * extra


def _slice_header(file: str) -> Any:
    io = itk.GDCMImageIO.New()
    io.SetFileName(str(file))
    io.ReadImageInformation()
    return io


def _damaged(path: Path, folder: str | os.PathLike) -> DatasetError:
    return DatasetError(
        f"DICOM file {path} in folder {folder} cannot be read (damaged or cut short), so its slice would be missing "
        "or wrong in the volume: restore the file from the archive, or remove it if it is not a slice."
    )


def _cut_short(path: Path) -> bool:
    """Whether a DICOM file ends before the pixel data its header declares.

    GDCM, depending on its version, leaves such a file out of the series or reads it with the missing
    voxels made up; either way the volume is wrong. Encapsulated (compressed) pixel data declares no
    length and is left to the decoder. The header comes first, so its start is read, not the voxels.
    """
    content = _read_head(path, _HEADER_BYTES)
    at = content.find(_PIXEL_DATA_TAGS[0])
    if at < 0:
        if len(content) < _HEADER_BYTES:
            return False
        content = _read_head(path)  # a header longer than the usual (private tags, an icon): read it all
        at = content.find(_PIXEL_DATA_TAGS[0])
        if at < 0:
            return False
    if content[at + 4 : at + 6] in (b"OB", b"OW"):  # explicit VR: 2 reserved bytes, then a 4-byte length
        start, length = at + 12, content[at + 8 : at + 12]
    else:  # implicit VR: the 4-byte length follows the tag
        start, length = at + 8, content[at + 4 : at + 8]
    if len(length) < 4:
        return True
    declared = int.from_bytes(length, "little")
    return declared != 0xFFFFFFFF and start + declared > path.stat().st_size


def _is_dicom(head: bytes) -> bool:
    """Whether a file's first bytes are a DICOM file's: a 128-byte preamble, then ``DICM``."""
    return head[128:132] == b"DICM"


def _read_head(path: Path, size: int = -1) -> bytes:
    """The first ``size`` bytes of a file (all with -1), or a :class:`DatasetError` naming it."""
    try:
        with open(path, "rb") as stream:
            return stream.read(size)
    except OSError as e:
        raise DatasetError(f"cannot read {path} in a DICOM series folder ({e.strerror}): check its permissions.") from e


def _check_unlisted(folder: str | os.PathLike, files: Sequence[str]) -> None:
    """A DICOM image the series lister skipped is one GDCM could not parse: the volume would lack its slice.

    DICOM files without voxels (structure sets, reports, presentation states, ``DICOMDIR``) are
    skipped by the lister too, and rightly: they are told apart by having no pixel data element.
    """
    listed = {os.path.realpath(f) for f in files}
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file() or os.path.realpath(path) in listed:
            continue
        content = _read_head(path)
        if _is_dicom(content) and any(tag in content for tag in _PIXEL_DATA_TAGS):
            raise _damaged(path, folder)


def _check_slice_geometry(folder: str | os.PathLike, files: Sequence[str]) -> None:
    """Refuse a series whose slices do not lie evenly along their normal: ITK stacks them at one step
    along it, so a missing, doubled or sheared slice would put every slice after it at the wrong depth."""
    if len(files) < 3:
        return
    origins, normal = [], np.zeros(3)
    for file in files:
        io = itk.GDCMImageIO.New()
        io.SetFileName(file)
        io.ReadImageInformation()
        origins.append([io.GetOrigin(i) for i in range(3)])
        normal = np.array(io.GetDirection(2))
    origins = np.asarray(origins)
    positions = origins @ normal
    order = np.argsort(positions, kind="stable")
    steps = np.diff(positions[order])
    usual = float(np.median(steps))
    names = [Path(files[i]).name for i in order]
    if usual <= 0:
        repeats = len(positions) // max(1, len(np.unique(np.round(positions, 3))))
        raise DatasetError(
            f"the DICOM series in {folder} has about {repeats} slices at each position: several echoes, phases or "
            "time points in one series, which MONAI would stack as one volume. Split it into one series per echo "
            "or phase (dcm2niix does) and pass one."
        )
    worst = int(np.argmax(np.abs(steps - usual)))
    if abs(steps[worst] - usual) > _STEP_TOLERANCE * usual:
        raise DatasetError(
            f"the DICOM series in {folder} is not evenly sliced: {names[worst]} and {names[worst + 1]} are "
            f"{steps[worst]:.4g} mm apart where its other slices are {usual:.4g} mm apart, so a slice is missing "
            "or doubled and MONAI would place the slices after it at the wrong depth. Restore the missing slice, "
            "or convert the series to NIfTI with a tool that resamples it (dcm2niix, 3D Slicer) and pass that file."
        )
    span = origins[order[-1]] - origins[order[0]]
    tilt = float(np.degrees(np.arccos(min(1.0, abs(span @ normal) / np.linalg.norm(span)))))
    if tilt > _TILT_TOLERANCE_DEGREES:
        raise DatasetError(
            f"the slices of the DICOM series in {folder} are sheared by {tilt:.1f} degrees against their normal (a "
            "gantry tilt): MONAI would stack them straight, out of place. Convert the series with a tool that "
            "corrects the tilt (dcm2niix, 3D Slicer) and pass the NIfTI file."
        )


def _one_slice_of(path: Path) -> int:
    """How many files the series of the DICOM file ``path`` has in its folder (0: not a DICOM image)."""
    if not _is_dicom(_read_head(path, 132)):
        return 0
    names = _series_names(path.parent)
    for uid in names.GetSeriesUIDs():
        series = {os.path.realpath(f) for f in names.GetFileNames(uid)}
        if os.path.realpath(path) in series:
            return len(series)
    return 0


def check_image(paths: str | os.PathLike | Sequence[str | os.PathLike], read_data: bool = True) -> None:
    """Check that an image reads: a NIfTI file, a file in another format ITK reads, or a DICOM series folder.

    Args:
        paths: one image, or the files of one multi-modal case.
        read_data: decode the voxels too (what finds a truncated file); otherwise NIfTI headers are
            read and DICOM folders are checked to hold one even series.

    Raises:
        DatasetError: naming the first image that is missing, corrupt or unreadable, a NIfTI image of fewer than
            three spatial axes, a folder that does not hold one evenly sliced DICOM series, one slice of a series
            given on its own, or an image of a multi-modal case on another grid than the first (for DICOM series
            and formats other than NIfTI, only with ``read_data``).
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    grids: list[tuple[Any, tuple[int, ...], np.ndarray]] = []
    for path in paths:
        if not Path(path).exists():
            raise DatasetError(f"image {path} does not exist: correct the datalist or the dataset folder.")
        if Path(path).is_dir():
            files: str | list[str] = dicom_series_files(path)
        elif str(path).endswith(NIFTI_SUFFIXES):
            check_nifti_volume(path, "image", read_data=read_data)
            if len(paths) > 1:  # the header holds the grid: compared without decoding the voxels
                grids.append((path, *_nifti_grid(path)))
            continue
        else:
            slices = _one_slice_of(Path(path))
            if slices > 1:
                raise DatasetError(
                    f"image {path} is one slice of a DICOM series of {slices} files: pass its folder, "
                    f"{Path(path).parent}, to segment the series."
                )
            files = str(path)
        if not read_data:
            continue
        try:
            image = itk.imread(files)
        except Exception as e:  # ITK raises RuntimeError for most failures, but not for all
            raise DatasetError(
                f"cannot read image file(s) [{str(path)!r}]: {image_error_reason(e)}; re-export or remove them."
            ) from e
        if len(paths) > 1:
            grids.append((path, *_itk_grid(image)))
    _check_one_grid(grids)


def _nifti_grid(path: str | os.PathLike) -> tuple[tuple[int, ...], np.ndarray]:
    """A NIfTI image's spatial shape and voxel-to-RAS affine (its header's, as MONAI's NibabelReader reads it)."""
    header = nib.load(str(path))
    return tuple(int(n) for n in header.shape[:3]), np.asarray(header.affine, dtype=np.float64)


def _itk_grid(image: Any) -> tuple[tuple[int, ...], np.ndarray]:
    """An ITK image's spatial shape and voxel-to-RAS affine (ITK's frame is LPS)."""
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = itk.array_from_matrix(image.GetDirection())[:3, :3] * spacing[:3]
    affine[:3, 3] = np.asarray(image.GetOrigin(), dtype=np.float64)[:3]
    size = tuple(int(n) for n in image.GetLargestPossibleRegion().GetSize())[:3]
    return size, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _same_grid(shape: tuple[int, ...], affine: np.ndarray, other_shape: tuple[int, ...], other_affine: np.ndarray) -> bool:
    return other_shape == shape and np.allclose(other_affine, affine, atol=_GRID_TOLERANCE_MM)


def _in_ras(shape: tuple[int, ...], affine: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """A grid's shape and affine once its voxel axes are flipped and permuted to RAS, as MONAI's ``Orientationd`` does."""
    ornt = nib.io_orientation(affine)
    ras_shape = [0, 0, 0]
    for axis, (to, _) in enumerate(ornt):
        ras_shape[int(to)] = shape[axis]
    return tuple(ras_shape), affine @ nib.orientations.inv_ornt_aff(ornt, shape)


def _describe_grids(
    shape: tuple[int, ...], affine: np.ndarray, other_shape: tuple[int, ...], other_affine: np.ndarray
) -> tuple[str, str]:
    """Two grids in words, told apart: size, spacing, axis directions and origin, or the whole affine
    where those read the same (an oblique rotation smaller than the rounding)."""

    def words(shape: tuple[int, ...], affine: np.ndarray) -> str:
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        axes = "".join(nib.aff2axcodes(affine))  # where each voxel axis points: RAS, LPS, ...
        return (
            f"{'x'.join(map(str, shape))} voxels of {'x'.join(f'{v:.3g}' for v in spacing)} mm towards {axes} "
            f"from {(np.round(affine[:3, 3], 2) + 0.0).tolist()}"
        )

    first, second = words(shape, affine), words(other_shape, other_affine)
    if first == second:
        first = f"{'x'.join(map(str, shape))} voxels of affine {np.round(affine[:3], 4).tolist()}"
        second = f"{'x'.join(map(str, other_shape))} voxels of affine {np.round(other_affine[:3], 4).tolist()}"
    return first, second


def _check_one_grid(grids: Sequence[tuple[Any, tuple[int, ...], np.ndarray]]) -> None:
    """Refuse the images of one case that do not share a grid, which MONAI would stack only at read time, mid-run."""
    if len(grids) < 2:
        return
    first, shape, affine = grids[0]
    for path, other_shape, other_affine in grids[1:]:
        if not _same_grid(shape, affine, other_shape, other_affine):
            reference, other = _describe_grids(shape, affine, other_shape, other_affine)
            raise DatasetError(
                f"the images of one case are not on one grid: {path} is {other} where {first} is {reference}. MONAI "
                "stacks a case's images voxel by voxel: register and resample them onto one grid first (BraTS' own "
                "preprocessing, 3D Slicer or ANTs do)."
            )


def check_case_grids(images: Sequence[str | os.PathLike], label: str | os.PathLike | None = None) -> str | None:
    """Check from the NIfTI headers alone that a case's images, and its label, lie on one grid.

    MONAI pairs a case's images and its label voxel by voxel after turning each to RAS by its own
    header: contrasts on different grids stop the run at that case, and a label whose axis directions or
    spacing differ from its image's (a segmentation saved with an identity affine) is silently flipped or
    resampled against the image, so every score on it is wrong. A label that differs in origin or by a
    small rotation only still pairs voxel by voxel as stored: the caller is told, to warn once for a
    dataset rather than once a case. A label stored in another axis order whose header puts it on the
    image's voxels in the world is paired right by the reorientation, and passes. Grids agree within the
    tolerance of :func:`check_image`.

    Args:
        images: the NIfTI files of one case (one, or a multi-modal case's contrasts).
        label: the case's NIfTI label, or None.

    Returns:
        ``None``, or for a label that differs from its image in origin or rotation only, the two files and
        grids in words.

    Raises:
        DatasetError: naming the image off the first image's grid (:func:`check_image`'s message), or the
            label and its image with both grids and how to put the label on the image's grid.
    """
    grids = [(path, *_nifti_grid(path)) for path in images]
    _check_one_grid(grids)
    return None if label is None else check_label_grid(*grids[0], label)


def check_series_grids(folders: Sequence[str | os.PathLike]) -> list[tuple[str, tuple[int, ...], np.ndarray]]:
    """Check from the slices' headers that a case's DICOM series lie on one grid, and give their grids.

    Args:
        folders: the case's series folders (one, or a multi-contrast case's).

    Returns:
        ``(folder, shape, affine)`` per series, as :func:`series_grid` gives them.

    Raises:
        DatasetError: for a folder that is not one evenly sliced series (:func:`dicom_series_files`), or a
            series off the first one's grid (:func:`check_case_grids`' message).
    """
    grids = [(str(folder), *series_grid(dicom_series_files(folder))) for folder in folders]
    _check_one_grid(grids)
    return grids


def check_label_grid(image: Any, shape: tuple[int, ...], affine: np.ndarray, label: str | os.PathLike) -> str | None:
    """Check from its header that a NIfTI label lies on its image's grid, as :func:`check_case_grids` does.

    Args:
        image: the image, for the message (a NIfTI file or a DICOM series folder).
        shape: the image's spatial shape.
        affine: the image's voxel-to-RAS affine (:func:`series_grid` gives a DICOM series').
        label: the NIfTI label.

    Returns:
        ``None``, or for a label that differs in origin or rotation only, the two files and grids in words.

    Raises:
        DatasetError: as :func:`check_case_grids`.
    """
    label_shape, label_affine = _nifti_grid(label)
    # the second: stored in another axis order (as dcm2niix stores rows) but on the same voxels in the world, which
    # MONAI's reorientation of each to RAS pairs as drawn
    if _same_grid(shape, affine, label_shape, label_affine) or _same_grid(*_in_ras(shape, affine), *_in_ras(label_shape, label_affine)):
        return None
    on_image, on_label = _describe_grids(shape, affine, label_shape, label_affine)
    spacing, label_spacing = np.linalg.norm(affine[:3, :3], axis=0), np.linalg.norm(label_affine[:3, :3], axis=0)
    if (
        label_shape == shape
        and nib.aff2axcodes(affine) == nib.aff2axcodes(label_affine)
        and np.allclose(spacing, label_spacing, rtol=1e-3, atol=_GRID_TOLERANCE_MM)
    ):
        # another origin or a small rotation: each file is turned to RAS and resampled by its own header onto arrays
        # of one shape, so the voxels still pair as drawn (nnU-Net's LiTS conversion and TotalSegmentator's data
        # hold such pairs); only a reading in world coordinates would place the label elsewhere
        return f"label {label} is {on_label} where its image {image} is {on_image}"
    raise DatasetError(
        f"label {label} is not on the grid of its image {image}: the label is {on_label}, the image {on_image}. "
        "MONAI turns each to RAS by its own header before pairing them voxel by voxel, so with another axis direction "
        "or spacing the label would mark other voxels than it was drawn on: if its voxels match the image, save it "
        "again with the image's header (affine); otherwise resample it onto the image (3D Slicer, ANTs or "
        "SimpleITK, nearest-neighbour)."
    )
