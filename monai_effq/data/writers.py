"""Image writers whose files appear whole or not at all, for ``SaveImaged(writer=...)``.

MONAI's writers save straight to the output name, so inference killed while it writes a mask
leaves a truncated ``.nii.gz`` under the name of a finished one, which a pipeline reading the
output folder would take for a result. These write through :func:`monai_effq.utils.io.atomic_write`:
the file is written beside its destination under a hidden temporary name, and moved into place
once complete.
"""

from __future__ import annotations

import logging
from typing import Any

from monai.config import PathLike
from monai.data import NibabelWriter

from monai_effq.utils.io import atomic_write

__all__ = ["AtomicNibabelWriter"]

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
