"""Atomic file output: a run that is interrupted never leaves a half-written file that looks whole.

Each output is written to a temporary file (or folder) beside it, named
``.<name>.<host>.<pid>.<random>.partial``, and moved into place when complete. A process killed
mid-write (``kill -9``, a power cut) cannot remove its temporary, so every write first removes those
of writers that are gone from the folder it writes to: those of dead processes on this host, and
those of other hosts (a shared network folder) or of unknown owners once they are older than
:data:`STALE_AFTER_SECONDS`. A live writer's temporary is never touched, so concurrent runs writing
to one folder do not disturb each other. A write that fails for want of space or quota, or on a
read-only or foreign folder, is an :class:`~monai_effq.utils.errors.OutputWriteError` naming the output.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from monai_effq.utils.errors import OutputWriteError, UserInputError, exception_chain

__all__ = [
    "STALE_AFTER_SECONDS",
    "atomic_directory",
    "atomic_files",
    "atomic_write",
    "atomic_write_text",
    "check_output_file",
    "check_writable",
    "current_umask",
    "json_text",
    "is_temporary",
    "remove_stale_temporaries",
]

# a temporary whose owner this host cannot check is left alone for a day: no write takes that long
STALE_AFTER_SECONDS = 24 * 3600
_SUFFIX = ".partial"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.(?P<token>[A-Za-z0-9_]+)\.partial$")


def _pid_namespace() -> int | None:
    """The PID namespace this process's pid is counted in (Linux), or ``None`` where the system does not say."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _host() -> str:
    # Containers that share the host name (docker --network host, --uts host) number their processes apart:
    # a pid names a writer only within its PID namespace, so another container's live writer must not be
    # taken for a dead process of this one.
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
    namespace = _pid_namespace()
    return host if namespace is None else f"{host}-pidns{namespace}"


# bytes of the destination's name a temporary's name keeps: host (64 bytes and its PID namespace's 16 at most),
# pid, token and suffix add up to 110 more, and a file system's names end at 255 bytes (a legal long name would
# otherwise fail for its temporary's alone)
_NAME_BYTES = 140


def _temporary_prefix(dest: Path) -> str:
    name = dest.name
    while len(os.fsencode(name)) > _NAME_BYTES:
        name = name[:-1]
    return f".{name}.{_host()}.{os.getpid()}."


def _process_is_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, owned by another user
        return True
    return True


def _is_stale(entry: Path, now: float) -> bool:
    match = _TEMPORARY.match(entry.name)
    if match is not None and match["host"] == _host():
        return not _process_is_alive(int(match["pid"]))
    try:
        return now - entry.lstat().st_mtime > STALE_AFTER_SECONDS
    except FileNotFoundError:  # its writer finished (or another sweep removed it) meanwhile
        return False


def is_temporary(name: str) -> bool:
    """Whether a file or folder name is that of an atomic write's temporary (``.<name>....partial``).

    Args:
        name: the entry's name.

    Returns:
        ``True`` for a temporary's name.
    """
    return name.startswith(".") and name.endswith(_SUFFIX)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that interrupted atomic writes left in ``folder``.

    A temporary (``.<name>.<host>.<pid>.<random>.partial``, file or folder; ``<host>`` is the host name with
    its PID namespace, where Linux gives one) is removed when its writer is a dead process on this host and in
    this process's PID namespace; one from another host or container, or without a writer in its name
    (written by older versions), when it is older than :data:`STALE_AFTER_SECONDS`.

    Args:
        folder: the folder to clean (a missing folder has nothing to clean).

    Returns:
        the paths removed.
    """
    folder = Path(folder)
    try:
        entries = [e for e in folder.iterdir() if is_temporary(e.name)]
    except OSError:  # missing, not a folder, or not ours to list: the write itself says what is wrong
        return []
    now = time.time()
    removed = []
    for entry in entries:
        if not _is_stale(entry, now):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:  # a concurrent run removed it first, or it is another user's (a shared folder): not ours to clean
            continue
        removed.append(entry)
    return removed


def _extension(path: Path) -> str:
    """``path``'s format extension: ``.nii.gz``, ``.nrrd``, ``.pt``; ``""`` for a name without one."""
    suffixes = path.suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() in (".gz", ".bz2", ".zst", ".xz"):
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Flush a finished temporary to disk, give it the mode an ordinary ``open()`` would (``mkstemp``
    creates 0600) and move it onto ``dest``."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, dest)


# what a full disk, a read-only or foreign folder, or a file in a folder's place gives a writer
_WRITE_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM", "ENOTDIR", "EEXIST", "ENAMETOOLONG")
    if hasattr(errno, name)
)
# those that can only be a write's, also where the error names no file (a write() to a full disk names none)
_FULL_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG") if hasattr(errno, name))


