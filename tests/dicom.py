"""Write a 3D image as a DICOM series, one file per slice, as a scanner's archive hands it out."""

from __future__ import annotations

import locale
import os

import itk
import numpy as np

__all__ = ["write_dicom_series"]


def write_dicom_series(image_path: str | os.PathLike, folder: str | os.PathLike, series_uid: str = "1.2.826.0.1.3680043.2.1125.1", prefix: str = "IM") -> list[str]:
    """Write ``image_path`` (any 3D integer image ITK reads) as CT slices carrying their position and orientation.

    Args:
        image_path: the volume to convert; its geometry goes into each slice's patient position and orientation.
        folder: where the slices go (created if needed).
        series_uid: the Series Instance UID of every slice; two calls with different UIDs make two series.
        prefix: the slice files' name prefix, so that two series can share a folder.

    Returns:
        the slice files written.
    """
    image = itk.imread(str(image_path))
    voxels = itk.array_view_from_image(image)  # (z, y, x)
    direction = np.asarray(image.GetDirection())
    origin, spacing = np.asarray(image.GetOrigin()), np.asarray(image.GetSpacing())
    os.makedirs(folder, exist_ok=True)
    saved = locale.setlocale(locale.LC_ALL)
    files = []
    for k in range(voxels.shape[0]):
        piece = itk.image_from_array(np.ascontiguousarray(voxels[k].astype(np.int16)))
        tags = piece.GetMetaDataDictionary()
        position = origin + direction[:, 2] * spacing[2] * k
        for tag, value in {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.9",
            "0020|000e": series_uid,
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
    # GDCM leaves the process in the C locale after writing text tags, and Python's default text
    # encoding would turn ASCII for the rest of the test session (reading still leaves it alone)
    locale.setlocale(locale.LC_ALL, saved)
    return files
