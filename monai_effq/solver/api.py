"""One entry point for quantizing one layer: :func:`solve_layer` and its :class:`LayerSolution`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from monai_effq.quant.fixed_point import FixedPointFormat
from monai_effq.quant.grid import UniformGrid
from monai_effq.quant.spec import WeightSpec
from monai_effq.solver.admm import AdmmSettings, AdmmTrace
from monai_effq.solver.gram import GramAccumulator, LayerStatistics
from monai_effq.solver.layers import LayerView, layer_view
from monai_effq.solver.methods import METHODS, LayerProblem, MethodResult, get_method
from monai_effq.solver.methods.efficientq import paper_problem_scale
from monai_effq.solver.rounding import GridFit, fit_grid, round_to_nearest
from monai_effq.utils.errors import UserInputError

__all__ = ["LayerSolution", "METHODS", "as_weight_spec", "solve_layer", "solve_statistics", "solve_weights", "paper_problem_scale"]

DEFAULT_WEIGHT_GRID = "midrise"
DEFAULT_METHOD = "efficientq"


@dataclass
class LayerSolution:
    """Quantized weights of one layer and how good they are.

    Attributes:
        weight: float weights on the grid, shaped like the layer's weight.
        bias: float bias (``(c_out,)``), refitted by least squares unless disabled.
        codes: integer codes (``torch.uint8``), shaped like the layer's weight.
        scale: grid step, 0-d or one per output channel.
        zero_point: code of the real value 0, same shape as ``scale``.
        grid: the :class:`UniformGrid` the codes index.
        method: the solver method used.
        mse_rtn: weighted output MSE with round-to-nearest weights and the FP bias.
        mse: weighted output MSE of this solution.
        mse_fp: weighted output MSE of the FP weights on the same inputs (the floor input error sets).
        seconds: wall time of the solve (excluding statistics accumulation).
        trace: the ADMM trace for ``"efficientq"``, else ``None``.
        info: extra timings and choices, for reports.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    grid: UniformGrid
    method: str
    mse_rtn: float
    mse: float
    mse_fp: float
    seconds: float
    trace: AdmmTrace | None = None
    info: dict = field(default_factory=dict)


SOLVER_OPTIONS = ("method", "admm", "init", "refit_bias", "gptq_damp")


def as_weight_spec(spec: WeightSpec | int) -> WeightSpec:
    """A layer's :class:`~monai_effq.quant.spec.WeightSpec`, or the default one of its bits.

    Args:
        spec: a spec, or just the bits (per-tensor, the default grid, free scale).

    Returns:
        the spec.
    """
    return spec if isinstance(spec, WeightSpec) else WeightSpec.of(spec, DEFAULT_WEIGHT_GRID)


def _check_float32_range(view: LayerView, stats: LayerStatistics, weight: torch.Tensor) -> None:
    """Refuse sums that overflow the float32 ADMM system, naming the layer rather than the Cholesky failure they cause.

    The sums are float64; a weight or activation upstream many orders beyond a trained network's (a
    damaged checkpoint) makes them exceed float32's 3.4e38 when the solver's system is built.
    """
    inputs_fit = bool(torch.isfinite(stats.A).all())
    if inputs_fit and bool(torch.isfinite(stats.B).all()):
        return
    what, sums = ("outputs", stats.B64) if inputs_fit else ("inputs", stats.A64)
    raise UserInputError(
        f"the {view.name} layer's {what} are too large for its float32 least-squares system (sums up to "
        f"{sums.abs().max().item():.3g}, beyond float32's 3.4e38): a weight or activation up to this layer is many orders "
        f"beyond a trained network's (its own largest weight is {weight.detach().abs().max().item():.3g}); check the "
        "network's weights (a damaged checkpoint) and the calibration data's intensity scaling."
    )


