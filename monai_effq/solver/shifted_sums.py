"""Normal equations of a "same" 3x3(x3) convolution from shifted products of its input, without im2col.

For a stride-1, dilation-1 convolution with kernel 3 and padding 1 on every axis (the bulk of a 3D
U-Net or SegResNet), the im2col Gram ``Σ_v x_v x_vᵀ`` over all output voxels ``v`` has one block per
pair of kernel taps ``(k, k')``: ``T(k, k') = Σ_u x[u] x[u + k' - k]ᵀ`` over the input voxels ``u``
that tap ``k`` reads. Every tap reads the whole volume except the last plane of an axis (tap 0)
or the first (tap 2), so by inclusion–exclusion each block is a sum over the whole volume at the
shift ``d = k' - k`` minus sums over those planes, their lines and corners. The whole-volume sums are
products of the zero-padded input with a flat-shifted view of itself (no copy), and only the
63 shifts with ``d >= 0`` are needed (``T(k', k) = T(k, k')ᵀ``): 63 ``C × C`` products per voxel
instead of the 378 of a symmetric im2col Gram, 6x fewer multiply-adds.

This holds for unweighted voxels only (a per-voxel weight ``h_v`` depends on the output voxel, so
the blocks stop depending on the shift alone); :class:`~monai_effq.solver.gram.GramAccumulator`
uses it when no voxel weights or held-out voxels are given.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from monai_effq.solver.layers import LayerView

__all__ = ["supports_shifted_sums", "shifted_sums"]

_MARGIN = 2  # the largest tap shift |k' - k|; padding by it keeps every flat-shifted view in bounds


def supports_shifted_sums(view: LayerView) -> bool:
    """Whether a layer's statistics can be summed by :func:`shifted_sums`.

    Args:
        view: the layer's :class:`LayerView`.

    Returns:
        ``True`` for an ungrouped stride-1, dilation-1 convolution with kernel 3 and zero padding 1
        on every axis (transposed ones included when they reduce to that).
    """
    if view.kind not in ("conv", "conv_transpose") or view.groups != 1:
        return False
    nd = view.spatial_dims
    return (
        view.kernel_size == (3,) * nd
        and view.stride == (1,) * nd
        and view.dilation == (1,) * nd
        and view.up_stride == (1,) * nd
        and view.pad == ((1, 1),) * nd
        and view.pad_mode == "constant"
    )


def _flat_strides(size: tuple[int, ...]) -> list[int]:
    strides, step = [], 1
    for s in reversed(size):
        strides.append(step)
        step *= s
    return strides[::-1]


class _Volume:
    """One sample, zero-padded by the margin, with the sums over planes of it cached."""

    def __init__(self, x: torch.Tensor) -> None:
        self.spatial = tuple(x.shape[1:])
        self.padded = F.pad(x, [_MARGIN] * (2 * len(self.spatial)))
        self._cache: dict[tuple, torch.Tensor] = {}

    def rows(self, fixed: dict[int, int], shift: tuple[int, ...], src: torch.Tensor | None = None) -> torch.Tensor:
        """``(channels, L)`` rows of the voxels with ``u_i = fixed[i]``, shifted by ``shift``, flattened.

        The free axes are flattened over the padded extent and cut to the span between the first and
        the last interior voxel; a shift of at most the margin on each free axis then stays inside
        the padded array, so it is a plain offset into the flat rows (a view, no copy).
        """
        t = self.padded if src is None else src
        free = [i for i in range(len(self.spatial)) if i not in fixed]
        index: list[slice | int] = [slice(None)]
        for i in range(len(self.spatial)):
            index.append(fixed[i] + shift[i] + _MARGIN if i in fixed else slice(None))
        sub = t[tuple(index)].reshape(t.shape[0], -1)
        if not free:
            return sub
        sizes = [self.spatial[i] + 2 * _MARGIN for i in free]
        strides = _flat_strides(tuple(sizes))
        first = sum(_MARGIN * s for s in strides)
        last = sum((self.spatial[i] + _MARGIN - 1) * s for i, s in zip(free, strides))
        offset = sum(shift[i] * s for i, s in zip(free, strides))
        return sub[:, first + offset : last + offset + 1]

    def region_product(self, shift: tuple[int, ...], fixed: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """``Σ x[u] x[u + shift]ᵀ`` over the voxels with ``u_i = c`` for each ``(i, c)`` in ``fixed``."""
        key = (shift, fixed)
        if key not in self._cache:
            where = dict(fixed)
            base = self.rows(where, (0,) * len(self.spatial))
            other = self.rows(where, shift)
            self._cache[key] = (base @ other.T).double()
        return self._cache[key]

    def region_sum(self, fixed: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """``Σ x[u]`` over the voxels with ``u_i = c`` for each ``(i, c)`` in ``fixed``."""
        key = ("sum", fixed)
        if key not in self._cache:
            self._cache[key] = self.rows(dict(fixed), (0,) * len(self.spatial)).double().sum(1)
        return self._cache[key]


def _excluded_planes(tap: tuple[int, ...], spatial: tuple[int, ...]) -> list[tuple[int, int]]:
    """The ``(axis, plane)`` pairs a tap does not read: the last plane for tap 0, the first for tap 2."""
    return [(i, spatial[i] - 1 if k == 0 else 0) for i, k in enumerate(tap) if k != 1]


def _inclusion_exclusion(planes: list[tuple[int, int]]):
    for r in range(len(planes) + 1):
        for subset in itertools.combinations(planes, r):
            yield (-1.0) ** r, tuple(subset)


@torch.no_grad()
def shifted_sums(
    inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unweighted normal-equation sums of a layer accepted by :func:`supports_shifted_sums`.

    Column ``c * 3^nd + k`` is input channel ``c`` at kernel tap ``k`` (row-major over the kernel
    axes), the order of :meth:`LayerView.weight_matrix`.

    Args:
        inputs: ``(N, C, *spatial)`` layer inputs (unpadded).
        targets: ``(N, M, *spatial)`` target outputs (the same spatial size).

    Returns:
        float64 ``(xx, yx, x, y, yy)``: ``(1, n, n)`` ``Σ x xᵀ``, ``(1, M, n)`` ``Σ y xᵀ``, ``(1, n)``
        ``Σ x``, ``(1, M)`` ``Σ y`` and ``(1, M)`` ``Σ y²`` over all output voxels, ``n = C 3^nd``.
    """
    n_batch, c = inputs.shape[:2]
    m = targets.shape[1]
    spatial = tuple(inputs.shape[2:])
    nd = len(spatial)
    taps = list(itertools.product(range(3), repeat=nd))
    kk = len(taps)
    blocks = torch.zeros(kk, kk, c, c, dtype=torch.float64, device=inputs.device)
    yx = torch.zeros(m, c, kk, dtype=torch.float64, device=inputs.device)
    xs = torch.zeros(c, kk, dtype=torch.float64, device=inputs.device)
    for b in range(n_batch):
        vol = _Volume(inputs[b].float())
        for a, ka in enumerate(taps):
            planes = _excluded_planes(ka, spatial)
            for sign, subset in _inclusion_exclusion(planes):
                xs[:, a] += sign * vol.region_sum(subset)
            for bi in range(a, kk):
                shift = tuple(q - p for p, q in zip(ka, taps[bi]))
                for sign, subset in _inclusion_exclusion(planes):
                    blocks[a, bi] += sign * vol.region_product(shift, subset)
        # Σ_v y[v] x[v + k - 1]ᵀ: the target padded like the input, so a tap is a flat offset.
        rows_y = vol.rows({}, (0,) * nd, src=F.pad(targets[b].float(), [_MARGIN] * (2 * nd)))
        for a, ka in enumerate(taps):
            yx[:, :, a] += (rows_y @ vol.rows({}, tuple(k - 1 for k in ka)).T).double()
    upper = torch.triu_indices(kk, kk, offset=1)
    blocks[upper[1], upper[0]] = blocks[upper[0], upper[1]].transpose(1, 2)
    n = c * kk
    xx = blocks.permute(2, 0, 3, 1).reshape(n, n)
    t = targets.float()
    y_sum = t.sum(dim=(0, *range(2, 2 + nd))).double()
    yy = t.pow(2).sum(dim=(0, *range(2, 2 + nd))).double()
    return xx[None], yx.reshape(1, m, n), xs.reshape(1, n), y_sum[None], yy[None]
