"""Atomic file output: a run that is interrupted never leaves a half-written file that looks whole."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_directory", "atomic_write", "atomic_write_text", "current_umask"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    The temporary file lives in the same folder (so the final ``os.replace`` is atomic on POSIX)
    and is flushed to disk before the move; on any exception it is removed and ``path`` is left
    as it was.

    Args:
        path: the destination file.

    Yields:
        the temporary path to write to.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600; the finished file gets the mode an ordinary open() would give it
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder beside ``path``; put it in place of ``path`` only if the block succeeds.

    The folder gets the mode an ordinary ``mkdir`` would give it. An existing ``path`` is moved aside
    first and removed after the swap, so a reader sees the old folder or the new one, never a mix;
    on any exception the new folder is removed and ``path`` is left as it was.

    Args:
        path: the destination folder.

    Yields:
        the folder to fill.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        yield staging
        staging.chmod(0o777 & ~current_umask())
        old = dest.with_name(f".{dest.name}.old")
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
        staging.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically.

    Args:
        path: the destination file.
        text: the content (UTF-8).

    Returns:
        the destination path.
    """
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def current_umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back).

    Returns:
        the umask, e.g. ``0o022``.
    """
    mask = os.umask(0)
    os.umask(mask)
    return mask
