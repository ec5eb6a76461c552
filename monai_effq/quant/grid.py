"""Uniform quantization grids as a small frozen value plus stateless functions.

A grid of ``bits`` bits holds integer codes ``q`` in ``[qmin, qmax]`` (stored unsigned, so they pack
into bytes) and represents the real value ``scale * (q - zero_point)``. Every grid the project uses
is a choice of ``qmin``, ``qmax`` and ``zero_point``:

- ``"signed"``: two's-complement levels ``-2^(b-1) .. 2^(b-1)-1`` (has an exact zero).
- ``"symmetric"``: ``-(2^(b-1)-1) .. 2^(b-1)-1`` (exact zero, one level unused, mirror-symmetric).
- ``"midrise"``: the EfficientQ paper's ``[-1, 1]`` grid of ``2^b`` levels, ``alpha * (2i+1-k)/(k-1)``;
  symmetric and uses every level, but has no zero.
- ``"unsigned"``: ``0 .. 2^b-1`` (the paper's ``[0, 1] * alpha`` for activations after ReLU).
- ``"asymmetric"``: ``0 .. 2^b-1`` with a fitted integer zero point per tensor or channel.

Scales are fitted per tensor or per output channel (axis 0), by alternating least squares (the
paper's projection) or by a search over clipping ratios minimising the squared error. Rounding
(:func:`grid_codes`) and dequantization (:func:`dequantize`) read a per-channel scale along any axis
(:func:`channel_view`), so a weight is rounded in its native layout whichever axis holds its channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "GRID_KINDS",
    "UniformGrid",
    "channel_view",
    "check_bits",
    "grid_codes",
    "quantize_codes",
    "dequantize",
    "fake_quantize",
    "fit_scale",
    "fit_scale_als",
    "fit_scale_mse",
    "fit_minmax",
]

GRID_KINDS = ("signed", "symmetric", "midrise", "unsigned", "asymmetric")

# a scale or zero point: a number, or a tensor (0-d, one value per channel, or laid out like the values)
GridParameter = torch.Tensor | float


def check_bits(bits: int, name: str = "bits", low: int = 2, high: int = 8) -> int:
    """Validate a bit width.

    Args:
        bits: the bit width to check.
        name: what the value is called in the error message.
        low: smallest allowed width.
        high: largest allowed width.

    Returns:
        ``bits`` as an int.

    Raises:
        ValueError: when ``bits`` is not an integer in ``[low, high]``.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {bits!r}.")
    return bits


