"""Fake-quant modules: what a quantized layer is once the solver has chosen its codes.

One module serves every rank and kind: :class:`QuantizedLayer` keeps the original layer and runs
its own forward with weights rebuilt from the integer codes, so Conv1d/2d/3d, their transposed
forms and Linear share one implementation. :class:`QuantizedConv`, :class:`QuantizedConvTranspose`
and :class:`QuantizedLinear` only name the kind. :class:`QuantizedNorm` is a group or instance norm
whose input is rounded to the activation grid, so a runtime reads it in 8 bits;
:func:`quantize_shared_input` rounds the input of a whole block instead, so that the block's norm
and its skip connection read one rounded tensor.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_effq.quant.fixed_point import FixedPointFormat, snap_to_power_of_two
from monai_effq.quant.grid import UniformGrid, dequantize, fit_scale
from monai_effq.quant.spec import ActivationSpec
from monai_effq.solver.layers import layer_view
from monai_effq.utils.errors import UserInputError, check_inference_input, check_spread

__all__ = [
    "ActivationQuantizer",
    "FiniteInputCheck",
    "QuantizedLayer",
    "QuantizedConv",
    "QuantizedConvTranspose",
    "QuantizedLinear",
    "QuantizedNorm",
    "SHARED_INPUT_QUANTIZER",
    "check_finite_input",
    "functional_forward",
    "is_group_norm",
    "quantize_shared_input",
    "quantized_layer_class",
    "shared_input_quantizer",
]

# the child that holds a block's shared input quantizer (see quantize_shared_input)
SHARED_INPUT_QUANTIZER = "shared_input_quantizer"


class ActivationQuantizer(nn.Module):
    """Per-tensor fake quantization of a layer's input.

    The grid is unsigned when calibration saw only non-negative values (after ReLU) and asymmetric
    otherwise (PReLU, norms, the raw image). In training the rounding passes gradients straight
    through inside the clipping range.

    Args:
        bits: bit width.
        kind: ``"unsigned"``, ``"asymmetric"`` or ``"signed"``.
        scale: grid step.
        zero_point: code of the value 0.
    """

    def __init__(self, bits: int, kind: str, scale: float = 1.0, zero_point: float = 0.0) -> None:
        super().__init__()
        self.grid = UniformGrid(bits, kind)
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("zero_point", torch.tensor(float(zero_point)))

    @classmethod
    def from_spec(cls, x: torch.Tensor, spec: ActivationSpec, name: str = "") -> ActivationQuantizer:
        """Calibrate the quantizer a layer's :class:`~monai_effq.quant.spec.ActivationSpec` asks for.

        Args:
            x: calibration activations.
            spec: bits, grid kind, power-of-two and explicit format of the input.
            name: the layer whose input this is (named in errors).

        Returns:
            the calibrated quantizer.

        Raises:
            UserInputError: for non-finite activations or activations without range.
        """
        return cls.calibrate(
            x, spec.bits, power_of_two=spec.power_of_two, fixed_point=spec.format, kind=spec.kind, name=name,
            signed_kind=spec.signed_kind,
        )

    @classmethod
    def calibrate(
        cls,
        x: torch.Tensor,
        bits: int,
        max_samples: int = 1 << 18,
        power_of_two: bool = False,
        fixed_point: str | FixedPointFormat | None = None,
        kind: str | None = None,
        name: str = "",
        signed_kind: str = "asymmetric",
    ) -> ActivationQuantizer:
        """Fit a quantizer to calibration activations.

        Args:
            x: activations (any shape).
            bits: bit width.
            max_samples: values used for the fit (a fixed-stride subsample of larger tensors).
            power_of_two: snap the fitted scale to a power of two (fixed point, ``f`` from the range).
            fixed_point: an explicit format such as ``"Q6.0"`` (text or parsed; step ``2^-f``, not
                fitted; ``bits`` is then ignored): unsigned when calibration saw no negative value,
                otherwise sign-magnitude with one more bit.
            kind: the grid kind (e.g. ``"symmetric"``); ``None`` chooses unsigned when
                calibration saw no negative value and ``signed_kind`` otherwise.
            name: the layer whose input this is (named in errors).
            signed_kind: the grid ``kind=None`` chooses for an input with negative values.

        Returns:
            the calibrated quantizer.

        Raises:
            UserInputError: for non-finite activations, activations that all hold one value (no range to
                fit a grid to: a constant calibration volume or a dead layer), or an explicit format that
                overflows 8 bits once the sign bit of an input with negative values is added.
        """
        flat = x.detach().reshape(-1).float()
        check_spread(
            flat,
            f"the calibration input of layer {name}" if name else "a calibration input",
            "the layers before it overflow; check the network's weights and that the volume is normalised as in training",
            "calibrate on a volume with content (not a constant or empty one), or keep the layer in full precision with skip",
        )
        if flat.numel() > max_samples:
            flat = flat[:: flat.numel() // max_samples + 1]
        non_negative = float(flat.min()) >= 0
        if fixed_point is not None:
            try:
                if isinstance(fixed_point, FixedPointFormat):
                    fmt = dataclasses.replace(fixed_point, signed=not non_negative)
                else:
                    fmt = FixedPointFormat.parse(fixed_point, signed=not non_negative)
            except ValueError as e:  # an unsigned 8-bit format given to an input with negative values
                where = f"layer {name}" if name else "a layer"
                raise UserInputError(
                    f"the input of {where} holds negative values, so its act_format takes a sign bit: {str(e).rstrip('.')}, "
                    "or give this layer an act_format of its own with an override."
                ) from e
            return cls(fmt.bits, fmt.grid.kind, fmt.step, fmt.zero_point)
        if kind is None:
            kind = "unsigned" if non_negative else signed_kind
        grid = UniformGrid(bits, kind)
        scale, zero = fit_scale(flat, grid, method="als")  # ALS as the paper; MSE sweep if asymmetric
        if power_of_two:
            scale, zero = snap_to_power_of_two(flat, scale, zero, grid)
        return cls(bits, kind, float(scale), float(zero))

    @property
    def qmin(self) -> int:
        """Smallest code."""
        return self.grid.qmin

    @property
    def qmax(self) -> int:
        """Largest code."""
        return self.grid.qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PyTorch's own operator rounds exactly as ONNX QuantizeLinear does (x * (1/scale)), so the
        # exported graph reproduces this module bit for bit; its backward is the clipped STE.
        return torch.fake_quantize_per_tensor_affine(
            x, self.scale.float(), self.zero_point.round().to(torch.int32), self.qmin, self.qmax
        )

    def extra_repr(self) -> str:
        return f"bits={self.grid.bits}, kind={self.grid.kind}, scale={float(self.scale):.4g}, zero_point={float(self.zero_point):g}"


# the hooks nn.Module.__call__ runs around a module's forward
_LAYER_CALL_HOOKS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


class FiniteInputCheck:
    """A forward pre-hook that refuses NaN or Inf in a quantized network's input.

    The first input quantizer would round them to grid codes (:func:`check_inference_input`), so the
    network would return a plausible segmentation where its full-precision original returns NaN.
    One reduction per call; skipped while torch traces or exports the network, whose runtimes check
    their own inputs (:class:`~monai_effq.deploy.runtime.OpenVINONetwork`). A class rather than a
    closure so that a pickled or deep-copied network keeps it.
    """

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return
        for value in args:
            if isinstance(value, torch.Tensor):
                check_inference_input(value, f"the input of the quantized {type(module).__name__}")
                _check_input_precision(module, value)


def _check_input_precision(network: nn.Module, x: torch.Tensor) -> None:
    """Refuse floating-point input of another precision than the network's (outside autocast) with the fix, where torch
    names a bias ("Input type (c10::Half) and bias type (float) should be the same"): a float16 FP network's
    quantized copy computes in float32, and its user's pipeline still feeds float16."""
    own = next((t.dtype for t in itertools.chain(network.parameters(), network.buffers()) if t.is_floating_point()), None)
    if own is None or not x.is_floating_point() or x.dtype == own or x.is_meta or torch.is_autocast_enabled(x.device.type):
        return
    name = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731
    raise UserInputError(
        f"the input of the quantized {type(network).__name__} is {name(x.dtype)}, but the network computes in {name(own)} "
        f"(a quantized network computes in float32 whatever the FP network's precision): give it {name(own)} input "
        f"(x.to(torch.{name(own)})), or run it under torch.autocast."
    )


