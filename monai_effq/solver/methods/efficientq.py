"""EfficientQ: ADMM against the layer's full-precision outputs, from round-to-nearest's codes (or the better baseline's)."""

from __future__ import annotations

import time

import torch

from monai_effq.solver.admm import AdmmLayerSolver
from monai_effq.solver.gram import LayerStatistics
from monai_effq.solver.methods import LayerProblem, MethodResult, register_method
from monai_effq.solver.rounding import gptq_round

__all__ = ["paper_problem_scale", "solve_efficientq"]


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


@register_method("efficientq")
def solve_efficientq(problem: LayerProblem) -> MethodResult:
    """ADMM from round-to-nearest's codes or, with ``init="gptq"``, the better of them and GPTQ's.

    Keeping the best iterate, ADMM is no worse than its start on the layer's output error (from
    the better baseline, no worse than either: GPTQ's greedy rounding can lose to RTN on tiny
    layers); the final refinement then lowers the η-regularised objective, which at a large η can
    give up some calibration fit for closeness to the FP weights.
    """
    stats, w0, fit = problem.stats, problem.w0, problem.fit
    s = paper_problem_scale(stats, w0)
    solver = AdmmLayerSolver(stats, w0, problem.admm, s)
    t_init = time.perf_counter()
    codes = problem.rtn_codes
    init_mse = problem.error(fit.values(codes))
    if problem.init == "gptq":
        gptq_codes = gptq_round(w0, stats.A, fit, damp=problem.gptq_damp)
        gptq_mse = problem.error(fit.values(gptq_codes))
        if gptq_mse <= init_mse:
            codes, init_mse = gptq_codes, gptq_mse
    info = {"init_seconds": time.perf_counter() - t_init, "init_mse": init_mse, "problem_scale": s, "lowrank": solver.lowrank}
    codes, fit, trace = solver.solve(codes, fit)
    return MethodResult(codes, fit, trace, info)
