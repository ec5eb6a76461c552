"""Dense factorisations and solves whose results do not depend on how many threads compute them.

MKL's float32 Cholesky, Cholesky inverse and triangular solves split their work by thread count, so
one matrix factorised with 1 and with 2 threads gives results that differ in the last bits, and ADMM
and GPTQ then round some weights the other way (issue 18: on the BraTS demo, 1 vs 2 threads changed
up to a quarter of some layers' codes). These helpers compute in float64 and round back: the
differences between thread counts stay far below float32's resolution (the explicit inverse, whose
float64 result still differed once rounded, runs on one thread). :class:`RowSolver` goes further:
its results are bit-identical on any thread count, because its only multi-threaded kernels are
matrix products, which MKL splits by output block and never along a sum.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["RowSolver", "cholesky", "spd_inverse"]


def cholesky(matrix: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """The Cholesky factor of symmetric positive definite matrices, in float64.

    Args:
        matrix: ``(..., n, n)`` symmetric positive definite matrices.
        upper: the upper factor ``U`` (``matrix = Uᵀ U``) instead of the lower ``L`` (``matrix = L Lᵀ``).

    Returns:
        the float64 factor (round it with ``.to(dtype)`` where it is used as is).
    """
    return torch.linalg.cholesky(matrix.double(), upper=upper)


class RowSolver:
    """``rhs M⁻¹`` for many right-hand sides of one symmetric positive definite ``M``, bit-identical
    on any thread count.

    ``M = L Lᵀ`` is factorised left-looking by blocks of columns: each block column is one matrix
    product with the columns before it, its diagonal block is factorised (and its triangle
    inverted) on one thread, so the whole factor is the same on 1 and 2 threads, where LAPACK's
    differs in the last bits. A solve is then block substitution, two products per block: at
    ``n = 3456`` with 128 rows it takes 22 ms where two float64 triangular solves took 78 ms.
    Both run in float32: the solution's relative error is near 2e-5 at ``n = 3456`` (3e-7 with a
    float64 factor, which took twice as long), and moved no comparison layer's output error in
    ``benchmarks/layer_solver.py`` by more than 0.03%.

    Args:
        matrix: ``(G, n, n)`` symmetric positive definite matrices.
        block: columns per block.
    """

    def __init__(self, matrix: torch.Tensor, block: int = 256) -> None:
        a = matrix.float()
        g, n, _ = a.shape
        lower = torch.zeros_like(a)
        self.block = block
        self.diagonal_inverses: list[torch.Tensor] = []
        for j0 in range(0, n, block):
            j1 = min(j0 + block, n)
            column = a[:, j0:, j0:j1]
            if j0:
                column = column - torch.bmm(lower[:, j0:, :j0], lower[:, j0:j1, :j0].transpose(1, 2))
            with _one_thread(a.device):
                diag = torch.linalg.cholesky(column[:, : j1 - j0])
                identity = torch.eye(j1 - j0, dtype=a.dtype, device=a.device).expand_as(diag)
                inverse = torch.linalg.solve_triangular(diag, identity, upper=False)
            lower[:, j0:j1, j0:j1] = diag
            if j1 < n:
                lower[:, j1:, j0:j1] = torch.bmm(column[:, j1 - j0 :], inverse.transpose(1, 2))
            self.diagonal_inverses.append(inverse)
        self.lower = lower

    def solve_rows(self, rhs: torch.Tensor) -> torch.Tensor:
        """``rhs M⁻¹`` for ``(G, m, n)`` float32 right-hand sides: ``X Lᵀ = rhs``, then ``Y L = X``."""
        lower, n = self.lower, self.lower.shape[-1]
        starts = range(0, n, self.block)
        x = torch.empty_like(rhs)
        for k, j0 in enumerate(starts):
            j1 = min(j0 + self.block, n)
            r = rhs[:, :, j0:j1]
            if j0:
                r = r - torch.bmm(x[:, :, :j0], lower[:, j0:j1, :j0].transpose(1, 2))
            x[:, :, j0:j1] = torch.bmm(r, self.diagonal_inverses[k].transpose(1, 2))
        y = torch.empty_like(rhs)
        for k, j0 in reversed(list(enumerate(starts))):
            j1 = min(j0 + self.block, n)
            r = x[:, :, j0:j1]
            if j1 < n:
                r = r - torch.bmm(y[:, :, j1:], lower[:, j1:, j0:j1])
            y[:, :, j0:j1] = torch.bmm(r, self.diagonal_inverses[k])
        return y


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
    with _one_thread(matrix.device):
        return torch.cholesky_inverse(cholesky(matrix)).to(matrix.dtype)


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Run the block on one intra-op thread where it runs on the CPU, then restore the thread count."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