def check_finite_input(network: nn.Module) -> nn.Module:
    """Make ``network`` refuse NaN or Inf input (:class:`FiniteInputCheck`), once however often it is called.

    Args:
        network: a quantized network.

    Returns:
        ``network``, with the check as a forward pre-hook.
    """
    if not any(isinstance(hook, FiniteInputCheck) for hook in network._forward_pre_hooks.values()):
        network.register_forward_pre_hook(FiniteInputCheck())
    return network


class QuantizedLayer(nn.Module):
    """A weight layer whose weights are integer codes on a uniform grid, with a quantized input.

    Args:
        layer: the original ``Conv*``/``ConvTranspose*``/``Linear`` module (copied; not modified).
        codes: integer codes shaped like the layer's weight.
        scale: grid step, 0-d or one per output channel.
        zero_point: same shape as ``scale``.
        grid: the weight grid.
        bias: the bias to use (``None`` keeps none).
        input_quantizer: the activation quantizer on the layer's input, or ``None``.
        channel_axis: the axis of the codes that holds the output channels of a per-channel scale
            (the plan's :attr:`~monai_effq.quant.spec.WeightSpec.channel_axis`); ``None`` takes the
            layer's own (:attr:`~monai_effq.solver.layers.LayerView.output_axis`), as a checkpoint
            or journal rebuilds it.
    """

    def __init__(
        self,
        layer: nn.Module,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        grid: UniformGrid,
        bias: torch.Tensor | None,
        input_quantizer: ActivationQuantizer | None = None,
        channel_axis: int | None = None,
    ) -> None:
        super().__init__()
        inner = copy.deepcopy(layer)
        for hooks in _LAYER_CALL_HOOKS:
            # functional_forward runs the copy's operation, never the copy as a module, so hooks it was copied
            # with never fire: they would only keep alive what they refer to (the solver pass's hook, its whole
            # run) and stop the network from being pickled
            getattr(inner, hooks).clear()
        del inner.weight
        if inner.bias is not None:
            del inner.bias
            inner.bias = None
        self.layer = inner
        self.grid = grid
        view = layer_view(inner)
        self.channel_axis = view.output_axis if channel_axis is None else channel_axis
        self.groups = view.groups
        self.register_buffer("codes", codes.detach().to(torch.uint8).clone())
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("zero_point", zero_point.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.input_quantizer = input_quantizer
        self.register_buffer("_weight", torch.empty(0), persistent=False)
        self.refresh_weight()

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        super()._apply(fn, recurse)
        self.refresh_weight()  # the cache follows .to()/.cuda() with the codes
        return self

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - nn.Module signature
        super()._load_from_state_dict(*args, **kwargs)
        # load_state_dict replaces the codes in place: the cache would keep the weights it had (a fold ensemble
        # that loads each fold's state dict into one network ran one fold's weights for all)
        self.refresh_weight()

    def refresh_weight(self) -> None:
        """Rebuild the cached dequantized weight from the codes, scale and zero point."""
        self._weight = dequantize(self.codes, self.scale, self.zero_point, self.channel_axis, self.groups)

    def weight(self) -> torch.Tensor:
        """The dequantized weight, ``scale * (codes - zero_point)`` per output channel."""
        return self._weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return functional_forward(self.layer, x, self.weight(), self.bias)

    def extra_repr(self) -> str:
        per = "per-channel" if self.scale.numel() > 1 else "per-tensor"
        return f"weight_bits={self.grid.bits}, grid={self.grid.kind}, {per}"


class QuantizedConv(QuantizedLayer):
    """A quantized ``Conv1d``/``Conv2d``/``Conv3d``."""


class QuantizedConvTranspose(QuantizedLayer):
    """A quantized ``ConvTranspose1d``/``2d``/``3d``."""


class QuantizedLinear(QuantizedLayer):
    """A quantized ``Linear``."""


class QuantizedNorm(nn.Module):
    """A group or instance norm whose input is fake-quantized.

    The norm's input is a convolution's output or a residual sum; rounded to 8 bits, an int8
    runtime can read it in 8 bits, and OpenVINO writes it so from a convolution whose output only
    the norm reads (NNCF's int8 graphs round these tensors too).

    Args:
        norm: the ``GroupNorm`` or ``InstanceNorm*`` module (kept as it is).
        input_quantizer: the quantizer of its input.
    """

    def __init__(self, norm: nn.Module, input_quantizer: ActivationQuantizer) -> None:
        super().__init__()
        self.norm = norm
        self.input_quantizer = input_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.input_quantizer(x))


