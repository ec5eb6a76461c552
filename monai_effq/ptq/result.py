"""What a quantization run hands on: the quantized network with its report and config, and byte counts.

PTQ produces it; QAT, the checkpoints and the exporters read it, without importing the pipeline.
Both PTQ and QAT end their report with :func:`finish_report`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn

from monai_effq.ptq.config import EfficientQConfig
from monai_effq.ptq.footprint import weight_footprint
from monai_effq.ptq.graph import SUPPORTED_LAYERS, unique_state_dict
from monai_effq.ptq.modules import QuantizedLayer, check_finite_input
from monai_effq.ptq.report import QuantizationReport, peak_gpu_memory_mib, peak_memory_mib
from monai_effq.quant.packing import packed_nbytes

__all__ = ["QuantizationResult", "finish_report", "float_weights", "quantized_size_bytes", "state_bytes"]


@dataclass
class QuantizationResult:
    """A quantized network and what was done to it.

    Attributes:
        network: the quantized network (fake-quant modules, eval mode); it refuses NaN or Inf input
            (:class:`~monai_effq.ptq.modules.FiniteInputCheck`), which its quantizers would round away.
        report: the :class:`QuantizationReport`.
        config: the config used.
        folded: names of the BatchNorms folded (replaced by ``nn.Identity``) before quantization.
    """

    network: nn.Module
    report: QuantizationReport
    config: EfficientQConfig
    folded: list[str]

    def __post_init__(self) -> None:
        check_finite_input(self.network)


def state_bytes(network: nn.Module) -> int:
    """Bytes of a network's parameters and persistent buffers as stored."""
    return sum(t.numel() * t.element_size() for t in unique_state_dict(network).values())


def quantized_size_bytes(network: nn.Module) -> int:
    """Bytes of a quantized network once its codes are packed (everything else as stored).

    Args:
        network: a network with :class:`QuantizedLayer` modules.

    Returns:
        packed codes plus scales, zero points, biases and every other parameter and buffer.
    """
    total = 0
    for key, t in unique_state_dict(network).items():
        module_name, _, attr = key.rpartition(".")
        module = network.get_submodule(module_name) if module_name else network
        if isinstance(module, QuantizedLayer) and attr == "codes":
            total += packed_nbytes(t.numel(), module.grid.bits)
        else:
            total += t.numel() * t.element_size()
    return total


def float_weights(network: nn.Module, skipped: list[str] | tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    """The weight tensors a quantized network still holds in floating point, though no layer was told to keep them.

    A weight is a parameter of two or more axes (biases, norms and PReLU slopes have one); those of quantized
    layers are codes, those of ``skipped`` layers are kept in floating point on purpose, and a layer of a kind
    monai-effq quantizes that is not quantized never ran. What remains is held by a module monai-effq does not
    quantize: a weight applied with ``torch.nn.functional``, an LSTM, a transformer's position table.

    Args:
        network: the quantized network.
        skipped: the layers the config kept in floating point.

    Returns:
        the weights' shapes by parameter name, largest first.
    """
    kept = tuple(f"{name}." for name in skipped)
    found = {}
    for name, module in network.named_modules():
        # a layer monai-effq quantizes that is left so never ran on the calibration input (a VAE branch, an unused
        # deep-supervision head): its weights change no output
        if isinstance(module, (QuantizedLayer, *SUPPORTED_LAYERS)) or name.startswith(kept) or f"{name}." in kept:
            continue
        for pname, param in module.named_parameters(recurse=False):
            if param.dim() >= 2:
                found[f"{name}.{pname}" if name else pname] = tuple(param.shape)
    return dict(sorted(found.items(), key=lambda item: -math.prod(item[1])))


def finish_report(report: QuantizationReport, network: nn.Module, fp_bytes: int, wall_seconds: float) -> QuantizationReport:
    """Fill in a run's sizes, time and peak memory: the last step of a PTQ and of a QAT report alike.

    Args:
        report: the report, its layers already listed (changed in place).
        network: the quantized network.
        fp_bytes: bytes of the FP network it was made from (:func:`state_bytes`).
        wall_seconds: the run's wall time.

    Returns:
        ``report``, with ``fp_bytes``, ``quantized_bytes``, ``weight_fp_bytes``,
        ``weight_packed_bytes``, ``wall_seconds``, ``peak_memory_mib`` and ``peak_gpu_memory_mib`` set.
    """
    weights = weight_footprint(network)
    report.fp_bytes = fp_bytes
    report.quantized_bytes = quantized_size_bytes(network)
    report.weight_fp_bytes, report.weight_packed_bytes = weights.fp32_bytes, weights.packed_bytes
    report.wall_seconds = wall_seconds
    report.peak_memory_mib = peak_memory_mib()
    report.peak_gpu_memory_mib = peak_gpu_memory_mib()
    return report
