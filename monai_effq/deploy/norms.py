"""Export forms of group and instance normalization that keep a runtime's channel-blocked layout.

PyTorch exports ``GroupNorm`` as ``Reshape(N, G, -1) → InstanceNormalization → Reshape → Mul → Add``.
The reshape ties the tensor to the planar ``NCDHW`` layout, so OpenVINO reorders every normalised
activation out of, and back into, the channel-blocked layout its int8 convolutions use; on
SegResNet at 128³ those reorders cost about as much as all the int8 convolutions together.

:class:`ChannelStatsGroupNorm` computes the same function from per-channel moments instead: two
spatial reductions of the input itself (``ReduceMean`` and ``ReduceL2``) give each channel's mean
and mean square, the group statistics follow on the tiny ``(N, C)`` tensors (a group's channels have
equal counts, so its mean and mean square are the means of theirs), and the full tensor is touched
once more by a per-channel ``x * a + b``. Every full-size operation is elementwise or a spatial
reduction, which runtimes run in any layout, and no full-size intermediate is written: subtracting
the channel mean before squaring (the textbook two-pass variance) made OpenVINO write and re-read a
full tensor per norm, 13% of SegResNet's int8 run on an AMX Xeon in bf16 and 15% in f32. Each
reduction first reduces the inner spatial axes and then the outer one (:func:`_channel_moments`):
OpenVINO runs a reduction that keeps only the channels on a single thread, which held the two
reductions at one core's speed: SegResNet init 16, W8A8, 1x4x128³, 2-core Xeon with AMX, medians of
7 interleaved runs, 315 -> 260 ms in bf16 (the FP export 364 -> 317 ms), 424 -> 348 ms in f32. The price
is the variance as ``E[x²] - E[x]²``: in float32 its relative error grows with ``(mean / std)²`` of
a channel, about 2e-4 of the output (relative L2) at a mean 65 standard deviations from zero (8-bit
activation rounding is 4e-3); in bfloat16 the rounding of the input itself dominates either way. The
result equals ``GroupNorm`` up to float rounding.

torch's exporter traces, decomposes and rewrites every operator of a graph with symbolic sizes, and the
twenty-odd small operators of each norm made a SegResNet's export 2-3 times slower than with PyTorch's
one ``group_norm``. Export forms therefore hold :class:`ChannelStatsGroupNormOp`, the same computation
as one operator (``torch.ops.monai_effq.channel_stats_group_norm``) that :data:`ONNX_TRANSLATIONS`
writes as the same ONNX nodes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from monai_effq.ptq.graph import set_submodule
from monai_effq.utils.imports import deferred_import

__all__ = [
    "GROUP_NORM_FORMS",
    "ONNX_TRANSLATIONS",
    "ChannelStatsGroupNorm",
    "ChannelStatsGroupNormOp",
    "channel_stats_group_norm",
    "channel_stats_norms",
    "group_norm_form_for",
    "openvino_channel_block",
]

# the operator set torch's exporter writes its own translations in (ReduceMean takes its axes as an input from 18)
op, _has_onnxscript = deferred_import("onnxscript", "opset18")

# "onnx": as PyTorch exports it; "channel_stats": ChannelStatsGroupNorm.
GROUP_NORM_FORMS = ("onnx", "channel_stats")

_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)

# The channel multiple at which OpenVINO runs the channel-statistics form faster than PyTorch's, by
# the precision of its float parts: 16 in bf16; 8 in f32 (8-channel norms, SegResNet init 8: 1.13x in
# f32 and 0.69x in bf16 on an AMX Xeon, 1.09-1.15x capped at AVX-512 VNNI, 1.17-1.26x at AVX2)
OPENVINO_CHANNEL_BLOCK = {"bf16": 16, "f32": 8}


def openvino_channel_block(precision: str | None = "auto") -> int:
    """The channel multiple at which OpenVINO gets the channel-statistics form.

    Args:
        precision: the precision OpenVINO runs the float parts in (``"bf16"`` or ``"f32"``);
            ``"auto"``/``None``: the one :class:`~monai_effq.deploy.OpenVINONetwork` picks on this
            CPU (without OpenVINO installed, f32 where torch finds AVX2 but not AVX-512).

    Returns:
        8 for f32, 16 for bf16 and precisions that were not measured.
    """
    if precision in (None, "auto"):
        precision = _default_openvino_precision()
    return OPENVINO_CHANNEL_BLOCK.get(str(precision).lower(), OPENVINO_CHANNEL_BLOCK["bf16"])


def _default_openvino_precision() -> str | None:
    """The float precision OpenVINO picks on this CPU (``None`` when it cannot be told)."""
    from monai_effq.deploy.runtime import float_precision_for  # runtime imports this module

    try:
        import openvino as ov
    except ImportError:
        return "f32" if torch.backends.cpu.get_cpu_capability() == "AVX2" else None
    return float_precision_for(ov.Core())


class ChannelStatsGroupNorm(nn.Module):
    """Group normalization written with per-channel spatial statistics (same function as ``GroupNorm``).

    Args:
        num_groups: number of groups (``num_channels`` for instance normalization).
        num_channels: number of channels.
        eps: added to the variance.
        weight: per-channel scale, or ``None``.
        bias: per-channel shift, or ``None``.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups}).")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, float(eps)
        per_group = (num_groups, num_channels // num_groups)
        gamma = torch.ones(per_group) if weight is None else weight.detach().reshape(per_group).clone()
        beta = torch.zeros(per_group) if bias is None else bias.detach().reshape(per_group).clone()
        self.register_buffer("gamma", gamma)
        self.register_buffer("beta", beta)

    @classmethod
    def from_module(cls, module: nn.Module) -> ChannelStatsGroupNorm | None:
        """The channel-statistics form of a ``GroupNorm`` or ``InstanceNorm`` (``None`` when it has none).

        An instance norm that normalises with running statistics in eval mode is a per-channel
        affine map, not a group normalization, and is left alone.
        """
        if isinstance(module, nn.GroupNorm):
            return cls(module.num_groups, module.num_channels, module.eps, module.weight, module.bias)
        if isinstance(module, _INSTANCE_NORMS) and not module.track_running_stats:
            weight = module.weight if module.affine else None
            bias = module.bias if module.affine else None
            return cls(module.num_features, module.num_features, module.eps, weight, bias)
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return channel_stats_group_norm(x, self.gamma, self.beta, self.eps)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() < 3 or x.shape[1] != self.num_channels:
            raise ValueError(f"expected (N, {self.num_channels}, *spatial), got shape {tuple(x.shape)}.")

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"


class ChannelStatsGroupNormOp(ChannelStatsGroupNorm):
    """:class:`ChannelStatsGroupNorm` as one operator, ``torch.ops.monai_effq.channel_stats_group_norm``.

    torch's exporter then traces one operator per norm instead of its twenty-odd small ones, and
    :data:`ONNX_TRANSLATIONS` (pass it as ``torch.onnx.export``'s ``custom_translation_table``; the
    exporter refuses the operator without it) writes the ONNX nodes it would have written for
    :class:`ChannelStatsGroupNorm`: the brats_effq SegResNet exported 1.8-2.1x faster
    (``benchmarks/export.py --norm-forms``), with the same outputs to the bit in ONNX Runtime and
    OpenVINO. Eager, it computes what :class:`ChannelStatsGroupNorm` computes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return torch.ops.monai_effq.channel_stats_group_norm(x, self.gamma, self.beta, self.eps)


def channel_stats_group_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """Group normalization of ``x`` from its per-channel moments (:class:`ChannelStatsGroupNorm`'s function).

    Args:
        x: ``(N, C, *spatial)`` input.
        gamma: ``(groups, C / groups)`` scale.
        beta: ``(groups, C / groups)`` shift.
        eps: added to the variance.

    Returns:
        the normalized ``x``, same shape.
    """
    groups, per_group = gamma.shape
    channel_mean, channel_square = (m.reshape(-1, groups, per_group) for m in _channel_moments(x))
    mean = channel_mean.mean(-1, keepdim=True)
    var = (channel_square.mean(-1, keepdim=True) - mean * mean).clamp_min(0.0)
    scale = torch.rsqrt(var + eps) * gamma
    shift = beta - mean * scale
    shape = (-1, groups * per_group) + (1,) * (x.dim() - 2)
    return x * scale.reshape(shape) + shift.reshape(shape)


@torch.library.custom_op("monai_effq::channel_stats_group_norm", mutates_args=())
def _channel_stats_group_norm_op(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    return channel_stats_group_norm(x, gamma, beta, eps)


@_channel_stats_group_norm_op.register_fake
def _(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


def _channel_stats_group_norm_onnx(x: Any, gamma: Any, beta: Any, eps: float) -> Any:
    """The ONNX nodes of :func:`channel_stats_group_norm`, as torch's exporter writes them from its operators.

    The spatial counts are read from the input's shape, which the exporter's optimizer folds to
    constants where the axes are fixed.
    """
    rank = len(x.shape)
    groups, per_group = gamma.shape
    spatial = list(range(2, rank))
    count = op.Cast(op.ReduceProd(op.Shape(x, start=2), keepdims=0), to=1)  # 1: FLOAT
    if rank > 3:  # the inner spatial axes first, then the outer one (see _channel_moments)
        inner = spatial[1:]
        outer = op.Cast(op.Squeeze(op.Shape(x, start=2, end=3)), to=1)
        mean = op.Div(op.ReduceSum(op.ReduceMean(x, inner, keepdims=0), [2], keepdims=0), outer)
        square = op.Div(op.ReduceSum(op.Pow(op.ReduceL2(x, inner, keepdims=0), 2.0), [2], keepdims=0), count)
    else:
        mean = op.ReduceMean(x, spatial, keepdims=0)
        square = op.Div(op.Pow(op.ReduceL2(x, spatial, keepdims=0), 2.0), count)
    mean, square = op.Reshape(mean, [-1, groups, per_group]), op.Reshape(square, [-1, groups, per_group])
    mean, square = op.ReduceMean(mean, [-1], keepdims=1), op.ReduceMean(square, [-1], keepdims=1)
    var = op.Clip(op.Sub(square, op.Mul(mean, mean)), 0.0)
    scale = op.Mul(op.Reciprocal(op.Sqrt(op.Add(var, eps))), gamma)
    shift = op.Sub(beta, op.Mul(mean, scale))
    shape = [-1, groups * per_group] + [1] * (rank - 2)
    return op.Add(op.Mul(x, op.Reshape(scale, shape)), op.Reshape(shift, shape))


# torch.onnx.export(..., custom_translation_table=ONNX_TRANSLATIONS) for networks holding ChannelStatsGroupNormOp
ONNX_TRANSLATIONS = {torch.ops.monai_effq.channel_stats_group_norm.default: _channel_stats_group_norm_onnx}


def _channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each channel's mean and mean square over the spatial axes of ``x``, as ``(N, C)`` tensors.

    With two or more spatial axes the inner ones are reduced first and the outer one after, on the
    small partial results: OpenVINO's CPU plugin runs a reduction over all spatial axes that keeps only
    the channels on one thread, and one that keeps the outer axis on all of them. The second step is
    a ``ReduceSum`` because OpenVINO merges two consecutive reductions of one kind back into one.
    ``vector_norm`` exports as ``ReduceL2``, which reads ``x`` once instead of writing and reading
    ``x * x``.
    """
    spatial = tuple(range(2, x.dim()))
    count = math.prod(x.shape[2:])
    if len(spatial) < 2:
        return x.mean(dim=spatial), torch.linalg.vector_norm(x, 2, dim=spatial).square() / count
    inner = spatial[1:]
    mean = x.mean(dim=inner).sum(dim=2) / x.shape[2]
    mean_square = torch.linalg.vector_norm(x, 2, dim=inner).square().sum(dim=2) / count
    return mean, mean_square


def channel_stats_norms(network: nn.Module, form_class: type[ChannelStatsGroupNorm] = ChannelStatsGroupNorm) -> list[str]:
    """Replace, in place, every group and instance norm of ``network`` by its :class:`ChannelStatsGroupNorm`.

    Args:
        network: the network (an export copy; it is changed).
        form_class: :class:`ChannelStatsGroupNorm`, or :class:`ChannelStatsGroupNormOp` for torch's
            current exporter (with :data:`ONNX_TRANSLATIONS`).

    Returns:
        the names of the replaced modules.
    """
    replaced = []
    for name, module in list(network.named_modules()):
        form = form_class.from_module(module)
        if form is not None and name:
            set_submodule(network, name, form)
            replaced.append(name)
    return replaced


def group_norm_form_for(runtime: str, network: nn.Module, precision: str | None = "auto") -> str:
    """The group-norm export form a runtime runs fastest for ``network``.

    OpenVINO gets ``"channel_stats"`` when every group/instance norm has a multiple of
    :func:`openvino_channel_block` channels: 16 where its float parts run in bf16, 8 where they run
    in f32 (CPUs without native bf16, or ``precision="f32"``).
    Measured on SegResNet at 1x4x128³, W8A8: on a 2-core AVX-512 AMD EPYC (f32, reductions not yet
    split, see :func:`_channel_moments`) init_filters 16 and 32 ran 1.58x and 1.35x faster in that
    form, 8 and 24 0.83x and 1.04x. On a 2-core Xeon with AMX, reductions split: init_filters 16
    1.06-1.33x in bf16; init_filters 8 0.63-0.70x in bf16 but 1.13x in f32 (bare requests, medians
    of 7 interleaved runs), and in f32 with OpenVINO and its oneDNN capped at AVX-512 VNNI 1.09x and
    1.15x (two deploy-benchmark runs), at AVX2 1.26x (bare requests; 1.17x in the deploy benchmark).
    The form is chosen for the CPU that exports, which is the one that runs the file when the
    overlays or :func:`~monai_effq.deploy.runtime_network` export it; either form computes the same
    function. ONNX Runtime runs both forms equally and gets ``"onnx"``.

    Args:
        runtime: ``"openvino"`` or ``"onnxruntime"``.
        network: the network to export (FP or quantized).
        precision: the precision OpenVINO will run the float parts in (``OpenVINONetwork``'s
            ``precision``); ``"auto"``: its pick on this CPU.

    Returns:
        ``"onnx"`` or ``"channel_stats"``.
    """
    if runtime != "openvino":
        return "onnx"
    channels = [
        m.num_channels if isinstance(m, nn.GroupNorm) else m.num_features
        for m in network.modules()
        if ChannelStatsGroupNorm.from_module(m) is not None
    ]
    if not channels:  # nothing to choose, and no need to ask OpenVINO for its precision
        return "onnx"
    block = openvino_channel_block(precision)
    return "channel_stats" if all(c % block == 0 for c in channels) else "onnx"
