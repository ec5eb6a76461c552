"""A quantization's journal: every finished layer kept on disk, so a killed run resumes where it stopped.

The journal is a folder beside the run's output (``<checkpoint>.journal/``) holding a manifest with the
fingerprints of what decides the result (the config, the FP weights, the calibration data, the body
mask and the task) and one file per finished layer with what the layer became: codes, scale, zero point, bias, the
input's activation range and the layer's report. Each file is written atomically, so a run killed at
any moment leaves only whole layers. A run that finds a journal of the same fingerprints takes its
layers instead of solving them; a journal of other fingerprints is discarded with a warning that names
what changed.

The folder is the journal's own: a folder that holds anything a journal does not write (the user's
files, another tool's) is refused before anything is written or removed there, and discarding or removing
a journal deletes only its manifest, its layer files (``layer.<name>.pt``) and the hidden temporaries of
its writes.

A run spread over ranks (``torchrun``) keeps one journal, on rank 0: every rank solves every layer to
the same bits (the ranks' statistics are summed), rank 0 is the rank that writes the checkpoint, and
the other ranks receive each journaled layer from it, so they need not see its disk (another node).

A run holds its folder locked (``flock``) until :meth:`QuantizationJournal.close`: a second run given the
same folder (the same checkpoint) is refused while the first goes on, instead of discarding the first
run's layers. The operating system drops the lock of a killed run, so its rerun resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from monai.utils import optional_import

from monai_effq.ptq.modules import ActivationQuantizer, QuantizedLayer
from monai_effq.ptq.report import LayerReport
from monai_effq.quant.grid import UniformGrid
from monai_effq.utils.distributed import broadcast_object, get_rank
from monai_effq.utils.errors import OutputWriteError, UserInputError
from monai_effq.utils.fingerprint import fingerprint_json, fingerprint_tensors
from monai_effq.utils.io import atomic_write, atomic_write_text, is_temporary

__all__ = ["JOURNAL_FORMAT", "JournalEntry", "QuantizationJournal", "journal_path", "journal_unfinished", "remove_journal"]

logger = logging.getLogger("monai_effq")

# absent on Windows, where a journal folder is not locked
fcntl, _has_fcntl = optional_import("fcntl")

# 2: the calibration fingerprint is taken window by window, the same however ranks share the windows
# 3: layer files are named layer.<name>.pt, so that they are told apart from any other file in the folder
JOURNAL_FORMAT = "monai-effq-journal/3"
_FORMAT_PREFIX = "monai-effq-journal/"
_MANIFEST = "manifest.json"
_LAYER_PREFIX, _LAYER_SUFFIX = "layer.", ".pt"
# what each fingerprint is called when it changes, for the log line
_WHAT = {
    "format": "journal format",
    "config": "config",
    "fp_weights": "FP weights",
    "architecture": "network architecture",
    "calibration": "calibration data",
    "body_mask": "body mask",
    "task": "task",
}


@dataclasses.dataclass
class JournalEntry:
    """One finished layer as journaled: what its :class:`QuantizedLayer` is made of, and its report.

    Attributes:
        codes: ``uint8`` codes shaped like the layer's weight.
        scale: the weight grid's step.
        zero_point: its zero point.
        grid: the weight grid.
        bias: the layer's bias, or ``None``.
        act: the input quantizer, or ``None``.
        report: the layer's :class:`LayerReport` from the run that solved it.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    grid: UniformGrid
    bias: torch.Tensor | None
    act: ActivationQuantizer | None
    report: LayerReport

    def build(self, layer: torch.nn.Module, cls: type[QuantizedLayer]) -> QuantizedLayer:
        """The quantized module this entry describes, on ``layer`` (the original layer, not modified)."""
        return cls(layer, self.codes, self.scale, self.zero_point, self.grid, self.bias, self.act)


