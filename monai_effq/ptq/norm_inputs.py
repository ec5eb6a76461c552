"""The norm-input quantization point: group and instance norms that read their input in 8 bits.

A convolution's input is quantized by its :class:`~monai_effq.ptq.modules.QuantizedLayer`; the
tensors a network normalises (convolution outputs, residual sums) stay in floating point unless
this point is on. With it, every group/instance norm reads its input on an 8-bit grid calibrated,
like the layers', on the first calibration batch. A norm that reads its block's own input (a
residual block's first norm, whose input also feeds the skip connection) has the rounding put at
the block's input (:func:`~monai_effq.ptq.modules.quantize_shared_input`), on the signed grid:
both paths then read one int8 tensor. Every other norm becomes a
:class:`~monai_effq.ptq.modules.QuantizedNorm`, whose input takes the signed grid too where it has
negative values (unless the spec names a kind); OpenVINO writes that input in int8 from the
convolution before it, and without a zero point its low-precision passes move the dequantization
past a norm in PyTorch's export form (``MVN``), which then reads int8 as well.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from monai_effq.ptq.graph import hooks, set_submodule
from monai_effq.ptq.modules import ActivationQuantizer, QuantizedNorm, is_group_norm, quantize_shared_input
from monai_effq.quant.spec import ActivationSpec

__all__ = ["NORM_INPUT_GRID", "quantize_norm_inputs"]

# the grid of a block input that a norm and a skip connection share, and of any other norm input
# with negative values, unless the spec names a kind: zero-centred residual sums and convolution
# outputs fit it, an int8 runtime adds such tensors without zero points, and all 256 levels make a
# plain int8 Q/DQ pair (the "symmetric" grid's unused level would need a clip). A zero point also
# kept OpenVINO's MVN reading floats. SegResNet W8A8 with norm inputs rounded, f32, OpenVINO and
# oneDNN capped at AVX-512 VNNI on a 2-core AMX Xeon, asymmetric -> signed: init 8 271 -> 260 ms in
# PyTorch's norm form and 293 -> 286 ms in the channel-statistics form (medians of 7 interleaved
# runs); init 16 663 -> 617 ms in PyTorch's form (best of 3). Real-data benchmark, W8A8: Dice
# 0.8937 -> 0.8952 calibrated on one crop, 0.8963 -> 0.8967 on the whole volume.
NORM_INPUT_GRID = "signed"


def quantize_norm_inputs(network: nn.Module, batch: torch.Tensor, spec: ActivationSpec) -> list[str]:
    """Round, in place, the input of every group/instance norm of ``network``.

    Each quantizer is calibrated on the input its norm sees in one pass of ``network`` over
    ``batch`` (a norm the pass does not reach is left alone). A norm whose parent module (other
    than an ``nn.Sequential``) passes it the parent's own input gets the rounding at the parent's
    input, so every consumer of that tensor inside the parent reads the rounded one; the others
    become :class:`QuantizedNorm`.

    Args:
        network: the network (changed).
        batch: a calibration batch on the network's device.
        spec: the grid of every norm input (bits, kind, power of two; an explicit format is used as
            given). When ``spec.kind`` is ``None``, shared block inputs take :data:`NORM_INPUT_GRID`
            and norm inputs with negative values take it too (its ``signed_kind`` is overridden).

    Returns:
        the names of the modules whose input is now rounded (norms and blocks), in execution order.

    Raises:
        UserInputError: for a norm input that is not finite or holds one value only.
    """
    norms = {name: m for name, m in network.named_modules() if name and is_group_norm(m)}
    # a Sequential passes its input to its first child only (nothing shares it), and would run an
    # added quantizer child as its last step
    parents = {
        parent
        for parent in (name.rpartition(".")[0] for name in norms)
        if parent and not isinstance(network.get_submodule(parent), nn.Sequential)
    }
    own = dataclasses.replace(spec, signed_kind=NORM_INPUT_GRID)  # a norm input nothing else reads
    shared = dataclasses.replace(spec, kind=spec.kind or NORM_INPUT_GRID)  # a block input
    running: dict[str, torch.Tensor] = {}  # the input of each parent whose forward is under way
    points: dict[str, ActivationQuantizer] = {}  # rounding point (norm or parent) -> its quantizer
    covered: set[str] = set()  # norms whose input a parent's rounding already covers

    def enter(name: str, x: torch.Tensor) -> None:
        running.setdefault(name, x)

    def leave(name: str) -> None:
        running.pop(name, None)

    def calibrate(name: str, x: torch.Tensor) -> None:
        if name in covered or name in points:  # a norm run twice keeps the range of its first input
            return
        parent = name.rpartition(".")[0]
        if parent in parents and running.get(parent) is x:
            covered.add(name)
            if parent not in points:
                points[parent] = ActivationQuantizer.from_spec(x, shared, f"{parent} (block input)").to(x.device)
        else:
            points[name] = ActivationQuantizer.from_spec(x, own, f"{name} (norm input)").to(x.device)

    handles = [m.register_forward_pre_hook(lambda _m, args, n=name: calibrate(n, args[0])) for name, m in norms.items()]
    for name in parents:
        module = network.get_submodule(name)
        handles.append(module.register_forward_pre_hook(lambda _m, args, n=name: enter(n, args[0])))
        handles.append(module.register_forward_hook(lambda _m, _a, _o, n=name: leave(n)))
    with hooks(handles), torch.no_grad():
        network(batch)
    for name, quantizer in points.items():
        if name in norms:
            set_submodule(network, name, QuantizedNorm(norms[name], quantizer))
        else:
            quantize_shared_input(network.get_submodule(name), quantizer)
    return list(points)
