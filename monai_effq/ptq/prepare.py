"""The one prepare phase of PTQ and QAT: copy the network, probe it once, fold BatchNorm, plan the layers."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from monai_effq.ptq.config import EfficientQConfig, LayerPlan
from monai_effq.ptq.graph import SUPPORTED_LAYERS, fold_batchnorm, probe_network, set_submodule
from monai_effq.ptq.modules import QuantizedLayer
from monai_effq.solver.layers import layer_view
from monai_effq.utils.errors import UserInputError
from monai_effq.utils.precision import ieee_float32

logger = logging.getLogger("monai_effq")

__all__ = ["PreparedNetwork", "available_device", "check_finite_state", "eager_network", "prepare_network", "quantizable_network"]


def _compiled(module: nn.Module) -> bool:
    return type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module)


def eager_network(network: nn.Module) -> nn.Module:
    """The network without ``torch.compile``'s wrappers: the module each one wraps in its place.

    Quantization runs the network with hooks on its layers and swaps them, which a compiled forward
    (traced by Dynamo once) neither calls nor sees; a training script's ``torch.compile(model)``, or a
    compiled encoder inside it, would end in a Dynamo error about fake tensors.

    Args:
        network: the network as given (not modified).

    Returns:
        the compiled network's own module; a copy with each compiled submodule replaced by its own
        module; or ``network`` itself when nothing in it is compiled.
    """
    wrapped = network._orig_mod if _compiled(network) else network
    inner = [name for name, module in wrapped.named_modules() if name and _compiled(module)]
    if wrapped is network and not inner:
        return network
    if wrapped is not network:
        logger.warning(
            "the network is compiled (torch.compile): its original module is used, and the result runs eagerly "
            "(compile it again to run it compiled)."
        )
    if inner:
        named = ", ".join(name.replace("._orig_mod", "") for name in inner[:3]) + (" ..." if len(inner) > 3 else "")
        logger.warning(
            f"the network holds compiled modules ({named}; torch.compile): their original modules are used, and the "
            "result runs them eagerly (compile them again to run them compiled)."
        )
        wrapped = copy.deepcopy(wrapped)
        # the outermost first; a compiled module inside another is then reached without the other's _orig_mod
        for name in inner:
            name = name.replace("._orig_mod", "")
            if _compiled(wrapped.get_submodule(name)):
                set_submodule(wrapped, name, wrapped.get_submodule(name)._orig_mod)
    return wrapped


def quantizable_network(network: nn.Module) -> nn.Module:
    """The network as quantization takes it: ``torch.compile``'s original module (:func:`eager_network`), in float32.

    The solver's targets and the quantized layers are float32: a network kept in float16 or bfloat16 for
    inference (or in float64) would refuse float32 calibration windows with a shape-like error, and its
    norms would not run beside float32 layers. Such a network becomes a float32 copy, with a warning;
    float16 and bfloat16 widen exactly.

    Args:
        network: the network as given (not modified).

    Returns:
        ``network`` itself (or the module it compiles) when it is float32, else a float32 copy.
    """
    network = eager_network(network)
    tensors = (*network.parameters(), *network.buffers())
    precisions = sorted({str(t.dtype).removeprefix("torch.") for t in tensors if t.is_floating_point()} - {"float32"})
    if not precisions:
        return network
    logger.warning(
        f"the network holds {' and '.join(precisions)} weights: it is quantized from a float32 copy, and the "
        "quantized network computes in float32."
    )
    return copy.deepcopy(network).float()


def available_device(device: torch.device | str) -> torch.device:
    """The device a run asks for, checked to exist on this machine before any work starts.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` ...

    Returns:
        the torch device.

    Raises:
        UserInputError: when this machine has no such device, or it names none.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:  # torch lists every device type it knows of
        raise UserInputError(f"device {device!r} is not a device name: use 'cpu', 'cuda' or 'cuda:<n>' (or 'mps').") from e
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserInputError(f"device {str(device)!r} was asked for but this machine has no CUDA GPU: set device to 'cpu'.")
        if device.index is not None and device.index >= count:
            raise UserInputError(
                f"device {str(device)!r} was asked for but this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}: "
                "set device to one of them."
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserInputError("device 'mps' was asked for but this machine has no Apple GPU: set device to 'cpu'.")
    return device


def check_finite_state(network: nn.Module) -> None:
    """Every weight and buffer of a network is finite, and every norm's running variance non-negative.

    A NaN weight would otherwise surface at the end of a run as NaN activations, blamed on the
    calibration data; a NaN running variance as a raw torch error inside BatchNorm folding.

    Args:
        network: the network to check.

    Raises:
        UserInputError: naming the first bad tensor and what to do.
    """
    tensors = [*network.named_parameters(), *network.named_buffers()]
    for name, tensor in tensors:
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise UserInputError(
                f"{name} holds {bad} NaN or Inf value(s) of {tensor.numel()}: the checkpoint is corrupt or its "
                "training diverged; load a good checkpoint (or retrain) before quantizing."
            )
        if name.endswith("running_var") and bool((tensor < 0).any()):
            raise UserInputError(
                f"{name} holds negative variances: the checkpoint is corrupt; load a good checkpoint before quantizing."
            )


@dataclass
class PreparedNetwork:
    """A working copy of a network, ready for its layers to be quantized.

    Attributes:
        network: the copy (eval mode, on the requested device, BatchNorms folded where they can be).
        folded: names of the BatchNorms folded (replaced by ``nn.Identity``).
        order: the quantizable layers in execution order.
        plans: what each layer not skipped gets, in that order.
        output_numels: each quantizable layer's output size on one sample.
    """

    network: nn.Module
    folded: list[str]
    order: list[str]
    plans: list[LayerPlan]
    output_numels: dict[str, int]


@ieee_float32()  # the fold check compares outputs to 1e-4: TF32 convolutions differ by more
def prepare_network(
    network: nn.Module,
    sample: torch.Tensor,
    config: EfficientQConfig,
    *,
    device: torch.device | str | None = None,
    from_scratch: bool = False,
) -> PreparedNetwork:
    """Copy ``network`` and prepare the copy: one probe pass (it runs, its layers' order and output
    sizes, the BatchNorms to fold), the folds (checked by one more pass), the plan.

    Args:
        network: the FP network (not modified).
        sample: a batch it accepts; only its first sample is run.
        config: the quantization config (folding and the plan).
        device: where the copy goes (``config.device`` when ``None``).
        from_scratch: re-initialise the copy's parameters first and fold nothing (a QAT start from
            scratch has no trained BatchNorm statistics to fold).

    Returns:
        the :class:`PreparedNetwork`.

    Raises:
        UserInputError: when the device does not exist here, a weight or norm statistic is not
            finite, the sample does not fit the network or gives a non-finite output, or it has no
            quantizable layer that runs.
        TypeError: when the network does not return one tensor.
    """
    device = available_device(config.device if device is None else device)
    if not from_scratch:  # a start from scratch re-initialises every parameter
        check_finite_state(network)
    net = copy.deepcopy(quantizable_network(network)).eval().to(device)
    if from_scratch:
        for module in net.modules():
            if module is not net and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    first = sample[:1].to(device)
    probe = probe_network(net, first, shape=tuple(sample.shape))
    if not bool(torch.isfinite(probe.output).all()):
        raise UserInputError(
            f"the network's output on the calibration sample of shape {tuple(first.shape)} holds NaN or Inf: its weights "
            "overflow on this input; check that the volume is normalised as in training and that the checkpoint is the trained one."
        )
    folded = fold_batchnorm(net, first, probe=probe) if config.fold_batchnorm and not from_scratch else []
    if not probe.order:
        quantized = [name for name, module in net.named_modules() if isinstance(module, QuantizedLayer)]
        if quantized:
            raise UserInputError(
                f"the network is quantized already: its {len(quantized)} layers such as {quantized[0]} are quantized layers; "
                "pass the FP network (quantize and load_quantized return a new network and leave the FP one as it was)."
            )
        raise UserInputError(
            "the network has no quantizable layers (Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear) that run in its forward pass."
        )
    views = {name: layer_view(net.get_submodule(name)) for name in probe.order}
    transposed = [name for name, view in views.items() if view.kind == "conv_transpose"]
    plans = config.plan(probe.order, probe.input_layers, {n: v.output_axis for n, v in views.items()}, transposed)
    if probe.calls:
        # a layer is calibrated and solved on the inputs of one call: its other calls' inputs (another scale, another
        # branch) would be clipped by that call's range, so it stays in floating point (the report lists it as skipped)
        plans = [plan for plan in plans if plan.name not in probe.calls]
        logger.warning(
            "%s run%s more than once in one forward pass (%s): a layer is calibrated on one call's inputs, so %s kept "
            "in floating point; give each use its own module to quantize it.",
            ", ".join(probe.calls), "s" if len(probe.calls) == 1 else "",
            ", ".join(f"{name}: {count} calls" for name, count in probe.calls.items()),
            "it is" if len(probe.calls) == 1 else "they are",
        )
    if probe.unreplaceable:
        # replaced, such a layer would compute otherwise, or fail when the quantized network runs
        plans = [plan for plan in plans if plan.name not in probe.unreplaceable]
        logger.warning(
            "%d layer%s kept in floating point, since a quantized layer cannot stand in for %s: %s. To quantize %s, "
            "compute the weight once into a plain layer (e.g. a Conv3d holding the standardised weights) or set "
            "ConvTranspose's output_padding instead of passing output_size.",
            len(probe.unreplaceable), " is" if len(probe.unreplaceable) == 1 else "s are",
            "it" if len(probe.unreplaceable) == 1 else "them",
            "; ".join(f"{name} ({why})" for name, why in probe.unreplaceable.items()),
            "it" if len(probe.unreplaceable) == 1 else "them",
        )
    if not plans and config.norm_input_spec is None:
        # nothing would be quantized (rounding only the norms' inputs, with every layer skipped, is a choice)
        reasons = [f"skip {config.skip} covers them"] if config.skip else []
        if probe.calls:
            reasons.append(f"{', '.join(probe.calls)} run more than once per forward pass (give each use its own module)")
        if probe.unreplaceable:
            reasons.append(f"a quantized layer cannot stand in for {', '.join(probe.unreplaceable)} (see the warning above)")
        raise UserInputError(
            f"none of the network's {len(probe.order)} quantizable layers is left to quantize: {'; '.join(reasons)}; "
            "keep in floating point only the layers that must stay so."
        )
    ran = set(probe.order)
    idle = [name for name, module in net.named_modules() if name and isinstance(module, SUPPORTED_LAYERS) and name not in ran]
    if idle:
        # not a warning: on inputs like the calibration one they change no output, and they are kept exact
        logger.info(
            "%d quantizable layer%s did not run on the calibration input, so %s kept in floating point (%s weights count "
            "in the sizes): %s%s. Such a layer belongs to a branch this input does not take (a VAE branch, a "
            "deep-supervision head that runs in training only).",
            len(idle), "" if len(idle) == 1 else "s", "it is" if len(idle) == 1 else "they are", "its" if len(idle) == 1 else "their",
            ", ".join(idle[:5]), f" and {len(idle) - 5} more" if len(idle) > 5 else "",
        )
    return PreparedNetwork(net, folded, probe.order, plans, probe.output_numels)
