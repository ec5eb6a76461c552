"""Dense factorisations and solves whose results do not depend on how many threads compute them.

MKL's float32 Cholesky, Cholesky inverse and triangular solves split their work by thread count, so
one matrix factorised with 1 and with 2 threads gives results that differ in the last bits, and ADMM
and GPTQ then round some weights the other way (issue 18: on the BraTS demo, 1 vs 2 threads changed
up to a quarter of some layers' codes). These helpers compute in float64 and round back: the
differences between thread counts stay far below float32's resolution (the explicit inverse, whose
float64 result still differed once rounded, runs on one thread).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["cholesky", "cholesky_solve_rows", "spd_inverse"]


def cholesky(matrix: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """The Cholesky factor of symmetric positive definite matrices, in float64.

    Args:
        matrix: ``(..., n, n)`` symmetric positive definite matrices.
        upper: the upper factor ``U`` (``matrix = Uᵀ U``) instead of the lower ``L`` (``matrix = L Lᵀ``).

    Returns:
        the float64 factor (round it with ``.to(dtype)`` where it is used as is).
    """
    return torch.linalg.cholesky(matrix.double(), upper=upper)


def cholesky_solve_rows(lower: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``rhs (L Lᵀ)⁻¹`` by two triangular solves in float64.

    Args:
        lower: ``(G, n, n)`` float64 lower Cholesky factors (:func:`cholesky`).
        rhs: ``(G, m, n)`` right-hand sides, one per row.

    Returns:
        the solution, in ``rhs``'s dtype.
    """
    y = torch.linalg.solve_triangular(lower.transpose(-1, -2), rhs.double(), upper=True, left=False)
    return torch.linalg.solve_triangular(lower, y, upper=False, left=False).to(rhs.dtype)


def spd_inverse(matrix: torch.Tensor) -> torch.Tensor:
    """The inverse of symmetric positive definite matrices through their Cholesky factor, in float64.

    On the CPU it is computed on one thread: LAPACK's inverse from the factor splits its sums by
    thread count, and at ``n = 1296`` its float64 result, rounded to float32, differed between 1 and
    2 threads.

    Args:
        matrix: ``(..., n, n)`` symmetric positive definite matrices.

    Returns:
        the inverse, in ``matrix``'s dtype.
    """
    if matrix.device.type != "cpu":
        return torch.cholesky_inverse(cholesky(matrix)).to(matrix.dtype)
    with _one_thread():
        return torch.cholesky_inverse(cholesky(matrix)).to(matrix.dtype)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the block on one intra-op thread, then restore the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
