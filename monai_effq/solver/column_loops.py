"""The column loops of GPTQ's rounding and of the coordinate-descent refinement.

Both visit the columns of a block of a ``(G, m, n)`` weight matrix in order, each column a few
float32 operations on its ``m`` values whose result feeds the block's later columns. They work on
NumPy arrays with the columns laid out as rows (``(G, b, m)``), so that a column is ``m`` adjacent
values.

Each loop is written twice, with the same float32 operations in the same order, so the same bits:

- with NumPy ufuncs, one call per operation on a whole column (a call costs about as much as its
  arithmetic on 32 or 64 values: two refinement sweeps of a 32 x 864 layer take 15 ms);
- as plain loops compiled by Numba, when it is installed (the ``fast`` extra): the same sweeps take
  3.3 ms, and 12 ms instead of 34 ms at 64 x 1728 (2 Xeon cores).

:func:`compiled` says which one runs; ``tests/solver/test_column_loops.py`` checks that both give the
same bits, ties to even included.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from monai_effq.solver import kernels
from monai_effq.solver.kernels import compiled

__all__ = ["compiled", "descend_columns", "round_columns"]


def descend_columns(
    grad: np.ndarray,
    codes: np.ndarray,
    neg_inv_curvature: np.ndarray,
    scale: np.ndarray,
    hessian: np.ndarray,
    qmin: float,
    qmax: float,
    use_compiled: bool | None = None,
) -> None:
    """One coordinate-descent pass over a block's columns, in place on ``codes`` (and ``grad``).

    Column ``j`` moves to ``clip(round(grad_j · neg_inv_curvature_j) + codes_j)``; its step times the
    scale is fed to the gradient of the block's later columns through the block's Hessian row.

    Args:
        grad: ``(G, b, m)`` float32 gradient of the block's columns (updated for the later columns).
        codes: ``(G, b, m)`` float32 codes (updated).
        neg_inv_curvature: ``(G, b, m)`` ``-1 / (s H_jj)``.
        scale: ``(G, m)`` the rows' scales.
        hessian: ``(G, b, b)`` the block's diagonal block of ``H``.
        qmin: the grid's smallest code.
        qmax: the grid's largest code.
        use_compiled: the compiled loop (``True``), the NumPy one (``False``) or whichever is available (``None``).
    """
    lo, hi = np.float32(qmin), np.float32(qmax)
    compiled_loops = _choose(use_compiled, [grad, codes, neg_inv_curvature], [scale], hessian)
    if compiled_loops is not None:
        compiled_loops.descend_columns(grad, codes, neg_inv_curvature, scale, hessian, lo, hi)
        return
    g, c, h = grad, codes, hessian
    # ufuncs with out= instead of np.clip and np.array_equal, whose Python wrappers cost more than
    # their arithmetic on m values
    new, step = np.empty_like(c[:, 0, :]), np.empty_like(c[:, 0, :])
    for j in range(c.shape[1]):
        col = c[:, j, :]
        np.multiply(g[:, j, :], neg_inv_curvature[:, j, :], out=new)
        np.round(new, out=new)
        np.add(new, col, out=new)
        np.maximum(new, lo, out=new)
        np.minimum(new, hi, out=new)
        np.subtract(new, col, out=step)
        if not step.any():
            continue
        np.multiply(scale, step, out=step)
        # only the block's later columns are read again; the caller updates the whole gradient
        g[:, j + 1 :, :] += h[:, j, j + 1 :, None] * step[:, None, :]
        col[...] = new


def round_columns(
    w: np.ndarray,
    w0: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    feedback: np.ndarray,
    qmin: float,
    qmax: float,
    use_compiled: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ's pass over a block: each column rounded, its error fed to the block's later columns.

    Args:
        w: ``(G, b, m)`` float32 weights with the feedback of the columns before the block (updated).
        w0: ``(G, b, m)`` the original weights.
        scale: ``(G, m)`` grid steps.
        zero_point: ``(G, m)`` zero points.
        feedback: ``(G, b, b)`` ``V_ij / V_jj`` within the block.
        qmin: the grid's smallest code.
        qmax: the grid's largest code.
        use_compiled: as for :func:`descend_columns`.

    Returns:
        ``(codes, errors)``, ``(G, b, m)``: each column's codes ``clip(round(w / s + z))`` and rounding
        error ``w0 - s (q - z)``.
    """
    lo, hi = np.float32(qmin), np.float32(qmax)
    codes, errors = np.empty_like(w), np.empty_like(w)
    compiled_loops = _choose(use_compiled, [w, w0], [scale, zero_point], feedback)
    if compiled_loops is not None:
        compiled_loops.round_columns(w, w0, scale, zero_point, feedback, lo, hi, codes, errors)
        return codes, errors
    for i in range(w.shape[1]):
        q, e = codes[:, i, :], errors[:, i, :]
        np.divide(w[:, i, :], scale, out=q)
        np.add(q, zero_point, out=q)
        np.round(q, out=q)
        np.maximum(q, lo, out=q)
        np.minimum(q, hi, out=q)
        np.subtract(q, zero_point, out=e)
        np.multiply(scale, e, out=e)
        np.subtract(w0[:, i, :], e, out=e)
        w[:, i + 1 :, :] += feedback[:, i, i + 1 :, None] * e[:, None, :]
    return codes, errors


def _choose(use_compiled: bool | None, columns: list[np.ndarray], rows: list[np.ndarray], square: np.ndarray) -> ModuleType | None:
    """The compiled loops where asked for (or available, for ``None``) and the arrays are what they
    were written for: float32 (NumPy computes other dtypes in their own), ``(G, b, m)`` columns,
    ``(G, m)`` per-row values and a ``(G, b, b)`` block (NumPy would also broadcast other shapes; the
    compiled loops index them as they are)."""

    def fits() -> bool:
        g, b, m = columns[0].shape
        return (
            all(a.dtype == np.float32 for a in (*columns, *rows, square))
            and all(a.shape == (g, b, m) for a in columns)
            and all(a.shape == (g, m) for a in rows)
            and square.shape == (g, b, b)
        )

    return kernels.choose_kernels(
        use_compiled, fits, "the compiled column loops",
        "the compiled column loops take float32 (G, b, m) columns, (G, m) rows and a (G, b, b) block.",
    )
