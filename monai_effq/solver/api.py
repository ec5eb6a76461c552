"""One entry point for quantizing one layer: :func:`solve_layer` and its :class:`LayerSolution`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from monai_effq.quant.fixed_point import FixedPointFormat
from monai_effq.quant.grid import UniformGrid, check_bits
from monai_effq.solver.admm import AdmmLayerSolver, AdmmSettings, AdmmTrace
from monai_effq.solver.gram import GramAccumulator, LayerStatistics
from monai_effq.solver.layers import LayerView, layer_view
from monai_effq.solver.rounding import fit_grid, gptq_round, round_to_nearest

__all__ = ["LayerSolution", "METHODS", "solve_layer", "solve_statistics", "paper_problem_scale"]

METHODS = ("efficientq", "gptq", "rtn")
DEFAULT_WEIGHT_GRID = "midrise"


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


def paper_problem_scale(stats: LayerStatistics, w0: torch.Tensor) -> float:
    """The EfficientQ paper's scale ``s`` of ρ and η.

    ``s = max(numel(Y) std(Y) / (numel(W) std(W)), 1) · mean(h)``, with Y's moments h-weighted.

    Args:
        stats: the layer's statistics.
        w0: ``(G, m, n)`` full-precision weights.

    Returns:
        the scale.
    """
    c_out = stats.out_channels
    y_mean = stats.y_mean.double().reshape(-1)
    var = (stats.y_energy.sum() + stats.weight_sum * (y_mean - y_mean.mean()).pow(2).sum()) / (
        stats.weight_sum * c_out
    )
    y_std = float(var.clamp_min(0).sqrt())
    w_std = float(w0.std()) if w0.numel() > 1 else 1.0
    ratio = (stats.voxels * c_out * y_std) / max(w0.numel() * w_std, 1e-30)
    return max(ratio, 1.0) * stats.weight_sum / stats.voxels


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")


def solve_statistics(
    view: LayerView,
    stats: LayerStatistics,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_bits: int,
    *,
    method: str = "efficientq",
    per_channel: bool = False,
    grid: str = DEFAULT_WEIGHT_GRID,
    scale_method: str = "als",
    admm: AdmmSettings | None = None,
    init: str = "gptq",
    refit_bias: bool | None = None,
    gptq_damp: float = 0.01,
    power_of_two: bool = False,
    weight_format: FixedPointFormat | None = None,
) -> LayerSolution:
    """Quantize a layer's weights from accumulated statistics.

    Args:
        view: the layer's :class:`LayerView`.
        stats: its statistics (from :class:`GramAccumulator`).
        weight: the layer's native FP weight.
        bias: the layer's FP bias or ``None``.
        weight_bits: 2 to 8.
        method: ``"efficientq"``, ``"gptq"`` or ``"rtn"``.
        per_channel: one scale per output channel.
        grid: weight grid kind (see :data:`monai_effq.quant.GRID_KINDS`).
        scale_method: how the scale is fitted (``"als"``, ``"mse"``, ``"minmax"``).
        admm: ADMM settings for ``"efficientq"``.
        init: EfficientQ's starting assignment: ``"gptq"`` (the better of the GPTQ and RTN
            baselines' roundings) or ``"rtn"`` (the paper: round-to-nearest of W0).
        refit_bias: refit the bias by least squares for the final weights (default: yes, except
            for ``"rtn"``, which is the plain baseline).
        gptq_damp: GPTQ's ridge, as a fraction of the Gram matrix's mean diagonal.
        power_of_two: restrict the scale to powers of two (fixed point with ``f`` fitted per
            tensor or channel), in the initial fit and in every refit of the solver.
        weight_format: an explicit fixed-point format ``Qi.f``: its grid and step replace
            ``grid``/``weight_bits`` and the scale is never refitted.

    Returns:
        the :class:`LayerSolution`.
    """
    _check_method(method)
    if weight_format is not None:
        weight_bits, grid = weight_format.bits, weight_format.grid.kind
    check_bits(weight_bits, "weight_bits")
    if init not in ("gptq", "rtn"):
        raise ValueError(f"init must be 'gptq' or 'rtn', got {init!r}.")
    if not torch.isfinite(weight).all():
        raise ValueError(f"the {view.name} weights contain NaN or Inf values.")
    t0 = time.perf_counter()
    g, m = view.groups, view.out_per_group
    w0 = view.weight_matrix(weight).float()
    b0 = torch.zeros(g, m, device=weight.device) if bias is None else bias.detach().float().reshape(g, m)
    qgrid = UniformGrid(weight_bits, grid)
    refit = method != "rtn" if refit_bias is None else refit_bias

    if weight_format is not None:
        rtn_fit = fit_grid(w0, qgrid, per_channel, scale_rule="fixed", fixed_scale=weight_format.step)
    else:
        rtn_fit = fit_grid(w0, qgrid, per_channel, scale_method, scale_rule="power_of_two" if power_of_two else "free")
    rtn_codes = round_to_nearest(w0, rtn_fit)
    error = stats.error_near(w0)
    mse_rtn = error(rtn_fit.values(rtn_codes), b0)
    mse_fp = error(w0, b0)
    trace = None
    info: dict = {}
    if method == "rtn":
        codes, fit = rtn_codes, rtn_fit
    elif method == "gptq":
        fit = rtn_fit
        codes = gptq_round(w0, stats.A, fit, damp=gptq_damp)
    else:
        settings = admm or AdmmSettings()
        s = paper_problem_scale(stats, w0)
        solver = AdmmLayerSolver(stats, w0, settings, s)
        t_init = time.perf_counter()
        fit = rtn_fit
        codes = rtn_codes
        init_mse = error(fit.values(rtn_codes))
        if init == "gptq":
            # Start from the better of the two baselines' assignments (GPTQ's greedy rounding can lose
            # to RTN on tiny layers); with the best iterate kept, EfficientQ is no worse than either.
            gptq_codes = gptq_round(w0, stats.A, fit, damp=gptq_damp)
            gptq_mse = error(fit.values(gptq_codes))
            if gptq_mse <= init_mse:
                codes, init_mse = gptq_codes, gptq_mse
        info["init_seconds"] = time.perf_counter() - t_init
        info["init_mse"] = init_mse
        info["problem_scale"] = s
        info["lowrank"] = solver.lowrank
        codes, fit, trace = solver.solve(codes, fit)
    wq = fit.values(codes)
    bq = stats.bias_for(wq) if refit else b0
    mse = error(wq, bq)
    native_codes = view.native_weight(codes).to(torch.uint8)
    return LayerSolution(
        weight=view.native_weight(wq).to(weight.dtype),
        bias=bq.reshape(-1).to(weight.dtype),
        codes=native_codes,
        scale=fit.scale.clone(),
        zero_point=fit.zero_point.clone(),
        grid=qgrid,
        method=method,
        mse_rtn=mse_rtn,
        mse=mse,
        mse_fp=mse_fp,
        seconds=time.perf_counter() - t0,
        trace=trace,
        info=info,
    )


def solve_layer(
    layer: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    weight_bits: int,
    *,
    method: str = "efficientq",
    voxel_weights: torch.Tensor | None = None,
    per_channel: bool = False,
    grid: str = DEFAULT_WEIGHT_GRID,
    scale_method: str = "als",
    admm: AdmmSettings | None = None,
    init: str = "gptq",
    refit_bias: bool | None = None,
    max_chunk_elements: int = 1 << 24,
    power_of_two: bool = False,
    weight_format: FixedPointFormat | None = None,
) -> LayerSolution:
    """Find low-bit weights with which ``layer`` maps ``inputs`` close to ``targets``.

    Args:
        layer: a ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or ``Linear`` module (not modified).
        inputs: the layer's input batch as the quantized network computes it.
        targets: the layer's output in the full-precision network on the same data.
        weight_bits: 2 to 8.
        method: ``"efficientq"`` (ADMM), ``"gptq"`` or ``"rtn"``.
        voxel_weights: non-negative importance per output voxel (the attention map).
        per_channel: one scale per output channel.
        grid: weight grid kind.
        scale_method: scale fitting method.
        admm: ADMM settings.
        init: EfficientQ's starting assignment (``"gptq"`` or ``"rtn"``).
        refit_bias: refit the bias for the final weights.
        max_chunk_elements: memory cap on one unfolded chunk (elements).
        power_of_two: power-of-two (fixed-point) scales only.
        weight_format: an explicit fixed-point format (replaces ``weight_bits`` and ``grid``).

    Returns:
        the :class:`LayerSolution`.

    Raises:
        TypeError: for an unsupported layer type.
        ValueError: for bad shapes, non-finite values, bits outside 2..8, an unknown method or
            empty calibration data.
    """
    view = layer_view(layer)
    _check_method(method)
    check_bits(weight_format.bits if weight_format is not None else weight_bits, "weight_bits")
    if inputs.numel() == 0 or targets.numel() == 0:
        raise ValueError(f"empty calibration data for {view.name}: inputs and targets need at least one sample.")
    acc = GramAccumulator(view, max_chunk_elements=max_chunk_elements)
    acc.add_batch(inputs, targets, voxel_weights)
    return solve_statistics(
        view,
        acc.statistics(),
        layer.weight,
        layer.bias,
        weight_bits,
        method=method,
        per_channel=per_channel,
        grid=grid,
        scale_method=scale_method,
        admm=admm,
        init=init,
        refit_bias=refit_bias,
        power_of_two=power_of_two,
        weight_format=weight_format,
    )
