"""One rounding for a residual unit's input that its first layer and its identity skip both read.

A MONAI :class:`~monai.networks.blocks.ResidualUnit` whose residual path is the identity (a U-Net's
decoder units, and any unit that keeps its channels and resolution) computes ``conv(x) + x``. The
quantized network rounds ``x`` for the convolution only, so the add reads the unrounded tensor and
an int8 runtime must keep ``x`` in floating point beside its 8-bit copy. With the rounding moved to
the unit's input (:func:`~monai_effq.ptq.modules.quantize_shared_input`), both paths read one 8-bit
tensor, as in NNCF's int8 graphs. The LiTS bundle's UNet (96³, W8A8, OpenVINO 2026.4, a 2-core Intel
Xeon, medians of 21 interleaved runs) has three such units: 27.8 -> 26.5 ms with AMX and bf16 (NNCF's
int8 24.8 ms), 34.2 -> 32.5 ms with oneDNN capped at AVX-512 (NNCF 43.6 ms); capped at AVX2 with
f32 float parts 57.2 against 60.0 ms, whose per-node counters sum to the same (59.3 and 58.8 ms).
The skip then carries the 8-bit rounding error of ``x``: on the real-data benchmark's UNet, held-out
mean Dice moved by -0.0004 to +0.0000 at W8A8, W4A8, W2A8 and W4A4 with crop and whole-volume
calibration. Inputs on grids of fewer than 8 bits keep their own rounding (where the post-hoc
experiment put the skip on a 4-bit grid, W4A4 lost 0.0007).
"""

from __future__ import annotations

import torch.nn as nn
from monai.networks.blocks import ResidualUnit

from monai_effq.ptq.modules import ActivationQuantizer, quantize_shared_input, shared_input_quantizer

__all__ = ["SHARED_SKIP_MIN_BITS", "share_skip_roundings", "shared_layer_inputs"]

# the narrowest input grid whose rounding the identity skip takes on (see the module docstring)
SHARED_SKIP_MIN_BITS = 8


def _first_layer(module: nn.Module) -> nn.Module:
    """The module that receives ``module``'s input first: down the first children of ``nn.Sequential``s."""
    while isinstance(module, nn.Sequential) and len(module):
        module = module[0]
    return module


def share_skip_roundings(network: nn.Module) -> list[str]:
    """Move, in place, the input rounding of each identity-skip residual unit's first layer to the unit.

    A unit qualifies when its residual path is ``nn.Identity``, its main path (an ``nn.Sequential``)
    hands its input straight to a :class:`QuantizedLayer` (or its trainable form) whose input quantizer has at least
    :data:`SHARED_SKIP_MIN_BITS` bits, and its input is not rounded already. The quantizer becomes
    the unit's shared input quantizer and the layer reads the rounded tensor as it did before: the
    main path computes what it computed, the skip adds the rounded input.

    Args:
        network: a quantized network (changed).

    Returns:
        the names of the units whose input is now rounded once, in module order.
    """
    shared = []
    for name, unit in network.named_modules():
        if not isinstance(unit, ResidualUnit) or not isinstance(unit.residual, nn.Identity):
            continue
        layer = _first_layer(unit.conv)
        # a quantized layer, or its trainable form (fine-tuning from FP shares the rounding before it trains)
        quantizer = getattr(layer, "input_quantizer", None)
        quantizer = quantizer if isinstance(quantizer, ActivationQuantizer) else None
        if quantizer is None or quantizer.grid.bits < SHARED_SKIP_MIN_BITS or shared_input_quantizer(unit) is not None:
            continue
        layer.input_quantizer = None
        quantize_shared_input(unit, quantizer)
        shared.append(name)
    return shared


def shared_layer_inputs(network: nn.Module) -> dict[str, nn.Module]:
    """The layers whose input rounding :func:`share_skip_roundings` moved to their unit, with that rounding.

    Args:
        network: a quantized network.

    Returns:
        ``{layer name: the unit's shared input quantizer}`` (the layer's own ``input_quantizer`` is ``None``).
    """
    names = {id(module): name for name, module in network.named_modules()}
    out = {}
    for unit in network.modules():
        quantizer = shared_input_quantizer(unit)
        if quantizer is not None and isinstance(unit, ResidualUnit):
            layer = _first_layer(unit.conv)
            if id(layer) in names and getattr(layer, "input_quantizer", None) is None:
                out[names[id(layer)]] = quantizer
    return out
