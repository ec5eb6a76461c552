"""Fixed-point formats ``Qi.f``: uniform grids whose step is a power of two.

The U-Net fixed-point method (AskariHemmat, Perone et al. 2019) keeps a value as a sign, ``i``
integer bits and ``f`` fractional bits: the step is ``2^-f`` and the magnitude saturates just below
``2^i``. On the project's grids that is:

- signed ``Qi.f``: the ``"symmetric"`` grid (sign-magnitude, exact zero) of ``1 + i + f`` bits with
  scale ``2^-f``;
- unsigned ``Qi.f`` (activations after ReLU): the ``"unsigned"`` grid of ``i + f`` bits with scale
  ``2^-f``.

A power-of-two scale makes a layer shift-only on integer hardware. Besides explicit formats, the
functions here choose ``f`` from a tensor's range (:func:`fixed_point_scale`) and snap any fitted
scale to the better of its two neighbouring powers of two (:func:`snap_to_power_of_two`), which is
how every solver method offers fixed-point grids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from monai_effq.quant.grid import UniformGrid, fake_quantize, fit_minmax
from monai_effq.utils.errors import UserInputError, all_finite

__all__ = [
    "FixedPointFormat",
    "MAX_WORD_BITS",
    "fixed_point_scale",
    "snap_to_power_of_two",
    "is_power_of_two",
    "fractional_bits",
]

MAX_WORD_BITS = 8  # codes are stored in uint8
_PATTERN = re.compile(r"^\s*[Qq]\s*(-?[0-9]+)\s*\.\s*(-?[0-9]+)\s*$")  # ASCII digits: int() reads others too


@dataclass(frozen=True)
class FixedPointFormat:
    """A fixed-point format ``Qi.f``.

    Args:
        int_bits: ``i``, bits of the integer part (may be negative for values well below 1).
        frac_bits: ``f``, bits of the fraction; the step is ``2^-f``.
        signed: whether a sign bit is stored (sign-magnitude, as the method); activations after
            ReLU are unsigned.

    Raises:
        ValueError: when the word (``int_bits + frac_bits``, plus the sign) is shorter than 2 bits
            or longer than :data:`MAX_WORD_BITS`.
    """

    int_bits: int
    frac_bits: int
    signed: bool = True

    def __post_init__(self) -> None:
        for name in ("int_bits", "frac_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} of a fixed-point format must be an integer, got {value!r}.")
        word = self.bits
        sign = "sign + " if self.signed else ""
        if word > MAX_WORD_BITS:
            room = MAX_WORD_BITS - int(self.signed)
            fix = (
                f"use at most {room - self.int_bits} fractional bits with {self.int_bits} integer bits"
                if room - self.int_bits >= 0
                else f"use at most {room - max(self.frac_bits, 0)} integer bits with {self.frac_bits} fractional bits"
            )
            raise ValueError(
                f"fixed-point format {self} needs a {word}-bit word ({sign}{self.int_bits} integer + "
                f"{self.frac_bits} fractional bits), but codes hold at most {MAX_WORD_BITS} bits: {fix}."
            )
        if word < 2:
            raise ValueError(
                f"fixed-point format {self} has a {word}-bit word ({sign}{self.int_bits} integer + "
                f"{self.frac_bits} fractional bits); at least 2 bits are needed: add integer or fractional bits."
            )

    @classmethod
    def parse(cls, text: str, signed: bool = True) -> FixedPointFormat:
        """Read ``"Q0.4"``-style text.

        Args:
            text: ``"Q<i>.<f>"``.
            signed: whether the format stores a sign.

        Returns:
            the format.

        Raises:
            ValueError: when the text is not ``Q<i>.<f>`` or the word does not fit.
        """
        match = _PATTERN.match(str(text))
        if match is None:
            raise ValueError(f"a fixed-point format is written 'Q<integer bits>.<fractional bits>', e.g. 'Q0.4'; got {text!r}.")
        return cls(int(match.group(1)), int(match.group(2)), signed)

    @property
    def bits(self) -> int:
        """Word size: integer and fractional bits, plus the sign bit when signed."""
        return self.int_bits + self.frac_bits + int(self.signed)

    @property
    def step(self) -> float:
        """The grid step ``2^-f``."""
        return 2.0**-self.frac_bits

    @property
    def grid(self) -> UniformGrid:
        """The uniform grid whose codes hold this format (its scale is :attr:`step`)."""
        return UniformGrid(self.bits, "symmetric" if self.signed else "unsigned")

    @property
    def zero_point(self) -> float:
        """The grid's code of the value 0."""
        return float(self.grid.fixed_zero_point)

    @property
    def max_value(self) -> float:
        """Largest representable magnitude, ``2^i - 2^-f``."""
        return (self.grid.qmax - self.zero_point) * self.step

    def __str__(self) -> str:
        return f"Q{self.int_bits}.{self.frac_bits}"


