"""The one configuration of a network quantization run, as plain data that round-trips through JSON."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from monai_effq.quant.fixed_point import FixedPointFormat
from monai_effq.quant.grid import GRID_KINDS
from monai_effq.quant.spec import SCALE_METHODS, ActivationSpec, WeightSpec
from monai_effq.solver.admm import AdmmSettings
from monai_effq.solver.api import METHODS
from monai_effq.utils.errors import UserInputError, check_flag, check_integer, check_number

__all__ = ["EfficientQConfig", "LayerPlan", "NETWORK_INPUT_GRID", "OVERRIDE_KEYS", "match_pattern"]


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


def _parse_format(text: Any, name: str, signed: bool) -> FixedPointFormat:
    """A fixed-point format setting, parsed; a malformed one is the user's error, named."""
    if not isinstance(text, str):
        raise UserInputError(f"{name} must be a fixed-point format such as 'Q0.4', got {text!r}.")
    try:
        return FixedPointFormat.parse(text, signed=signed)
    except ValueError as e:
        raise UserInputError(f"{name}: {e}") from None


# a sanity bound on the class weights' power p, (max n / n_c)^p: at 8 a class of a thousandth of the voxels already
# weighs 1e24 times the largest one, so no larger power serves a purpose (the paper's is 0.5), and inf or 1e6 overflow
# float32 and stop the solver later with a message about voxel weights that names no setting
_MAX_ATTENTION_POWER = 8.0


def _check_patterns(value: Any) -> list[str]:
    """``skip`` is a list of layer-name patterns; a bare string would be read letter by letter."""
    if isinstance(value, str):
        raise UserInputError(f"skip must be a list of layer-name patterns, got the string {value!r}: write [{value!r}].")
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise UserInputError(f"skip must be a list of layer-name patterns (strings), got {value!r}.")
    return list(value)


def _check_device(value: Any) -> str:
    """A device name torch understands (whether it exists here is checked when a run starts)."""
    if isinstance(value, torch.device):
        return str(value)
    try:
        return str(torch.device(value))
    except (RuntimeError, TypeError, ValueError):
        raise UserInputError(f"device must be a torch device name such as 'cpu', 'cuda' or 'cuda:0', got {value!r}.") from None


# activation grid choices: "auto" (from calibration), or a grid for every input ("asymmetric": the
# calibrated zero point also where "auto" takes the symmetric grid for OpenVINO's sake)
ACT_GRIDS = ("auto", "symmetric", "asymmetric")
# act_grid="auto": the grid of an 8-bit network input with negative values (a normalised image). With
# its zero point gone the first convolution reads int8 without zero-point compensation: SegResNet
# init 16 W8A8 at 1x4x128^3, OpenVINO 2026.4, 2-core Intel Xeon, 9 / 7 / 7 interleaved requests:
# 251.0 -> 245.6 ms with AMX (bf16), 506.6 -> 499.9 ms capped at AVX-512 VNNI, 1010.9 -> 997.9 ms at
# AVX2 (f32)
NETWORK_INPUT_GRID = "signed"
# "auto": the paper's midrise grid wherever its integers fit a deployed file's container
WEIGHT_GRIDS = ("auto", *GRID_KINDS)


_REGISTER_HINT = " (a method of your own: import the module that registers it first)"

# the per-layer settings an override may set: every field of a layer's specs and its method
OVERRIDE_KEYS = (
    "weight_bits", "act_bits", "weight_format", "act_format", "per_channel", "weight_grid", "power_of_two",
    "scale_method", "act_grid", "method",
)


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
        """The input's explicit fixed-point format (its text), or ``None``."""
        return None if self.act is None or self.act.format is None else str(self.act.format)


