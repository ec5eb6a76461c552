"""A quantization's journal: every finished layer kept on disk, so a killed run resumes where it stopped.

The journal is a folder beside the run's output (``<checkpoint>.journal/``) holding a manifest with the
fingerprints of what decides the result (the config, the FP weights, the calibration data, the body
mask and the task) and one file per finished layer with what the layer became: codes, scale, zero point, bias, the
input's activation range and the layer's report. Each file is written atomically, so a run killed at
any moment leaves only whole layers. A run that finds a journal of the same fingerprints takes its
layers instead of solving them; a journal of other fingerprints is discarded with a warning that names
what changed.

A run spread over ranks (``torchrun``) keeps one journal, on rank 0: every rank solves every layer to
the same bits (the ranks' statistics are summed), rank 0 is the rank that writes the checkpoint, and
the other ranks receive each journaled layer from it, so they need not see its disk (another node).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from monai_effq.ptq.modules import ActivationQuantizer, QuantizedLayer
from monai_effq.ptq.report import LayerReport
from monai_effq.quant.grid import UniformGrid
from monai_effq.utils.distributed import broadcast_object, get_rank
from monai_effq.utils.errors import UserInputError
from monai_effq.utils.io import atomic_write, atomic_write_text

__all__ = ["JOURNAL_FORMAT", "JournalEntry", "QuantizationJournal", "journal_path", "remove_journal"]

logger = logging.getLogger("monai_effq")

# 2: the calibration fingerprint is taken window by window, the same however ranks share the windows
JOURNAL_FORMAT = "monai-effq-journal/2"
_MANIFEST = "manifest.json"
# what each fingerprint is called when it changes, for the log line
_WHAT = {
    "format": "journal format",
    "config": "config",
    "fp_weights": "FP weights",
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
        fingerprints: what decides the result, by name (``config``, ``fp_weights``, ``calibration``,
            ``body_mask``, ``task``); a journal whose manifest differs is discarded.

    Example::

        journal = QuantizationJournal("model_w4a8.pt.journal", {"config": ..., "fp_weights": ...})
        entry = journal.load("encoder.conv")  # None until that layer has finished once
    """

    def __init__(self, path: str | os.PathLike, fingerprints: dict[str, str]) -> None:
        self.path = Path(path)
        self.fingerprints = {"format": JOURNAL_FORMAT, **fingerprints}
        self.keeper = get_rank() == 0
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

    def _start(self) -> None:
        manifest = self.path / _MANIFEST
        if manifest.is_file():
            try:
                found = json.loads(manifest.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                found = None
            if not isinstance(found, dict):
                logger.warning("journal %s has a damaged manifest: starting afresh", self.path)
                shutil.rmtree(self.path)
            else:
                changed = [_WHAT.get(k, k) for k in self.fingerprints if found.get(k) != self.fingerprints[k]]
                if not changed:
                    if self.finished:
                        logger.info("resuming from journal %s: %d layers already finished", self.path, len(self.finished))
                    return
                logger.warning("journal %s is from another run (%s changed): starting afresh", self.path, ", ".join(changed))
                shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(manifest, json.dumps(self.fingerprints, indent=1, sort_keys=True))

    def _file(self, name: str) -> Path:
        return self.path / f"{name}.pt"

    @property
    def finished(self) -> list[str]:
        """Names of the journaled layers (as rank 0 finds them: the other ranks do not keep the journal)."""
        return sorted(p.name[: -len(".pt")] for p in self.path.glob("*.pt"))

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


def journal_path(checkpoint: str | os.PathLike) -> Path:
    """Where the run that writes ``checkpoint`` keeps its journal: ``<checkpoint>.journal`` beside it.

    Args:
        checkpoint: the quantized checkpoint the run writes.

    Returns:
        the journal folder's path.
    """
    return Path(f"{checkpoint}.journal")


def remove_journal(path: str | os.PathLike | None) -> None:
    """Delete a journal folder once its run's output is safely written (nothing happens if it is absent).

    Args:
        path: the journal folder; ``None`` (a run that kept no journal) does nothing.
    """
    # rmtree(None, ignore_errors=True) is a no-op up to Python 3.12 and a TypeError from 3.13
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
