"""The one configuration of a network quantization run, as plain data that round-trips through JSON."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from monai_effq.quant.fixed_point import FixedPointFormat
from monai_effq.quant.grid import GRID_KINDS, check_bits
from monai_effq.solver.admm import AdmmSettings
from monai_effq.solver.api import METHODS

__all__ = ["EfficientQConfig", "LayerPlan", "match_pattern"]


def match_pattern(pattern: str, name: str) -> bool:
    """Whether a module name matches a pattern.

    A pattern starting with ``re:`` is a regular expression (``re.fullmatch``); anything else is a
    shell-style glob (``fnmatch``), so ``"model.0.*"`` or ``"*.conv"`` work, as does an exact name.

    Args:
        pattern: the pattern.
        name: a dotted module name.

    Returns:
        ``True`` on a match.
    """
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _check_format(role: str, text: str | None, bits: int | None, signed: bool) -> None:
    """A ``<role>_format`` must parse and match ``<role>_bits`` (which it sets, unless changed later)."""
    if text is None:
        return
    fmt = FixedPointFormat.parse(text, signed=signed)
    if fmt.bits != bits:
        sign = "sign + " if signed else ""
        raise ValueError(
            f"{role}_format {fmt} is a {fmt.bits}-bit word ({sign}{fmt.int_bits} + {fmt.frac_bits} bits) "
            f"but {role}_bits is {bits}: drop {role}_bits or set it to {fmt.bits}."
        )


# activation grid choices: "auto" (unsigned or asymmetric, from calibration) or "symmetric"
ACT_GRIDS = ("auto", "symmetric")


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is quantized.

    Attributes:
        name: the module's dotted name.
        weight_bits: weight bits.
        act_bits: input activation bits, or ``None`` to keep the input in floating point.
        weight_format: explicit fixed-point format of the weights (``"Q0.4"``), or ``None``.
        act_format: explicit fixed-point format of the input (``"Q6.0"``), or ``None``.
    """

    name: str
    weight_bits: int
    act_bits: int | None
    weight_format: str | None = None
    act_format: str | None = None


