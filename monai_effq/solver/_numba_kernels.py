"""Numba twins of the NumPy column loops in :mod:`monai_effq.solver.column_loops` and of ADMM's
projection in :mod:`monai_effq.solver.projection` and objective update in :mod:`monai_effq.solver.admm`.

Each is the same float32 operations in the same order as its NumPy loop, written element by element
(every product and sum cast back to float32, no fused multiply-adds: Numba compiles without
fast-math), so it gives the same bits, signed zeros included: the clamps return the bound on a tie
and keep NaN, as ``np.maximum(v, lo)`` and ``np.minimum(v, hi)`` do (Python's ``max`` would keep a
``-0.0`` that NumPy turns into the bound's ``0.0``), and the descent decides whether a column moved
over all groups at once, as ``step.any()`` does. Division by zero gives inf, as in NumPy
(``error_model="numpy"``).

The projection's clamps keep the value on a tie, as torch's ``clamp`` does. Its float64 sums of
float32 products are added in the order vectorised code adds them, torch's in its own; both are
exact, and so the same, while the products' magnitudes span less than about ``2**29 / n``. Beyond
that the float32 scales can differ by a unit in the last place (a built case: one weight near
``2**20`` among values near ``2**-35``), which no random state of thousands tried reached. The
objective update adds by fused multiply-adds where torch's sparse product does (``fused``; a probe
in :mod:`monai_effq.solver.admm` decides). Compiled on first use and cached on disk.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numba
import numpy as np
from numba.core import types
from numba.extending import intrinsic

__all__ = ["add_code_changes", "count_changes", "descend_columns", "fma_in_hardware", "project_rows", "round_columns"]


@intrinsic
def _fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (LLVM's ``llvm.fma``: one instruction where the CPU has it)."""
    if not all(isinstance(t, types.Float) for t in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return c(c, c, c), codegen


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


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def _codes_and_sums(v, scale, zero, per_row, lo, hi, before, codes):
    # reassoc lets the float64 sums below be vectorised; no other operation here is a sum of three or more terms
    rows, n = v.shape
    num = np.zeros(scale.shape[0], np.float64)
    den = np.zeros(scale.shape[0], np.float64)
    moved = 0
    for r in range(rows):
        k = r if per_row else 0
        s, z = scale[k], zero[k]
        a, b = 0.0, 0.0
        for j in range(n):
            c = np.float32(np.round(np.float32(np.float32(v[r, j] / s) + z)))
            c = lo if c < lo else c
            c = hi if c > hi else c
            moved += c != before[r, j]
            codes[r, j] = c
            q = np.float32(c - z)
            a += np.float64(np.float32(q * v[r, j]))
            b += np.float64(np.float32(q * q))
        num[k] += a
        den[k] += b
    return moved == 0, num, den


@numba.njit(cache=True, nogil=True, error_model="numpy")
def project_rows(w, dual, before, scale, zero, lo, hi, max_iter, codes, values):  # noqa: D103 (see projection)
    rows, n = w.shape
    per_row = scale.shape[0] > 1
    v = np.empty((rows, n), np.float32)
    for r in range(rows):
        for j in range(n):
            v[r, j] = np.float32(w[r, j] + dual[r, j])
    for k in range(scale.shape[0]):
        scale[k] = np.float32(1e-12) if scale[k] < np.float32(1e-12) else scale[k]
    spare = np.empty((rows, n), np.float32)
    last = codes  # any buffer: the first pass has no codes to compare with
    for it in range(max_iter + 1):
        out = spare if it % 2 == 0 else codes
        same, num, den = _codes_and_sums(v, scale, zero, per_row, lo, hi, last, out)
        last = out
        if it == max_iter or (it > 0 and same):
            break
        for k in range(scale.shape[0]):
            ratio = np.float32(num[k] / max(den[k], 1e-30)) if den[k] > 0 else scale[k]
            scale[k] = np.float32(1e-12) if ratio < np.float32(1e-12) else ratio
    changed = False
    for r in range(rows):
        k = r if per_row else 0
        s, z = scale[k], zero[k]
        for j in range(n):
            c = last[r, j]
            codes[r, j] = c
            changed = changed or c != before[r, j]
            val = np.float32(s * np.float32(c - z))
            values[r, j] = val
            dual[r, j] = np.float32(dual[r, j] + np.float32(w[r, j] - val))
    return changed


@numba.njit(cache=True, nogil=True, error_model="numpy")
def count_changes(codes, before):  # noqa: D103 (see admm._OnGridObjective)
    groups, m, n = codes.shape
    changed = 0
    for k in range(groups):
        for r in range(m):
            for j in range(n):
                changed += codes[k, r, j] != before[k, r, j]
    return changed


@numba.njit(cache=True, nogil=True, error_model="numpy")
def add_code_changes(qa, codes, before, a, fused):  # noqa: D103 (see admm._OnGridObjective)
    # qa += (codes - before) @ a as torch.sparse.mm and += do it: per row, a zero row to which each
    # changed code's row of a is added in column order (by fused multiply-adds where torch's kernel
    # fuses them), then added to qa's row, unchanged rows included (-0.0 + 0.0 is 0.0)
    groups, m, n = codes.shape
    row = np.empty(n, np.float32)
    for k in range(groups):
        for r in range(m):
            row[:] = 0.0
            for j in range(n):
                d = np.float32(codes[k, r, j] - before[k, r, j])
                if d != 0 and fused:
                    for c in range(n):
                        row[c] = _fma(d, a[k, j, c], row[c])
                elif d != 0:
                    for c in range(n):
                        row[c] = np.float32(row[c] + np.float32(d * a[k, j, c]))
            for c in range(n):
                qa[k, r, c] = qa[k, r, c] + row[c]


def fma_in_hardware() -> bool:
    """Whether the loops compile for a CPU with fused multiply-adds (else :func:`_fma` calls ``fmaf``)."""
    if numba.config.CPU_NAME not in (None, "host"):
        return "+fma" in (numba.config.CPU_FEATURES or "")
    return bool(llvm.get_host_cpu_features().get("fma", False))