def solve_statistics(
    view: LayerView,
    stats: LayerStatistics,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: WeightSpec | int,
    *,
    method: str = DEFAULT_METHOD,
    admm: AdmmSettings | None = None,
    init: str = "rtn",
    refit_bias: bool | None = None,
    gptq_damp: float = 0.01,
    rtn_fit: GridFit | None = None,
) -> LayerSolution:
    """Quantize a layer's weights from accumulated statistics.

    Args:
        view: the layer's :class:`LayerView`.
        stats: its statistics (from :class:`GramAccumulator`).
        weight: the layer's native FP weight.
        bias: the layer's FP bias or ``None``.
        spec: the layer's :class:`~monai_effq.quant.spec.WeightSpec` (grid, granularity, scale
            rule), or just its bits (per-tensor, midrise grid, free scale).
        method: a registered method (:data:`METHODS`: ``"efficientq"``, ``"gptq"``, ``"rtn"``).
        admm: ADMM settings for ``"efficientq"``.
        init: EfficientQ's starting assignment: ``"rtn"`` (the paper: round-to-nearest of W0)
            or ``"gptq"`` (the better of the GPTQ and RTN baselines' roundings).
        refit_bias: refit the bias by least squares for the final weights (default: the method's
            choice; round-to-nearest, the plain baseline, keeps the FP bias).
        gptq_damp: GPTQ's ridge, as a fraction of the Gram matrix's mean diagonal.
        rtn_fit: ``fit_grid`` of ``weight``'s matrix under ``spec``, where the caller already has it
            (:func:`~monai_effq.solver.validation.solve_validated` fits it once for all its candidates).

    Returns:
        the :class:`LayerSolution`.

    Raises:
        ValueError: for an unknown ``init`` or ``method``, non-finite weights, or an ``rtn_fit`` of another spec.
        UserInputError: for sums beyond float32's range (weights or activations far out of a trained network's).
    """
    solver = get_method(method)
    spec = as_weight_spec(spec)
    if init not in ("gptq", "rtn"):
        raise ValueError(f"init must be 'gptq' or 'rtn', got {init!r}.")
    if not torch.isfinite(weight).all():
        raise ValueError(f"the {view.name} weights contain NaN or Inf values.")
    _check_float32_range(view, stats, weight)
    t0 = time.perf_counter()
    g, m = view.groups, view.out_per_group
    w0 = view.weight_matrix(weight).float()
    b0 = torch.zeros(g, m, device=weight.device) if bias is None else bias.detach().float().reshape(g, m)
    if rtn_fit is None:
        rtn_fit = fit_grid(w0, spec)
    elif rtn_fit.grid != spec.grid or rtn_fit.scale_rule != spec.scale_rule or rtn_fit.scale.numel() != (g * m if spec.per_channel else 1):
        raise ValueError(
            f"the rtn_fit given for {view.name} is not a fit of its spec {spec}: pass fit_grid(weight matrix, spec) or None."
        )
    rtn_codes = round_to_nearest(w0, rtn_fit)
    error = stats.error_near(w0)
    mse_rtn = error(rtn_fit.values(rtn_codes), b0)
    mse_fp = error(w0, b0)
    problem = LayerProblem(view, stats, w0, rtn_fit, rtn_codes, error, admm or AdmmSettings(), init, gptq_damp)
    result = solver.solve(problem)
    wq = result.fit.values(result.codes)
    bq = stats.bias_for(wq) if (solver.refits_bias if refit_bias is None else refit_bias) else b0
    return _solution(view, weight, spec, method, result, bq, (mse_rtn, error(wq, bq), mse_fp), t0)


def _solution(
    view: LayerView,
    weight: torch.Tensor,
    spec: WeightSpec,
    method: str,
    result: MethodResult,
    bias: torch.Tensor,
    errors: tuple[float, float, float],
    t0: float,
) -> LayerSolution:
    """The :class:`LayerSolution` of a method's result: weights in the layer's layout, ``errors`` as
    (RTN, solution, FP) MSE, ``t0`` the solve's start."""
    return LayerSolution(
        weight=view.native_weight(result.fit.values(result.codes)).to(weight.dtype),
        bias=bias.reshape(-1).to(weight.dtype),
        codes=view.native_weight(result.codes).to(torch.uint8),
        scale=result.fit.scale.clone(),
        zero_point=result.fit.zero_point.clone(),
        grid=spec.grid,
        method=method,
        mse_rtn=errors[0],
        mse=errors[1],
        mse_fp=errors[2],
        seconds=time.perf_counter() - t0,
        trace=result.trace,
        info=result.info,
    )


