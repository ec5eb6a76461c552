"""The norm-input quantization point: group and instance norms that read their input in 8 bits.

A convolution's input is quantized by its :class:`~monai_effq.ptq.modules.QuantizedLayer`; the
tensors a network normalises (convolution outputs, residual sums) stay in floating point unless
this point is on. With it, every group/instance norm becomes a
:class:`~monai_effq.ptq.modules.QuantizedNorm` whose input quantizer is calibrated, like the
layers', on the first calibration batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from monai_effq.ptq.graph import hooks, set_submodule
from monai_effq.ptq.modules import ActivationQuantizer, QuantizedNorm, is_group_norm
from monai_effq.quant.spec import ActivationSpec

__all__ = ["quantize_norm_inputs"]


def quantize_norm_inputs(network: nn.Module, batch: torch.Tensor, spec: ActivationSpec) -> list[str]:
    """Replace, in place, every group/instance norm of ``network`` by a :class:`QuantizedNorm`.

    Each quantizer is calibrated on the input its norm sees in one pass of ``network`` over
    ``batch`` (a norm the pass does not reach is left alone).

    Args:
        network: the network (changed).
        batch: a calibration batch on the network's device.
        spec: the grid of every norm input (bits, kind, power of two; an explicit format is used as given).

    Returns:
        the names of the norms now quantized, in execution order.

    Raises:
        UserInputError: for a norm input that is not finite or holds one value only.
    """
    norms = [(name, m) for name, m in network.named_modules() if name and is_group_norm(m)]
    quantizers: dict[str, ActivationQuantizer] = {}

    def calibrate(name: str, x: torch.Tensor) -> None:
        if name not in quantizers:  # a norm run twice keeps the range of its first input
            quantizers[name] = ActivationQuantizer.from_spec(x, spec, f"{name} (norm input)").to(x.device)

    handles = [m.register_forward_pre_hook(lambda _m, args, n=name: calibrate(n, args[0])) for name, m in norms]
    with hooks(handles), torch.no_grad():
        network(batch)
    for name, module in norms:
        if name in quantizers:
            set_submodule(network, name, QuantizedNorm(module, quantizers[name]))
    return list(quantizers)
