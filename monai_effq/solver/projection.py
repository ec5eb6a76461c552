"""ADMM's projection step: ``W + U`` onto the grid with the scale refitted, then the dual update.

The G-step of EfficientQ: the scale is refitted to ``V = W + U`` by alternating least squares from
the current scale (:func:`~monai_effq.quant.grid.fit_scale_als`, zero point kept), ``V`` is
rounded with it, and the scaled dual moves by ``W - G``. Written twice, with the same operations:

- with torch operations, one call per operation on the whole matrix (about ten passes over it per
  alternation, 0.37 ms for a 32 x 864 layer on 2 Xeon cores);
- as one loop compiled by Numba (the ``fast`` extra) that rounds, compares and sums in one pass per
  alternation: 0.14 ms there, 0.62 ms instead of 0.87 ms at 64 x 1728.

Both give the same bits (``tests/solver/test_projection.py``), ties to even and signed zeros
included, up to the order of two float64 sums (see :mod:`monai_effq.solver._numba_kernels`); the
compiled loop runs for the ``"free"`` scale rule on contiguous float32 CPU tensors.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import torch

from monai_effq.solver import kernels
from monai_effq.solver.rounding import GridFit

__all__ = ["project_onto_grid"]


def project_onto_grid(
    w: torch.Tensor, dual: torch.Tensor, codes: torch.Tensor, fit: GridFit, max_iter: int = 4, use_compiled: bool | None = None
) -> tuple[torch.Tensor, GridFit, torch.Tensor, bool]:
    """Project ``w + dual`` onto the grid, refitting the scale, and add ``w - G`` to the dual in place.

    Args:
        w: ``(G, m, n)`` float32 weights from the W-step.
        dual: ``(G, m, n)`` the scaled dual ``U``, updated in place.
        codes: ``(G, m, n)`` the codes before this step (to say whether they changed).
        fit: the grid, the current scale (the alternations start from it), zero point and scale rule.
        max_iter: least-squares alternations.
        use_compiled: the compiled loop (``True``), the torch one (``False``) or whichever applies (``None``).

    Returns:
        ``(codes, fit, values, changed)``: the new codes, the fit with the refitted scale, the on-grid
        values ``G = s (codes - z)`` and whether any code changed.
    """
    max_iter = max(int(max_iter), 0)  # as fit_scale_als's range() takes a negative count
    loops = _choose(use_compiled, w, dual, codes, fit)
    if loops is not None:
        return _project_compiled(loops, w, dual, codes, fit, max_iter)
    v = w + dual
    projection = fit.refit(v, max_iter=max_iter)
    new = projection.codes(v)
    values = projection.values(new)
    dual += w - values
    return new, projection, values, not torch.equal(new, codes)


def _project_compiled(
    loops: ModuleType, w: torch.Tensor, dual: torch.Tensor, codes: torch.Tensor, fit: GridFit, max_iter: int
) -> tuple[torch.Tensor, GridFit, torch.Tensor, bool]:
    n = w.shape[-1]
    per_channel = fit.per_channel
    scale = fit.scale.reshape(-1).numpy().copy()  # refitted in place by the loop
    zero = np.ascontiguousarray(np.broadcast_to(fit.zero_point.reshape(-1).numpy(), scale.shape))
    new, values = torch.empty_like(w), torch.empty_like(w)
    lo, hi = np.float32(fit.grid.qmin), np.float32(fit.grid.qmax)
    changed = loops.project_rows(
        w.numpy().reshape(-1, n), dual.numpy().reshape(-1, n), codes.numpy().reshape(-1, n), scale, zero, lo, hi, max_iter,
        new.numpy().reshape(-1, n), values.numpy().reshape(-1, n),
    )
    refitted = torch.from_numpy(scale)
    refitted = refitted if per_channel else refitted.reshape(())
    return new, GridFit(fit.grid, refitted, fit.zero_point, fit.scale_rule), values, bool(changed)


def _choose(
    use_compiled: bool | None, w: torch.Tensor, dual: torch.Tensor, codes: torch.Tensor, fit: GridFit
) -> ModuleType | None:
    """The compiled loop where asked for (or available, for ``None``) and the step is what it was
    written for: the ``"free"`` rule (the others snap or keep the scale after the fit) on contiguous
    float32 CPU tensors of one shape, one scale per tensor or per row."""

    def fits() -> bool:
        tensors = (w, dual, codes, fit.scale, fit.zero_point)
        rows = w.shape[0] * w.shape[1] if w.dim() == 3 else -1
        return (
            fit.scale_rule == "free"
            and w.dim() == 3
            and w.numel() > 0
            and dual.shape == w.shape == codes.shape
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
            # as GridFit.per_row reads them: one value (0-d), or one per row
            and all(t.dim() == 0 or t.numel() == rows for t in (fit.scale, fit.zero_point))
            and not any(t.requires_grad for t in tensors)
        )

    return kernels.choose_kernels(
        use_compiled, fits, "the compiled ADMM projection",
        "the compiled ADMM projection takes contiguous float32 CPU (G, m, n) tensors of one shape that need "
        "no gradient, a 0-d or per-row scale and zero point, and the 'free' scale rule.",
    )