@dataclass(frozen=True)
class EfficientQConfig:
    """Settings of :func:`monai_effq.quantize`, checked once when made and fixed from then on
    (``dataclasses.replace`` makes a changed copy, checked again).

    Attributes:
        weight_bits: weight bits of every quantized layer (2 to 8).
        act_bits: bits of every quantized layer's input (2 to 8); ``None`` keeps activations in FP.
        first_layer_bits: weight and activation bits of the first layer in execution order and of
            every other layer that reads the network input (the paper keeps it at 8); ``None``
            uses ``weight_bits``/``act_bits``.
        last_layer_bits: the same for the last layer.
        overrides: module-name pattern → per-layer settings (later patterns win): any of
            ``weight_bits``, ``act_bits``, ``weight_format``, ``act_format``, ``per_channel``,
            ``weight_grid``, ``power_of_two``, ``scale_method`` (the first fit of the layer's weight
            scale: ``"als"``, the default, ``"mse"`` or ``"minmax"``), ``act_grid`` and ``method``.
        skip: module-name patterns of layers kept in full precision.
        per_channel: one weight scale per output channel.
        method: a registered solver method (``"efficientq"``, ``"gptq"``, ``"rtn"`` or one
            registered with :func:`monai_effq.solver.register_method`).
        weight_grid: weight grid kind. ``"auto"`` (the default) is the paper's ``"midrise"`` grid
            wherever its integers fit the container a deployed file stores them in: 4-bit layers use
            ``"signed"`` (the midrise grid's half-integer zero point needs 5-bit integers, so 4-bit
            files could not shrink below int8; on the real-data benchmark the signed grid's Dice was
            within 0.006 of midrise's, better in three of four settings) and 8-bit layers
            ``"symmetric"``. An explicit ``"midrise"`` keeps the paper's grid at 4 bits too (8-bit
            layers still use ``"symmetric"``: 9-bit integers fit no int8 runtime); ``"signed"``
            has an exact zero everywhere.
        init: EfficientQ's starting assignment: ``"rtn"`` (the paper's, the default) or ``"gptq"``
            (the better of GPTQ's and RTN's codes; on the real-data benchmark no better on whole
            volumes and a quarter slower, see docs/design.md).
        admm: ADMM settings (a dict in JSON).
        attention: weight each output voxel by the self-adaptive class attention.
        attention_power: the power ``p`` of the class weights ``(max n / n_c)^p``, from 0 to 8 (the paper: 0.5).
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
            value and on the asymmetric grid otherwise (every level used), except an 8-bit
            transposed convolution's input, which takes the symmetric grid there: OpenVINO computes a
            transposed convolution in int8 only when its input has no zero point, and ran the LiTS
            bundle UNet's three in f32 otherwise (40.4 ms against 24.8 ms for the whole network at
            96³, 2-core Intel Xeon with AMX, OpenVINO 2026.4; on the real-data benchmark it cost
            0.0015-0.005 held-out Dice at W2A8 and nothing measurable at W8A8 and W4A8), and an 8-bit
            network input (the first layer's, or any layer's that reads the input), which takes the
            signed grid (:data:`NETWORK_INPUT_GRID`): the first convolution then reads int8 with no
            zero point to compensate, 1-2% of the network's time on every kernel set measured;
            ``"symmetric"`` puts every input on the symmetric signed grid with zero point 0, which
            TensorRT's int8 requires (:mod:`monai_effq.deploy.tensorrt`): one bit less for inputs
            after a ReLU; ``"asymmetric"`` puts every input on the asymmetric grid (an override
            ``{"<transposed layer>": {"act_grid": "asymmetric"}}`` keeps its zero point).
        validation_fraction: share of the calibration windows held out (every ``1/fraction``-th
            window when there are that many, else that share of every window as one slab along its
            longest axis) to choose each layer's regularisation by held-out
            output error (:mod:`monai_effq.solver.validation`); round-to-nearest is always a
            candidate, and layers with fewer calibration voxels than unknowns per output channel
            keep round-to-nearest. ``0`` turns both off (one solve per layer, as the paper).
        calibration_flips: calibrate on every window and its mirror images (flipped along every
            subset of its spatial axes: 8 windows per window in 3D; :mod:`monai_effq.ptq.mirroring`),
            for 8 times the passes. For one small crop: on the benchmark UNet and real MRI
            (``benchmarks/accuracy.py``, 7 crop positions) its labels agreed better with the FP
            network's at every 8-bit-input setting on average (at 4-bit inputs: better on average,
            worse at 2 of 7 positions); on whole volumes it bought nothing for 2.5 times the time (W4A4
            0.006 lower Dice against the truth). Off by default.
        quantize_norm_inputs: also round the input of every group/instance norm to ``act_bits``
            (:mod:`monai_effq.ptq.norm_inputs`; calibrated on the FP network's first calibration
            batch, on the ``act_grid`` grid, with ``power_of_two``), where NNCF's int8 graphs round
            them too; a residual block's first norm has it at the block's input, so the skip path
            reads the same int8 tensor. Needs ``act_bits``. Off by default: on the untrained
            SegResNet (init 16, 1x4x128³, OpenVINO 2026.4 in bf16, this project's 2-core AVX-512
            CPU) it ran level with NNCF's int8 and with our graph without it (0.320 s, NNCF 0.319 s,
            without it 0.322 s, one interleaved run), so it buys no speed for an extra rounding point.
        share_skip_rounding: give a residual unit whose skip is the identity (a U-Net's decoder
            units) one rounding of its input, read by its first layer and by the skip add
            (:mod:`monai_effq.ptq.skip_rounding`; inputs on grids of 8 bits only), so an int8 runtime
            adds 8-bit tensors there: the LiTS bundle's UNet ran 27.8 -> 26.5 ms in OpenVINO (96³,
            W8A8, bf16 default, 2-core Intel Xeon with AMX), held-out Dice on the real-data benchmark
            moved by -0.0004 to +0.0000.
    """

    weight_bits: int = 4
    act_bits: int | None = 8
    first_layer_bits: int | None = 8
    last_layer_bits: int | None = 8
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    skip: list[str] = field(default_factory=list)
    per_channel: bool = False
    method: str = "efficientq"
    weight_grid: str = "auto"
    init: str = "rtn"
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
    calibration_flips: bool = False
    quantize_norm_inputs: bool = False
    share_skip_rounding: bool = True

    def __post_init__(self) -> None:
        self._normalise()
        self._validate()

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _parse(self, text: Any, name: str, signed: bool) -> FixedPointFormat:
        """Parse a format setting and keep it for :meth:`_format` (the config's one parse of that text)."""
        fmt = _parse_format(text, name, signed)
        self._formats[(text, signed)] = self._formats[(str(fmt), signed)] = fmt
        return fmt

    def _format(self, text: str | None, signed: bool) -> FixedPointFormat | None:
        """The parsed form of a format text that :meth:`_normalise` read (``None`` for ``None``)."""
        return None if text is None else self._formats[(text, signed)]

    def _normalise(self) -> None:
        """Check every field's type and store it in its plain form (numpy integers become ``int``).

        Raises:
            UserInputError: naming the first field of the wrong type and what it accepts.
        """
        if isinstance(self.admm, Mapping):
            try:
                self._set("admm", AdmmSettings(**self.admm))
            except (TypeError, ValueError) as e:
                raise UserInputError(f"admm: {e}") from None
        elif not isinstance(self.admm, AdmmSettings):
            raise UserInputError(f"admm must be AdmmSettings or a dict of its fields, got {self.admm!r}.")
        # every format text is parsed here, once; the checks and the plan read the parsed formats
        self._set("_formats", {})
        for name in ("weight_format", "act_format"):
            if getattr(self, name) is not None:
                fmt = self._parse(getattr(self, name), name, signed=name == "weight_format")
                # kept as written canonically: " q0.4" and "Q0.4" are one config, model tag and file name
                self._set(name, str(fmt))
                self._set(name.replace("format", "bits"), fmt.bits)
        self._set("weight_bits", check_integer(self.weight_bits, "weight_bits", 2, 8))
        for name in ("act_bits", "first_layer_bits", "last_layer_bits"):
            if getattr(self, name) is not None:
                self._set(name, check_integer(getattr(self, name), name, 2, 8))
        for name in (
            "per_channel", "attention", "fold_batchnorm", "power_of_two", "calibration_flips", "quantize_norm_inputs", "share_skip_rounding",
        ):
            self._set(name, check_flag(getattr(self, name), name))
        if not isinstance(self.overrides, Mapping):
            raise UserInputError(f"overrides must be a dict from layer-name pattern to settings, got {self.overrides!r}.")
        self._set("overrides", {p: self._normalised_override(p, spec) for p, spec in self.overrides.items()})
        self._set("skip", _check_patterns(self.skip))
        self._set(
            "attention_power",
            check_number(self.attention_power, "attention_power", 0.0, _MAX_ATTENTION_POWER, hint=" (the paper uses 0.5)"),
        )
        self._set("validation_fraction", check_number(self.validation_fraction, "validation_fraction", 0.0, 0.5))
        self._set("max_chunk_elements", check_integer(self.max_chunk_elements, "max_chunk_elements", low=1))
        self._set("target_memory_mib", check_integer(self.target_memory_mib, "target_memory_mib", low=1))
        self._set("device", _check_device(self.device))
        for name in ("method", "weight_grid", "init", "act_grid"):
            if not isinstance(getattr(self, name), str):
                raise UserInputError(f"{name} must be a name (text), got {getattr(self, name)!r}.")

    def _normalised_override(self, pattern: Any, spec: Any) -> dict[str, Any]:
        """One override, its keys, types and formats checked, numpy integers made ``int``."""
        if not isinstance(pattern, str) or not isinstance(spec, Mapping) or not set(spec) <= set(OVERRIDE_KEYS):
            raise UserInputError(
                f"override {pattern!r} must map a layer-name pattern to a dict with keys among {OVERRIDE_KEYS}, got {spec!r}."
            )
        where = f"overrides[{pattern!r}]"
        spec = dict(spec)
        for name in ("weight_bits", "act_bits"):
            if spec.get(name) is not None or (name == "weight_bits" and name in spec):
                spec[name] = check_integer(spec[name], f"{where}.{name}", 2, 8)
        for name in ("weight_format", "act_format"):
            if spec.get(name) is not None:
                spec[name] = str(self._parse(spec[name], f"{where}.{name}", signed=name == "weight_format"))
        for flag in ("per_channel", "power_of_two"):
            if flag in spec:
                spec[flag] = check_flag(spec[flag], f"{where}.{flag}")
        return spec

    def _validate(self) -> None:
        """Check every field's value (once: the config is frozen).

        Raises:
            UserInputError: naming the first bad field and what it accepts.
        """
        for pattern, spec in self.overrides.items():
            where = f"overrides[{pattern!r}]"
            if "weight_grid" in spec and spec["weight_grid"] not in WEIGHT_GRIDS:
                raise UserInputError(f"{where}.weight_grid must be one of {WEIGHT_GRIDS}, got {spec['weight_grid']!r}.")
            if "scale_method" in spec and spec["scale_method"] not in SCALE_METHODS:
                raise UserInputError(f"{where}.scale_method must be one of {SCALE_METHODS}, got {spec['scale_method']!r}.")
            if "act_grid" in spec and spec["act_grid"] not in ACT_GRIDS:
                raise UserInputError(f"{where}.act_grid must be one of {ACT_GRIDS}, got {spec['act_grid']!r}.")
            if "method" in spec and spec["method"] not in METHODS:
                raise UserInputError(
                    f"{where}.method must be one of {tuple(METHODS)}, got {spec['method']!r}{_REGISTER_HINT}."
                )
            grid = spec.get("act_grid", self.act_grid)
            if grid != "auto" and spec.get("act_format") is not None:
                raise UserInputError(f"{where}.act_format sets its own grid: use it or act_grid={grid!r}, not both.")
        if self.method not in METHODS:
            raise UserInputError(f"method must be one of {tuple(METHODS)}, got {self.method!r}{_REGISTER_HINT}.")
        if self.weight_grid not in WEIGHT_GRIDS:
            raise UserInputError(f"weight_grid must be one of {WEIGHT_GRIDS}, got {self.weight_grid!r}.")
        if self.init not in ("gptq", "rtn"):
            raise UserInputError(f"init must be 'gptq' or 'rtn', got {self.init!r}.")
        if self.act_grid not in ACT_GRIDS:
            raise UserInputError(f"act_grid must be one of {ACT_GRIDS}, got {self.act_grid!r}.")
        if self.act_grid != "auto" and self.act_format is not None:
            raise UserInputError(f"act_format sets its own grid: use it or act_grid={self.act_grid!r}, not both.")
        if self.quantize_norm_inputs and self.act_bits is None:
            raise UserInputError("quantize_norm_inputs rounds norm inputs to act_bits: set act_bits or turn it off.")

    @property
    def act_kind(self) -> str | None:
        """The activation grid kind every layer's input calibrates on (``None``: chosen per input)."""
        return None if self.act_grid == "auto" else self.act_grid

    @property
    def norm_input_spec(self) -> ActivationSpec | None:
        """The grid of every group/instance norm's input (``None``: norm inputs stay in floating point)."""
        if not self.quantize_norm_inputs:
            return None
        return ActivationSpec(self.act_bits, self.act_kind, self.power_of_two)

    def weight_grid_for(self, bits: int, kind: str | None = None) -> str:
        """The weight grid kind of a layer with ``bits``-bit weights (see ``weight_grid``).

        Args:
            bits: the layer's weight bits.
            kind: the layer's own ``weight_grid`` override; one other than ``"auto"`` is taken as
                written. ``None``: the config's ``weight_grid``.

        Returns:
            a grid kind.
        """
        if kind not in (None, "auto"):
            return kind
        kind = kind or self.weight_grid
        if kind in ("auto", "midrise") and bits == 8:
            return "symmetric"
        if kind == "auto":
            return "signed" if bits == 4 else "midrise"
        return kind

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
            UserInputError: for an unknown key or a bad value.
        """
        if not isinstance(data, Mapping):
            raise UserInputError(f"an EfficientQConfig is read from a dict of its fields, got {data!r}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UserInputError(f"unknown EfficientQConfig keys {sorted(unknown)}; known keys are {sorted(known)}.")
        return cls(**data)

    def plan(
        self,
        ordered_names: list[str],
        input_layers: list[str] | tuple[str, ...] = (),
        channel_axes: Mapping[str, int] | None = None,
        transposed_layers: Collection[str] = (),
    ) -> list[LayerPlan]:
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
            channel_axes: the axis of each layer's native weight that holds its output channels
                (:attr:`~monai_effq.solver.layers.LayerView.output_axis`: 1 for a transposed
                convolution); a layer not named has them on axis 0. Per-channel specs carry it.
            transposed_layers: the transposed convolutions, whose 8-bit inputs ``act_grid="auto"``
                puts on the symmetric grid when they hold negative values.

        Returns:
            the plan of every layer not skipped, in the same order.

        Raises:
            UserInputError: when a skip or override pattern matches no layer (a typo would otherwise
                silently quantize what the user meant to protect).
        """
        for pattern in [*self.skip, *self.overrides]:
            if not any(match_pattern(pattern, n) for n in ordered_names):
                shown = ", ".join(ordered_names[:12]) + (" ..." if len(ordered_names) > 12 else "")
                raise UserInputError(
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
                "power_of_two": self.power_of_two, "scale_method": "als", "act_grid": self.act_grid, "method": self.method,
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
            plans.append(self._layer_plan(name, layer, (channel_axes or {}).get(name, 0), name in transposed_layers, first))
        return plans

    def _layer_plan(self, name: str, layer: dict[str, Any], channel_axis: int, transposed: bool, reads_input: bool) -> LayerPlan:
        grid = self.weight_grid_for(layer["weight_bits"], layer["weight_grid"])
        weight = WeightSpec.of(
            layer["weight_bits"], grid, layer["per_channel"], layer["power_of_two"],
            self._format(layer["weight_format"], signed=True), layer["scale_method"], channel_axis,
        )
        act = None
        act_format = self._format(layer["act_format"], signed=False)
        if act_format is not None and layer["act_grid"] != "auto":
            raise UserInputError(
                f"layer {name} gets act_format {act_format}, which sets its own grid, and act_grid={layer['act_grid']!r}: use one."
            )
        if layer["act_bits"] is not None or act_format is not None:
            act_bits = layer["act_bits"] if act_format is None else act_format.bits
            kind = None if layer["act_grid"] == "auto" else layer["act_grid"]
            # below 8 bits the asymmetric grid is exported without a zero point anyway (deploy.export)
            signed_kind = "asymmetric"
            if act_bits == 8 and transposed:
                signed_kind = "symmetric"
            elif act_bits == 8 and reads_input:
                signed_kind = NETWORK_INPUT_GRID
            act = ActivationSpec(act_bits, kind, layer["power_of_two"], act_format, signed_kind)
        return LayerPlan(name, weight, act, layer["method"])