@contextlib.contextmanager
def _reporting_write_errors(what: Path | str, dest: Path, temporaries: list[Path], into: bool = False) -> Iterator[None]:
    """Turn an ``OSError`` of writing ``dest`` into an :class:`OutputWriteError` naming ``what``, the cause
    and what to do.

    Such a write fails after the checks before a run (a disk fills up, a network share turns
    read-only), and MONAI's transforms and the bundle command would bury the cause under a page of
    ``RuntimeError: applying transform``. An error about another path (reading an input), and a
    user-input error the block raised, pass through unchanged.

    Args:
        what: the output as the message names it.
        dest: the destination file or folder.
        temporaries: the temporary files or folders written for it, appended to as they are made.
        into: files are moved into ``dest``, a folder (:func:`atomic_files`).
    """
    try:
        yield
    except UserInputError:
        raise
    except Exception as error:
        cause = _write_error(error, dest, temporaries, into)
        if cause is None:
            raise
        if isinstance(cause, (FileExistsError, NotADirectoryError)):
            check_writable(dest)  # a file where a folder above it would be made: named as such, not "File exists"
        raise OutputWriteError(
            f"could not write {what}: {cause.strerror or cause}; free space, or point the setting that names it "
            "(--output_dir, --ckpt_dir, --export_dir, ...) at a folder you can write, then run again "
            "(nothing half-written was left)."
        ) from error


def _write_error(error: BaseException | None, dest: Path, temporaries: list[Path], into: bool) -> OSError | None:
    """The ``OSError`` of writing ``dest`` in an exception's chain: torch's archive writer, for one, raises a
    ``RuntimeError`` of its own while it handles the ``OSError`` of a full disk."""
    return next(
        (e for e in exception_chain(error) if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS and _concerns(e, dest, temporaries, into)),
        None,
    )


def _concerns(error: OSError, dest: Path, temporaries: list[Path], into: bool) -> bool:
    """Whether an ``OSError`` is about writing ``dest``: its file is ``dest``, a folder above it (made for it),
    one of its temporaries or in one, a temporary being made for it, or a file moved ``into`` it."""
    if error.filename is None:
        return error.errno in _FULL_ERRNOS
    path, dest = Path(os.path.abspath(os.fsdecode(error.filename))), Path(os.path.abspath(dest))
    if dest.is_relative_to(path) or any(path.is_relative_to(os.path.abspath(t)) for t in temporaries):
        return True
    if into:
        return path.parent == dest
    return path.parent == dest.parent and path.name.startswith(_temporary_prefix(dest))


def check_output_file(path: str | os.PathLike) -> Path:
    """Refuse a destination that names a folder, before anything is computed for it.

    ``Path("out/")`` drops the slash, so a write to it would make a file named ``out``; an existing folder
    fails only at the final move, with an error naming a temporary file.

    Args:
        path: where a file is to be written.

    Returns:
        the path.

    Raises:
        OutputWriteError: for an empty path, one ending in a separator, or an existing folder.
    """
    text = os.fspath(path)
    if not text or text.endswith(("/", os.sep)) or Path(text).is_dir():
        raise OutputWriteError(
            f"cannot write {text!r}: it names a folder, where a file is to be written; give the file's own path, "
            "such as '<folder>/model.pt'."
        )
    return Path(text)


