"""The one configuration of a network quantization run, as plain data that round-trips through JSON."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from monai_effq.quant.fixed_point import FixedPointFormat
from monai_effq.quant.grid import GRID_KINDS, check_bits
from monai_effq.quant.spec import ActivationSpec, WeightSpec
from monai_effq.solver.admm import AdmmSettings
from monai_effq.solver.api import METHODS

__all__ = ["EfficientQConfig", "LayerPlan", "OVERRIDE_KEYS", "match_pattern"]


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


_REGISTER_HINT = " (a method of your own: import the module that registers it first)"

# the per-layer settings an override may set
OVERRIDE_KEYS = ("weight_bits", "act_bits", "weight_format", "act_format", "per_channel", "weight_grid", "power_of_two", "method")


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is quantized, decided once by :meth:`EfficientQConfig.plan`.

    Attributes:
        name: the module's dotted name.
        weight: the weight spec (grid, granularity, scale rule).
        act: the input's spec, or ``None`` to keep the input in floating point.
        method: the solver method.
    """

    name: str
    weight: WeightSpec
    act: ActivationSpec | None
    method: str = "efficientq"

    @property
    def weight_bits(self) -> int:
        """Weight bits."""
        return self.weight.bits

    @property
    def act_bits(self) -> int | None:
        """Input bits, or ``None``."""
        return None if self.act is None else self.act.bits

    @property
    def weight_format(self) -> str | None:
        """The weights' explicit fixed-point format, or ``None``."""
        return self.weight.format

    @property
    def act_format(self) -> str | None:
        """The input's explicit fixed-point format, or ``None``."""
        return None if self.act is None else self.act.format