def fractional_bits(scale: torch.Tensor) -> torch.Tensor:
    """``f`` of power-of-two scales ``2^-f`` (integer tensor, same shape).

    Args:
        scale: power-of-two scales.

    Returns:
        ``-log2(scale)`` rounded to integers.
    """
    return torch.round(-torch.log2(scale.double())).long()


def is_power_of_two(scale: torch.Tensor) -> bool:
    """Whether every entry of ``scale`` is exactly a power of two."""
    s = scale.detach().double()
    return bool(torch.all(s > 0)) and bool(torch.equal(torch.exp2(torch.round(torch.log2(s))), s))


def fixed_point_scale(x: torch.Tensor, grid: UniformGrid, per_channel: bool = False) -> torch.Tensor:
    """The smallest power-of-two step ``2^-f`` (largest ``f``) with which ``grid`` covers ``x``'s range.

    Args:
        x: values (axis 0 is the channel axis when ``per_channel``).
        grid: a grid with a fixed zero point (``signed``, ``symmetric``, ``midrise``, ``unsigned``).
        per_channel: one ``f`` per slice of axis 0.

    Returns:
        the scales, 0-d or of length ``x.shape[0]``.

    Raises:
        ValueError: for a grid whose zero point is fitted (``asymmetric``), or values holding NaN or Inf.
    """
    if grid.fixed_zero_point is None:
        raise ValueError("fixed_point_scale needs a grid with a fixed zero point; use snap_to_power_of_two for asymmetric grids.")
    if not all_finite(x):
        raise UserInputError("fixed_point_scale: the values hold NaN or Inf, which no fixed-point format covers; fix them first.")
    exact, _ = fit_minmax(x, grid, per_channel)
    if grid.kind == "signed":
        # two's complement has one level more below zero than above: a negative extreme may use it
        dims = tuple(range(1, x.dim())) if per_channel else tuple(range(x.dim()))
        xf = x.detach().float()
        hi, lo = (xf.amax(dim=dims), xf.amin(dim=dims)) if dims else (xf, xf)
        zp = grid.fixed_zero_point
        exact = torch.maximum(hi.clamp_min(0) / (grid.qmax - zp), (-lo).clamp_min(0) / (zp - grid.qmin))
        exact = exact.clamp_min(1e-12).reshape(-1 if per_channel else ())
    # Rounding the exponent up never clips: 2^ceil(log2 s) >= s covers the range.
    return torch.exp2(torch.ceil(torch.log2(exact.double()))).float()


def snap_to_power_of_two(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    grid: UniformGrid,
    per_channel: bool = False,
    keep_zero_point: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace fitted scales by the power of two below or above them, whichever rounds ``x`` better.

    A fixed zero point is kept; an asymmetric grid's zero point is moved so that the same real
    offset stays (nearest integer code), unless ``keep_zero_point``.

    Args:
        x: the values the scale was fitted to (axis 0 is the channel axis when ``per_channel``).
        scale: fitted scales, 0-d or per channel.
        zero_point: their zero points.
        grid: the grid.
        per_channel: whether the scales are per channel.
        keep_zero_point: never move the zero point (a solver that holds it fixed).

    Returns:
        ``(scale, zero_point)`` with every scale a power of two.
    """
    xf = x.detach().float()
    dims = tuple(range(1, xf.dim())) if per_channel else tuple(range(xf.dim()))
    log = torch.log2(scale.detach().double().clamp_min(1e-30))
    best_err, best_scale, best_zero = None, scale, zero_point
    for exponent in (torch.floor(log), torch.ceil(log)):
        cand = torch.exp2(exponent).float()
        if grid.fixed_zero_point is None and not keep_zero_point:
            zero = torch.round(zero_point * scale / cand).clamp(grid.qmin, grid.qmax)
        else:
            zero = zero_point
        err = (fake_quantize(xf, cand, zero, grid) - xf).pow(2)
        err = err.sum(dim=dims, dtype=torch.float64) if dims else err  # float64: the same sum on any thread count
        err = err.reshape(cand.shape)
        if best_err is None:
            best_err, best_scale, best_zero = err, cand, torch.as_tensor(zero, device=cand.device).float().reshape(cand.shape).clone()
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, cand, best_scale)
        best_zero = torch.where(better, torch.as_tensor(zero, device=cand.device).float().reshape(cand.shape), best_zero)
    return best_scale, best_zero

