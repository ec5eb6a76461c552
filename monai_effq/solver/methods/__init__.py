"""The methods a layer can be solved with, by name.

A method is one module: a function from a :class:`LayerProblem` to a :class:`MethodResult`,
registered with :func:`register_method`. The built-in ones (``"efficientq"``, ``"gptq"``,
``"rtn"``) register themselves when this package is imported; a new one is a new module that
does the same, imported before it is named in a config.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from monai_effq.solver.admm import AdmmSettings, AdmmTrace
from monai_effq.solver.gram import LayerStatistics, NearbyError
from monai_effq.solver.layers import LayerView
from monai_effq.solver.rounding import GridFit

__all__ = ["LayerProblem", "METHODS", "MethodResult", "SolverMethod", "get_method", "register_method"]


@dataclass
class LayerProblem:
    """One layer's quantization problem, as every method sees it.

    Attributes:
        view: the layer's :class:`LayerView`.
        stats: its statistics (``None`` for a method registered with ``needs_statistics=False``).
        w0: ``(G, m, n)`` full-precision weights (float32).
        fit: the spec's fit of ``w0`` (round-to-nearest's grid and scale).
        rtn_codes: round-to-nearest codes of ``w0`` on ``fit``.
        error: the weighted output MSE of weights near ``w0`` (least-squares bias when none is
            given); ``None`` with ``stats``.
        admm: ADMM settings.
        init: EfficientQ's starting assignment (``"rtn"`` or ``"gptq"``).
        gptq_damp: GPTQ's ridge as a fraction of the Gram matrix's mean diagonal.
    """

    view: LayerView
    stats: LayerStatistics | None
    w0: torch.Tensor
    fit: GridFit
    rtn_codes: torch.Tensor
    error: NearbyError | None
    admm: AdmmSettings
    init: str = "rtn"
    gptq_damp: float = 0.01


@dataclass
class MethodResult:
    """Codes on a grid, and what the method did.

    Attributes:
        codes: ``(G, m, n)`` float integer codes.
        fit: the grid and scale the codes index.
        trace: the ADMM trace, for methods that run ADMM.
        info: extra timings and choices, for reports.
    """

    codes: torch.Tensor
    fit: GridFit
    trace: AdmmTrace | None = None
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SolverMethod:
    """A registered method.

    Attributes:
        name: its name in configs.
        solve: the function.
        refits_bias: whether its bias is refitted by least squares by default (round-to-nearest,
            the plain baseline, keeps the FP bias).
        needs_statistics: whether its codes depend on the calibration data; a method whose codes
            do not is solved without the layer's statistics and its error is measured by running
            the layer (:class:`~monai_effq.solver.output_error.OutputError`).
    """

    name: str
    solve: Callable[[LayerProblem], MethodResult]
    refits_bias: bool = True
    needs_statistics: bool = True


METHODS: dict[str, SolverMethod] = {}


def register_method(name: str, refits_bias: bool = True, needs_statistics: bool = True) -> Callable:
    """Register a method under ``name`` (a decorator).

    Args:
        name: the name configs use.
        refits_bias: see :class:`SolverMethod`.
        needs_statistics: see :class:`SolverMethod`.

    Returns:
        the decorator, which returns the function unchanged.
    """

    def register(fn: Callable[[LayerProblem], MethodResult]) -> Callable[[LayerProblem], MethodResult]:
        METHODS[name] = SolverMethod(name, fn, refits_bias, needs_statistics)
        return fn

    return register


def get_method(name: str) -> SolverMethod:
    """The method registered as ``name``.

    Raises:
        ValueError: naming the registered methods.
    """
    if name not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}.")
    return METHODS[name]


for _builtin in ("efficientq", "gptq", "rtn"):  # each registers itself
    importlib.import_module(f"{__name__}.{_builtin}")