@dataclass(frozen=True)
class EfficientQConfig:
    """Settings of :func:`monai_effq.quantize`, checked once when made and fixed from then on
    (``dataclasses.replace`` makes a changed copy, checked again).

    Attributes:
        weight_bits: weight bits of every quantized layer (2 to 8).
        act_bits: bits of every quantized layer's input (4 to 8); ``None`` keeps activations in FP.
        first_layer_bits: weight and activation bits of the first layer in execution order and of
            every other layer that reads the network input (the paper keeps it at 8); ``None``
            uses ``weight_bits``/``act_bits``.
        last_layer_bits: the same for the last layer.
        overrides: module-name pattern → per-layer settings (later patterns win): any of
            ``weight_bits``, ``act_bits``, ``weight_format``, ``act_format``, ``per_channel``,
            ``weight_grid``, ``power_of_two`` and ``method``.
        skip: module-name patterns of layers kept in full precision.
        per_channel: one weight scale per output channel.
        method: a registered solver method (``"efficientq"``, ``"gptq"``, ``"rtn"`` or one
            registered with :func:`monai_effq.solver.register_method`).
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
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
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
            object.__setattr__(self, "admm", AdmmSettings(**self.admm))
        if self.weight_format is not None:
            object.__setattr__(self, "weight_bits", FixedPointFormat.parse(self.weight_format, signed=True).bits)
        if self.act_format is not None:
            object.__setattr__(self, "act_bits", FixedPointFormat.parse(self.act_format, signed=False).bits)
        self._validate()

    def _validate(self) -> None:
        """Check every field (once: the config is frozen).

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
            if not isinstance(spec, dict) or not set(spec) <= set(OVERRIDE_KEYS):
                raise ValueError(
                    f"override {pattern!r} must be a dict with keys among {OVERRIDE_KEYS}, got {spec!r}."
                )
            where = f"overrides[{pattern!r}]"
            if "weight_bits" in spec:
                check_bits(spec["weight_bits"], f"{where}.weight_bits")
            if spec.get("act_bits") is not None:
                check_bits(spec["act_bits"], f"{where}.act_bits")
            if spec.get("weight_format") is not None:
                FixedPointFormat.parse(spec["weight_format"], signed=True)
            if spec.get("act_format") is not None:
                FixedPointFormat.parse(spec["act_format"], signed=False)
            for flag in ("per_channel", "power_of_two"):
                if flag in spec and not isinstance(spec[flag], bool):
                    raise ValueError(f"{where}.{flag} must be True or False, got {spec[flag]!r}.")
            if "weight_grid" in spec and spec["weight_grid"] not in GRID_KINDS:
                raise ValueError(f"{where}.weight_grid must be one of {GRID_KINDS}, got {spec['weight_grid']!r}.")
            if "method" in spec and spec["method"] not in METHODS:
                raise ValueError(f"{where}.method must be one of {tuple(METHODS)}, got {spec['method']!r}{_REGISTER_HINT}.")
            if self.act_grid == "symmetric" and spec.get("act_format") is not None:
                raise ValueError(f"{where}.act_format sets its own grid: use it or act_grid='symmetric', not both.")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}, got {self.method!r}{_REGISTER_HINT}.")
        if self.weight_grid not in GRID_KINDS:
            raise ValueError(f"weight_grid must be one of {GRID_KINDS}, got {self.weight_grid!r}.")
        if self.init not in ("gptq", "rtn"):
            raise ValueError(f"init must be 'gptq' or 'rtn', got {self.init!r}.")
        if self.attention_power < 0:
            raise ValueError(f"attention_power must be non-negative, got {self.attention_power}.")
        for flag in ("power_of_two", "per_channel", "attention", "fold_batchnorm"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}.")
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

    def plan(self, ordered_names: list[str], input_layers: list[str] | tuple[str, ...] = ()) -> list[LayerPlan]:
        """What each layer gets, given the quantizable layers in execution order.

        The body layers get the config's settings; the first layer (and every other that reads the
        network input) and the last layer their own bits (and no explicit format); overrides then
        set any per-layer setting (:data:`OVERRIDE_KEYS`; bits drop the format they replace, a
        format sets its bits).

        Args:
            ordered_names: names of the quantizable layers, in the order the network runs them.
            input_layers: the layers that read the network input (a residual unit's first
                convolution reads the image as its shortcut does: a body format such as ``Q6.0``
                would round the image to a few levels).

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
            layer = {
                "weight_bits": self.weight_bits, "act_bits": self.act_bits, "weight_format": self.weight_format,
                "act_format": self.act_format, "per_channel": self.per_channel, "weight_grid": None,
                "power_of_two": self.power_of_two, "method": self.method,
            }
            first = i == 0 or name in input_layers
            edge = self.first_layer_bits if first else self.last_layer_bits if i == len(ordered_names) - 1 else None
            if edge is not None:
                layer.update(weight_bits=edge, weight_format=None, act_format=None)
                layer["act_bits"] = None if self.act_bits is None else edge
            for pattern, spec in self.overrides.items():
                if match_pattern(pattern, name):
                    if "weight_bits" in spec and "weight_format" not in spec:
                        layer["weight_format"] = None
                    if "act_bits" in spec and "act_format" not in spec:
                        layer["act_format"] = None
                    layer.update(spec)
            plans.append(self._layer_plan(name, layer))
        return plans

    def _layer_plan(self, name: str, layer: dict[str, Any]) -> LayerPlan:
        grid = layer["weight_grid"] or self.weight_grid_for(layer["weight_bits"])
        weight = WeightSpec.of(
            layer["weight_bits"], grid, layer["per_channel"], layer["power_of_two"], layer["weight_format"]
        )
        act = None
        if layer["act_bits"] is not None or layer["act_format"] is not None:
            act_bits = layer["act_bits"]
            if layer["act_format"] is not None:
                act_bits = FixedPointFormat.parse(layer["act_format"], signed=False).bits
            act = ActivationSpec(act_bits, self.act_kind, layer["power_of_two"], layer["act_format"])
        return LayerPlan(name, weight, act, layer["method"])
