"""The quantization report: per layer bits, errors and time; in total sizes, time and memory."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_effq.utils.io import atomic_write_text

__all__ = ["LayerReport", "QuantizationReport", "peak_memory_mib", "reset_peak_memory"]


def reset_peak_memory() -> None:
    """Reset the process's peak resident memory counter (Linux), so a later reading is this run's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


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


@dataclass
class LayerReport:
    """One quantized layer.

    Attributes:
        name: the module's dotted name.
        kind: ``QuantizedConv``, ``QuantizedConvTranspose`` or ``QuantizedLinear``.
        weight_bits: weight bits.
        act_bits: input bits (``None``: floating point).
        act_grid: ``"unsigned"``/``"asymmetric"`` or ``None``.
        params: number of weights.
        mse_fp: weighted output MSE of the FP weights on the quantized inputs.
        mse_rtn: the same with round-to-nearest weights.
        mse: the same with the solution.
        seconds: wall time of this layer (capture, statistics and solve).
        solve_seconds: time of the solve alone.
        iterations: ADMM iterations run (0 for other methods).
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
    seconds: float
    solve_seconds: float
    iterations: int = 0


@dataclass
class QuantizationReport:
    """What a quantization run did.

    Attributes:
        layers: one :class:`LayerReport` per quantized layer, in execution order.
        method: the solver method.
        fp_bytes: bytes of the FP network's parameters and buffers.
        quantized_bytes: bytes once quantized (packed codes, scales, FP remainder).
        weight_fp_bytes: bytes of every weight layer's weights at 32 bits.
        weight_packed_bytes: the same weights as stored: codes packed at their bits.
        wall_seconds: total wall time.
        peak_memory_mib: peak resident memory of the run.
        folded_batchnorms: BatchNorms folded into their convolutions.
        skipped: quantizable layers kept in floating point.
        extra: anything a caller adds (e.g. Dice).
    """

    layers: list[LayerReport] = field(default_factory=list)
    method: str = "efficientq"
    fp_bytes: int = 0
    quantized_bytes: int = 0
    weight_fp_bytes: int = 0
    weight_packed_bytes: int = 0
    wall_seconds: float = 0.0
    peak_memory_mib: float = float("nan")
    folded_batchnorms: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def compression(self) -> float:
        """FP bytes over quantized bytes."""
        return self.fp_bytes / max(self.quantized_bytes, 1)

    @property
    def weight_compression(self) -> float:
        """fp32 weight bytes over packed weight bytes (the weights alone, no biases or norms)."""
        return self.weight_fp_bytes / max(self.weight_packed_bytes, 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, with the compression ratios."""
        d = dataclasses.asdict(self)
        d["compression"] = self.compression
        d["weight_compression"] = self.weight_compression
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizationReport:
        """Inverse of :meth:`to_dict`."""
        data = {k: v for k, v in data.items() if k not in ("compression", "weight_compression")}
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

    def save(self, folder: str | Path, stem: str = "quantization_report") -> tuple[Path, Path]:
        """Write ``<stem>.json`` and ``<stem>.csv`` atomically.

        Args:
            folder: destination folder (created if missing).
            stem: file name without extension.

        Returns:
            the two paths.
        """
        folder = Path(folder)
        j = atomic_write_text(folder / f"{stem}.json", json.dumps(self.to_dict(), indent=2, default=float))
        c = atomic_write_text(folder / f"{stem}.csv", self.to_csv())
        return j, c

    def summary(self) -> str:
        """A few lines for logs and the console."""
        n = len(self.layers)
        ratios = [r.mse / r.mse_rtn for r in self.layers if r.mse_rtn > 0]  # NaN (no solve) fails the test
        mean_ratio = f"{sum(ratios) / max(n, 1):.3f}" if ratios else "n/a"
        return (
            f"{self.method}: {n} layers quantized in {self.wall_seconds:.1f} s, peak memory "
            f"{self.peak_memory_mib:.0f} MiB; size {self.fp_bytes / 2**20:.2f} MiB -> "
            f"{self.quantized_bytes / 2**20:.3f} MiB ({self.compression:.1f}x; weights {self.weight_compression:.2f}x); "
            f"mean layer error vs RTN {mean_ratio}"
        )
