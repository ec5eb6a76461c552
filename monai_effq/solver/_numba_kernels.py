"""Numba twins of the NumPy column loops in :mod:`monai_effq.solver.column_loops`.

Each is the same float32 operations in the same order as its NumPy loop, written element by element
(every product and sum cast back to float32, no fused multiply-adds: Numba compiles without
fast-math), so it gives the same bits, signed zeros included: the clamps return the bound on a tie
and keep NaN, as ``np.maximum(v, lo)`` and ``np.minimum(v, hi)`` do (Python's ``max`` would keep a
``-0.0`` that NumPy turns into the bound's ``0.0``), and the descent decides whether a column moved
over all groups at once, as ``step.any()`` does. Division by zero gives inf, as in NumPy
(``error_model="numpy"``). Compiled on first use and cached on disk.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["descend_columns", "round_columns"]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def descend_columns(grad, codes, neg_inv_curvature, scale, hessian, lo, hi):  # noqa: D103 (see column_loops)
    groups, b, m = codes.shape
    new = np.empty((groups, m), np.float32)
    step = np.empty((groups, m), np.float32)
    for j in range(b):
        moved = False
        for k in range(groups):
            for r in range(m):
                v = np.float32(np.round(np.float32(grad[k, j, r] * neg_inv_curvature[k, j, r])))
                v = np.float32(v + codes[k, j, r])
                v = lo if v <= lo else v
                v = hi if v >= hi else v
                new[k, r] = v
                step[k, r] = np.float32(v - codes[k, j, r])
                moved = moved or step[k, r] != 0
        if not moved:
            continue
        for k in range(groups):
            for r in range(m):
                step[k, r] = np.float32(scale[k, r] * step[k, r])
            for jj in range(j + 1, b):
                h = hessian[k, j, jj]
                for r in range(m):
                    grad[k, jj, r] = np.float32(grad[k, jj, r] + np.float32(h * step[k, r]))
            for r in range(m):
                codes[k, j, r] = new[k, r]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def round_columns(w, w0, scale, zero_point, feedback, lo, hi, codes, errors):  # noqa: D103 (see column_loops)
    groups, b, m = w.shape
    for k in range(groups):
        for i in range(b):
            for r in range(m):
                q = np.float32(w[k, i, r] / scale[k, r])
                q = np.float32(np.round(np.float32(q + zero_point[k, r])))
                q = lo if q <= lo else q
                q = hi if q >= hi else q
                codes[k, i, r] = q
                e = np.float32(scale[k, r] * np.float32(q - zero_point[k, r]))
                errors[k, i, r] = np.float32(w0[k, i, r] - e)
            for ii in range(i + 1, b):
                f = feedback[k, i, ii]
                for r in range(m):
                    w[k, ii, r] = np.float32(w[k, ii, r] + np.float32(f * errors[k, i, r]))
