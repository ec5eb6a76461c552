"""Normal equations of a "same" 3x3(x3) convolution from shifted products of its input, without im2col.

For a stride-1, dilation-1 convolution with kernel 3 and padding 1 on every axis (the bulk of a 3D
U-Net or SegResNet), the im2col Gram ``Σ_v x_v x_vᵀ`` over all output voxels ``v`` has one block per
pair of kernel taps ``(k, k')``: ``T(k, k') = Σ_u x[u] x[u + k' - k]ᵀ`` over the input voxels ``u``
that tap ``k`` reads. Every tap reads the whole volume except the last plane of an axis (tap 0)
or the first (tap 2), so by inclusion–exclusion each block is a sum over the whole volume at the
shift ``d = k' - k`` minus sums over those planes, their lines and corners. The whole-volume sums are
products of the flattened zero-padded input with flat-shifted copies of itself (the five shifts
along the innermost axis stacked, so that one product serves five), and only the 63 shifts with
``d >= 0`` are needed (``T(k', k) = T(k, k')ᵀ``): 63 ``C × C`` products per voxel instead of the 378
of a symmetric im2col Gram, 6x fewer multiply-adds.

This holds for unweighted voxels only (a per-voxel weight ``h_v`` depends on the output voxel, so
the blocks stop depending on the shift alone). Weighted sums whose weights are 1 on most voxels
(EfficientQ's class attention: 1 on the most common class and outside the body) are the unweighted
sums plus ``Σ (h_v - 1) x_v x_vᵀ`` over the other voxels, whose columns :func:`voxel_columns` gathers;
:class:`~monai_effq.solver.gram.GramAccumulator` sums them so.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from monai_effq.solver.layers import LayerView

__all__ = ["supports_shifted_sums", "shifted_sums", "voxel_columns"]

_MARGIN = 2  # the largest tap shift |k' - k|
_INNER = 2 * _MARGIN + 1  # shifts along the innermost axis, -_MARGIN to _MARGIN
_STACK_ELEMENTS = 1 << 24  # largest stack of shifted copies (floats) made of one sample (64 MB)
_SPAN = 8192  # voxels per float32 product over a volume; the spans add up in float64


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


def _extents(spatial: tuple[int, ...]) -> tuple[int, ...]:
    """The padded extent of each axis: the margin's zeros after the voxels, none before them."""
    return tuple(s + _MARGIN for s in spatial)


def _lead(extents: tuple[int, ...] | list[int]) -> int:
    """Zeros before a flattened padded block: a shift of ``-_MARGIN`` on every axis stays in it."""
    return _MARGIN * sum(_flat_strides(tuple(extents)))


def _pad(volume: torch.Tensor) -> torch.Tensor:
    """A ``(C, *spatial)`` volume as the flat ``(C, lead + Π extents)`` rows that :func:`_rows` reads.

    Each axis is followed by ``_MARGIN`` zero planes and the whole is preceded by :func:`_lead`
    zeros, and nothing else: a coordinate ``-1`` or ``-2`` on an axis lands on the zeros after the
    previous line (or plane, or before the first), the same as zero padding on both sides. Against
    padding every axis on both sides this is 11% fewer positions at 32^3 and 14% at 24^3, and the
    products over them are most of the time.
    """
    c, spatial = volume.shape[0], tuple(volume.shape[1:])
    extents = _extents(spatial)
    lead = _lead(extents)
    flat = volume.new_zeros(c, lead + math.prod(extents))
    flat[:, lead:].view(c, *extents)[(slice(None),) + tuple(slice(0, s) for s in spatial)] = volume
    return flat


