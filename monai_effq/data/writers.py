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
from typing import Any

from monai.config import PathLike
from monai.data import NibabelWriter
from monai.data.folder_layout import default_name_formatter

from monai_effq.utils.io import atomic_write

__all__ = ["AtomicNibabelWriter", "mask_name_formatter", "mask_subject"]

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