def _round_shared_input(module: nn.Module, args: tuple) -> tuple:
    return (getattr(module, SHARED_INPUT_QUANTIZER)(args[0]), *args[1:])


def quantize_shared_input(module: nn.Module, quantizer: nn.Module) -> None:
    """Round the first input of ``module`` before its forward runs, in place.

    A residual block's input feeds its first norm and its skip connection; rounding it once, at the
    block's input, gives both the same 8-bit tensor, which an int8 runtime reads in 8 bits on both
    paths (NNCF's int8 graphs put one quantizer there as well). The quantizer becomes the child
    :data:`SHARED_INPUT_QUANTIZER`, applied by a forward pre-hook, as ``torch.ao.quantization``
    attaches its observers; the block's own children keep their names.

    Args:
        module: the block (changed).
        quantizer: an :class:`ActivationQuantizer`, or its export form.

    Raises:
        ValueError: when the block's input is already rounded, or the block is an ``nn.Sequential``
            (which would run the quantizer child as its last step).
    """
    if isinstance(module, nn.Sequential):
        raise ValueError("a Sequential runs every child in turn: round the input of its first child instead.")
    if shared_input_quantizer(module) is not None:
        raise ValueError(f"the input of {type(module).__name__} is already quantized: attach one quantizer per block.")
    module.add_module(SHARED_INPUT_QUANTIZER, quantizer)
    module.register_forward_pre_hook(_round_shared_input)