def _rows_index(spatial: tuple[int, ...], fixed: dict[int, int], shift: tuple[int, ...]) -> tuple[tuple, int, int]:
    """Where the rows of :func:`_rows` lie: an index fixing the axes in ``fixed`` and a flat range.

    A fixed axis's coordinate may be ``-1`` or ``-2``: as an index it counts from the end, where the
    padding is. The free axes are flattened over their padded extents after :func:`_lead` zeros and
    cut to the span between the first and the last voxel; a shift of at most the margin on each
    free axis then stays inside the flat rows, so it is a plain offset (a view, no copy).
    """
    index: list[slice | int] = [slice(None)]
    for i in range(len(spatial)):
        index.append(fixed[i] + shift[i] if i in fixed else slice(None))
    free = [i for i in range(len(spatial)) if i not in fixed]
    if not free:
        return tuple(index), 0, 1
    extents = _extents(spatial)
    strides = _flat_strides(tuple(extents[i] for i in free))
    first = _lead([extents[i] for i in free])
    last = first + sum((spatial[i] - 1) * s for i, s in zip(free, strides))
    offset = sum(shift[i] * s for i, s in zip(free, strides))
    return tuple(index), first + offset, last + offset + 1


def _rows(
    padded: torch.Tensor, spatial: tuple[int, ...], where: tuple[tuple, int, int], planes: dict[tuple, torch.Tensor] | None = None
) -> torch.Tensor:
    """``(channels, L)`` rows of a sample padded by :func:`_pad` at a place given by :func:`_rows_index`.

    ``planes``, when given, keeps the flattened plane (or line) of each index for the next place on
    it, as a contiguous copy: a few dozen planes serve hundreds of products, and a plane across the
    innermost axis is otherwise a view whose rows step by a whole line, with which each product
    took 6x as long (about 9 of 76 ms at 32 channels and 32^3).
    """
    index, lo, hi = where
    if all(isinstance(i, slice) for i in index):
        return padded[:, lo:hi]
    key = tuple(i if isinstance(i, int) else None for i in index)
    if planes is None or key not in planes:
        extents = _extents(spatial)
        volume = padded[:, _lead(extents) :].view(padded.shape[0], *extents)
        free = [e for e, i in zip(extents, index[1:]) if isinstance(i, slice)]
        plane = F.pad(volume[index].reshape(padded.shape[0], -1), (_lead(free), 0))
        if planes is None:
            return plane[:, lo:hi]
        planes[key] = plane
    return planes[key][:, lo:hi]


def _excluded_planes(tap: tuple[int, ...], spatial: tuple[int, ...]) -> list[tuple[int, int]]:
    """The ``(axis, plane)`` pairs a tap does not read: the last plane for tap 0, the first for tap 2."""
    return [(i, spatial[i] - 1 if k == 0 else 0) for i, k in enumerate(tap) if k != 1]


def _inclusion_exclusion(planes: list[tuple[int, int]]) -> Iterator[tuple[float, tuple[tuple[int, int], ...]]]:
    for r in range(len(planes) + 1):
        for subset in itertools.combinations(planes, r):
            yield (-1.0) ** r, tuple(subset)


@dataclass(frozen=True)
class _Plan:
    """Which region products a volume size needs, and how they add up to the Gram blocks.

    Attributes:
        products: how many region products there are.
        whole: the products over the whole volume, grouped by their shift on the outer axes: per
            group that shift's flat offset, the ``(inner shift + _MARGIN, slot)`` of each product,
            and those two as index tensors.
        direct: the products over planes, each as its slot among the products and the places of its
            two row sets (:func:`_rows_index`).
        gathered: the products over lines and corners (hundreds, a few dozen rows each), grouped by
            their first row set: per group its place, the slots of its products, and
            ``(products, rows)`` flat indices into the padded sample of each product's second row
            set, so that a group is one matrix product.
        assembly: sparse ``(pairs, products)`` matrix of the signs with which region products add
            up to the upper Gram blocks (pairs in ``triu_indices`` order).
        sums: per region sum of the input, its place.
        tap, summand, sum_sign: ``x_sum[tap[i]] += sum_sign[i] * sums[summand[i]]``.
        taps: the kernel taps, row-major.
        tap_groups: the kernel taps grouped as ``whole`` is, by their offset ``k - 1`` on the outer
            axes: per group its flat offset, the ``(inner offset + _MARGIN, tap)`` of each tap, and
            those two as index tensors.
    """

    products: int
    whole: tuple
    direct: tuple
    gathered: tuple
    assembly: torch.Tensor
    sums: tuple
    tap: torch.Tensor
    summand: torch.Tensor
    sum_sign: torch.Tensor
    taps: tuple
    tap_groups: tuple


