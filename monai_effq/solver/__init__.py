"""The layer solver: normal equations, rounding methods and EfficientQ's ADMM. Knows nothing of MONAI."""

from monai_effq.solver.admm import AdmmLayerSolver, AdmmSettings, AdmmTrace
from monai_effq.solver.api import (
    METHODS,
    LayerSolution,
    as_weight_spec,
    paper_problem_scale,
    solve_layer,
    solve_statistics,
    solve_weights,
)
from monai_effq.solver.gram import GramAccumulator, LayerStatistics
from monai_effq.solver.layers import SUPPORTED_LAYERS, LayerView, ParityClass, PatchChunk, layer_view
from monai_effq.solver.methods import LayerProblem, MethodResult, register_method
from monai_effq.solver.output_error import OutputError
from monai_effq.solver.rounding import GridFit, fit_grid, gptq_round, round_to_nearest

__all__ = [
    "AdmmLayerSolver",
    "AdmmSettings",
    "AdmmTrace",
    "METHODS",
    "LayerProblem",
    "MethodResult",
    "register_method",
    "LayerSolution",
    "as_weight_spec",
    "paper_problem_scale",
    "solve_layer",
    "solve_statistics",
    "solve_weights",
    "OutputError",
    "GramAccumulator",
    "LayerStatistics",
    "SUPPORTED_LAYERS",
    "LayerView",
    "ParityClass",
    "PatchChunk",
    "layer_view",
    "GridFit",
    "fit_grid",
    "gptq_round",
    "round_to_nearest",
]
