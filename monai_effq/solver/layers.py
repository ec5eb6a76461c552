"""Weight layers seen as affine maps ``Y_g = W_g X_g + b_g``, one per convolution group.

A :class:`LayerView` turns a supported layer (``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``,
``Linear``) into

- a weight matrix of shape ``(groups, out_per_group, in_per_group)`` and back, and
- a stream of patch chunks: the layer's input unfolded into columns (im2col for every rank
  through one path, ``Tensor.unfold``), its target outputs and per-voxel weights, a few slices
  at a time so that the whole im2col matrix never exists.

A transposed convolution is the convolution of the stride-dilated input with the flipped,
channel-swapped kernel, so it shares the convolution path. With a stride above 1 most entries of
those columns are the inserted zeros: :meth:`LayerView.iter_parity_chunks` splits the output voxels
by their position modulo the stride (:class:`ParityClass`), within which the same taps read real
input samples, and yields only those taps' columns (for the stride-2, kernel-3 up-sampling of a 3D
U-Net, 1/8 of each column on average and 1/47 of the Gram's multiply-adds).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_effq.utils.errors import all_finite

__all__ = ["LayerView", "ParityClass", "PatchChunk", "layer_view", "SUPPORTED_LAYERS"]

SUPPORTED_LAYERS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


@dataclass
class PatchChunk:
    """A slice of a layer's normal-equation data.

    Attributes:
        inputs: ``(groups, voxels, in_per_group)`` unfolded inputs.
        targets: ``(groups, voxels, out_per_group)`` target outputs.
        weights: ``(voxels,)`` importance of each output voxel, or ``(voxels, K)`` for ``K`` weightings.
        columns: which of the ``in_per_group`` columns ``inputs`` holds, in order (the others are
            zero for these voxels); ``None`` when it holds all of them.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    columns: torch.Tensor | None = None


@dataclass(frozen=True)
class ParityClass:
    """The output voxels of a strided transposed convolution at one position modulo its stride.

    Along axis ``i`` the class holds the output indices ``first[i] + up_stride[i] * q`` for
    ``q < count[i]``. Of the equivalent convolution's kernel taps, only ``first_tap[i] + up_stride[i] * a``
    for ``a < taps[i]`` read real input samples for these voxels (the others read inserted zeros),
    and tap ``a`` of voxel ``q`` reads input index ``q + input_offset[i] + a`` (zero padding outside
    the input): the class's columns are a stride-1 unfold of the input with window ``taps``.

    Attributes:
        first: first output index per axis.
        count: output voxels per axis.
        first_tap: first kernel tap per axis that reads the input.
        taps: taps per axis that read the input (0 when none does).
        input_offset: input index that tap ``a = 0`` of voxel ``q = 0`` reads, per axis (may be negative).
    """

    first: tuple[int, ...]
    count: tuple[int, ...]
    first_tap: tuple[int, ...]
    taps: tuple[int, ...]
    input_offset: tuple[int, ...]


