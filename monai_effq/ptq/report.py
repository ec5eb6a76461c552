"""The quantization report: per layer bits, errors and time; in total sizes, time, memory and sources.

Times and memory are measurements of one run, so they go to the report files a run writes and not
into checkpoints (:meth:`QuantizationReport.to_dict` with ``measurements=False``), whose bytes then
depend only on what was computed; a report read back from a checkpoint has ``nan`` there.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from monai_effq.solver.methods import METHODS
from monai_effq.solver.validation import is_underdetermined
from monai_effq.utils.fingerprint import fingerprint_json, fingerprint_state
from monai_effq.utils.io import atomic_write_text, json_text

__all__ = [
    "LAYER_MEASUREMENTS",
    "LayerReport",
    "QuantizationReport",
    "RUN_MEASUREMENTS",
    "peak_gpu_memory_mib",
    "peak_memory_mib",
    "reset_peak_memory",
    "source_fingerprints",
]

# fields that measure a run (time, memory) rather than describe its result
LAYER_MEASUREMENTS = ("seconds", "solve_seconds")
RUN_MEASUREMENTS = ("wall_seconds", "peak_memory_mib", "peak_gpu_memory_mib")


def reset_peak_memory() -> None:
    """Reset the process's peak resident memory counter (Linux) and the current GPU's, so later readings are this run's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    # a process that has not touched CUDA yet starts its GPU counters at zero when it does
    if torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mib() -> float:
    """Peak resident memory of this process in MiB since the last reset (``nan`` where unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_gpu_memory_mib() -> float:
    """Peak memory PyTorch allocated on the current CUDA GPU since the last reset (``nan`` where CUDA was not used).

    The host's resident memory (:func:`peak_memory_mib`) does not include it: a run on a GPU needs both.
    """
    if not torch.cuda.is_initialized():
        return float("nan")
    return torch.cuda.max_memory_allocated() / 2**20


def source_fingerprints(network: nn.Module, config: dict[str, Any], calibration: str) -> dict[str, str]:
    """Fingerprints of a quantization run's inputs, for :attr:`QuantizationReport.sources`.

    Args:
        network: the FP network as given (before BatchNorms are folded).
        config: the config's ``to_dict()``.
        calibration: the calibration data's fingerprint, which the caller takes window by window
            over all ranks (one process and any number of ranks give the same).

    Returns:
        ``{"fp_weights": ..., "config": ..., "calibration": ...}`` (:mod:`monai_effq.utils.fingerprint`).
    """
    return {"fp_weights": fingerprint_state(network), "config": fingerprint_json(config), "calibration": calibration}


@dataclass
class LayerReport:
    """One quantized layer.

    Attributes:
        name: the module's dotted name.
        kind: ``QuantizedConv``, ``QuantizedConvTranspose`` or ``QuantizedLinear``.
        weight_bits: weight bits.
        act_bits: input bits (``None``: floating point).
        act_grid: the input grid's kind (``"unsigned"``, ``"asymmetric"``, ``"signed"``, ``"symmetric"``) or ``None``.
        params: number of weights.
        mse_fp: weighted output MSE of the FP weights on the quantized inputs.
        mse_rtn: the same with round-to-nearest weights.
        mse: the same with the solution.
        seconds: wall time of this layer (capture, statistics and solve); ``nan`` when not recorded.
        solve_seconds: time of the solve alone; ``nan`` when not recorded.
        iterations: ADMM iterations run (0 for other methods).
        voxels: calibration output voxels the layer saw (its equations per output channel).
        effective_voxels: ``(Σ h)² / Σ h²`` of the attention weights: equally weighted voxels
            worth as much data.
        unknowns: weights per output channel (``c_in / groups · prod(kernel)``).
        mse_holdout: held-out output error of the chosen setting (``None`` without validation, or for a
            layer kept at round to nearest outright for want of voxels, whose statistics are not summed).
        mse_holdout_rtn: round-to-nearest's held-out output error (``None`` where ``mse_holdout`` is).
        choice: the solver setting used (``"efficientq eta=1"``, ``"rtn"``, ...).
    """

    name: str
    kind: str
    weight_bits: int
    act_bits: int | None
    act_grid: str | None
    params: int
    mse_fp: float
    mse_rtn: float
    mse: float
    seconds: float = math.nan
    solve_seconds: float = math.nan
    iterations: int = 0
    voxels: int = 0
    effective_voxels: float = 0.0
    unknowns: int = 0
    mse_holdout: float | None = None
    mse_holdout_rtn: float | None = None
    choice: str = ""

    @property
    def underdetermined(self) -> bool:
        """Fewer (effective) calibration voxels than unknowns per output channel."""
        return 0 < self.unknowns and is_underdetermined(self.effective_voxels, self.unknowns)

    @property
    def fitted(self) -> bool:
        """Whether its weights were chosen by calibration data: not by a method that ignores it (round to nearest)."""
        method = METHODS.get(self.choice)
        return method is None or method.needs_statistics


@dataclass
class QuantizationReport:
    """What a quantization run did.

    Attributes:
        layers: one :class:`LayerReport` per quantized layer, in execution order.
        method: the solver method.
        fp_bytes: bytes of the FP network's parameters and buffers, in the precision it was given in.
        quantized_bytes: bytes once quantized (packed codes, scales, FP remainder).
        weight_fp_bytes: bytes of every weight layer's weights at 32 bits.
        weight_packed_bytes: the same weights as stored: codes packed at their bits.
        wall_seconds: total wall time (``nan`` when not recorded).
        peak_memory_mib: peak resident memory of the run (``nan`` when not recorded).
        peak_gpu_memory_mib: peak memory the run allocated on its CUDA GPU (``nan`` for a run that used
            none, or when not recorded).
        folded_batchnorms: BatchNorms folded into their convolutions.
        skipped: quantizable layers kept in floating point.
        float_weights: weights no quantized layer holds, left in floating point
            (:func:`~monai_effq.ptq.result.float_weights`: a weight used through ``torch.nn.functional``, an LSTM's).
        sources: fingerprints of what the run was given (:func:`source_fingerprints`: ``fp_weights``,
            ``config``, ``calibration``), so a checkpoint can be checked against its inputs.
        extra: anything a caller adds (e.g. Dice).
    """

    layers: list[LayerReport] = field(default_factory=list)
    method: str = "efficientq"
    fp_bytes: int = 0
    quantized_bytes: int = 0
    weight_fp_bytes: int = 0
    weight_packed_bytes: int = 0
    wall_seconds: float = math.nan
    peak_memory_mib: float = math.nan
    peak_gpu_memory_mib: float = math.nan
    folded_batchnorms: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    float_weights: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def compression(self) -> float:
        """FP bytes over quantized bytes."""
        return self.fp_bytes / max(self.quantized_bytes, 1)

    @property
    def weight_compression(self) -> float:
        """fp32 weight bytes over packed weight bytes (the weights alone, no biases or norms)."""
        return self.weight_fp_bytes / max(self.weight_packed_bytes, 1)

    def to_dict(self, measurements: bool = True) -> dict[str, Any]:
        """Plain-data form, with the compression ratios.

        Args:
            measurements: keep the times and memory (:data:`RUN_MEASUREMENTS`, :data:`LAYER_MEASUREMENTS`);
                ``False`` leaves what two runs on the same inputs agree on.

        Returns:
            a dict that :meth:`from_dict` reads back.
        """
        d = dataclasses.asdict(self)
        d["compression"] = self.compression
        d["weight_compression"] = self.weight_compression
        if not measurements:
            for key in RUN_MEASUREMENTS:
                del d[key]
            for layer in d["layers"]:
                for key in LAYER_MEASUREMENTS:
                    del layer[key]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizationReport:
        """Inverse of :meth:`to_dict` (measurements left out read as ``nan``; other keys of a report file are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in names}
        data["layers"] = [LayerReport(**r) for r in data.get("layers", [])]
        return cls(**data)

    def to_csv(self) -> str:
        """Per-layer table as CSV text."""
        buf = io.StringIO()
        names = [f.name for f in dataclasses.fields(LayerReport)]
        writer = csv.DictWriter(buf, fieldnames=names)
        writer.writeheader()
        for r in self.layers:
            writer.writerow(dataclasses.asdict(r))
        return buf.getvalue()

    def save(
        self, folder: str | Path, stem: str = "quantization_report", provenance: dict[str, Any] | None = None
    ) -> tuple[Path, Path]:
        """Write ``<stem>.json`` and ``<stem>.csv`` atomically.

        Args:
            folder: destination folder (created if missing).
            stem: file name without extension.
            provenance: written under ``"provenance"`` in the JSON (e.g. the fingerprint of the checkpoint
                the report describes, and when it was written).

        Returns:
            the two paths.
        """
        folder = Path(folder)
        data = self.to_dict()
        if provenance is not None:
            data["provenance"] = provenance
        j = atomic_write_text(folder / f"{stem}.json", json_text(data))
        c = atomic_write_text(folder / f"{stem}.csv", self.to_csv())
        return j, c

    @property
    def underdetermined(self) -> list[str]:
        """Names of the layers fitted to calibration data with fewer voxels than unknowns per output channel.

        A layer quantized by a method that ignores the data (``method="rtn"``) is left out: no fit of it
        could learn the sample.
        """
        return [r.name for r in self.layers if r.fitted and r.underdetermined]

    def underdetermined_warning(self) -> str | None:
        """A message naming the underdetermined layers and what to do, or ``None`` when there are none."""
        layers = [r for r in self.layers if r.fitted and r.underdetermined]
        if not layers:
            return None
        shown = ", ".join(f"{r.name} ({r.effective_voxels:.0f} voxels for {r.unknowns} unknowns)" for r in layers[:6])
        more = f" and {len(layers) - 6} more" if len(layers) > 6 else ""
        return (
            f"{len(layers)} of {len(self.layers)} layers saw fewer calibration voxels than they have weights per "
            f"output channel: {shown}{more}. A layer-wise fit there learns the calibration sample instead of "
            "the layer, so with held-out validation on (the default) they keep round-to-nearest weights. More "
            "calibration data lifts the limit: more whole volumes (the bundles' --calibration_cases N, "
            "monai_effq.data.calibration_windows) rather than crops."
        )

    def summary(self) -> str:
        """A few lines for logs and the console."""
        n = len(self.layers)
        ratios = [r.mse / r.mse_rtn for r in self.layers if r.mse_rtn > 0]  # NaN (no solve) fails the test
        mean_ratio = f"{sum(ratios) / len(ratios):.3f}" if ratios else "n/a"
        # a report read back from a checkpoint has no measurements
        seconds = f" in {self.wall_seconds:.1f} s" if math.isfinite(self.wall_seconds) else ""
        memory = f", peak memory {self.peak_memory_mib:.0f} MiB" if math.isfinite(self.peak_memory_mib) else ""
        if math.isfinite(self.peak_gpu_memory_mib):
            memory += f" (GPU {self.peak_gpu_memory_mib:.0f} MiB)"
        return (
            f"{self.method}: {n} layers quantized{seconds}{memory}; size {self.fp_bytes / 2**20:.2f} MiB -> "
            f"{self.quantized_bytes / 2**20:.3f} MiB ({self.compression:.1f}x; weights {self.weight_compression:.2f}x); "
            f"mean layer error vs RTN {mean_ratio}"
        )