def solve_weights(
    view: LayerView,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: WeightSpec | int,
    *,
    method: str = "rtn",
) -> LayerSolution:
    """Quantize a layer with a method whose codes do not depend on the calibration data.

    Such a method (registered with ``needs_statistics=False``: round to nearest) needs no
    statistics; the error figures of the solution are left ``nan`` for the caller to measure on
    the layer's data (:class:`~monai_effq.solver.output_error.OutputError`) and fill in.

    Args:
        view: the layer's :class:`LayerView`.
        weight: the layer's native FP weight.
        bias: the layer's FP bias or ``None``.
        spec: the layer's :class:`~monai_effq.quant.spec.WeightSpec`, or just its bits.
        method: a registered method that needs no statistics.

    Returns:
        the :class:`LayerSolution`, with the FP bias and ``nan`` error figures.

    Raises:
        ValueError: for a method that needs statistics, or non-finite weights.
    """
    solver = get_method(method)
    if solver.needs_statistics:
        raise ValueError(f"method {method!r} fits its codes to the calibration data: solve it with solve_statistics.")
    spec = as_weight_spec(spec)
    if not torch.isfinite(weight).all():
        raise ValueError(f"the {view.name} weights contain NaN or Inf values.")
    t0 = time.perf_counter()
    w0 = view.weight_matrix(weight).float()
    fit = fit_grid(w0, spec)
    codes = round_to_nearest(w0, fit)
    result = solver.solve(LayerProblem(view, None, w0, fit, codes, None, AdmmSettings()))
    b0 = torch.zeros(view.out_channels, device=weight.device) if bias is None else bias.detach().float()
    nan = float("nan")
    return _solution(view, weight, spec, method, result, b0, (nan, nan, nan), t0)


def solve_layer(
    layer: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    weight_bits: int | WeightSpec,
    *,
    voxel_weights: torch.Tensor | None = None,
    max_chunk_elements: int = 1 << 24,
    per_channel: bool = False,
    grid: str = DEFAULT_WEIGHT_GRID,
    scale_method: str = "als",
    power_of_two: bool = False,
    weight_format: FixedPointFormat | str | None = None,
    **options: Any,
) -> LayerSolution:
    """Find low-bit weights with which ``layer`` maps ``inputs`` close to ``targets``.

    Args:
        layer: a ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or ``Linear`` module (not modified).
        inputs: the layer's input batch as the quantized network computes it.
        targets: the layer's output in the full-precision network on the same data.
        weight_bits: 2 to 8, or a whole :class:`~monai_effq.quant.spec.WeightSpec` (then the
            grid, granularity and scale arguments below are not used).
        voxel_weights: non-negative importance per output voxel (the attention map).
        max_chunk_elements: memory cap on one unfolded chunk (elements).
        per_channel: one scale per output channel.
        grid: weight grid kind.
        scale_method: scale fitting method.
        power_of_two: power-of-two (fixed-point) scales only.
        weight_format: an explicit fixed-point format (replaces ``weight_bits`` and ``grid``).
        options: the solver's settings, as :func:`solve_statistics` takes them (``method``,
            ``admm``, ``init``, ``refit_bias``, ``gptq_damp``).

    Returns:
        the :class:`LayerSolution`.

    Raises:
        TypeError: for an unsupported layer type.
        ValueError: for bad shapes, non-finite values, bits outside 2..8, an unknown method or
            empty calibration data.
    """
    view = layer_view(layer)
    unknown = set(options) - set(SOLVER_OPTIONS)
    if unknown:  # before the statistics, which can take minutes
        raise TypeError(f"solve_layer got unknown options {sorted(unknown)}; the solver's are {SOLVER_OPTIONS}.")
    get_method(options.get("method", DEFAULT_METHOD))
    if isinstance(weight_bits, WeightSpec):
        spec = weight_bits
    else:
        spec = WeightSpec.of(weight_bits, grid, per_channel, power_of_two, weight_format, scale_method)
    if inputs.numel() == 0 or targets.numel() == 0:
        raise ValueError(f"empty calibration data for {view.name}: inputs and targets need at least one sample.")
    acc = GramAccumulator(view, max_chunk_elements=max_chunk_elements)
    acc.add_batch(inputs, targets, voxel_weights)
    return solve_statistics(view, acc.statistics(), layer.weight, layer.bias, spec, **options)