def shared_input_quantizer(module: nn.Module) -> nn.Module | None:
    """The quantizer :func:`quantize_shared_input` attached to ``module``, or ``None``.

    Args:
        module: any module.

    Returns:
        the quantizer, or ``None`` when the module's input is not rounded.
    """
    return module._modules.get(SHARED_INPUT_QUANTIZER)


_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def is_group_norm(module: nn.Module) -> bool:
    """Whether a module normalises with statistics of its input: a ``GroupNorm``, or an
    ``InstanceNorm*`` without running statistics (one with them is a per-channel affine map in eval).

    Args:
        module: any module.

    Returns:
        ``True`` for such a norm.
    """
    if isinstance(module, nn.GroupNorm):
        return True
    return isinstance(module, _INSTANCE_NORMS) and not module.track_running_stats


def functional_forward(
    layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Run ``layer``'s own operation with the given weight and bias.

    Args:
        layer: a supported layer (its hyperparameters are used, not its parameters).
        x: the input.
        weight: the weight to use.
        bias: the bias to use, or ``None``.

    Returns:
        the layer's output.
    """
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[len(layer.kernel_size) - 1]
        return fn(x, weight, bias, layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation)
    return layer._conv_forward(x, weight, bias)


def quantized_layer_class(layer: nn.Module) -> type[QuantizedLayer]:
    """The fake-quant class for a layer.

    Args:
        layer: a supported layer.

    Returns:
        :class:`QuantizedConv`, :class:`QuantizedConvTranspose` or :class:`QuantizedLinear`.
    """
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        return QuantizedConvTranspose
    if isinstance(layer, nn.modules.conv._ConvNd):
        return QuantizedConv
    return QuantizedLinear
