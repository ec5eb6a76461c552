"""Memory of a quantized network at its stated bits: packed weights and the largest activation.

These are the figures a deployment pays, counted from the bit widths (not from how PyTorch stores
fake-quant tensors): a 4-bit weight is half a byte, a 6-bit activation three quarters of one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from monai_effq.ptq.graph import hooks
from monai_effq.ptq.modules import QuantizedLayer, shared_input_quantizer
from monai_effq.quant.packing import packed_nbytes
from monai_effq.solver.layers import SUPPORTED_LAYERS

__all__ = ["WeightFootprint", "ActivationFootprint", "weight_footprint", "activation_footprint"]


@dataclass(frozen=True)
class WeightFootprint:
    """Bytes of every weight layer's weights.

    Attributes:
        fp32_bytes: the weights at 32 bits.
        packed_bytes: quantized layers' codes packed at their bits, other weight layers at 32 bits.
    """

    fp32_bytes: int
    packed_bytes: int

    @property
    def ratio(self) -> float:
        """fp32 bytes over packed bytes."""
        return self.fp32_bytes / max(self.packed_bytes, 1)


@dataclass(frozen=True)
class ActivationFootprint:
    """The largest weight-layer input of one forward pass.

    Attributes:
        fp32_bytes: its size at 32 bits.
        quantized_bytes: the largest input at the bits its quantizer stores (32 where not quantized).
    """

    fp32_bytes: int
    quantized_bytes: int

    @property
    def ratio(self) -> float:
        """fp32 bytes over quantized bytes."""
        return self.fp32_bytes / max(self.quantized_bytes, 1)


def weight_footprint(network: nn.Module) -> WeightFootprint:
    """Packed and fp32 bytes of the weights of every weight layer.

    Args:
        network: a network with :class:`QuantizedLayer` modules (an FP network gives a ratio of 1).

    Returns:
        the :class:`WeightFootprint`.
    """
    fp32, packed = 0, 0
    inner = _wrapped_layers(network)
    for module in network.modules():
        if isinstance(module, QuantizedLayer):
            fp32 += 4 * module.codes.numel()
            packed += packed_nbytes(module.codes.numel(), module.grid.bits)
        elif isinstance(module, SUPPORTED_LAYERS) and id(module) not in inner:
            fp32 += 4 * module.weight.numel()
            packed += 4 * module.weight.numel()
    return WeightFootprint(fp32, packed)


def _wrapped_layers(network: nn.Module) -> set[int]:
    """Ids of the weightless layers inside quantized layers (their hyperparameters, not weights)."""
    return {id(m.layer) for m in network.modules() if isinstance(m, QuantizedLayer)}


@torch.no_grad()
def activation_footprint(network: nn.Module, batch: torch.Tensor) -> ActivationFootprint:
    """The largest input of a weight layer on ``batch``, at 32 bits and at its quantizer's bits.

    Args:
        network: the network (FP or quantized).
        batch: an input of the size to measure (e.g. one inference patch).

    Returns:
        the :class:`ActivationFootprint`.
    """
    fp32, quantized = 0, 0
    # a residual unit that rounds its input once for its first layer and its skip (share_skip_rounding):
    # that layer has no quantizer of its own and reads the unit's rounded tensor, known by its id; the
    # tensor is held until the pass ends, so that its id is not reused by a later tensor
    rounded: dict[int, tuple[int, torch.Tensor]] = {}

    def record_rounded(quantizer: nn.Module, args: tuple, out: torch.Tensor) -> None:
        rounded[id(out)] = (quantizer.grid.bits, out)

    def record(module: nn.Module, args: tuple) -> None:
        nonlocal fp32, quantized
        numel = args[0].numel()
        quantizer = getattr(module, "input_quantizer", None)
        bits = rounded.get(id(args[0]), (32, None))[0] if quantizer is None else quantizer.grid.bits
        fp32 = max(fp32, 4 * numel)
        quantized = max(quantized, packed_nbytes(numel, bits) if bits <= 8 else 4 * numel)

    handles = []
    inner = _wrapped_layers(network)
    for module in network.modules():
        if isinstance(module, QuantizedLayer) or (isinstance(module, SUPPORTED_LAYERS) and id(module) not in inner):
            handles.append(module.register_forward_pre_hook(record))
        shared = shared_input_quantizer(module)
        if shared is not None and hasattr(shared, "grid"):
            handles.append(shared.register_forward_hook(record_rounded))
    with hooks(handles):
        network(batch)
    return ActivationFootprint(fp32, quantized)
