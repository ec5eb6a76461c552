"""Per-layer choice of the solver's regularisation by held-out output error.

A layer's weights are fitted to a few hundred calibration voxels when the calibration sample is
small, against thousands of unknowns per output channel: the layer-wise least-squares fit then
learns the sample, not the layer. Every candidate (the method's default, stronger pulls toward the
FP weights, stronger GPTQ damping, and round-to-nearest itself) is fitted on the fit voxels and
scored on the held-out voxels by the exact output error their statistics give; the winner's
settings are refitted on all voxels. Round-to-nearest with the FP bias is always a candidate, so
the chosen setting is never worse than it on the held-out voxels.

Held-out voxels are whole windows where there are enough (the PTQ pipeline makes the mask):
voxels scattered through the same crop sit beside the fit voxels and share their inputs, and their
error was measured to mislead (on a small test network the choices it made tripled the output error on
other volumes). With fewer windows than ``1/fraction``, one contiguous slab at the end of each window's
longest axis is held out, whose face alone shares inputs with the fit voxels.

A layer with fewer (effective) calibration voxels than unknowns per output channel keeps
round-to-nearest outright: its least-squares problem has a null space the data cannot pin down
(measured: on a 64x8x64 crop of real MRI, W2A8, such layers cost 0.05 held-out Dice against
round-to-nearest; keeping them at round-to-nearest recovered it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from monai_effq.quant.spec import WeightSpec
from monai_effq.solver.admm import AdmmSettings
from monai_effq.solver.api import LayerSolution, as_weight_spec, solve_statistics
from monai_effq.solver.gram import LayerStatistics
from monai_effq.solver.layers import LayerView
from monai_effq.solver.rounding import fit_grid

__all__ = [
    "Candidate", "candidates_for", "is_underdetermined", "solve_validated", "ETA_CHOICES", "GPTQ_DAMP_CHOICES",
    "UNDERDETERMINED_CHOICE",
]

# η in units of the paper's scale s: 1 is the paper's; larger values keep W near W0 where data is scarce
ETA_CHOICES = (1.0, 30.0)
# GPTQ's ridge as a fraction of the mean Gram diagonal: 0.01 is GPTQ's default
GPTQ_DAMP_CHOICES = (0.01, 1.0)


# what a layer kept at round to nearest for want of voxels reports as its choice
UNDERDETERMINED_CHOICE = "rtn (underdetermined)"


def is_underdetermined(voxels: float, unknowns: int) -> bool:
    """Whether a layer's least-squares problem has a null space its calibration data cannot pin down.

    Args:
        voxels: the layer's (effective) calibration voxels; a raw count bounds the effective one
            from above (``(Σ h)² / Σ h² <= voxels``), so a raw count below the bar decides it too.
        unknowns: its weights per output channel (:attr:`LayerView.in_per_group`).

    Returns:
        ``True`` with fewer voxels than unknowns.
    """
    return voxels < unknowns


@dataclass(frozen=True)
class Candidate:
    """One solver setting tried on the fit voxels.

    Attributes:
        name: a short label for reports (``"efficientq eta=30"``).
        method: the solver method.
        options: keyword arguments of :func:`~monai_effq.solver.api.solve_statistics` for it.
    """

    name: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)


def candidates_for(method: str, admm: AdmmSettings | None = None, gptq_damp: float = 0.01) -> list[Candidate]:
    """The settings tried for ``method``, its default first (which wins ties).

    Args:
        method: a registered method; one other than the built-in three competes as itself with
            round-to-nearest.
        admm: the configured ADMM settings (their ``eta`` is the default candidate's).
        gptq_damp: the configured GPTQ damping.

    Returns:
        the candidates; ``"rtn"`` has only itself.
    """
    rtn = Candidate("rtn", "rtn")
    if method == "rtn":
        return [rtn]
    gptq = [Candidate(f"gptq damp={d:g}", "gptq", {"gptq_damp": d}) for d in dict.fromkeys((gptq_damp, *GPTQ_DAMP_CHOICES))]
    out: list[Candidate] = []
    if method not in ("efficientq", "gptq"):
        # a registered method reads the configured settings as the built-in ones do
        own = {"gptq_damp": gptq_damp, **({"admm": admm} if admm is not None else {})}
        return [Candidate(method, method, own), Candidate("rtn+bias", "rtn", {"refit_bias": True}), rtn]
    if method == "efficientq":
        base = admm or AdmmSettings()
        for eta in dict.fromkeys((base.eta, *ETA_CHOICES)):
            settings = dataclasses.replace(base, eta=eta)
            out.append(Candidate(f"efficientq eta={eta:g}", "efficientq", {"admm": settings, "gptq_damp": gptq_damp}))
    out += gptq
    out += [Candidate("rtn+bias", "rtn", {"refit_bias": True}), rtn]
    return out


def _holdout_error(view: LayerView, sol: LayerSolution, held: LayerStatistics) -> float:
    g, m = view.groups, view.out_per_group
    return held.weighted_mse(view.weight_matrix(sol.weight).float(), sol.bias.float().reshape(g, m))


def solve_validated(
    view: LayerView,
    full: LayerStatistics,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: WeightSpec | int,
    *,
    fit: LayerStatistics | None = None,
    holdout: LayerStatistics | None = None,
    method: str = "efficientq",
    admm: AdmmSettings | None = None,
    gptq_damp: float = 0.01,
    **options: Any,
) -> LayerSolution:
    """Choose the layer's solver setting by held-out error, then solve on all voxels with it.

    Args:
        view: the layer's :class:`LayerView`.
        full: statistics of every voxel (the final solve's).
        weight: the layer's native FP weight.
        bias: the layer's FP bias or ``None``.
        spec: the layer's :class:`~monai_effq.quant.spec.WeightSpec` (or its bits).
        fit: statistics of the fit voxels; with ``holdout``, every candidate is scored, otherwise the
            configured setting is used.
        holdout: statistics of the held-out voxels.
        method: the configured method (its default setting comes first among the candidates).
        admm: the configured ADMM settings.
        gptq_damp: the configured GPTQ damping.
        options: the remaining :func:`~monai_effq.solver.api.solve_statistics` arguments (``init``).

    Returns:
        the final :class:`LayerSolution` (round-to-nearest when ``full`` has fewer effective voxels than
        unknowns per output channel). Its ``info["choice"]`` names the setting used; with a held-out
        part, ``info["validation"]`` holds every candidate's held-out error and ``info["holdout_mse"]``
        and ``info["holdout_mse_rtn"]`` the winner's and round-to-nearest's.
    """
    candidates = candidates_for(method, admm, gptq_damp)
    underdetermined = is_underdetermined(full.effective_voxels, view.in_per_group)
    if underdetermined:
        candidates = [c for c in candidates if c.name == "rtn"]
    errors: dict[str, float] = {}
    best = candidates[0]
    if not torch.isfinite(weight).all():  # before the grid fit, whose message would not name the layer
        raise ValueError(f"the {view.name} weights contain NaN or Inf values.")
    # every candidate starts from the same grid fit of the FP weights: fitted once
    spec = as_weight_spec(spec)
    options = {**options, "rtn_fit": fit_grid(view.weight_matrix(weight).float(), spec)}
    if fit is not None and holdout is not None:
        for cand in candidates:
            sol = solve_statistics(view, fit, weight, bias, spec, method=cand.method, **{**options, **cand.options})
            errors[cand.name] = _holdout_error(view, sol, holdout)
            if errors[cand.name] < errors[best.name]:
                best = cand
    final = solve_statistics(view, full, weight, bias, spec, method=best.method, **{**options, **best.options})
    final.info["choice"] = UNDERDETERMINED_CHOICE if underdetermined else best.name
    if errors:
        final.info.update(validation=errors, holdout_mse=errors[best.name], holdout_mse_rtn=errors["rtn"])
    return final
