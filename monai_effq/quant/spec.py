"""What one layer gets, decided once: the weight and activation specs that the solver, QAT and export read.

:class:`WeightSpec` is the weight grid, its granularity and how its scale may be chosen;
:class:`ActivationSpec` is the input's bit width, grid and fixed-point choice. A network config's
plan (:meth:`monai_effq.EfficientQConfig.plan`) makes one of each per layer, with format strings
parsed there once, and nothing downstream decides or parses them again.
"""

from __future__ import annotations

from dataclasses import dataclass

from monai_effq.quant.fixed_point import FixedPointFormat
from monai_effq.quant.grid import GRID_KINDS, UniformGrid, check_bits

__all__ = ["SCALE_RULES", "ActivationSpec", "WeightSpec"]

SCALE_RULES = ("free", "power_of_two", "fixed")
SCALE_METHODS = ("als", "mse", "minmax")


@dataclass(frozen=True)
class WeightSpec:
    """How a layer's weights are quantized.

    Attributes:
        grid: the weight grid (bits and kind).
        channel_axis: the axis of the layer's native weight that holds its output channels when
            there is one scale per output channel (0, or 1 for a transposed convolution, whose
            weight is ``(c_in, c_out / groups, *kernel)``); ``None`` for one scale per tensor. The
            plan resolves it from the layer (:attr:`~monai_effq.solver.layers.LayerView.output_axis`);
            the fake-quant, trainable and export modules round along it.
        scale_rule: what a fit or a solver may do with the scale: ``"free"`` (any value),
            ``"power_of_two"`` (fixed point with ``f`` chosen per tensor/channel) or ``"fixed"``
            (an explicit ``Qi.f`` format: the step is :attr:`step` and never refitted).
        step: the scale of a ``"fixed"`` rule; ``None`` otherwise.
        scale_method: how a free or power-of-two scale is first fitted (``"als"``, ``"mse"``,
            ``"minmax"``).
        format: the explicit format's text (``"Q0.4"``) of a ``"fixed"`` rule, for reports.

    Raises:
        ValueError: for an unknown rule or method, a step that does not match the rule, or a
            negative channel axis.
    """

    grid: UniformGrid
    channel_axis: int | None = None
    scale_rule: str = "free"
    step: float | None = None
    scale_method: str = "als"
    format: str | None = None

    def __post_init__(self) -> None:
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"scale_rule must be one of {SCALE_RULES}, got {self.scale_rule!r}.")
        if self.scale_method not in SCALE_METHODS:
            raise ValueError(f"scale_method must be one of {SCALE_METHODS}, got {self.scale_method!r}.")
        if (self.scale_rule == "fixed") != (self.step is not None):
            raise ValueError(f"a step is given exactly for the 'fixed' scale rule, got {self.scale_rule!r} with step {self.step!r}.")
        if self.step is not None and not self.step > 0:
            raise ValueError(f"a fixed step must be positive, got {self.step!r}.")
        axis = self.channel_axis
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int) or axis < 0):
            raise ValueError(f"channel_axis must be None (per tensor) or a weight axis (0, 1, ...), got {self.channel_axis!r}.")

    @classmethod
    def of(
        cls,
        bits: int,
        grid: str = "midrise",
        per_channel: bool = False,
        power_of_two: bool = False,
        format: str | FixedPointFormat | None = None,
        scale_method: str = "als",
        channel_axis: int = 0,
    ) -> WeightSpec:
        """The spec of the usual settings.

        Args:
            bits: 2 to 8 (ignored when ``format`` is given: the format's word size wins).
            grid: the grid kind (see :data:`monai_effq.quant.GRID_KINDS`).
            per_channel: one scale per output channel.
            power_of_two: power-of-two scales only.
            format: an explicit fixed-point format (text such as ``"Q0.4"``, signed): its grid and
                step replace ``bits``/``grid``, and the scale is never fitted.
            scale_method: the first fit of a free or power-of-two scale.
            channel_axis: the native weight's axis of the output channels, when ``per_channel``
                (1 for a transposed convolution).

        Returns:
            the spec.
        """
        axis = channel_axis if per_channel else None
        if format is not None:
            fmt = format if isinstance(format, FixedPointFormat) else FixedPointFormat.parse(format, signed=True)
            return cls(fmt.grid, axis, "fixed", fmt.step, scale_method, str(fmt))
        check_bits(bits, "weight_bits")
        if grid not in GRID_KINDS:
            raise ValueError(f"weight grid must be one of {GRID_KINDS}, got {grid!r}.")
        return cls(UniformGrid(bits, grid), axis, "power_of_two" if power_of_two else "free", None, scale_method)

    @property
    def bits(self) -> int:
        """Bits of a weight code."""
        return self.grid.bits

    @property
    def per_channel(self) -> bool:
        """Whether there is one scale per output channel (along :attr:`channel_axis`)."""
        return self.channel_axis is not None


@dataclass(frozen=True)
class ActivationSpec:
    """How a layer's input is quantized.

    Attributes:
        bits: 2 to 8 (an explicit format's word when ``format`` is given).
        kind: the grid kind; ``None`` lets calibration choose (unsigned when it saw no negative
            value, ``signed_kind`` otherwise).
        power_of_two: snap the calibrated scale to a power of two.
        format: an explicit fixed-point format such as ``Q6.0``, parsed (unsigned; step ``2^-f``, not
            calibrated; an input calibration finds negative takes the signed format of the same
            ``i`` and ``f``).
        signed_kind: the grid calibration chooses for an input with negative values when ``kind`` is
            ``None``: ``"asymmetric"`` (every level used), ``"symmetric"`` (zero point 0, for
            layers that a runtime computes in integers only without an input zero point) or
            ``"signed"`` (zero point 0 and all levels, for tensors a runtime adds or normalises, and
            for an 8-bit network input).
    """

    bits: int
    kind: str | None = None
    power_of_two: bool = False
    format: FixedPointFormat | None = None
    signed_kind: str = "asymmetric"
