"""Round to nearest: the plain baseline."""

from __future__ import annotations

from monai_effq.solver.methods import LayerProblem, MethodResult, register_method

__all__ = ["solve_rtn"]


@register_method("rtn", refits_bias=False, needs_statistics=False)
def solve_rtn(problem: LayerProblem) -> MethodResult:
    """The nearest grid point of every FP weight."""
    return MethodResult(problem.rtn_codes, problem.fit)