def _tuple(v: int | tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n


@dataclass(frozen=True)
class LayerView:
    """How to read a layer as grouped affine maps.

    Attributes:
        kind: ``"conv"``, ``"conv_transpose"`` or ``"linear"``.
        spatial_dims: number of spatial dimensions (0 for ``Linear``).
        in_channels: channels (features) of the layer's input.
        out_channels: channels (features) of the layer's output.
        groups: convolution groups.
        kernel_size: kernel size per spatial dimension (of the equivalent convolution).
        stride: stride of the equivalent convolution (1 for transposed ones).
        dilation: dilation per spatial dimension.
        pad: ``(left, right)`` padding per spatial dimension of the equivalent convolution's input.
        pad_mode: ``F.pad`` mode for that padding.
        up_stride: zero-insertion factor of a transposed convolution's input (1 otherwise).
        name: the layer, for messages: its class name (the PTQ pipeline adds its module path).
    """

    kind: str
    spatial_dims: int
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pad: tuple[tuple[int, int], ...]
    pad_mode: str
    up_stride: tuple[int, ...]
    name: str

    @property
    def output_axis(self) -> int:
        """The axis of the native weight that holds the output channels (1 for a transposed conv).

        A grouped transposed convolution spreads its output channels over axes 0 and 1; per-channel
        parameters of such a layer go through :meth:`weight_matrix` rows instead.
        """
        return 1 if self.kind == "conv_transpose" else 0

    @property
    def in_per_group(self) -> int:
        """Length of one unfolded input column (``c_in / groups * prod(kernel)``)."""
        return self.in_channels // self.groups * math.prod(self.kernel_size)

    @property
    def splits_by_parity(self) -> bool:
        """Whether :meth:`iter_parity_chunks` applies: a transposed convolution with a stride above 1,
        dilation 1 and zero padding (a dilated one reads its taps in another pattern, and another
        padding mode would put values where the parity classes assume zeros; both keep :meth:`iter_chunks`)."""
        return (
            self.kind == "conv_transpose"
            and any(u > 1 for u in self.up_stride)
            and all(d == 1 for d in self.dilation)
            and self.pad_mode == "constant"
        )

    @property
    def out_per_group(self) -> int:
        """Output channels per group."""
        return self.out_channels // self.groups

    # -- weights -----------------------------------------------------------------------------
    def weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The layer's weight as ``(groups, out_per_group, in_per_group)``.

        Args:
            weight: the layer's native weight tensor.

        Returns:
            a new float tensor.
        """
        g, m, n = self.groups, self.out_per_group, self.in_per_group
        w = weight.detach()
        if self.kind == "conv_transpose":
            w = self._transposed_to_conv(w)
        return w.reshape(g, m, n).clone()

    def native_weight(self, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`weight_matrix`: a tensor shaped like the layer's weight.

        Args:
            matrix: ``(groups, out_per_group, in_per_group)`` weights.

        Returns:
            the native weight tensor (for a transposed convolution, ``(c_in, c_out/g, *k)``).
        """
        if self.kind == "linear":
            return matrix.reshape(self.out_channels, self.in_channels)
        conv_w = matrix.reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        if self.kind == "conv_transpose":
            return self._conv_to_transposed(conv_w)
        return conv_w

    def _transposed_to_conv(self, w: torch.Tensor) -> torch.Tensor:
        # (c_in, c_out/g, *k) -> (c_out, c_in/g, *k) with the kernel flipped, group by group.
        g = self.groups
        cin_g = self.in_channels // g
        w = w.reshape(g, cin_g, self.out_per_group, *self.kernel_size).transpose(1, 2)
        w = w.flip(dims=tuple(range(3, 3 + self.spatial_dims)))
        return w.reshape(self.out_channels, cin_g, *self.kernel_size)

    def _conv_to_transposed(self, w: torch.Tensor) -> torch.Tensor:
        g = self.groups
        cin_g = self.in_channels // g
        w = w.reshape(g, self.out_per_group, cin_g, *self.kernel_size)
        w = w.flip(dims=tuple(range(3, 3 + self.spatial_dims))).transpose(1, 2)
        return w.reshape(self.in_channels, self.out_per_group, *self.kernel_size)

    # -- shapes ------------------------------------------------------------------------------
    def output_spatial(self, input_spatial: tuple[int, ...]) -> tuple[int, ...]:
        """Spatial size of the output for an input of spatial size ``input_spatial``.

        Args:
            input_spatial: the input's spatial size.

        Returns:
            the output's spatial size.
        """
        out = []
        for i, size in enumerate(input_spatial):
            size = (size - 1) * self.up_stride[i] + 1 + sum(self.pad[i])
            span = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            out.append((size - span) // self.stride[i] + 1)
        return tuple(out)

    def check_shapes(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Raise a clear error when ``inputs``/``targets`` do not fit the layer.

        Args:
            inputs: the layer's input batch.
            targets: the layer's target output batch.

        Raises:
            ValueError: naming the mismatch.
        """
        if self.kind == "linear":
            if inputs.shape[-1] != self.in_channels:
                raise ValueError(
                    f"{self.name} expects inputs with {self.in_channels} features in the last axis, "
                    f"got shape {tuple(inputs.shape)}."
                )
            expected = (*inputs.shape[:-1], self.out_channels)
        else:
            if inputs.dim() != self.spatial_dims + 2 or inputs.shape[1] != self.in_channels:
                raise ValueError(
                    f"{self.name} expects inputs shaped (N, {self.in_channels}, "
                    f"{', '.join(['*'] * self.spatial_dims)}), got {tuple(inputs.shape)}."
                )
            expected = (inputs.shape[0], self.out_channels, *self.output_spatial(tuple(inputs.shape[2:])))
        if tuple(targets.shape) != tuple(expected):
            raise ValueError(
                f"{self.name} maps inputs of shape {tuple(inputs.shape)} to outputs of shape "
                f"{tuple(expected)}, but the targets have shape {tuple(targets.shape)}."
            )

    def check_finite(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Raise a clear error when calibration ``inputs`` or ``targets`` hold NaN or Inf values.

        Args:
            inputs: the layer's input batch.
            targets: the layer's target output batch.

        Raises:
            ValueError: naming the tensor that is not finite.
        """
        for what, t in (("inputs", inputs), ("targets", targets)):
            if not all_finite(t):
                raise ValueError(f"calibration {what} of {self.name} contain NaN or Inf values.")

    def check_voxel_weights(self, weights: torch.Tensor, targets: torch.Tensor, what: str = "voxel_weights") -> torch.Tensor:
        """One non-negative weight per output voxel of ``targets``, as float32 on their device.

        Args:
            weights: ``(N, *spatial)`` or ``(N, 1, *spatial)`` for convolutions, the leading shape
                of ``targets`` for ``Linear``.
            targets: the layer's output batch.
            what: the argument's name, for errors.

        Returns:
            the weights shaped ``(N, *spatial)`` (the leading shape for ``Linear``).

        Raises:
            ValueError: naming the expected shape, or non-finite or negative weights.
        """
        if self.kind == "linear":
            expected = tuple(targets.shape[:-1])
        else:
            expected = (targets.shape[0], *targets.shape[2:])
            if weights.dim() == targets.dim() and weights.shape[1] == 1:
                weights = weights[:, 0]
        if tuple(weights.shape) != expected:
            raise ValueError(
                f"{what} for {self.name} must have shape {expected} (one weight per output "
                f"voxel), got {tuple(weights.shape)}."
            )
        weights = weights.detach().to(targets.device, torch.float32)
        if not all_finite(weights) or bool((weights < 0).any()):
            raise ValueError(f"{what} for {self.name} must be finite and non-negative.")
        return weights

    # -- patches -----------------------------------------------------------------------------
    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if any(s > 1 for s in self.up_stride):
            n, c, *size = x.shape
            up = x.new_zeros(n, c, *[(s - 1) * u + 1 for s, u in zip(size, self.up_stride)])
            up[(slice(None), slice(None), *[slice(None, None, u) for u in self.up_stride])] = x
            x = up
        pads: list[int] = []
        for left, right in reversed(self.pad):
            pads += [left, right]
        if any(pads):
            if min(pads) < 0:  # a transposed convolution's padding larger than its kernel crops
                crop = [slice(None), slice(None)]
                for i, (left, right) in enumerate(self.pad):
                    crop.append(slice(max(-left, 0), x.shape[2 + i] - max(-right, 0)))
                x = x[tuple(crop)]
                pads = [max(p, 0) for p in pads]
            if any(pads):
                x = F.pad(x, pads, mode=self.pad_mode)
        return x

    def iter_chunks(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        voxel_weights: torch.Tensor | None = None,
        max_elements: int = 1 << 24,
    ) -> Iterator[PatchChunk]:
        """Yield the unfolded input, targets and voxel weights a few output slices at a time.

        Args:
            inputs: the layer's input batch (checked with :meth:`check_shapes` first).
            targets: the layer's target outputs.
            voxel_weights: importance per output voxel, shaped like the targets without the
                channel axis (``(N, *spatial)``, a singleton channel axis is accepted); 1 if ``None``.
                A trailing axis (``(N, *spatial, K)``) carries ``K`` weightings of the same voxels.
            max_elements: cap on the elements of one unfolded chunk (memory per chunk).

        Yields:
            :class:`PatchChunk` objects; their voxels together cover every output voxel once.
        """
        g, n, m = self.groups, self.in_per_group, self.out_per_group
        if self.kind == "linear":
            x2 = inputs.reshape(-1, self.in_channels)
            y2 = targets.reshape(-1, self.out_channels)
            h2 = None if voxel_weights is None else voxel_weights.reshape(x2.shape[0], -1)
            rows = max(1, max_elements // max(n, 1))
            for start in range(0, x2.shape[0], rows):
                x = x2[start : start + rows]
                h = torch.ones(x.shape[0], dtype=x.dtype, device=x.device) if h2 is None else _weight_columns(h2[start : start + rows], x.dtype)
                yield PatchChunk(x.reshape(-1, 1, n).transpose(0, 1), y2[start : start + rows].reshape(-1, 1, m).transpose(0, 1), h)
            return
        out_spatial = targets.shape[2:]
        plane = math.prod(out_spatial[1:]) if len(out_spatial) > 1 else 1
        rows = max(1, max_elements // max(plane * n * g, 1))
        k, s, d = self.kernel_size, self.stride, self.dilation
        for b in range(inputs.shape[0]):
            xp = self._prepare_input(inputs[b : b + 1])
            yb = targets[b]
            hb = None if voxel_weights is None else voxel_weights[b].reshape(*out_spatial, -1)
            for start in range(0, out_spatial[0], rows):
                stop = min(start + rows, out_spatial[0])
                lo = start * s[0]
                hi = (stop - 1) * s[0] + d[0] * (k[0] - 1) + 1
                t = xp[:, :, lo:hi]
                for i in range(self.spatial_dims):
                    t = t.unfold(2 + i, d[i] * (k[i] - 1) + 1, s[i])
                    if d[i] > 1:
                        t = t[..., :: d[i]]
                voxels = (stop - start) * plane
                yield self._chunk(t, voxels, yb[:, start:stop], None if hb is None else hb[start:stop])

    def parity_classes(self, output_spatial: tuple[int, ...]) -> list[ParityClass]:
        """The output voxels of a strided transposed convolution grouped by position modulo the stride.

        Args:
            output_spatial: the output's spatial size.

        Returns:
            the non-empty parity classes (:class:`ParityClass`), which together cover every output voxel once.
        """
        axes = []
        for size, k, u, (left, _) in zip(output_spatial, self.kernel_size, self.up_stride, self.pad):
            # Tap j of output o reads the stride-dilated input at o + j - left: a real sample when
            # that is a multiple of u, namely sample (o + j - left) / u.
            classes = []
            for r in range(min(u, size)):
                j0 = (left - r) % u
                taps = max(0, (k - j0 + u - 1) // u)
                classes.append((r, len(range(r, size, u)), j0, taps, (r + j0 - left) // u))
            axes.append(classes)
        return [ParityClass(*zip(*per_axis)) for per_axis in itertools.product(*axes)]

    def parity_columns(self, parity: ParityClass, device: torch.device | str = "cpu") -> torch.Tensor:
        """Indices into the ``in_per_group`` columns of the taps that ``parity`` reads, channel-major.

        Args:
            parity: a :class:`ParityClass` of this layer.
            device: device of the result.

        Returns:
            ``(in_channels / groups * prod(taps),)`` int64 indices in the order of
            the columns of :meth:`iter_parity_chunks`.
        """
        flat = torch.zeros(1, dtype=torch.int64, device=device)
        for k, u, j0, t in zip(self.kernel_size, self.up_stride, parity.first_tap, parity.taps):
            flat = (flat[:, None] * k + (j0 + u * torch.arange(t, device=device))[None, :]).reshape(-1)
        channels = torch.arange(self.in_channels // self.groups, device=device)[:, None] * math.prod(self.kernel_size)
        return (channels + flat[None, :]).reshape(-1)

    def iter_parity_chunks(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        voxel_weights: torch.Tensor | None = None,
        max_elements: int = 1 << 24,
    ) -> Iterator[PatchChunk]:
        """:meth:`iter_chunks` without the inserted zeros, for a layer that :attr:`splits_by_parity`.

        Each chunk holds voxels of one :class:`ParityClass` and only the columns of the taps that
        read the input (:attr:`PatchChunk.columns`); the other entries of those voxels' columns are zero.

        Args:
            inputs: the layer's input batch (checked with :meth:`check_shapes` first).
            targets: the layer's target outputs.
            voxel_weights: as for :meth:`iter_chunks`.
            max_elements: cap on the elements of one chunk's columns.

        Yields:
            :class:`PatchChunk` objects; their voxels together cover every output voxel once.

        Raises:
            ValueError: for a layer that does not split by parity.
        """
        if not self.splits_by_parity:
            raise ValueError(f"{self.name} is not a strided transposed convolution with dilation 1: use iter_chunks.")
        g, nd = self.groups, self.spatial_dims
        out_spatial = tuple(targets.shape[2:])
        classes = self.parity_classes(out_spatial)
        reading = [p for p in classes if all(p.taps)]
        # zeros around the input so that every class's window lies inside it
        below = [max([0] + [-p.input_offset[i] for p in reading]) for i in range(nd)]
        above = [max([0] + [p.input_offset[i] + p.count[i] + p.taps[i] - 1 - inputs.shape[2 + i] for p in reading]) for i in range(nd)]
        pads = [p for i in reversed(range(nd)) for p in (below[i], above[i])]
        columns = {p: self.parity_columns(p, inputs.device) for p in classes}
        for b in range(inputs.shape[0]):
            xb = F.pad(inputs[b : b + 1], pads)
            yb = targets[b]
            hb = None if voxel_weights is None else voxel_weights[b].reshape(*out_spatial, -1)
            for p in classes:
                width = columns[p].numel()
                rows = max(1, max_elements // max(math.prod(p.count[1:]) * width * g, 1))
                for start in range(0, p.count[0], rows):
                    stop = min(start + rows, p.count[0])
                    # this chunk's output voxels, and the input samples their taps read
                    out = [slice(p.first[0] + self.up_stride[0] * start, p.first[0] + self.up_stride[0] * (stop - 1) + 1, self.up_stride[0])]
                    out += [slice(p.first[i], None, self.up_stride[i]) for i in range(1, nd)]
                    span = [stop - start, *p.count[1:]]
                    voxels = math.prod(span)
                    t = None
                    if width:
                        lo = [below[i] + p.input_offset[i] + (start if i == 0 else 0) for i in range(nd)]
                        t = xb[(slice(None), slice(None), *[slice(lo[i], lo[i] + span[i] + p.taps[i] - 1) for i in range(nd)])]
                        for i in range(nd):
                            t = t.unfold(2 + i, p.taps[i], 1)
                    yield self._chunk(t, voxels, yb[(slice(None), *out)], None if hb is None else hb[tuple(out)], columns[p])

    def _chunk(
        self,
        window: torch.Tensor | None,
        voxels: int,
        targets: torch.Tensor,
        weights: torch.Tensor | None,
        columns: torch.Tensor | None = None,
    ) -> PatchChunk:
        """The :class:`PatchChunk` of ``voxels`` output voxels of one sample.

        Args:
            window: their unfolded input, ``(1, C, *voxel axes, *tap axes)``; ``None`` when they read
                no column.
            voxels: how many voxels.
            targets: their targets, ``(M, *voxel axes)``.
            weights: their weights, ``(*voxel axes, K)``; ``None`` for 1.
            columns: which of the layer's columns ``window`` holds (``None``: all).

        Returns:
            the chunk.
        """
        g, m = self.groups, self.out_per_group
        if window is None:
            cols = targets.new_zeros(g, voxels, 0)
        else:
            # (1, C, *O, *K) -> (V, C * prod(K)); C is outermost so each group is contiguous.
            perm = (0, *range(2, 2 + self.spatial_dims), 1, *range(2 + self.spatial_dims, window.dim()))
            cols = window.permute(perm).reshape(voxels, g, -1).transpose(0, 1)
        ys = targets.reshape(g, m, -1).transpose(1, 2)
        if weights is None:
            h = torch.ones(voxels, dtype=cols.dtype, device=cols.device)
        else:
            h = _weight_columns(weights.reshape(voxels, -1), cols.dtype)
        return PatchChunk(cols, ys, h, columns)


def _weight_columns(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(V, K)`` weights as ``(V,)`` when there is one weighting."""
    return (h[:, 0] if h.shape[1] == 1 else h).to(dtype)


def _conv_padding(layer: nn.Module, nd: int) -> tuple[tuple[int, int], ...]:
    k, d = _tuple(layer.kernel_size, nd), _tuple(layer.dilation, nd)
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return ((0, 0),) * nd
        total = [d[i] * (k[i] - 1) for i in range(nd)]  # "same"
        return tuple((t // 2, t - t // 2) for t in total)
    p = _tuple(layer.padding, nd)
    return tuple((pi, pi) for pi in p)


def layer_view(layer: nn.Module) -> LayerView:
    """Describe a supported layer as grouped affine maps.

    Args:
        layer: a ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or ``Linear`` module.

    Returns:
        the layer's :class:`LayerView`.

    Raises:
        TypeError: for any other module type.
    """
    name = type(layer).__name__
    if isinstance(layer, nn.Linear):
        return LayerView("linear", 0, layer.in_features, layer.out_features, 1, (), (), (), (), "constant", (), name)
    if isinstance(layer, nn.modules.conv._ConvNd) and isinstance(layer, SUPPORTED_LAYERS):
        nd = len(layer.kernel_size)
        k, d = _tuple(layer.kernel_size, nd), _tuple(layer.dilation, nd)
        if isinstance(layer, nn.modules.conv._ConvTransposeNd):
            p = _tuple(layer.padding, nd)
            op = _tuple(layer.output_padding, nd)
            pad = tuple((d[i] * (k[i] - 1) - p[i], d[i] * (k[i] - 1) - p[i] + op[i]) for i in range(nd))
            return LayerView(
                "conv_transpose", nd, layer.in_channels, layer.out_channels, layer.groups, k, (1,) * nd, d,
                pad, "constant", _tuple(layer.stride, nd), name,
            )
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        return LayerView(
            "conv", nd, layer.in_channels, layer.out_channels, layer.groups, k, _tuple(layer.stride, nd), d,
            _conv_padding(layer, nd), mode, (1,) * nd, name,
        )
    supported = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
    raise TypeError(f"cannot quantize a {name}: supported layers are {supported}.")
