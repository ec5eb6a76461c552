"""GPTQ: columns rounded in order, each one's error fed back through the inverse Gram matrix."""

from __future__ import annotations

from monai_effq.solver.methods import LayerProblem, MethodResult, register_method
from monai_effq.solver.rounding import gptq_round

__all__ = ["solve_gptq"]


@register_method("gptq")
def solve_gptq(problem: LayerProblem) -> MethodResult:
    """GPTQ's rounding on round-to-nearest's grid and scale."""
    return MethodResult(gptq_round(problem.w0, problem.stats.A, problem.fit, damp=problem.gptq_damp), problem.fit)
