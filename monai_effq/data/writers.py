"""Image writers whose files appear whole or not at all, for ``SaveImaged(writer=...)``.

MONAI's writers save straight to the output name, so inference killed while it writes a mask
leaves a truncated ``.nii.gz`` under the name of a finished one, which a pipeline reading the
output folder would take for a result. These write through :func:`monai_effq.utils.io.atomic_write`:
the file is written beside its destination under a hidden temporary name, and moved into place
once complete.

:func:`mask_name_formatter` names a DICOM series' mask after its whole folder name: MONAI takes
what follows the last dot of a name for an extension, and series folders are often named by UID
(``1.3.6.1.4.1.14519...``) or number and description (``2.000000-ARTERIAL-41234``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.config import PathLike
from monai.data import NibabelWriter
from monai.data.folder_layout import default_name_formatter
from monai.data.utils import create_file_basename

from monai_effq.utils.errors import UserInputError
from monai_effq.utils.io import atomic_write

__all__ = ["AtomicNibabelWriter", "inference_masks", "mask_name_formatter", "mask_subject"]

logger = logging.getLogger(__name__)


class AtomicNibabelWriter(NibabelWriter):
    """:class:`monai.data.NibabelWriter` that moves each file into place only once it is written in full.

    Example::

        SaveImaged(keys="pred", output_dir="seg", writer="monai_effq.data.AtomicNibabelWriter")
    """

    def write(self, filename: PathLike, verbose: bool = False, **obj_kwargs: Any) -> None:
        """Write the image to ``filename`` (its extension, ``.nii`` or ``.nii.gz``, sets the format).

        Args:
            filename: the destination file.
            verbose: log the progress.
            obj_kwargs: passed to :meth:`monai.data.NibabelWriter.create_backend_obj`.
        """
        if verbose:  # the destination's name, not the temporary's that the parent class would log
            logger.info(f"writing: {filename}")
        # nibabel picks the format from the extension: the temporary keeps it, in a hidden folder beside
        with atomic_write(filename, keep_extension=True) as tmp:
            super().write(tmp, verbose=False, **obj_kwargs)


def mask_subject(image: str | os.PathLike) -> str:
    """The name ``SaveImage``'s folder layout is given for an image's mask, which then drops its extension.

    Args:
        image: the image file, or the folder of a DICOM series (a trailing separator is ignored).

    Returns:
        the image's path; a folder's with a stand-in extension, so that the mask keeps the folder's
        whole name (``2.000000-ARTERIAL-41234`` gives ``2.000000-ARTERIAL-41234_seg.nii.gz``, not ``2_seg``).
    """
    path = os.path.normpath(os.fspath(image))
    return f"{path}.series" if os.path.isdir(path) else path


def mask_name_formatter(metadict: dict | None, saver: Any) -> dict:
    """``SaveImage(output_name_formatter=...)`` naming each mask after its image as :func:`mask_subject` does.

    Args:
        metadict: the image's metadata (its ``filename_or_obj``).
        saver: the ``SaveImage`` transform.

    Returns:
        the keyword arguments of ``FolderLayout.filename``.
    """
    names = default_name_formatter(metadict, saver)
    if metadict and metadict.get("filename_or_obj"):
        names["subject"] = mask_subject(str(metadict["filename_or_obj"]))
    return names


def inference_masks(
    cases: Sequence[dict[str, Any]], output_dir: str | os.PathLike, postfix: str = "seg", ext: str = ".nii.gz"
) -> list[Path]:
    """The mask inference writes for each case, refusing a malformed datalist or two cases that would
    share a mask.

    The masks go into one folder, named after each image's file (``SaveImaged`` with
    ``separate_folder=False`` and :func:`monai_effq.data.mask_name_formatter`), so ``a/ct.nii`` and
    ``b/ct.nii`` (or ``ct.nrrd`` and ``ct.mha``) would leave only the last patient's mask. No image is read.

    Args:
        cases: ``[{"image": path or paths}, ...]``, the inference datalist; a path may be a file MONAI
            reads (NIfTI, NRRD, MetaImage, ...) or a folder holding one DICOM series.
        output_dir: where the masks go.
        postfix: the masks' name postfix.
        ext: the masks' file extension.

    Returns:
        one path per case, in order.

    Raises:
        UserInputError: naming an entry that is not ``{"image": path or paths}``, or two images whose
            masks would collide.
    """
    if isinstance(cases, (str, bytes, Mapping)) or not isinstance(cases, Sequence) or not cases:
        raise UserInputError(
            f"the inference datalist must be a non-empty list of cases such as [{{'image': '/path/to/ct.nii.gz'}}], got {cases!r}."
        )
    masks: dict[Path, str] = {}
    for case in cases:
        image = case.get("image") if isinstance(case, Mapping) else None
        files = [image] if isinstance(image, (str, os.PathLike)) else image
        if not (isinstance(files, (list, tuple)) and files and all(isinstance(f, (str, os.PathLike)) for f in files)):
            raise UserInputError(
                f"inference datalist entry {case!r} is not a case: give each as {{'image': path}}, the path an image "
                "file or DICOM series folder (a list of paths for a multi-modal case), e.g. "
                "--datalist \"[{'image': '/path/to/ct.nii.gz'}]\"."
            )
        # the name SaveImaged gives the mask: from the first file of a multi-modal case
        mask = Path(create_file_basename(postfix, mask_subject(files[0]), str(output_dir), "", False, makedirs=False) + ext)
        if mask in masks:
            raise UserInputError(
                f"images {masks[mask]} and {files[0]} would both write the mask {mask.name} in {output_dir}: "
                "rename one, or run them with separate --output_dir."
            )
        masks[mask] = str(files[0])
    return list(masks)
