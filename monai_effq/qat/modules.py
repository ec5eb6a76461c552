"""Trainable forms of the fake-quant modules: float shadow weights, projected on the grid every pass.

:class:`TrainableQuantizedLayer` is what a :class:`~monai_effq.ptq.QuantizedLayer` becomes while it
trains: the float weight is a parameter, every forward pass rounds it onto the layer's grid and
the backward pass is the straight-through estimator (the gradient of the rounded weight is handed
unchanged to the float weight). :meth:`TrainableQuantizedLayer.to_quantized` rounds it once more
and gives back an ordinary ``QuantizedLayer`` holding codes. :class:`FrozenBatchNorm` keeps a
BatchNorm that could not be folded on its running statistics while the rest of the network trains.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from monai_effq.ptq.modules import ActivationQuantizer, QuantizedLayer, functional_forward, quantized_layer_class
from monai_effq.quant.grid import UniformGrid, channel_view, dequantize, grid_codes, quantize_codes
from monai_effq.solver.layers import layer_view

__all__ = ["TrainableQuantizedLayer", "FrozenBatchNorm", "straight_through"]


def straight_through(x: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
    """``projected`` in the forward pass, the identity's gradient to ``x`` in the backward pass."""
    # not x + (projected - x).detach(): in floating point that misses projected by a few ulps once |x| > 2|projected|
    # (a shadow weight past the clip), so the network trained and scored would not be the frozen one
    return projected + (x - x.detach())


class TrainableQuantizedLayer(nn.Module):
    """A weight layer under quantization-aware training.

    Args:
        layer: the original ``Conv*``/``ConvTranspose*``/``Linear`` module (its hyperparameters are
            used; copied, not modified).
        weight: the float (shadow) weight to start from, shaped like the layer's weight.
        bias: the float bias, or ``None``.
        grid: the weight grid.
        scale: grid step, 0-d or one per output channel.
        zero_point: same shape as ``scale``.
        input_quantizer: the input's activation quantizer, or ``None``.
        quantized_class: the :class:`QuantizedLayer` subclass the layer freezes to (default: the
            one that names the layer's kind).
        channel_axis: the weight's axis of the output channels of a per-channel scale (the plan's
            :attr:`~monai_effq.quant.spec.WeightSpec.channel_axis`); ``None`` takes the layer's own.
    """

    def __init__(
        self,
        layer: nn.Module,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        grid: UniformGrid,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        input_quantizer: ActivationQuantizer | None = None,
        quantized_class: type[QuantizedLayer] | None = None,
        channel_axis: int | None = None,
    ) -> None:
        super().__init__()
        self.quantized_class = quantized_class or quantized_layer_class(layer)
        inner = copy.deepcopy(layer)
        if "weight" in inner._parameters:
            del inner.weight
        if inner._parameters.get("bias") is not None:
            del inner.bias
            inner.bias = None
        self.layer = inner
        self.grid = grid
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("zero_point", zero_point.detach().float().clone())
        view = layer_view(inner)
        self.channel_axis = view.output_axis if channel_axis is None else channel_axis
        self.groups = view.groups
        self.input_quantizer = input_quantizer

    @classmethod
    def from_quantized(cls, module: QuantizedLayer) -> TrainableQuantizedLayer:
        """The trainable form of a PTQ layer, its shadow weight starting at the dequantized codes.

        Args:
            module: a :class:`QuantizedLayer`.

        Returns:
            the trainable layer (same grid, scale, zero point, bias and input quantizer).
        """
        aq = None if module.input_quantizer is None else copy.deepcopy(module.input_quantizer)
        return cls(
            module.layer, module.weight(), module.bias, module.grid, module.scale, module.zero_point, aq, type(module),
            module.channel_axis,
        )

    def weight_step(self) -> torch.Tensor:
        """The grid step of each weight, broadcastable against the weight."""
        return channel_view(self.scale, self.weight, self.channel_axis, self.groups)

    def codes(self) -> torch.Tensor:
        """Integer codes of the current shadow weight (``torch.int64``, native weight shape)."""
        return quantize_codes(self.weight.detach(), self.scale, self.zero_point, self.grid, self.channel_axis, self.groups)

    def quantized_weight(self) -> torch.Tensor:
        """The shadow weight on the grid, with the straight-through gradient."""
        axis, groups = self.channel_axis, self.groups
        codes = grid_codes(self.weight.detach(), self.scale, self.zero_point, self.grid, axis, groups)
        return straight_through(self.weight, dequantize(codes, self.scale, self.zero_point, axis, groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return functional_forward(self.layer, x, self.quantized_weight(), self.bias)

    def to_quantized(self) -> QuantizedLayer:
        """Freeze: round the shadow weight to codes and build the ordinary quantized layer.

        Returns:
            a :class:`QuantizedLayer` (eval mode) whose weight equals this layer's projected weight.
        """
        host = copy.deepcopy(self.layer)
        host.weight = nn.Parameter(self.weight.detach().clone(), requires_grad=False)
        aq = None if self.input_quantizer is None else copy.deepcopy(self.input_quantizer).eval()
        bias = None if self.bias is None else self.bias.detach()
        codes = self.codes().to(torch.uint8)
        module = self.quantized_class(host, codes, self.scale, self.zero_point, self.grid, bias, aq, self.channel_axis)
        return module.to(self.weight.device).eval()

    def extra_repr(self) -> str:
        per = "per-channel" if self.scale.numel() > 1 else "per-tensor"
        return f"weight_bits={self.grid.bits}, grid={self.grid.kind}, {per}, trainable"


class FrozenBatchNorm(nn.Module):
    """A BatchNorm that stays on its running statistics while the network around it trains.

    Its affine weight and bias still train; ``train()`` leaves the inner BatchNorm in eval mode.

    Args:
        norm: the ``BatchNorm1d/2d/3d`` to hold.
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm.eval()

    def train(self, mode: bool = True) -> FrozenBatchNorm:
        super().train(mode)
        self.norm.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