def check_writable(path: str | os.PathLike, folder: bool = False) -> Path:
    """Refuse an output that could not be written, before anything is computed for it.

    Args:
        path: a file or folder to be written (it and the folders above it need not exist).
        folder: ``path`` is a folder that files are written into, so a file there is refused too.

    Returns:
        the path.

    Raises:
        OutputWriteError: when a file stands where a folder above it (or, with ``folder``, the folder itself)
            would be made, or the folder it would be made in is read-only or another user's.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise OutputWriteError(f"cannot write into {path}: it is a file; give a folder (it is made if missing).")
    # the nearest path that exists is where the output, or the folders above it, will be made
    folder = next(f for f in (path.absolute(), *path.absolute().parents) if f.exists())
    if folder != path.absolute() and not folder.is_dir():
        raise OutputWriteError(
            f"cannot write {path}: {folder} is a file, so no folder can be made inside it; point the setting that "
            "names it (--output_dir, --ckpt_dir, --export_dir, ...) at a folder, or move that file."
        )
    folder = folder if folder.is_dir() else folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputWriteError(
            f"cannot write {path}: the folder {folder} is not writable (read-only or another user's); point the "
            "setting that names it (--output_dir, --ckpt_dir, --export_dir, ...) at a folder you can write."
        )
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, keep_extension: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    The temporary file lives in the same folder (so the final ``os.replace`` is atomic on POSIX)
    and is flushed to disk before the move; on any exception it is removed and ``path`` is left
    as it was. Temporaries that killed writers left in the folder are removed first
    (:func:`remove_stale_temporaries`).

    Args:
        path: the destination file.
        keep_extension: yield a path ending in ``path``'s extension (``.nii.gz``: the last suffix, and
            the one before a compression suffix), named ``partial`` inside a temporary folder beside
            ``path``, for writers that choose the format from the extension (nibabel, ITK). The block
            must create it.

    Yields:
        the temporary path to write to.

    Raises:
        OutputWriteError: naming the output, when writing it fails for want of space or quota, or because
            its folder is read-only, another user's or below a file (also when that is raised in the block);
            and before the block, when ``path`` names a folder (:func:`check_output_file`).
    """
    dest = check_output_file(path)
    temporaries: list[Path] = []
    with _reporting_write_errors(dest, dest, temporaries):
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(dest.parent)
        if keep_extension:
            staging = Path(tempfile.mkdtemp(prefix=_temporary_prefix(dest), suffix=_SUFFIX, dir=dest.parent))
            temporaries.append(staging)
            # not the destination's own name, which a search for finished outputs (*_seg.nii.gz) would find
            tmp = staging / f"partial{_extension(dest)}"
        else:
            fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(dest), suffix=_SUFFIX, dir=dest.parent)
            os.close(fd)
            tmp = Path(tmp_name)
            temporaries.append(tmp)
        try:
            yield tmp
            _move_into_place(tmp, dest)
        finally:
            if keep_extension:
                shutil.rmtree(tmp.parent, ignore_errors=True)
            elif tmp.exists():
                tmp.unlink()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder beside ``path``; put it in place of ``path`` only if the block succeeds.

    The folder gets the mode an ordinary ``mkdir`` would give it. An existing ``path`` is moved aside
    first and removed after the swap, so a reader sees the old folder or the new one, never a mix;
    on any exception the new folder is removed and ``path`` is left as it was. Temporaries that
    killed writers left beside it are removed first (:func:`remove_stale_temporaries`).

    Args:
        path: the destination folder.

    Yields:
        the folder to fill.

    Raises:
        OutputWriteError: naming the output, when writing it fails for want of space or quota, or because
            its folder is read-only, another user's or below a file (also when that is raised in the block).
    """
    dest = Path(path)
    old = dest.with_name(f".{dest.name}.old")
    temporaries: list[Path] = [old]
    with _reporting_write_errors(dest, dest, temporaries):
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(dest.parent)
        staging = Path(tempfile.mkdtemp(prefix=_temporary_prefix(dest), suffix=_SUFFIX, dir=dest.parent))
        temporaries.append(staging)
        try:
            yield staging
            staging.chmod(0o777 & ~current_umask())
            if dest.exists():
                shutil.rmtree(old, ignore_errors=True)
                dest.rename(old)
            staging.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder; move each file written there into ``folder`` if the block succeeds.

    For writers that name their own files inside a folder that holds other outputs too (MONAI's
    ``write_metrics_reports`` writes ``<metric>_raw.csv``, ``metrics.csv`` ... beside the masks): each
    file appears whole or not at all, and the rest of ``folder`` is untouched. On any exception
    nothing is moved and the staging folder is removed. Temporaries that killed writers left in
    ``folder`` are removed first (:func:`remove_stale_temporaries`).

    Args:
        folder: the destination folder (created if missing).

    Yields:
        the staging folder to write to; only its top-level files are moved.

    Raises:
        OutputWriteError: naming the output, when writing it fails for want of space or quota, or because
            its folder is read-only, another user's or below a file (also when that is raised in the block).
    """
    dest = Path(folder)
    temporaries: list[Path] = []
    with _reporting_write_errors(f"into {dest}", dest, temporaries, into=True):
        dest.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(dest)
        staging = Path(tempfile.mkdtemp(prefix=_temporary_prefix(dest), suffix=_SUFFIX, dir=dest))
        temporaries.append(staging)
        try:
            yield staging
            for written in sorted(staging.iterdir()):
                if written.is_file():
                    _move_into_place(written, dest / written.name)
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


def json_text(value: Any, indent: int | None = 2) -> str:
    """``value`` as standard JSON: NaN and infinities (an HD95 where a class was never predicted, a time not
    recorded) become ``null``, which every parser reads; Python's ``NaN``/``Infinity`` are not JSON.

    Args:
        value: dicts, lists, strings, numbers (numpy and 0-d torch numbers are written as floats), bools, ``None``.
        indent: as ``json.dumps``.

    Returns:
        the JSON text.
    """

    def finite(item: Any) -> Any:
        if isinstance(item, dict):
            return {k: finite(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [finite(v) for v in item]
        if isinstance(item, float) and not math.isfinite(item):
            return None
        return item

    return json.dumps(finite(json.loads(json.dumps(value, default=float))), indent=indent, allow_nan=False)


def current_umask() -> int:
    """The process's file-creation mask, read from ``/proc/self/status`` where Linux shows it.

    Elsewhere it is read by setting it and putting it back, under a lock: two threads doing that at once could
    read each other's 0 and leave it as the process's umask.

    Returns:
        the umask, e.g. ``0o022``.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()
