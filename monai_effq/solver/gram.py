"""Streaming normal equations of one layer: ``A = 2 Σ h x xᵀ`` and ``B = 2 Σ h y xᵀ``.

Every solver method works from these sums. The bias is eliminated in closed form (for fixed
weights the least-squares bias is ``b = ȳ - W x̄`` with h-weighted means), which leaves the centred
matrices ``A_c`` and ``B_c``; the weighted output error of any weight matrix ``W`` is then
``tr(W A_c Wᵀ)/2 - tr(W B_cᵀ) + const``, a function of the sums alone.

The weighted sums are products of im2col columns, but for a stride-1 "same" 3x3(x3) convolution:
there they are its unweighted sums from shifted products (:mod:`monai_effq.solver.shifted_sums`)
plus the im2col products of the voxels whose weight is not 1, which class attention makes few.
Those of a strided transposed convolution are mostly the zeros its stride inserts, so its output
voxels are taken by parity class (:meth:`~monai_effq.solver.layers.LayerView.iter_parity_chunks`),
whose columns hold only the taps that read input samples, and their products go into those taps'
rows and columns of the sums.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from monai_effq.solver.layers import LayerView, PatchChunk
from monai_effq.solver.shifted_sums import shifted_sums, supports_shifted_sums, voxel_columns

__all__ = ["GramAccumulator", "LayerStatistics", "NearbyError", "SumBounds", "symmetric_gram"]


@dataclass
class LayerStatistics:
    """Sufficient statistics of one layer's least-squares problem (per group).

    Attributes:
        A: ``(G, n, n)`` centred ``2 Σ h x xᵀ`` (float32).
        B: ``(G, m, n)`` centred ``2 Σ h y xᵀ`` (float32).
        x_mean: ``(G, n)`` h-weighted mean input column.
        y_mean: ``(G, m)`` h-weighted mean target.
        y_energy: ``(G, m)`` centred ``Σ h (y - ȳ)²`` per output channel (float64).
        weight_sum: ``Σ h``.
        voxels: number of output voxels seen.
        factor: ``(G, n, V)`` with ``A = 2 F Fᵀ`` when fewer voxels than columns were seen, else ``None``.
        A64: centred ``A`` in float64, for exact error figures.
        B64: centred ``B`` in float64.
        effective_voxels: ``(Σ h)² / Σ h²``, the number of equally weighted voxels worth as much
            data as the weighted ones (equals ``voxels`` without attention).
    """

    A: torch.Tensor
    B: torch.Tensor
    x_mean: torch.Tensor
    y_mean: torch.Tensor
    y_energy: torch.Tensor
    weight_sum: float
    voxels: int
    factor: torch.Tensor | None
    A64: torch.Tensor
    B64: torch.Tensor
    effective_voxels: float = 0.0

    @property
    def out_channels(self) -> int:
        """Total output channels over all groups."""
        return self.B.shape[0] * self.B.shape[1]

    def bias_for(self, weight: torch.Tensor) -> torch.Tensor:
        """Least-squares bias for fixed weights.

        Args:
            weight: ``(G, m, n)`` weights.

        Returns:
            ``(G, m)`` bias.
        """
        return self.y_mean - torch.einsum("gmn,gn->gm", weight.to(self.y_mean.dtype), self.x_mean)

    def weighted_mse(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> float:
        """Exact h-weighted output MSE ``Σ h ||W x + b - y||² / (Σ h · c_out)`` (float64).

        Args:
            weight: ``(G, m, n)`` weights.
            bias: ``(G, m)`` bias; the least-squares bias when ``None``.

        Returns:
            the weighted mean squared error.
        """
        w = weight.to(torch.float64)
        quad = (w * (0.5 * torch.bmm(w, self.A64) - self.B64)).sum()
        err = quad + self.y_energy.sum()
        if bias is not None:
            # With a bias other than the least-squares one, add Σh |b - b*|² per channel.
            diff = bias.to(torch.float64) - self.bias_for(weight).to(torch.float64)
            err = err + self.weight_sum * diff.pow(2).sum()
        return max(float(err), 0.0) / (self.weight_sum * self.out_channels)

    def error_near(self, anchor: torch.Tensor) -> NearbyError:
        """A cheaper :meth:`weighted_mse` for weights close to ``anchor`` (e.g. quantizations of it).

        Args:
            anchor: ``(G, m, n)`` weights (the full-precision ones).

        Returns:
            the :class:`NearbyError`.
        """
        return NearbyError(self, anchor)


class NearbyError:
    """:meth:`LayerStatistics.weighted_mse` of many weight matrices ``W = W0 + D`` near one anchor.

    The quadratic is expanded about ``W0``: ``q(W) = q(W0) + Σ D∘(W0 A - B) + ½ Σ D∘(D A)``. The
    anchor's terms are float64 and paid once; each ``W`` then costs one float32 product ``D A``,
    precise because ``D`` is small (a float64 product costs three times as much).

    Args:
        stats: the layer's statistics.
        anchor: ``(G, m, n)`` the anchor ``W0``.
    """

    def __init__(self, stats: LayerStatistics, anchor: torch.Tensor) -> None:
        self.stats = stats
        self.anchor = anchor.to(torch.float64)
        w0a = torch.bmm(self.anchor, stats.A64)
        self.residual = w0a - stats.B64
        self.quad = float((self.anchor * (0.5 * w0a - stats.B64)).sum())

    def __call__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> float:
        """Weighted output MSE of ``weight`` (and ``bias``; the least-squares bias when ``None``)."""
        st = self.stats
        d = weight.to(torch.float64) - self.anchor
        if d.any():
            da = torch.bmm(d.float(), st.A).double()
            err = self.quad + float((d * (self.residual + 0.5 * da)).sum()) + float(st.y_energy.sum())
        else:  # the anchor itself (the FP weights' figure): D A and the sum it enters are zeros
            err = self.quad + 0.0 + float(st.y_energy.sum())
        if bias is not None:
            diff = bias.to(torch.float64) - st.bias_for(weight).to(torch.float64)
            err = err + st.weight_sum * float(diff.pow(2).sum())
        return max(err, 0.0) / (st.weight_sum * st.out_channels)


def symmetric_gram(xh: torch.Tensor, x: torch.Tensor, block: int = 512) -> torch.Tensor:
    """``xhᵀ x`` for ``xh = h ∘ x``, a symmetric ``(G, n, n)`` product, computing only its upper blocks.

    Blocks of ``block`` rows are multiplied against the columns from their diagonal on and mirrored,
    which does a little over half the multiply-adds of the full product (measured 1.9x faster for
    ``n = 3457``).

    Args:
        xh: ``(G, voxels, n)`` weighted columns.
        x: ``(G, voxels, n)`` columns.
        block: rows per block.

    Returns:
        the ``(G, n, n)`` product.
    """
    n = x.shape[-1]
    if n <= block:
        return torch.bmm(xh.transpose(1, 2), x)
    out = torch.empty(x.shape[0], n, n, dtype=x.dtype, device=x.device)
    for i in range(0, n, block):
        end = min(i + block, n)
        out[:, i:end, i:] = torch.bmm(xh[:, :, i:end].transpose(1, 2), x[:, :, i:])
        out[:, end:, i:end] = out[:, i:end, end:].transpose(1, 2)
    return out


def _weighted_parts(x: torch.Tensor, y: torch.Tensor, h: torch.Tensor) -> dict[str, torch.Tensor]:
    """The float64 sums ``Σ h x xᵀ``, ``Σ h y xᵀ``, ``Σ h x``, ``Σ h y`` and ``Σ h y²`` of ``(G, V, ·)`` columns."""
    xh = x * h[None, :, None]
    yh = y * h[None, :, None]
    return {
        "xx": symmetric_gram(xh, x).double(),
        "yx": torch.bmm(yh.transpose(1, 2), x).double(),
        "x": xh.sum(1).double(),
        "y": yh.sum(1).double(),
        "yy": (yh * y).sum(1).double(),
    }


@dataclass
class _Blocks:
    """A part that is zero outside blocks at disjoint column subsets: per subset its columns and values.

    Attributes:
        square: the blocks lie on rows and columns (``xx``); otherwise on the last axis only.
        blocks: ``(key, columns, values)`` per subset, ``key`` the columns' bytes.
    """

    square: bool
    blocks: list[tuple[bytes, torch.Tensor, torch.Tensor]]

    def add_into(self, target: torch.Tensor) -> None:
        """``target += self`` as a dense tensor would add (the entries outside the blocks add zero)."""
        for _, columns, values in self.blocks:
            if self.square:
                target[:, columns[:, None], columns[None, :]] += values
            else:
                target[..., columns] += values


class _ScatteredParts:
    """The float64 parts of one window's sums from chunks that hold a subset of the columns each.

    A chunk's products land in the rows and columns of its subset; the other entries of its voxels'
    outer products are zero, so nothing else is added. The subsets (a transposed convolution's
    parity classes) are disjoint, so each subset's sums are kept compact, added chunk by chunk in
    the order the chunks come, and handed to :class:`_Sums` once per window as :class:`_Blocks`:
    the same float64 additions a dense part would make, without a dense ``n x n`` part per window
    (on the real-data UNet of ``benchmarks/accuracy.py``, allocating, scattering and rounding those
    took about 1.9 of 17.5 s; kept compact, the whole quantization ran 17.9 -> 16.7 s).

    Args:
        n: columns per group (the parts follow their chunks' shapes, dtype and device).
    """

    def __init__(self, n: int) -> None:
        self._n = n
        # per column subset, its columns and running sums, made on its first chunk: most windows'
        # held-out parts get none (whole windows are held out)
        self._subsets: dict[bytes, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
        self._taken: torch.Tensor | None = None  # the columns some subset holds
        self._outputs: dict[str, torch.Tensor] = {}  # the y and yy parts, which every chunk adds to
        self.h, self.h2, self.voxels = 0.0, 0.0, 0

    def add(self, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, columns: torch.Tensor) -> None:
        """Add one chunk of voxels that read only some of the layer's columns.

        Args:
            x: ``(G, V, len(columns))`` the voxels' values in those columns.
            y: ``(G, V, m)`` their targets.
            h: ``(V,)`` their weights.
            columns: the distinct columns of the layer that ``x`` holds, in its order.

        Raises:
            RuntimeError: where this subset overlaps another one of the window (the layer's parity
                classes are disjoint by construction; an overlap is a bug).
        """
        part = _weighted_parts(x, y, h)
        key = columns.cpu().numpy().tobytes()
        if key not in self._subsets:
            if self._taken is None:
                self._taken = torch.zeros(self._n, dtype=torch.bool, device=columns.device)
            if bool(self._taken[columns].any()):
                raise RuntimeError("the column subsets of one window's chunks overlap; this is a bug in monai_effq.")
            self._taken[columns] = True
            self._subsets[key] = (columns, {k: torch.zeros_like(part[k]) for k in ("xx", "yx", "x")})
            self._outputs = self._outputs or {k: torch.zeros_like(part[k]) for k in ("y", "yy")}
        _, sums = self._subsets[key]
        for name, total in (*sums.items(), *self._outputs.items()):
            total += part[name]
        self.h += float(h.double().sum())
        self.h2 += float(h.double().pow(2).sum())
        self.voxels += h.numel()

    @property
    def parts(self) -> dict[str, torch.Tensor | _Blocks]:
        """The window's parts: ``xx``, ``yx`` and ``x`` as :class:`_Blocks`, ``y`` and ``yy`` dense."""
        subsets = list(self._subsets.items())
        blocks = {name: _Blocks(name == "xx", [(key, columns, sums[name]) for key, (columns, sums) in subsets]) for name in ("xx", "yx", "x")}
        return {**blocks, **self._outputs}


@dataclass(frozen=True)
class SumBounds:
    """Upper bounds of a layer's calibration data that every process agrees on, for exact sums.

    Given them, :class:`GramAccumulator` rounds each window's contribution to a fixed-point grid
    (a power of two per sum, set by these bounds) and adds the integers in int64: integer addition
    is exact, so the sums do not depend on how windows are grouped into batches, chunks or ranks.

    Attributes:
        voxels: output voxels of the layer over all calibration windows.
        weight: the largest voxel weight (1 without weights).
        inputs: the largest ``|input|`` of the layer.
        targets: the largest ``|target|`` of the layer.
    """

    voxels: int
    weight: float
    inputs: float
    targets: float

    # Bits above the bounds' grid kept free: sums up to 2**HEADROOM times the bound still fit in
    # int64, e.g. inputs 64x larger than ``inputs`` (the quantized network's inputs are close to,
    # not equal to, the full-precision ones the bounds come from).
    HEADROOM = 12

    def exponents(self) -> dict[str, int]:
        """Per sum, the ``k`` of its grid ``2**-k``: the bound scaled by ``2**k`` is below ``2**(62 - HEADROOM)``."""
        v, h, x, y = float(self.voxels), float(self.weight), float(self.inputs), float(self.targets)
        bounds = {
            "xx": v * h * x * x, "yx": v * h * y * x, "x": v * h * x, "y": v * h * y, "yy": v * h * y * y,
            "h": v * h, "h2": v * h * h,
        }  # fmt: skip

        def exponent(bound: float) -> int:
            top = math.frexp(bound)[1] if bound > 0 and math.isfinite(bound) else 0  # bound < 2**top
            return max(-900, min(900, 62 - self.HEADROOM - top))

        return {name: exponent(bound) for name, bound in bounds.items()}


_FIELDS = ("xx", "yx", "x", "y", "yy")
_LIMIT = 2.0**62  # an int64 sum of parts whose magnitudes add up to less than this cannot overflow
_EXACT = 2.0**53  # float64 adds integers exactly while their magnitudes add up to less than this
# sizes of a sample from which its weighted sums are taken from shifted products (shifted_products_pay)
SHIFTED_MIN_VOXELS = 24**3
SHIFTED_MIN_VALUES = 2**15


def shifted_products_pay(voxels: int, channels: int) -> bool:
    """Whether a sample's weighted sums are taken from shifted products rather than im2col.

    Shifted products spend most of their time on planes, lines and corners in small samples, and
    those products are too small to gain from a second thread. Measured on a 2-core AMD EPYC (avx2),
    two samples with a tenth of their voxels weighted otherwise than 1, shifted against im2col: on one
    thread 0.45x at 8 channels and 12^3 voxels, 2.65x at 24^3; 1.46x at 32 channels and 12^3, 3.2x at
    24^3. On two threads with OpenMP's passive waiting (``OMP_WAIT_POLICY=PASSIVE``) one sample of 16
    channels: 1.1x slower at 24^3, 2.4x faster at 48^3; with its default waiting 3x faster at 24^3.
    The bar does not depend on the thread count, so the sums, and the codes solved from them, are
    the same on any number of threads.

    Args:
        voxels: the sample's output voxels.
        channels: its input channels.

    Returns:
        ``True`` from 24^3 voxels and 2^15 input values on.
    """
    return voxels >= SHIFTED_MIN_VOXELS and voxels * channels >= SHIFTED_MIN_VALUES


@dataclass
class _Sums:
    """Running sums of one set of voxels: float64, or int64 on the fixed-point grids of ``exponents``."""

    xx: torch.Tensor
    yx: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    yy: torch.Tensor
    h: float | int = 0
    h2: float | int = 0
    voxels: int = 0
    exponents: dict[str, int] | None = None
    # the sum of every part's largest |integer| per sum: a bound on |any running integer sum|
    magnitude: dict[str, float] = field(default_factory=dict)
    # integer-valued float64 sums not yet moved into the int64 ones (and their magnitudes), which
    # spares most parts the conversion to int64
    pending: dict[str, torch.Tensor] = field(default_factory=dict)
    # the same for parts in blocks (_Blocks), kept compact per column subset until they settle:
    # per sum, per subset key, its columns and integers
    pending_blocks: dict[str, dict[bytes, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    pending_magnitude: dict[str, float] = field(default_factory=dict)
    # set once a sum outgrew its grid and moved to a coarser one (see _coarsen)
    coarsened: bool = False

    @classmethod
    def zeros(cls, g: int, n: int, m: int, device: torch.device | str = "cpu", exponents: dict[str, int] | None = None) -> _Sums:
        dtype = torch.float64 if exponents is None else torch.int64

        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(z(g, n, n), z(g, m, n), z(g, n), z(g, m), z(g, m), exponents=exponents)

    def _put(self, parts: dict[str, torch.Tensor | _Blocks], h: float, h2: float, voxels: int) -> None:
        """Add float64 parts (and the weight sums), exactly on the grids when there are grids."""
        if self.exponents is None:
            for name, part in parts.items():
                if isinstance(part, _Blocks):
                    part.add_into(getattr(self, name))
                else:
                    getattr(self, name).add_(part)
            self.h += h
            self.h2 += h2
        else:
            for name, part in parts.items():
                ints, size = self._fixed(name, part)
                if self.pending_magnitude.get(name, 0.0) + size >= _EXACT:
                    self.settle()
                if isinstance(ints, _Blocks):
                    held = self.pending_blocks.setdefault(name, {})
                    for key, columns, values in ints.blocks:
                        if key in held:
                            held[key][1].add_(values)
                        else:
                            held[key] = (columns, values)
                elif name in self.pending:
                    self.pending[name].add_(ints)
                else:
                    self.pending[name] = ints
                self.pending_magnitude[name] = self.pending_magnitude.get(name, 0.0) + size
            self.h += int(self._fixed("h", torch.tensor(h, dtype=torch.float64))[0])
            self.h2 += int(self._fixed("h2", torch.tensor(h2, dtype=torch.float64))[0])
        self.voxels += voxels

    def settle(self) -> _Sums:
        """Move the pending float64 integers into the int64 sums (before they are read or reduced)."""
        for name, ints in self.pending.items():
            getattr(self, name).add_(ints.to(torch.int64))
        for name, held in self.pending_blocks.items():
            blocks = [(key, columns, ints.to(torch.int64)) for key, (columns, ints) in held.items()]
            _Blocks(name == "xx", blocks).add_into(getattr(self, name))
        self.pending, self.pending_blocks, self.pending_magnitude = {}, {}, {}
        return self

    def _fixed(self, name: str, part: torch.Tensor | _Blocks) -> tuple[torch.Tensor | _Blocks, float]:
        """``part`` on the grid of sum ``name``, as integer-valued float64, and its largest ``|value|``."""
        # A power of two scales exactly; rounding each part once is the only error. In place: the
        # parts are fresh float64 tensors, and the Gram parts are large.
        ints, size = self._scaled(part if isinstance(part, _Blocks) else part.double(), self.exponents[name])
        total = self.magnitude.get(name, 0.0) + size
        if not total < _LIMIT:
            # The data outgrew the bounds by more than 2**HEADROOM (a quantized network far from its
            # full-precision one): a coarser grid keeps the run going, at the price of exactness
            # across groupings, which reduce() refuses.
            bits = math.frexp(total / (_LIMIT / 4))[1]
            self._coarsen(name, bits)
            ints, size = self._scaled(ints, -bits)
        self.magnitude[name] = self.magnitude.get(name, 0.0) + size
        return ints, size

    @staticmethod
    def _scaled(part: torch.Tensor | _Blocks, exponent: int) -> tuple[torch.Tensor | _Blocks, float]:
        if isinstance(part, _Blocks):
            # the entries outside the blocks are zeros, which neither scaling nor the largest |value| sees
            sizes = [_Sums._scaled(values, exponent)[1] for _, _, values in part.blocks]
            return part, max(sizes, default=0.0)
        ints = part.mul_(2.0**exponent).round_()
        size = 0.0
        if ints.numel():
            low, high = torch.aminmax(ints)
            size = max(-float(low), float(high))
        return ints, size

    def _coarsen(self, name: str, bits: int) -> None:
        """Move sum ``name`` to a grid ``2**bits`` times coarser, rounding its integers once more."""
        if bits <= 0:
            return
        self.settle()
        self.exponents = {**self.exponents, name: self.exponents[name] - bits}  # the dict may be shared
        half = 1 << (bits - 1)
        if name in ("h", "h2"):
            setattr(self, name, (getattr(self, name) + half) >> bits)
        else:
            getattr(self, name).add_(half).bitwise_right_shift_(bits)  # round half up; |sum| < 2**62
        self.magnitude[name] = self.magnitude.get(name, 0.0) / 2.0**bits + 1.0
        self.coarsened = True

    def add(self, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor) -> None:
        self._put(_weighted_parts(x, y, h), float(h.double().sum()), float(h.double().pow(2).sum()), h.numel())

    def add_scattered(self, parts: _ScatteredParts) -> None:
        """Add a window's parts gathered chunk by chunk (:class:`_ScatteredParts`), as one part."""
        if parts.voxels:
            self._put(parts.parts, parts.h, parts.h2, parts.voxels)

    def add_unweighted(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        voxels = targets.numel() // targets.shape[1]
        self._put(dict(zip(_FIELDS, shifted_sums(inputs, targets))), float(voxels), float(voxels), voxels)

    def minus(self, other: _Sums) -> _Sums:
        self.settle(), other.settle()
        if self.exponents is not None:
            for name, e in self.exponents.items():
                self._coarsen(name, e - other.exponents[name])
                other._coarsen(name, other.exponents[name] - e)
        return _Sums(self.xx - other.xx, self.yx - other.yx, self.x - other.x, self.y - other.y,
                     self.yy - other.yy, self.h - other.h, self.h2 - other.h2, self.voxels - other.voxels,
                     self.exponents, coarsened=self.coarsened or other.coarsened)

    def in_float64(self) -> _Sums:
        """These sums as float64 values (the integers off their grids)."""
        if self.exponents is None:
            return self
        self.settle()
        e = self.exponents
        scaled = [getattr(self, name).double() * 2.0 ** -e[name] for name in _FIELDS]
        return _Sums(*scaled, self.h * 2.0 ** -e["h"], self.h2 * 2.0 ** -e["h2"], self.voxels)


def _split_weights(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A chunk's voxel weights and those of its held-out part: ``(V,)`` weights hold nothing out,
    ``(V, 2)`` ones carry the held-out part in their second column."""
    if weights.dim() == 1:
        return weights, None
    return weights[:, 0], weights[:, 1]


def _fit_weights(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's voxel weights and those of its fitted part (all of them less the held-out ones)."""
    h, h_held = _split_weights(weights)
    return h, h if h_held is None else h - h_held


def _in_float64(chunk: PatchChunk) -> PatchChunk:
    """A chunk whose products are summed in float64.

    A transformer's attention outputs share a mean up to ~200 times their spread; centring float32
    products afterwards leaves errors of ~1e-7 x 200² of the Gram matrix, enough to make a
    rank-deficient one indefinite. A linear layer's products are few beside the convolutions', so
    float64 costs little there (shifting the inputs, possible without padding, would need a shift
    that every rank agrees on).
    """
    return dataclasses.replace(chunk, inputs=chunk.inputs.double(), targets=chunk.targets.double(), weights=chunk.weights.double())


def _add_chunk(chunk: PatchChunk, whole: _Sums | _ScatteredParts, held: _Sums | _ScatteredParts | None) -> None:
    """Add a chunk's voxels to ``whole``, and those with a held-out weight (its second weight column) to ``held``."""
    x, y = chunk.inputs, chunk.targets
    h, h_held = _split_weights(chunk.weights)
    columns = () if chunk.columns is None else (chunk.columns,)
    if h_held is not None:
        rows = torch.nonzero(h_held > 0).squeeze(1)
        if rows.numel():
            held.add(x[:, rows], y[:, rows], h_held[rows], *columns)
    whole.add(x, y, h, *columns)


class GramAccumulator:
    """Accumulates a layer's normal equations over calibration batches.

    Voxels marked as held out (``add_batch(..., holdout=mask)``) are summed apart as well, so the
    statistics of the fit part, of the held-out part and of everything are all available
    (:meth:`statistics`): a solution fitted on one part is scored on the other at no extra pass.

    Args:
        view: the layer's :class:`LayerView`.
        max_chunk_elements: cap on the elements of one unfolded chunk.
        keep_factor: keep the weighted im2col columns (for the low-rank solve) while fewer
            voxels than ``in_per_group`` have been seen.
        bounds: bounds of all the calibration data (:class:`SumBounds`); given, the sums are exact
            (fixed point, int64), so any grouping of the same windows into batches, or into
            accumulators later :meth:`reduce`-d together, gives bit-identical statistics. ``None``
            adds float64 sums in the order the batches come.

    Example::

        acc = GramAccumulator(layer_view(conv))
        acc.add_batch(x, y)
        stats = acc.statistics()
    """

    def __init__(
        self, view: LayerView, max_chunk_elements: int = 1 << 24, keep_factor: bool = True, bounds: SumBounds | None = None
    ) -> None:
        self.view = view
        self._exponents = None if bounds is None else bounds.exponents()
        self.max_chunk_elements = max_chunk_elements
        self._dims = (view.groups, view.in_per_group, view.out_per_group)
        self._all: _Sums | None = None  # made on the first batch's device
        self._held: _Sums | None = None
        self._columns: list[torch.Tensor] | None = [] if keep_factor else None
        self._sqrt_h: list[torch.Tensor] = []
        self._sqrt_h_fit: list[torch.Tensor] = []

    @property
    def voxels(self) -> int:
        """Output voxels accumulated so far."""
        return 0 if self._all is None else self._all.voxels

    @property
    def has_holdout(self) -> bool:
        """Whether any voxel with positive weight was held out."""
        return self._all is not None and self._held is not None and self._held.h > 0 and self._all.h - self._held.h > 0

    @torch.no_grad()
    def add_batch(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        voxel_weights: torch.Tensor | None = None,
        holdout: torch.Tensor | None = None,
    ) -> None:
        """Add a batch of the layer's inputs, target outputs and voxel weights.

        Args:
            inputs: the layer's input batch (as the quantized network computes it).
            targets: the full-precision network's output of this layer.
            voxel_weights: non-negative importance per output voxel, ``(N, *spatial)`` or
                ``(N, 1, *spatial)`` for convolutions, the leading shape for ``Linear``.
            holdout: boolean mask of the output voxels held out for validation, shaped like
                ``voxel_weights``; ``None`` holds out nothing.

        The statistics stay on the device of the first batch (the solve then runs there); later
        batches are moved to it.

        Raises:
            ValueError: on shape mismatches, non-finite values or negative weights.
        """
        self.view.check_shapes(inputs, targets)
        if self._all is None:
            self._all = _Sums.zeros(*self._dims, device=inputs.device, exponents=self._exponents)
        device = self._all.xx.device
        inputs, targets = inputs.to(device), targets.to(device)
        self.view.check_finite(inputs, targets)
        if voxel_weights is not None:
            voxel_weights = self.view.check_voxel_weights(voxel_weights, targets, "voxel_weights")
        if holdout is not None:
            held = self.view.check_voxel_weights(holdout, targets, "holdout") > 0
            h = torch.ones(held.shape, device=held.device) if voxel_weights is None else voxel_weights
            voxel_weights = torch.stack([h, h * held], dim=-1)
            if self._held is None:
                self._held = _Sums.zeros(*self._dims, device=device, exponents=self._exponents)
        inputs = inputs.detach().float()
        targets = targets.detach().float()
        if supports_shifted_sums(self.view):
            # Shifted products are 6x fewer multiply-adds than im2col, but keep no columns for the
            # low-rank form, which needs them while fewer voxels than columns have been seen.
            voxels = targets.numel() // targets.shape[1]
            past_factor = self._columns is None or self._all.voxels + voxels > self.view.in_per_group
            if past_factor and (voxel_weights is None or shifted_products_pay(voxels // targets.shape[0], inputs.shape[1])):
                self._columns, self._sqrt_h, self._sqrt_h_fit = None, [], []
                if voxel_weights is None:
                    for window in self._windows(inputs, targets):
                        self._all.add_unweighted(*window)
                else:
                    for b in range(inputs.shape[0]):
                        self._add_shifted_weighted(inputs[b], targets[b], voxel_weights[b])
                return
        chunks = (c for w in self._windows(inputs, targets, voxel_weights) for c in self.view.iter_chunks(*w, self.max_chunk_elements))
        if self.view.kind == "linear":
            chunks = (_in_float64(c) for c in chunks)
        if self.view.splits_by_parity:
            # Parity classes skip the inserted zeros (47x fewer multiply-adds for a 3D U-Net's
            # up-sampling); the dense columns are only unfolded for the low-rank form, while it lasts.
            # A dilated transposed convolution reads other taps and keeps the dense path below.
            voxels = targets.numel() // targets.shape[1]
            if self._columns is not None and self._all.voxels + voxels <= self.view.in_per_group:
                for chunk in chunks:
                    self._keep_columns(chunk.inputs, *_fit_weights(chunk.weights))
            else:
                self._columns, self._sqrt_h, self._sqrt_h_fit = None, [], []
            for window in self._windows(inputs, targets, voxel_weights):
                self._add_by_parity(*window)
            return
        for chunk in chunks:
            _add_chunk(chunk, self._all, self._held)
            if self._columns is not None:
                if self._all.voxels <= self.view.in_per_group:
                    self._keep_columns(chunk.inputs, *_fit_weights(chunk.weights))
                else:
                    self._columns = None
                    self._sqrt_h, self._sqrt_h_fit = [], []

    def _add_shifted_weighted(self, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> None:
        """Add one sample of a layer :func:`supports_shifted_sums` accepts, with voxel weights.

        Its weighted sums are its unweighted (shifted) sums plus ``Σ (h - 1) x xᵀ`` (and the same of
        the other sums) over the voxels whose weight is not 1, whose columns alone are gathered.
        A held-out part that is the whole sample has the same sums; a part of it is summed from its
        own voxels' gathered columns. Each part is put once, so its exact sums are the same
        whichever samples share the batch.

        Args:
            inputs: ``(C, *spatial)`` the sample's layer input.
            targets: ``(M, *spatial)`` its targets.
            weights: ``(*spatial)`` its voxel weights, or ``(*spatial, 2)`` with the held-out part's second.
        """
        voxels = targets[0].numel()
        weights = weights.reshape(voxels) if weights.dim() == targets.dim() - 1 else weights.reshape(voxels, -1)
        h, h_held = _split_weights(weights)
        parts = dict(zip(_FIELDS, shifted_sums(inputs[None], targets[None])))
        other = torch.nonzero(h != 1).squeeze(1)
        if other.numel():
            for name, value in self._gathered_parts(inputs, targets, other, h[other] - 1).items():
                parts[name] += value
        held = None
        if h_held is not None:
            rows = torch.nonzero(h_held > 0).squeeze(1)
            if rows.numel() and torch.equal(h_held, h):
                # _put rounds its parts in place
                held = ({name: part.clone() for name, part in parts.items()}, h_held[rows])
            elif rows.numel():
                held = (self._gathered_parts(inputs, targets, rows, h_held[rows]), h_held[rows])
        self._all._put(parts, float(h.double().sum()), float(h.double().pow(2).sum()), h.numel())
        if held is not None:
            held_parts, hs = held
            self._held._put(held_parts, float(hs.double().sum()), float(hs.double().pow(2).sum()), hs.numel())

    def _gathered_parts(self, inputs: torch.Tensor, targets: torch.Tensor, voxels: torch.Tensor, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """The float64 sums of :func:`_weighted_parts` over some voxels of one sample, their columns
        gathered (:func:`voxel_columns`) in chunks of at most ``max_chunk_elements``."""
        n = self._dims[1]
        rows = max(1, self.max_chunk_elements // n)
        ys = targets.reshape(targets.shape[0], -1)
        total: dict[str, torch.Tensor] = {}
        for start in range(0, voxels.numel(), rows):
            chunk = voxels[start : start + rows]
            part = _weighted_parts(voxel_columns(inputs, chunk)[None], ys[:, chunk].T[None], h[start : start + rows])
            for name, value in part.items():
                total[name] = total[name] + value if name in total else value
        return total

    def _keep_columns(self, x: torch.Tensor, h: torch.Tensor, h_fit: torch.Tensor) -> None:
        """Keep a chunk's dense columns and the square roots of its weights for the low-rank factor."""
        # float32 copies: a linear layer's chunks come in float64 for its sums, the factor stays float32
        self._columns.append(x.to(torch.float32, copy=True))
        self._sqrt_h.append(h.clamp_min(0).sqrt().float())
        self._sqrt_h_fit.append(h_fit.clamp_min(0).sqrt().float())

    def _add_by_parity(self, inputs: torch.Tensor, targets: torch.Tensor, voxel_weights: torch.Tensor | None) -> None:
        """Add one window (or batch, for float64 sums) through :meth:`LayerView.iter_parity_chunks`."""
        n = self._dims[1]
        whole = _ScatteredParts(n)
        held = None if self._held is None else _ScatteredParts(n)
        for chunk in self.view.iter_parity_chunks(inputs, targets, voxel_weights, self.max_chunk_elements):
            _add_chunk(chunk, whole, held)
        self._all.add_scattered(whole)
        if held is not None:
            self._held.add_scattered(held)

    def _windows(self, *tensors: torch.Tensor | None) -> list[tuple[torch.Tensor | None, ...]]:
        """The batch as it is summed: whole, or window by window for exact sums, so that each part
        added is the same whichever windows share its batch."""
        if self._exponents is None:
            return [tensors]
        return [tuple(None if t is None else t[b : b + 1] for t in tensors) for b in range(tensors[0].shape[0])]

    def statistics_bytes(self) -> int:
        """Bytes of the running sums (and their counts) that :meth:`reduce` hands over."""
        parts = [s for s in (self._all, self._held) if s is not None]
        return sum(sum(t.numel() for t in (s.xx, s.yx, s.x, s.y, s.yy)) * 8 + 3 * 8 for s in parts)

    def reduce(self, reduce_sum: Callable[[list[torch.Tensor]], int]) -> int:
        """Combine the sums with those of other accumulators of the same layer (other ranks' data).

        ``reduce_sum`` gets every sum and count as one list of one dtype (float64, or int64 for
        exact sums), in a fixed order, and must replace each tensor in place by its sum over the
        accumulators (e.g. one all-reduce); the statistics are then those of all their voxels
        together. Exact sums reduced this way equal those of one accumulator given every batch. The
        low-rank factor cannot be combined, so an accumulator that is reduced should be made with ``keep_factor=False``.

        Args:
            reduce_sum: sums a list of tensors in place; returns the bytes it communicated.

        Returns:
            what ``reduce_sum`` returned.

        Raises:
            ValueError: when no batch was added, or the accumulator keeps its low-rank factor.
        """
        if self._all is None:
            raise ValueError(f"no calibration data reached {self.view.name}: add at least one batch before reducing.")
        if self._columns is not None:
            raise ValueError(f"the accumulator of {self.view.name} keeps its low-rank factor, which cannot be reduced: make it with keep_factor=False.")
        parts = [s.settle() for s in (self._all, self._held) if s is not None]
        if any(p.coarsened for p in parts):
            # raised on the rank whose data outgrew the grid; torchrun then stops the other ranks
            raise ValueError(
                f"the inputs of {self.view.name} exceeded the full-precision bounds by more than "
                f"2**{SumBounds.HEADROOM}, so its sums moved to a coarser grid that other ranks do not "
                "share: quantize this configuration in one process, or check why the quantized network "
                "drifts this far from the full-precision one (e.g. an unsigned weight grid)."
            )
        tensors = [getattr(p, name) for p in parts for name in _FIELDS]
        dtype = self._all.xx.dtype
        counts = torch.tensor([[p.h, p.h2, p.voxels] for p in parts], dtype=dtype, device=self._all.xx.device)
        sent = reduce_sum(tensors + [counts])
        number = float if dtype == torch.float64 else int
        for p, (h, h2, voxels) in zip(parts, counts.tolist()):
            p.h, p.h2, p.voxels = number(h), number(h2), int(voxels)
        return sent

    def statistics(self, part: str = "all") -> LayerStatistics:
        """Centred normal equations of the voxels added so far.

        Args:
            part: ``"all"`` (every voxel), ``"fit"`` (those not held out) or ``"holdout"``.

        Returns:
            the layer's :class:`LayerStatistics` over that part.

        Raises:
            ValueError: when that part is empty (or has only zero-weight voxels), or for an unknown part.
        """
        if part not in ("all", "fit", "holdout"):
            raise ValueError(f"part must be 'all', 'fit' or 'holdout', got {part!r}.")
        if self._all is None:
            raise ValueError(f"no calibration data reached {self.view.name}: pass at least one non-empty batch.")
        if part == "all":
            sums, sqrt_h = self._all, self._sqrt_h
        elif self._held is None:
            if part == "holdout":
                raise ValueError(f"no voxel of {self.view.name} was held out: pass holdout= to add_batch.")
            sums, sqrt_h = self._all, self._sqrt_h
        elif part == "fit":
            sums, sqrt_h = self._all.minus(self._held), self._sqrt_h_fit
        else:
            sums, sqrt_h = self._held, []
        sums = sums.in_float64()
        if sums.voxels == 0 or sums.h <= 0:
            raise ValueError(
                f"no calibration data reached {self.view.name} ({part} part): pass at least one non-empty "
                "batch with positive voxel weights."
            )
        hs = sums.h
        x_mean = sums.x / hs
        y_mean = sums.y / hs
        # One n x n buffer for the whole expression: at n = 3456 each fresh float64 temporary
        # costs as much in page faults as the arithmetic on it.
        a64 = torch.mul(hs * x_mean[:, :, None], x_mean[:, None, :])
        a64 = torch.sub(sums.xx, a64, out=a64).mul_(2.0)
        b64 = 2.0 * (sums.yx - hs * y_mean[:, :, None] * x_mean[:, None, :])
        y_energy = sums.yy - hs * y_mean.pow(2)
        factor = None
        if self._columns and sqrt_h:
            cols = torch.cat(self._columns, dim=1)  # (G, V, n)
            s = torch.cat(sqrt_h)  # (V,)
            xs = cols * s[None, :, None]
            # Centre in the h-metric: F = X̃ (I - s sᵀ/sᵀs), so that 2 F Fᵀ equals the centred A.
            proj = torch.einsum("gvn,v->gn", xs, s) / s.pow(2).sum().clamp_min(1e-30)
            factor = (xs - s[None, :, None] * proj[:, None, :]).transpose(1, 2).contiguous()
        return LayerStatistics(
            A=a64.float(),
            B=b64.float(),
            x_mean=x_mean.float(),
            y_mean=y_mean.float(),
            y_energy=y_energy,
            weight_sum=hs,
            voxels=sums.voxels,
            factor=factor,
            A64=a64,
            B64=b64,
            effective_voxels=hs * hs / sums.h2 if sums.h2 > 0 else 0.0,
        )
