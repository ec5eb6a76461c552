"""Checks that one image, a file or a folder holding a DICOM series, is there and reads in full.

Inference takes what a hospital has: NIfTI from research pipelines, NRRD and MetaImage from 3D Slicer
or MONAI Label clients, and DICOM series straight from the scanner's archive, one folder per series.
MONAI's ``ITKReader`` reads such a folder, but a folder holding several series (a CT's arterial and
venous phases, a localizer) makes it warn and read the first it lists, so a mask could belong to
another series than the user meant. These checks refuse that before a run, and decode every image in
full so that a truncated file is named before any mask is written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.utils import optional_import

from monai_effq.data.layouts import NIFTI_SUFFIXES, DatasetError, check_nifti

itk, _ = optional_import("itk")

__all__ = ["dicom_series_files", "check_image"]


def dicom_series_files(folder: str | os.PathLike) -> list[str]:
    """The files of the one DICOM series in ``folder``, in the order MONAI's ``ITKReader`` reads them.

    The series are told apart as ``ITKReader`` tells them apart (series UID and details, series date),
    so a folder passes here exactly when MONAI reads all of it.

    Args:
        folder: a folder of DICOM files (``.dcm`` or without an extension).

    Returns:
        the series' file paths, sorted by slice position.

    Raises:
        DatasetError: when the folder holds no DICOM series, or more than one.
    """
    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction("0008|0021")  # Series Date, as MONAI's ITKReader
    warnings = itk.Object.GetGlobalWarningDisplay()
    itk.Object.SetGlobalWarningDisplay(False)  # an empty folder's warning would precede the error saying the same
    try:
        names.SetDirectory(str(folder))
        series = list(names.GetSeriesUIDs())
    finally:
        itk.Object.SetGlobalWarningDisplay(warnings)
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
    _check_slice_steps(folder, files)
    return files


def _check_unlisted(folder: str | os.PathLike, files: Sequence[str]) -> None:
    """A DICOM file the series lister skipped is one GDCM could not parse: the volume would lack its slice."""
    listed = {os.path.realpath(f) for f in files}
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file() or os.path.realpath(path) in listed:
            continue
        with open(path, "rb") as stream:
            preamble = stream.read(132)
        if preamble[128:132] == b"DICM":
            raise DatasetError(
                f"DICOM file {path} in folder {folder} cannot be read (damaged or cut short), so its slice would "
                "be missing from the volume: restore the file from the archive, or remove it if it is not a slice."
            )


def _check_slice_steps(folder: str | os.PathLike, files: Sequence[str]) -> None:
    """Refuse a series whose slices are not evenly spaced: ITK stacks them at one step, so a missing
    or doubled slice would shift every slice after it."""
    if len(files) < 3:
        return
    positions = []
    for file in files:
        io = itk.GDCMImageIO.New()
        io.SetFileName(file)
        io.ReadImageInformation()
        origin = np.array([io.GetOrigin(i) for i in range(3)])
        positions.append(float(origin @ np.array(io.GetDirection(2))))  # along the slice normal
    order = np.argsort(positions, kind="stable")
    steps = np.diff(np.asarray(positions)[order])
    usual = float(np.median(steps))
    worst = int(np.argmax(np.abs(steps - usual)))
    # a missing slice doubles a step; the rounding of positions written as text stays far below 10%
    if usual <= 0 or abs(steps[worst] - usual) > 0.1 * usual:
        raise DatasetError(
            f"the DICOM series in {folder} is not evenly sliced: {Path(files[order[worst]]).name} and "
            f"{Path(files[order[worst + 1]]).name} are {steps[worst]:.4g} mm apart where its other slices are "
            f"{usual:.4g} mm apart, so a slice is missing or doubled and MONAI would place the slices at the "
            "wrong depth. Restore the missing slice, or convert the series to NIfTI with a tool that "
            "resamples it (e.g. 3D Slicer) and pass that file."
        )


def check_image(paths: str | os.PathLike | Sequence[str | os.PathLike], read_data: bool = True) -> None:
    """Check that an image reads: a NIfTI file, a file in another format ITK reads, or a DICOM series folder.

    Args:
        paths: one image, or the files of one multi-modal case.
        read_data: decode the voxels too (what finds a truncated file); otherwise NIfTI headers are
            read and DICOM folders are checked to hold one series.

    Raises:
        DatasetError: naming the first image that is missing, corrupt or unreadable, or a folder that
            does not hold exactly one DICOM series.
    """
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        if not Path(path).exists():
            raise DatasetError(f"image {path} does not exist: correct the datalist or the dataset folder.")
        if Path(path).is_dir():
            files: str | list[str] = dicom_series_files(path)
        elif str(path).endswith(NIFTI_SUFFIXES):
            check_nifti(path, read_data=read_data)
            continue
        else:
            files = str(path)
        if not read_data:
            continue
        try:
            itk.imread(files)
        except Exception as e:  # ITK raises RuntimeError for most failures, but not for all
            reason = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
            raise DatasetError(f"cannot read image file(s) [{str(path)!r}]: {reason}; re-export or remove them.") from e