def _flat_positions(spatial: tuple[int, ...], where: tuple[tuple, int, int]) -> torch.Tensor:
    """The flat positions in a sample padded by :func:`_pad` of the rows :func:`_rows` reads at ``where``.

    The same as reading a volume of flat positions with :func:`_rows`, without making that volume
    (int64 of the padded size: 0.2 GB at 512x512x100): only the selected line or corner is formed.
    A fixed coordinate of ``-1`` or ``-2`` and the free axes' leading zeros land on zeros of the
    padded sample, as :func:`_rows` reads them.
    """
    index, lo, hi = where
    extents = _extents(spatial)
    positions = torch.tensor(_lead(extents), dtype=torch.int64)
    free = []
    for axis, (place, stride) in enumerate(zip(index[1:], _flat_strides(extents))):
        along = torch.arange(extents[axis]) if isinstance(place, slice) else torch.tensor([place])
        shape = [1] * len(extents)
        shape[axis] = -1
        positions = positions + (along * stride).reshape(shape)
        if isinstance(place, slice):
            free.append(extents[axis])
    lead = torch.zeros(_lead(free), dtype=torch.int64)  # position 0 is in the sample's leading zeros
    return torch.cat([lead, positions.reshape(-1)])[lo:hi]


@functools.lru_cache(maxsize=64)
def _plan(spatial: tuple[int, ...]) -> _Plan:
    nd = len(spatial)
    taps = tuple(itertools.product(range(3), repeat=nd))
    zero = (0,) * nd
    products: dict[tuple, int] = {}
    pair, product, sign = [], [], []
    sums: dict[tuple, int] = {}
    tap, summand, sum_sign = [], [], []
    rows, cols = torch.triu_indices(len(taps), len(taps), device="cpu").tolist()
    for p, (a, b) in enumerate(zip(rows, cols)):
        shift = tuple(q - r for r, q in zip(taps[a], taps[b]))
        for sgn, subset in _inclusion_exclusion(_excluded_planes(taps[a], spatial)):
            pair.append(p)
            product.append(products.setdefault((shift, subset), len(products)))
            sign.append(sgn)
    for a, ka in enumerate(taps):
        for sgn, subset in _inclusion_exclusion(_excluded_planes(ka, spatial)):
            tap.append(a)
            summand.append(sums.setdefault(subset, len(sums)))
            sum_sign.append(sgn)
    # Made on the CPU whatever the default device (the plan is cached); moved where the data is.
    cpu, f64 = torch.device("cpu"), torch.float64
    outer_strides = _flat_strides(_extents(spatial))[:-1]

    def by_outer_shift(shifts: dict[int, tuple[int, ...]]) -> tuple:
        """Group ``key: shift`` by the shift's flat offset on the outer axes (see ``_Plan.whole``)."""
        grouped: dict[int, list[tuple[int, int]]] = {}
        for key, d in shifts.items():
            offset = sum(a * b for a, b in zip(d[:-1], outer_strides))
            grouped.setdefault(offset, []).append((d[-1] + _MARGIN, key))
        return tuple(
            (offset, tuple(members), *(torch.tensor(t, device=cpu) for t in zip(*members)))
            for offset, members in grouped.items()
        )

    whole = by_outer_shift({slot: shift for slot, (shift, fixed) in enumerate(products) if not fixed})
    direct, groups = [], {}
    for slot, (shift, fixed) in enumerate(products):
        if not fixed:
            continue
        one, other = _rows_index(spatial, dict(fixed), zero), _rows_index(spatial, dict(fixed), shift)
        if len(fixed) < 2:
            direct.append((slot, one, other))
        else:
            _, slots, index = groups.setdefault(fixed, (one, [], []))
            slots.append(slot)
            index.append(_flat_positions(spatial, other))
    gathered = tuple((one, torch.tensor(slots, device=cpu), torch.stack(index)) for one, slots, index in groups.values())
    return _Plan(
        len(products),
        whole,
        tuple(direct),
        gathered,
        torch.sparse_coo_tensor(
            [pair, product], sign, (len(rows), len(products)), dtype=f64, device=cpu, check_invariants=True
        ).coalesce(),
        tuple(_rows_index(spatial, dict(fixed), zero) for fixed in sums),
        torch.tensor(tap, device=cpu), torch.tensor(summand, device=cpu), torch.tensor(sum_sign, dtype=f64, device=cpu),
        taps,
        by_outer_shift({a: tuple(k - 1 for k in ka) for a, ka in enumerate(taps)}),
    )