@dataclass(frozen=True)
class UniformGrid:
    """A uniform grid of ``2**bits`` codes.

    Args:
        bits: bit width, 2 to 8.
        kind: one of ``GRID_KINDS``.
    """

    bits: int
    kind: str = "signed"

    def __post_init__(self) -> None:
        check_bits(self.bits, "grid bits", 2, 8)
        if self.kind not in GRID_KINDS:
            raise ValueError(f"grid kind must be one of {GRID_KINDS}, got {self.kind!r}.")

    @property
    def levels(self) -> int:
        """Number of codes the grid's bit width can address."""
        return 1 << self.bits

    @property
    def qmin(self) -> int:
        """Smallest code used."""
        return 1 if self.kind == "symmetric" else 0

    @property
    def qmax(self) -> int:
        """Largest code used."""
        return self.levels - 1

    @property
    def fixed_zero_point(self) -> float | None:
        """The zero point for grids where it is fixed, ``None`` where it is fitted."""
        if self.kind in ("signed", "symmetric"):
            return float(self.levels // 2)
        if self.kind == "midrise":
            return (self.levels - 1) / 2.0
        if self.kind == "unsigned":
            return 0.0
        return None

    @property
    def is_signed(self) -> bool:
        """Whether the grid spans negative values with a fixed zero point."""
        return self.kind in ("signed", "symmetric", "midrise")


def channel_view(t: torch.Tensor, like: torch.Tensor, axis: int = 0, groups: int = 1) -> torch.Tensor:
    """Lay a quantization parameter out to broadcast against ``like``.

    A 0-d (or one-element) parameter is per tensor; a parameter with as many axes as ``like`` is
    already laid out (e.g. ``(G, m, 1)`` rows); a 1-d one holds one value per channel along ``axis``.
    With ``groups > 1`` and ``axis > 0``, ``like``'s axis 0 is ``groups`` blocks and channel
    ``b * like.shape[axis] + i`` sits at position ``i`` of ``axis`` within block ``b`` (the layout of a
    grouped transposed convolution's weight, ``(c_in, c_out / groups, *kernel)``).

    Args:
        t: the parameter (scale or zero point).
        like: the tensor it applies to.
        axis: the channel axis of a 1-d ``t``.
        groups: blocks of axis 0 that the channels along ``axis > 0`` are spread over.

    Returns:
        ``t``, reshaped (and repeated over each block of axis 0 for ``groups > 1``) to broadcast
        against ``like``.
    """
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(())
    if t.dim() == like.dim():
        return t
    shape = [1] * like.dim()
    shape[axis] = -1
    if groups == 1 or axis == 0:
        return t.reshape(shape)
    shape[0] = groups
    return t.reshape(shape).repeat_interleave(like.shape[0] // groups, dim=0)


def grid_codes(
    x: torch.Tensor, scale: GridParameter, zero_point: GridParameter, grid: UniformGrid, axis: int = 0, groups: int = 1
) -> torch.Tensor:
    """Nearest grid codes of ``x``, as integer values in ``x``'s float dtype: the one rounding.

    Fake quantization, the solvers, the trainable layers and the export all round through here.

    Args:
        x: values.
        scale: step between levels: 0-d, one per channel along ``axis``, or laid out like ``x``.
        zero_point: code of the real value 0 (may be a half-integer for the midrise grid), shaped
            like ``scale``.
        grid: the grid.
        axis: the channel axis of a 1-d ``scale``/``zero_point`` (1 for a transposed convolution's
            native weight).
        groups: blocks of axis 0 that the channels along ``axis > 0`` are spread over (see
            :func:`channel_view`).

    Returns:
        float codes in ``[grid.qmin, grid.qmax]``, shaped like ``x``.
    """
    # float16 and bfloat16 round in float32: a fitted step of 1e-12 (an all-zero channel) is 0 in float16, and their
    # quotients land on the wrong side of a half-integer; the codes (at most 255) are exact in either format
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    s = channel_view(torch.as_tensor(scale, dtype=dtype, device=x.device), x, axis, groups)
    z = channel_view(torch.as_tensor(zero_point, dtype=dtype, device=x.device), x, axis, groups)
    # in place after the division: the same operations as round(x / s + z), one tensor instead of three
    codes = torch.div(x.to(dtype), s).add_(z).round_().clamp_(grid.qmin, grid.qmax)
    return codes.to(x.dtype) if x.is_floating_point() else codes


def quantize_codes(
    x: torch.Tensor, scale: GridParameter, zero_point: GridParameter, grid: UniformGrid, axis: int = 0, groups: int = 1
) -> torch.Tensor:
    """Round ``x`` to the nearest grid code.

    Args:
        x: values.
        scale: step between levels, 0-d, one per channel along ``axis`` or laid out like ``x``.
        zero_point: code of the real value 0 (may be a half-integer for the midrise grid).
        grid: the grid.
        axis: the channel axis of a 1-d ``scale``/``zero_point``.
        groups: see :func:`channel_view`.

    Returns:
        integer codes (``torch.int64``) in ``[grid.qmin, grid.qmax]``, shaped like ``x``.
    """
    return grid_codes(x, scale, zero_point, grid, axis, groups).long()


def dequantize(
    codes: torch.Tensor, scale: GridParameter, zero_point: GridParameter, axis: int = 0, groups: int = 1
) -> torch.Tensor:
    """Real values ``scale * (codes - zero_point)`` of integer codes: the one dequantization.

    Args:
        codes: integer codes (any dtype).
        scale: 0-d, one per channel along ``axis``, or laid out like ``codes``.
        zero_point: shaped like ``scale``.
        axis: the channel axis of a 1-d ``scale``/``zero_point``.
        groups: see :func:`channel_view`.

    Returns:
        float tensor shaped like ``codes`` (``scale``'s dtype when it is floating point, else float32).
    """
    scale = torch.as_tensor(scale, device=codes.device)
    dtype = scale.dtype if scale.is_floating_point() else torch.float32
    s = channel_view(scale.to(dtype=dtype, device=codes.device), codes, axis, groups)
    z = channel_view(torch.as_tensor(zero_point, dtype=dtype, device=codes.device), codes, axis, groups)
    return s * (codes.to(dtype) - z)


def fake_quantize(
    x: torch.Tensor, scale: GridParameter, zero_point: GridParameter, grid: UniformGrid, axis: int = 0, groups: int = 1
) -> torch.Tensor:
    """Project ``x`` on the grid (quantize then dequantize).

    Args:
        x: values.
        scale: 0-d, per-channel (along ``axis``) or laid-out step.
        zero_point: shaped like ``scale``.
        grid: the grid.
        axis: the channel axis of a 1-d ``scale``/``zero_point``.
        groups: see :func:`channel_view`.

    Returns:
        the nearest grid values, shaped like ``x``.
    """
    codes = grid_codes(x, scale, zero_point, grid, axis, groups)
    return dequantize(codes, scale, zero_point, axis, groups).to(x.dtype)


def _reduce_dims(x: torch.Tensor, per_channel: bool) -> tuple[int, ...]:
    return tuple(range(1, x.dim())) if per_channel else tuple(range(x.dim()))


def _keep(t: torch.Tensor, per_channel: bool) -> torch.Tensor:
    return t.reshape(-1) if per_channel else t.reshape(())


def fit_minmax(x: torch.Tensor, grid: UniformGrid, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that cover the range of ``x`` exactly.

    Args:
        x: values (axis 0 is the channel axis when ``per_channel``).
        grid: the grid.
        per_channel: one scale per slice of axis 0 instead of one for the tensor.

    Returns:
        ``(scale, zero_point)``, 0-d or of length ``x.shape[0]``.
    """
    dims = _reduce_dims(x, per_channel)
    xf = x.detach().float()
    hi = xf.amax(dim=dims) if dims else xf
    lo = xf.amin(dim=dims) if dims else xf
    span = grid.qmax - grid.qmin
    if grid.kind == "asymmetric":
        lo = torch.minimum(lo, torch.zeros_like(lo))
        hi = torch.maximum(hi, torch.zeros_like(hi))
        scale = ((hi - lo) / span).clamp_min(1e-12)
        zero = torch.round(-lo / scale).clamp(grid.qmin, grid.qmax)
        return _keep(scale, per_channel), _keep(zero, per_channel)
    zp = grid.fixed_zero_point
    if grid.kind == "unsigned":
        scale = hi.clamp_min(0) / span
    else:
        amax = torch.maximum(hi.abs(), lo.abs())
        scale = amax / (grid.qmax - zp)
    scale = scale.clamp_min(1e-12)
    return _keep(scale, per_channel), _keep(torch.full_like(scale, zp), per_channel)


def fit_scale_als(
    x: torch.Tensor,
    grid: UniformGrid,
    per_channel: bool = False,
    max_iter: int = 20,
    init: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares scale by alternating projection (the EfficientQ G-step rule).

    Alternates ``q <- clip(round(x / s + z))`` and ``s <- <q - z, x> / <q - z, q - z>`` until the codes
    stop changing. The zero point stays fixed (asymmetric grids keep their min/max zero point).

    Args:
        x: values (axis 0 is the channel axis when ``per_channel``).
        grid: the grid.
        per_channel: one scale per slice of axis 0.
        max_iter: cap on the alternations.
        init: starting scale; min/max when ``None``.
        zero_point: the zero point to keep, shaped like the scale; ``x``'s min/max one when ``None``
            (given, the scale is fitted for the zero point it will be used with, and with ``init``
            the min/max pass is skipped).

    Returns:
        ``(scale, zero_point)``.
    """
    if init is None or zero_point is None:
        scale, zero = fit_minmax(x, grid, per_channel)
    if init is not None:
        scale = _keep(init.detach().float().clamp_min(1e-12), per_channel)
    if zero_point is not None:
        zero = _keep(zero_point.detach().float(), per_channel)
    dims = _reduce_dims(x, per_channel)
    xf = x.detach().float()
    z = channel_view(zero, xf)
    codes = None
    for _ in range(max_iter):
        new_codes = grid_codes(xf, scale, zero, grid)  # integers in float32: compared and used as they are
        if codes is not None and torch.equal(new_codes, codes):
            break
        codes = new_codes
        q = codes - z
        # float64 sums: a float32 sum over many values depends on how the threads split it (issue 18)
        num = (q * xf).sum(dim=dims, dtype=torch.float64) if dims else q * xf
        den = (q * q).sum(dim=dims, dtype=torch.float64) if dims else q * q
        # A channel whose codes are all at the zero point keeps its scale (the solution is 0 anyway).
        if num.dim() == 0:
            # one scale: the same float64 division and float32 roundings as below, as Python and
            # NumPy scalars (six tensor operations on 0-d tensors cost more than the sums above)
            n, d = float(num), float(den)
            ratio = np.float32(n / max(d, 1e-30)) if d > 0 else np.float32(float(scale))
            scale = torch.tensor(max(ratio, np.float32(1e-12)), dtype=torch.float32, device=x.device)
        else:
            ratio = (num / den.clamp_min(1e-30)).float()
            scale = torch.where(den > 0, ratio, _keep(scale, per_channel).reshape(num.shape))
            scale = _keep(scale.clamp_min(1e-12), per_channel)
    return scale, zero


def fit_scale_mse(
    x: torch.Tensor,
    grid: UniformGrid,
    per_channel: bool = False,
    ratios: int = 80,
    min_ratio: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale minimising the squared rounding error over a sweep of clipping ratios.

    Args:
        x: values (axis 0 is the channel axis when ``per_channel``).
        grid: the grid.
        per_channel: one scale per slice of axis 0.
        ratios: number of clipping ratios tried between ``min_ratio`` and 1.
        min_ratio: smallest fraction of the min/max scale tried.

    Returns:
        ``(scale, zero_point)``.
    """
    base_scale, base_zero = fit_minmax(x, grid, per_channel)
    dims = _reduce_dims(x, per_channel)
    xf = x.detach().float()
    best_err = None
    best_scale, best_zero = base_scale, base_zero
    for r in torch.linspace(1.0, min_ratio, ratios, device="cpu").tolist():  # Python floats
        scale = base_scale * r
        if grid.kind == "asymmetric":
            lo = -base_zero * base_scale * r
            zero = torch.round(-lo / scale).clamp(grid.qmin, grid.qmax)
        else:
            zero = base_zero
        err = (fake_quantize(xf, scale, zero, grid) - xf).pow(2)
        err = err.sum(dim=dims, dtype=torch.float64) if dims else err  # float64: the same sum on any thread count
        if best_err is None:
            best_err, best_scale, best_zero = err, scale.clone(), zero.clone()
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def fit_scale(
    x: torch.Tensor, grid: UniformGrid, per_channel: bool = False, method: str = "als"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit a scale (and zero point) of ``grid`` to ``x``.

    Args:
        x: values (axis 0 is the channel axis when ``per_channel``).
        grid: the grid.
        per_channel: one scale per slice of axis 0.
        method: ``"als"`` (alternating least squares, started from the MSE search),
            ``"mse"`` (clipping-ratio search) or ``"minmax"``.

    Returns:
        ``(scale, zero_point)``.

    Raises:
        ValueError: for an unknown method or non-finite values.
    """
    if not torch.isfinite(x).all():
        raise ValueError("cannot fit a quantization scale to values containing NaN or Inf.")
    if method == "minmax":
        return fit_minmax(x, grid, per_channel)
    if method == "mse":
        return fit_scale_mse(x, grid, per_channel)
    if method == "als":
        if grid.kind == "asymmetric":
            return fit_scale_mse(x, grid, per_channel)
        # ALS converges to the local optimum nearest its start; the MSE sweep gives a good start.
        init, _ = fit_scale_mse(x, grid, per_channel, ratios=20)
        return fit_scale_als(x, grid, per_channel, init=init)
    raise ValueError(f"scale method must be 'als', 'mse' or 'minmax', got {method!r}.")