class QuantizationJournal:
    """The journal folder of one quantization run.

    Under ``torch.distributed`` every rank makes the same calls in the same order (as with the run's
    other collectives): rank 0 alone reads and writes the folder, and :meth:`load` gives every rank
    rank 0's entry.

    Args:
        path: the folder (created if missing; on rank 0 only).
        fingerprints: what decides the result, by name (``config``, ``fp_weights``, ``architecture``,
            ``calibration``, ``body_mask``, ``task``); a journal whose manifest differs is discarded.

    Example::

        journal = QuantizationJournal("model_w4a8.pt.journal", {"config": ..., "fp_weights": ...})
        entry = journal.load("encoder.conv")  # None until that layer has finished once
    """

    def __init__(self, path: str | os.PathLike, fingerprints: dict[str, str]) -> None:
        self.path = Path(path)
        self.fingerprints = {"format": JOURNAL_FORMAT, **fingerprints}
        # what decides this run's result (its manifest) as one fingerprint, which each entry records
        self.run = fingerprint_json(self.fingerprints)
        self.keeper = get_rank() == 0
        self._lock_fd: int | None = None
        failure: Exception | None = None
        if self.keeper:
            try:
                self._start()
            except Exception as e:  # every rank stops, not rank 0 alone while the others wait for it
                failure = e
        reason = broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
        if failure is not None:
            raise failure
        if reason is not None:
            raise UserInputError(f"rank 0 could not open the journal {self.path} ({reason}): see rank 0's error.")

    def __enter__(self) -> QuantizationJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the folder for the next run (the journal's files stay until :func:`remove_journal`)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # which drops the flock
            self._lock_fd = None

    def _lock(self) -> None:
        """Hold the folder for this run, or refuse it when another run holds it (before anything is removed)."""
        if not _has_fcntl:
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserInputError(
                f"the journal {self.path} is in use by another quantization run writing the same checkpoint (in this "
                "or another process); nothing was changed there. Wait for that run to finish (a rerun then finds its "
                "checkpoint, or resumes its journal if it was stopped), or give this run another checkpoint path."
            ) from None
        except OSError as e:  # a file system without flock (some network shares): the run goes on unlocked
            os.close(fd)
            logger.debug("journal %s is not locked (%s)", self.path, e)
            return
        self._lock_fd = fd

    def _start(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise OutputWriteError(
                f"the journal {self.path} is a file, not a folder: give journal a folder of its own (quantize makes it), "
                "such as '<checkpoint>.journal' beside the checkpoint."
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputWriteError(f"could not write the journal {self.path} ({e.strerror or e}): give journal a folder you can write to.") from e
        self._lock()
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        found = _manifest(self.path)
        own, other = _entries(self.path, found)
        if other:
            shown = ", ".join(sorted(e.name for e in other)[:3]) + (", ..." if len(other) > 3 else "")
            raise UserInputError(
                f"the journal folder {self.path} holds {len(other)} entries a journal does not write ({shown}); nothing "
                "was changed there. Give journal a folder of its own, new or empty, such as '<checkpoint>.journal' "
                "beside the checkpoint (the bundles' choice)."
            )
        if isinstance(found, dict) and found.get("format") == JOURNAL_FORMAT:
            changed = [_WHAT.get(k, k) for k in self.fingerprints if found.get(k) != self.fingerprints[k]]
            if not changed:
                if self.finished:
                    logger.info("resuming from journal %s: %d layers already finished", self.path, len(self.finished))
                return
            logger.warning("journal %s is from another run (%s changed): starting afresh", self.path, ", ".join(changed))
        elif isinstance(found, dict):
            logger.warning("journal %s is from another run (journal format changed): starting afresh", self.path)
        elif found is not None:
            logger.warning("journal %s has a damaged manifest: starting afresh", self.path)
        try:
            for entry in own:
                entry.unlink(missing_ok=True)
        except OSError as e:
            raise OutputWriteError(f"could not write the journal {self.path} ({e.strerror or e}): give journal a folder you can write to.") from e
        atomic_write_text(self.path / _MANIFEST, json.dumps(self.fingerprints, indent=1, sort_keys=True))

    def _file(self, name: str) -> Path:
        return self.path / f"{_LAYER_PREFIX}{name}{_LAYER_SUFFIX}"

    @property
    def finished(self) -> list[str]:
        """Names of the journaled layers (as rank 0 finds them: the other ranks do not keep the journal)."""
        return sorted(p.name[len(_LAYER_PREFIX) : -len(_LAYER_SUFFIX)] for p in self.path.glob(f"{_LAYER_PREFIX}*{_LAYER_SUFFIX}"))

    def record(self, name: str, module: QuantizedLayer, report: LayerReport) -> None:
        """Journal a finished layer (atomically: a kill leaves it whole or absent); rank 0 writes it.

        Args:
            name: the layer's dotted name.
            module: the quantized module it became.
            report: its report.
        """
        if not self.keeper:
            return
        aq = module.input_quantizer
        payload: dict[str, Any] = {
            "codes": module.codes.cpu(),
            "scale": module.scale.cpu(),
            "zero_point": module.zero_point.cpu(),
            "bits": module.grid.bits,
            "grid": module.grid.kind,
            "bias": None if module.bias is None else module.bias.detach().cpu(),
            "act": None if aq is None else {"bits": aq.grid.bits, "kind": aq.grid.kind, "scale": aq.scale.cpu(), "zero_point": aq.zero_point.cpu()},
            "report": json.dumps(dataclasses.asdict(report)),
        }
        payload["checksum"] = _entry_checksum(payload, name, self.run)
        # through a Python file, whose failed write (a full disk) raises an OSError naming the cause, where
        # torch's own file writer raises "basic_ios::clear: iostream error"
        with atomic_write(self._file(name)) as tmp, open(tmp, "wb") as f:
            torch.save(payload, f)

    def load(self, name: str) -> JournalEntry | None:
        """The journaled layer ``name``: on every rank, what rank 0's journal holds.

        Args:
            name: the layer's dotted name.

        Returns:
            the entry, or ``None`` when the layer has not finished or its file cannot be read whole
            (then the layer is solved again).
        """
        return broadcast_object(self._read(name) if self.keeper else None)

    def _read(self, name: str) -> JournalEntry | None:
        path = self._file(name)
        if not path.is_file():
            return None
        try:
            p = torch.load(path, map_location="cpu", weights_only=True)
            # torch reads a changed byte without complaint, and another run's entry (an earlier version's, a run
            # that shared the folder, a file copied under another layer's name) is whole: the checksum names all three
            if p.get("checksum") != _entry_checksum(p, name, self.run):
                logger.warning(
                    "journal entry %s is damaged or from another run (its checksum does not match this run's layer): "
                    "solving the layer again", path,
                )
                return None
            act = p["act"]
            act_q = None
            if act is not None:
                act_q = ActivationQuantizer(act["bits"], act["kind"], float(act["scale"]), float(act["zero_point"]))
            return JournalEntry(
                codes=p["codes"],
                scale=p["scale"],
                zero_point=p["zero_point"],
                grid=UniformGrid(p["bits"], p["grid"]),
                bias=p["bias"],
                act=act_q,
                report=LayerReport(**json.loads(p["report"])),
            )
        except Exception as e:  # a damaged or foreign file only costs this layer's solve
            logger.warning("journal entry %s is unreadable (%s): solving the layer again", path, type(e).__name__)
            return None


def _entry_checksum(payload: dict[str, Any], name: str, run: str) -> str:
    """The fingerprint of a journal entry's content, of the layer it is for and of the run that wrote it."""
    act = payload.get("act") or {}
    tensors = [payload.get(k) for k in ("codes", "scale", "zero_point", "bias")] + [act.get("scale"), act.get("zero_point")]
    settings = [name, run, payload.get("bits"), payload.get("grid"), act.get("bits"), act.get("kind"), payload.get("report")]
    return fingerprint_json([settings, fingerprint_tensors([t for t in tensors if isinstance(t, torch.Tensor)])])


def _manifest(folder: Path) -> dict | str | None:
    """A folder's journal manifest: the dict, ``"damaged"`` for a ``manifest.json`` that is not a dict, ``None`` for none."""
    path = folder / _MANIFEST
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "damaged"
    return found if isinstance(found, dict) else "damaged"


# files an operating system or file server leaves in any folder a person or a share touches: neither the
# journal's nor another's, so they neither block a journal nor keep a finished one's folder
_CLUTTER_NAMES = frozenset((".DS_Store", "Thumbs.db", "desktop.ini"))
_CLUTTER_PREFIXES = ("._", ".nfs")
# an earlier format's layer file is at most this large: a larger *.pt file is someone's checkpoint
_EARLIER_LAYER_MAX_BYTES = 64 * 2**20


def _is_journal_manifest(found: dict | str | None) -> bool:
    """Whether a manifest (:func:`_manifest`) is a journal's, of this format or an earlier one."""
    return isinstance(found, dict) and str(found.get("format", "")).startswith(_FORMAT_PREFIX)


def _is_clutter(name: str) -> bool:
    return name in _CLUTTER_NAMES or name.startswith(_CLUTTER_PREFIXES)


def _is_earlier_layer_file(path: Path) -> bool:
    """Whether a ``*.pt`` file of an earlier format's journal is one of its layer files (which had no prefix)."""
    try:
        if path.stat().st_size > _EARLIER_LAYER_MAX_BYTES:
            return False
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a file torch reads safely: not a layer file
        return False
    return isinstance(entry, dict) and {"codes", "scale", "report"} <= set(entry)


def journal_unfinished(path: str | os.PathLike) -> bool:
    """Whether the run that keeps its journal in ``path`` has not finished (a finished run removes its journal).

    Args:
        path: the journal folder (:func:`journal_path`).

    Returns:
        ``True`` when the journal's manifest is there, or the folder is empty (a run killed as it made it);
        a folder that keeps only files a journal does not write (an NFS placeholder) is no journal.
    """
    folder = Path(path)
    return (folder / _MANIFEST).is_file() or (folder.is_dir() and not any(folder.iterdir()))


def _entries(folder: Path, found: dict | str | None) -> tuple[list[Path], list[Path]]:
    """A journal folder's entries: those a journal writes, and the others (a missing folder has neither).

    A journal writes its manifest, layer files and the hidden temporaries of its writes (:mod:`monai_effq.utils.io`).
    A manifest that is a dict of another tool (no journal format) is another's; one that does not parse counts
    as the journal's only where every other entry does. An earlier format's journal named its layer files
    ``<name>.pt``: those that read as layer files are its own too (a checkpoint saved beside them is not).
    An operating system's clutter (``.DS_Store``, ``._*``, ``.nfs*``) is in neither list.
    """
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    ours = _is_journal_manifest(found)
    earlier = ours and found.get("format") != JOURNAL_FORMAT
    own, other = [], []
    for entry in entries:
        name, is_file = entry.name, entry.is_file() and not entry.is_symlink()
        if _is_clutter(name):
            continue
        layer = is_file and name.endswith(_LAYER_SUFFIX) and (
            name.startswith(_LAYER_PREFIX) or (earlier and _is_earlier_layer_file(entry))
        )
        (own if layer or is_temporary(name) or (is_file and name == _MANIFEST) else other).append(entry)
    manifest = [e for e in own if e.name == _MANIFEST]
    if manifest and not ours and (found != "damaged" or other):
        own.remove(manifest[0])
        other.append(manifest[0])
    return own, other


def journal_path(checkpoint: str | os.PathLike) -> Path:
    """Where the run that writes ``checkpoint`` keeps its journal: ``<checkpoint>.journal`` beside it.

    Args:
        checkpoint: the quantized checkpoint the run writes.

    Returns:
        the journal folder's path.
    """
    return Path(f"{checkpoint}.journal")


def remove_journal(path: str | os.PathLike | None) -> None:
    """Delete a journal once its run's output is safely written: its own files, then the folder if that leaves it empty.

    Nothing happens if it is absent; a folder without a journal's manifest keeps every file, and any file a
    journal does not write stays where it is.

    Args:
        path: the journal folder; ``None`` (a run that kept no journal) does nothing.
    """
    if path is None:
        return
    folder = Path(path)
    found = _manifest(folder)
    own, other = _entries(folder, found)
    if _is_journal_manifest(found):
        clutter = [e for e in folder.iterdir() if _is_clutter(e.name) and e.is_file()] if not other else []
        for entry in [*own, *clutter]:
            with contextlib.suppress(OSError):  # an NFS placeholder of an open file stays until it is closed
                entry.unlink()
    if not other:
        with contextlib.suppress(OSError):  # not empty (a file of the user's), or already gone
            folder.rmdir()