def _inner_shifts(padded: torch.Tensor) -> torch.Tensor | None:
    """A padded sample's rows at each shift along the innermost axis, stacked (``None`` past :data:`_STACK_ELEMENTS`).

    Row ``j * C + c``, column ``p`` holds ``padded[c, p + j]``: rows that start at column ``p`` of
    the sample, shifted by ``d`` on the innermost axis, start at column ``p - _MARGIN`` of block
    ``d + _MARGIN``. One product of a ``(5C, L)`` stack with ``(C, L)`` rows replaces five
    ``(C, L)`` ones: at 32 channels MKL's ``C x C`` products ran at 190 GFLOP/s and the stacked ones
    at 250 (both on 2 Xeon cores), with the same bits there.
    """
    t = padded.shape[1]
    if _INNER * padded.numel() > _STACK_ELEMENTS:
        return None
    return torch.cat([padded[:, j : t - _INNER + 1 + j] for j in range(_INNER)])


def _shifted_products(
    rows: torch.Tensor, padded: torch.Tensor, stack: torch.Tensor | None, start: int, members: tuple, js: torch.Tensor
) -> torch.Tensor:
    """``(k, R, C)`` products ``rows X_dᵀ`` of ``(R, L)`` rows with the sample's rows at each inner shift.

    Args:
        rows: the first row set.
        padded: the ``(C, ·)`` sample padded by :func:`_pad`.
        stack: :func:`_inner_shifts` of ``padded``, or ``None`` (the products are then made one by one).
        start: where the second row set starts in ``padded`` at no inner shift.
        members: the group's ``(inner shift + _MARGIN, key)`` pairs.
        js: their inner shifts plus ``_MARGIN`` as an index tensor on the data's device.

    Returns:
        the products in the order of ``members``.
    """
    c, length = padded.shape[0], rows.shape[1]
    if length > _SPAN:
        # A product this narrow (a few dozen outputs) over a whole volume adds its terms one after
        # another in float32; over the constant background of a scan that drifted by 2e-4 of the sum
        # (an im2col Gram, blocked by its BLAS, by 1e-6). Spans of _SPAN voxels, added in float64, do not.
        total = None
        for lo in range(0, length, _SPAN):
            span = min(_SPAN, length - lo)
            part = _shifted_products(rows[:, lo : lo + span], padded, stack, start + lo, members, js).double()
            total = part if total is None else total.add_(part)
        return total.to(rows.dtype)
    if stack is None:
        return torch.stack([rows @ padded[:, start + j - _MARGIN : start + j - _MARGIN + length].T for j, _ in members])
    first, last = min(j for j, _ in members), max(j for j, _ in members) + 1
    # only the blocks of the shifts asked for, and the stack first (the wide operand, as for the lines)
    blocks = stack[first * c : last * c, start - _MARGIN : start - _MARGIN + length]
    return (blocks @ rows.T).reshape(last - first, c, rows.shape[0])[js - first].transpose(1, 2)


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
    plan = _plan(spatial)
    kk = len(plan.taps)
    dev, f64 = inputs.device, torch.float64
    # Each sample's sums are float32 products, as im2col's chunks are; they add up in float64.
    upper = torch.zeros(kk * (kk + 1) // 2, c, c, dtype=f64, device=dev)
    yx = torch.zeros(m, c, kk, dtype=f64, device=dev)
    xs = torch.zeros(c, kk, dtype=f64, device=dev)
    whole = _rows_index(spatial, {}, (0,) * nd)
    assembly = plan.assembly.to(device=dev, dtype=torch.float32)
    gathered = [(one, slots.to(dev), index.to(dev)) for one, slots, index in plan.gathered]
    whole_groups, tap_groups = (
        [(offset, members, js.to(dev), keys.to(dev)) for offset, members, js, keys in groups]
        for groups in (plan.whole, plan.tap_groups)
    )
    for b in range(n_batch):
        x = _pad(inputs[b].float())
        products = torch.empty(plan.products, c, c, dtype=x.dtype, device=dev)
        planes: dict[tuple, torch.Tensor] = {}
        stack = _inner_shifts(x)
        x0 = _rows(x, spatial, whole)
        for offset, members, js, slots in whole_groups:
            products[slots] = _shifted_products(x0, x, stack, whole[1] + offset, members, js)
        for slot, one, other in plan.direct:
            torch.mm(_rows(x, spatial, one, planes), _rows(x, spatial, other, planes).T, out=products[slot])
        for one, slots, index in gathered:
            k = index.shape[0]
            others = x[:, index].reshape(c * k, -1)  # (c, k, rows) as (c * k, rows)
            # the wide operand first: with it second, 5 to 11 channels gave other bits on 1 and 2 threads
            products[slots] = (others @ _rows(x, spatial, one, planes).T).reshape(c, k, c).permute(1, 2, 0)
        upper += torch.sparse.mm(assembly, products.reshape(len(products), -1)).reshape(upper.shape)
        region_sums = torch.stack([_rows(x, spatial, place).sum(1) for place in plan.sums]).to(f64)
        xs.index_add_(1, plan.tap.to(dev), (region_sums[plan.summand.to(dev)] * plan.sum_sign.to(dev)[:, None]).T)
        # Σ_v y[v] x[v + k - 1]ᵀ: the target padded like the input, so a tap is a flat offset.
        rows_y = _rows(_pad(targets[b].float()), spatial, whole)
        for offset, members, js, taps in tap_groups:
            yx[:, :, taps] += _shifted_products(rows_y, x, stack, whole[1] + offset, members, js).permute(1, 2, 0)
    rows, cols = torch.triu_indices(kk, kk, device=dev)
    n = c * kk
    # Blocks laid out tap by tap, where each is one contiguous copy, then one permuted copy into
    # the column order: a scatter straight into that order took 5x as long at n = 3456.
    blocks = torch.empty(kk, kk, c, c, dtype=f64, device=dev)
    blocks[rows, cols] = upper
    blocks[cols, rows] = upper.transpose(1, 2)
    xx = blocks.permute(2, 0, 3, 1).reshape(n, n)
    # One float32 sum per sample, added in float64 like the products: the same sums however the
    # samples are batched (or spread over ranks).
    t = targets.float()
    per_sample = tuple(range(1, 1 + nd))
    y_sum = torch.stack([t[b].sum(dim=per_sample) for b in range(n_batch)]).to(f64).sum(0)
    yy = torch.stack([t[b].pow(2).sum(dim=per_sample) for b in range(n_batch)]).to(f64).sum(0)
    return xx[None], yx.reshape(1, m, n), xs.reshape(1, n), y_sum[None], yy[None]


def voxel_columns(inputs: torch.Tensor, voxels: torch.Tensor) -> torch.Tensor:
    """The im2col columns of some output voxels of one sample, in the column order of :func:`shifted_sums`.

    Gathered straight from the zero-padded input (tap ``k`` of voxel ``v`` reads ``x[v + k - 1]``), so
    only the columns asked for are formed, not those of every voxel.

    Args:
        inputs: ``(C, *spatial)`` one sample's layer input (unpadded).
        voxels: ``(S,)`` flat (row-major) indices of output voxels.

    Returns:
        ``(S, C 3^nd)`` float32 columns, column ``c * 3^nd + k`` for channel ``c`` at tap ``k``.
    """
    c, spatial = inputs.shape[0], tuple(inputs.shape[1:])
    nd = len(spatial)
    padded = F.pad(inputs.float(), (1, 1) * nd).reshape(c, -1)
    strides = _flat_strides(tuple(s + 2 for s in spatial))
    coords = torch.unravel_index(voxels, spatial)
    base = sum(coord * stride for coord, stride in zip(coords, strides))
    taps = torch.tensor(
        [sum(k * stride for k, stride in zip(tap, strides)) for tap in itertools.product(range(3), repeat=nd)],
        device=voxels.device,
    )
    return padded[:, base[:, None] + taps[None, :]].permute(1, 0, 2).reshape(voxels.numel(), -1)
