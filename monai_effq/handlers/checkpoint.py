"""Training checkpoints written whole: MONAI's ``CheckpointSaver`` with every file written atomically.

MONAI's ``CheckpointSaver`` turns ignite's atomic saving off (ignite's temporary gets mode 0600, readable
by its writer alone), so training killed while it saves, or a disk that fills up under it, leaves a
truncated ``model_final.pt`` or ``model_best.pt`` under the name of a finished one: a file that MONAI
Label offers as a starting point and that ``quantize --ckpt_dir`` would read. :class:`AtomicCheckpointSaver`
writes the same files, with the mode the umask gives, through :func:`monai_effq.utils.io.atomic_write`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from monai.handlers import CheckpointSaver
from monai.utils import IgniteInfo, min_version, optional_import

from monai_effq.utils.io import atomic_write, check_writable

DiskSaver, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "DiskSaver")

__all__ = ["AtomicCheckpointSaver", "AtomicDiskSaver"]


class AtomicDiskSaver(DiskSaver):
    """ignite's ``DiskSaver`` that moves each checkpoint into place only once it is written in full.

    Saves on rank 0 of a distributed run, as ignite's does. Like the saver MONAI's ``CheckpointSaver``
    builds, it may keep one fixed file name (``model_final.pt``), which it replaces rather than removes.

    Args:
        dirname: the folder the checkpoints go to (made if missing).
        filename: a fixed file name for every save, or ``None`` for the names ignite's ``Checkpoint`` gives.
    """

    def __init__(self, dirname: str | Path, filename: str | None = None) -> None:
        check_writable(dirname)  # ignite would make the folder with a bare OSError
        super().__init__(dirname=dirname, require_empty=False)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        """Save ``checkpoint`` under the fixed name, if there is one, else under ``filename``.

        Args:
            checkpoint: the objects' state dicts.
            filename: the name ignite's ``Checkpoint`` gives.
            metadata: ignite's metadata of the save (unused, as by ignite's ``DiskSaver``).
        """
        super().__call__(checkpoint, self.filename or filename, metadata)

    def remove(self, filename: str) -> None:
        """Remove an older checkpoint; a fixed name is replaced by the next save, never removed.

        Args:
            filename: the name ignite's ``Checkpoint`` gave it.
        """
        if self.filename is None:
            super().remove(filename)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable[..., Any]) -> None:
        # through a Python file, whose failed write raises an OSError naming the cause (torch's own file
        # writer raises "basic_ios::clear: iostream error"), which atomic_write reports as the output's
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            func(checkpoint, f, **self.kwargs)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's :class:`~monai.handlers.CheckpointSaver` whose files appear whole or not at all.

    Takes MONAI's arguments and saves the same files (final, key-metric and interval checkpoints, with
    MONAI's names and ``n_saved`` rotation), each through :class:`AtomicDiskSaver`. In a bundle config::

        {"_target_": "monai_effq.handlers.AtomicCheckpointSaver", "save_dir": "@ckpt_dir",
         "save_dict": {"model": "@network"}, "save_final": true, "final_filename": "model_final.pt"}
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        save_dir = kwargs.get("save_dir", args[0] if args else None)
        if save_dir is not None:  # MONAI's saver makes the folder first, with a bare OSError where it cannot
            check_writable(save_dir)
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                handler = checkpoint.save_handler
                checkpoint.save_handler = AtomicDiskSaver(handler.dirname, getattr(handler, "filename", None))