@dataclass
class EfficientQConfig:
    """Settings of :func:`monai_effq.quantize`.

    Attributes:
        weight_bits: weight bits of every quantized layer (2 to 8).
        act_bits: bits of every quantized layer's input (4 to 8); ``None`` keeps activations in FP.
        first_layer_bits: weight and activation bits of the first layer in execution order (the
            paper keeps it at 8); ``None`` uses ``weight_bits``/``act_bits``.
        last_layer_bits: the same for the last layer.
        overrides: module-name pattern → ``{"weight_bits": .., "act_bits": ..}`` (later patterns win).
        skip: module-name patterns of layers kept in full precision.
        per_channel: one weight scale per output channel.
        method: ``"efficientq"``, ``"gptq"`` or ``"rtn"``.
        weight_grid: weight grid kind (``"midrise"`` is the paper's; ``"signed"`` has an exact zero).
            8-bit layers on the midrise grid use ``"symmetric"`` instead: the midrise half-integer
            zero point needs 9-bit integers at 8 bits, which int8 runtimes cannot hold.
        init: EfficientQ's starting assignment, ``"gptq"`` or ``"rtn"``.
        admm: ADMM settings (a dict in JSON).
        attention: weight each output voxel by the self-adaptive class attention.
        attention_power: the power ``p`` of the class weights ``(max n / n_c)^p``.
        fold_batchnorm: fold BatchNorm that directly follows a convolution into it first.
        device: where the solve runs (``"cpu"``, ``"cuda"``, ...).
        max_chunk_elements: memory cap on one unfolded im2col chunk.
        target_memory_mib: memory for the FP targets captured in one pass (layers are solved in
            windows that fit it; larger windows mean fewer forward passes).
        power_of_two: every weight and activation scale is a power of two (fixed point ``Qi.f``
            with ``f`` chosen per tensor, or per channel, from the calibrated range), so the network
            is shift-only on integer hardware. Every solver method honours it.
        weight_format: an explicit fixed-point format for the weights of the body layers (those
            at ``weight_bits``; not the first/last layer or overrides), e.g. ``"Q0.4"``: the step
            is ``2^-f`` and never fitted, the word is sign + ``i`` + ``f`` bits. When given it sets
            ``weight_bits`` to that word size.
        act_format: the same for the body layers' inputs, e.g. ``"Q6.0"`` (unsigned, ``i + f``
            bits, after ReLU; a signed input adds a sign bit). When given it sets ``act_bits``.
        act_grid: ``"auto"`` puts each input on the unsigned grid when calibration saw no negative
            value and on the asymmetric grid otherwise (every level used); ``"symmetric"`` puts
            every input on the symmetric signed grid with zero point 0, which TensorRT's int8
            requires (:mod:`monai_effq.deploy.tensorrt`): one bit less for inputs after a ReLU.
        validation_fraction: share of the calibration windows held out (every ``1/fraction``-th
            window, when there are that many) to choose each layer's regularisation by held-out
            output error (:mod:`monai_effq.solver.validation`); round-to-nearest is always a
            candidate, and layers with fewer calibration voxels than unknowns per output channel
            keep round-to-nearest. ``0`` turns both off (one solve per layer, as the paper).
    """

    weight_bits: int = 4
    act_bits: int | None = 8
    first_layer_bits: int | None = 8
    last_layer_bits: int | None = 8
    overrides: dict[str, dict[str, int | None]] = field(default_factory=dict)
    skip: list[str] = field(default_factory=list)
    per_channel: bool = False
    method: str = "efficientq"
    weight_grid: str = "midrise"
    init: str = "gptq"
    admm: AdmmSettings = field(default_factory=AdmmSettings)
    attention: bool = True
    attention_power: float = 0.5
    fold_batchnorm: bool = True
    device: str = "cpu"
    max_chunk_elements: int = 1 << 24
    target_memory_mib: int = 2048
    power_of_two: bool = False
    weight_format: str | None = None
    act_format: str | None = None
    act_grid: str = "auto"
    validation_fraction: float = 0.25

    def __post_init__(self) -> None:
        if isinstance(self.admm, dict):
            self.admm = AdmmSettings(**self.admm)
        if self.weight_format is not None:
            self.weight_bits = FixedPointFormat.parse(self.weight_format, signed=True).bits
        if self.act_format is not None:
            self.act_bits = FixedPointFormat.parse(self.act_format, signed=False).bits
        self.validate()

    def validate(self) -> None:
        """Check every field.

        Raises:
            ValueError: naming the first bad field and what it accepts.
        """
        check_bits(self.weight_bits, "weight_bits")
        if self.act_bits is not None:
            check_bits(self.act_bits, "act_bits", 2, 8)
        for name in ("first_layer_bits", "last_layer_bits"):
            if getattr(self, name) is not None:
                check_bits(getattr(self, name), name)
        for pattern, spec in self.overrides.items():
            if not isinstance(spec, dict) or not set(spec) <= {"weight_bits", "act_bits"}:
                raise ValueError(
                    f"override {pattern!r} must be a dict with keys 'weight_bits' and/or 'act_bits', got {spec!r}."
                )
            if "weight_bits" in spec:
                check_bits(spec["weight_bits"], f"overrides[{pattern!r}].weight_bits")
            if spec.get("act_bits") is not None:
                check_bits(spec["act_bits"], f"overrides[{pattern!r}].act_bits")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}.")
        if self.weight_grid not in GRID_KINDS:
            raise ValueError(f"weight_grid must be one of {GRID_KINDS}, got {self.weight_grid!r}.")
        if self.init not in ("gptq", "rtn"):
            raise ValueError(f"init must be 'gptq' or 'rtn', got {self.init!r}.")
        if self.attention_power < 0:
            raise ValueError(f"attention_power must be non-negative, got {self.attention_power}.")
        if not isinstance(self.power_of_two, bool):
            raise ValueError(f"power_of_two must be True or False, got {self.power_of_two!r}.")
        _check_format("weight", self.weight_format, self.weight_bits, signed=True)
        _check_format("act", self.act_format, self.act_bits, signed=False)
        if self.act_grid not in ACT_GRIDS:
            raise ValueError(f"act_grid must be one of {ACT_GRIDS}, got {self.act_grid!r}.")
        if not 0.0 <= self.validation_fraction <= 0.5:
            raise ValueError(
                f"validation_fraction must be in [0, 0.5] (0 turns held-out validation off), got {self.validation_fraction}."
            )
        if self.act_grid == "symmetric" and self.act_format is not None:
            raise ValueError("act_format sets its own grid: use it or act_grid='symmetric', not both.")

    @property
    def act_kind(self) -> str | None:
        """The activation grid kind every layer's input calibrates on (``None``: chosen per input)."""
        return None if self.act_grid == "auto" else self.act_grid

    def weight_grid_for(self, bits: int) -> str:
        """The weight grid kind of a layer with ``bits``-bit weights (see ``weight_grid``).

        Args:
            bits: the layer's weight bits.

        Returns:
            a grid kind.
        """
        return "symmetric" if self.weight_grid == "midrise" and bits == 8 else self.weight_grid

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EfficientQConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error.

        Args:
            data: the plain-data form.

        Returns:
            the config.

        Raises:
            ValueError: for an unknown key.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown EfficientQConfig keys {sorted(unknown)}; known keys are {sorted(known)}.")
        return cls(**data)

    def plan(self, ordered_names: list[str]) -> list[LayerPlan]:
        """Bits of each layer, given the quantizable layers in execution order.

        Args:
            ordered_names: names of the quantizable layers, in the order the network runs them.

        Returns:
            the plan of every layer not skipped, in the same order.

        Raises:
            ValueError: when a skip or override pattern matches no layer (a typo would otherwise
                silently quantize what the user meant to protect).
        """
        for pattern in [*self.skip, *self.overrides]:
            if not any(match_pattern(pattern, n) for n in ordered_names):
                shown = ", ".join(ordered_names[:12]) + (" ..." if len(ordered_names) > 12 else "")
                raise ValueError(
                    f"config names layer pattern {pattern!r}, which matches no quantizable layer; "
                    f"the quantizable layers are: {shown}."
                )
        plans = []
        for i, name in enumerate(ordered_names):
            if any(match_pattern(p, name) for p in self.skip):
                continue
            wbits, abits = self.weight_bits, self.act_bits
            wfmt, afmt = self.weight_format, self.act_format
            edge = self.first_layer_bits if i == 0 else self.last_layer_bits if i == len(ordered_names) - 1 else None
            if edge is not None:
                wbits, wfmt = edge, None
                abits, afmt = (None if abits is None else edge), None
            for pattern, spec in self.overrides.items():
                if match_pattern(pattern, name):
                    if "weight_bits" in spec:
                        wbits, wfmt = spec["weight_bits"], None
                    if "act_bits" in spec:
                        abits, afmt = spec["act_bits"], None
            plans.append(LayerPlan(name, wbits, abits, wfmt, afmt))
        return plans
