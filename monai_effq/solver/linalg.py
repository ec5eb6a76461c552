"""Dense factorisations and solves whose results do not depend on how many threads compute them.

MKL's float32 Cholesky, Cholesky inverse and triangular solves split their work by thread count, so
one matrix factorised with 1 and with 2 threads gives results that differ in the last bits, and ADMM
and GPTQ then round some weights the other way (issue 18: on the BraTS demo, 1 vs 2 threads changed
up to a quarter of some layers' codes). :func:`spd_inverse` computes in float64 on one thread and
rounds back. :func:`cholesky` and :class:`RowSolver` factorise in float32 by blocks of columns: their
only multi-threaded kernels are matrix products whose row counts are multiples of 16. MKL splits
such products by output block, never along a sum, so they give the same bits on 1 and 2 threads (on
Intel CPUs under the strict reproducibility that importing monai_effq sets); products with 5 to 11
rows did not (seen with 9 right-hand sides at ``n = 432`` and with a last block of 7 columns at
``n = 1285``), hence the padding. LAPACK's float64 factor, rounded, still differed between 1 and 2
threads on an Intel Xeon at ``n = 432``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

__all__ = ["RowSolver", "cholesky", "spd_inverse"]

_ALIGN = 16  # rows and columns are padded to a multiple of this (see the module docstring)


def cholesky(matrix: torch.Tensor, block: int = 256) -> torch.Tensor:
    """The lower Cholesky factor ``L`` (``matrix = L Lᵀ``) of symmetric positive definite matrices, in
    float32, the same bits on any thread count.

    The left-looking block factorisation of :class:`RowSolver`: LAPACK's float32 factor differs in
    its last bits between 1 and 2 threads, and its float64 factor on one thread (what GPTQ's
    rounding used before) took 476 ms at ``n = 3456`` on a 2-core AMD EPYC with AVX-512, this 138 ms.

    Args:
        matrix: ``(G, n, n)`` symmetric positive definite matrices.
        block: columns per block (a multiple of 16).

    Returns:
        the ``(G, n, n)`` float32 factor.

    Raises:
        torch.linalg.LinAlgError: where a matrix is not numerically positive definite in float32.
    """
    n = matrix.shape[-1]
    with torch.no_grad():
        lower, _ = _factorise(matrix.float(), block)
    return lower[:, :n, :n]


class RowSolver:
    """``rhs M⁻¹`` for many right-hand sides of one symmetric positive definite ``M``, bit-identical
    on any thread count.

    ``M = L Lᵀ`` is factorised left-looking by blocks of columns: each block column is one matrix
    product with the columns before it, its diagonal block is factorised (and its triangle
    inverted) on one thread, so the whole factor is the same on 1 and 2 threads, where LAPACK's
    differs in the last bits. A solve is then block substitution, two products per block (with a
    float64 factor, 22 ms at ``n = 3456`` with 128 rows where two float64 triangular solves took
    78 ms). Both run in float32: the solution's relative error is near 2e-5 at ``n = 3456`` (3e-7
    with a float64 factor, which took twice as long), and moved no comparison layer's output error
    in ``benchmarks/layer_solver.py`` by more than 0.03%. ``M`` is padded with an identity block
    and the right-hand sides with zero rows and columns to multiples of 16, which leaves the
    solution as it is and keeps every product thread-invariant. Products are written into slices of
    the factor and the solution (``out=``), so nothing here is differentiable: both run without
    autograd.

    Args:
        matrix: ``(G, n, n)`` symmetric matrices (``matrix + shift I`` positive definite); not modified.
        block: columns per block (a multiple of 16).
        shift: added to the diagonal before factorising, block column by block column, so that a
            changing shift needs no shifted copy of ``matrix`` (ADMM factorises ``A + (ρ+η) I`` for
            each ρ): the same float32 sums ``(a + shift) - ...`` as factorising a shifted copy.
        workspace: a ``lower`` of an earlier solver of the same shape, to be overwritten (that
            solver must not be used again): at ``n = 1728`` a fresh 12 MB factor costs 3000 page
            faults per ρ phase.

    Attributes:
        lower: the padded ``(G, n', n')`` float32 factor ``L``.
        diagonal_inverses: per block, the inverse of ``L``'s diagonal block.
        block: columns per block.
        size: ``n``, the unpadded size.
    """

    @torch.no_grad()
    def __init__(
        self, matrix: torch.Tensor, block: int = 256, shift: float = 0.0, workspace: torch.Tensor | None = None
    ) -> None:
        self.size = matrix.shape[-1]
        self.block = block
        try:
            self.lower, self.diagonal_inverses = _factorise(matrix.float(), block, shift, workspace)
        except torch.linalg.LinAlgError:
            raise ValueError(
                f"the {self.size}x{self.size} system of the ADMM W-step is not positive definite in "
                "float32 (its columns are nearly dependent): raise AdmmSettings.rho_start or eta, or "
                "quantize this layer with method='gptq'."
            ) from None

    @torch.no_grad()
    def solve_rows(self, rhs: torch.Tensor) -> torch.Tensor:
        """``rhs M⁻¹`` for ``(G, m, n)`` right-hand sides: ``X Lᵀ = rhs``, then ``Y L = X``.

        Args:
            rhs: the right-hand sides (computed in float32).

        Returns:
            the ``(G, m, n)`` solutions, in ``rhs``'s dtype, contiguous.
        """
        m, n = rhs.shape[1], self.lower.shape[-1]
        padding = (0, n - self.size, 0, -m % _ALIGN)
        padded = F.pad(rhs.float(), padding) if any(padding) else rhs.float()
        y = self._solve_padded(padded)
        return y[:, :m, : self.size].to(rhs.dtype).contiguous()

    def _solve_padded(self, rhs: torch.Tensor) -> torch.Tensor:
        """The block substitution on right-hand sides already padded to ``lower``'s size.

        Each block's product is written straight into its columns of the solution (``out=`` a
        strided view, which BLAS takes as is) and the sum it subtracts is formed in place: the same
        bits as products copied in, 6% less time at ``n = 1728`` with 64 rows.
        """
        lower, n = self.lower, self.lower.shape[-1]
        starts = range(0, n, self.block)
        x = torch.empty_like(rhs)
        for k, j0 in enumerate(starts):
            j1 = min(j0 + self.block, n)
            r = rhs[:, :, j0:j1]
            if j0:
                earlier = torch.bmm(x[:, :, :j0], lower[:, j0:j1, :j0].transpose(1, 2))
                r = torch.sub(r, earlier, out=earlier)
            torch.bmm(r, self.diagonal_inverses[k].transpose(1, 2), out=x[:, :, j0:j1])
        y = torch.empty_like(rhs)
        for k, j0 in reversed(list(enumerate(starts))):
            j1 = min(j0 + self.block, n)
            r = x[:, :, j0:j1]
            if j1 < n:
                later = torch.bmm(y[:, :, j1:], lower[:, j1:, j0:j1])
                r = torch.sub(r, later, out=later)
            torch.bmm(r, self.diagonal_inverses[k], out=y[:, :, j0:j1])
        return y


def _factorise(
    a: torch.Tensor, block: int, shift: float = 0.0, workspace: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The padded factor of :class:`RowSolver` and the inverses of its diagonal blocks.

    Args:
        a: ``(G, n, n)`` float32 symmetric matrices (not modified).
        block: columns per block (a multiple of 16).
        shift: added to the first ``n`` diagonal entries, block column by block column.
        workspace: a padded factor of the same shape to overwrite, or ``None``.

    Returns:
        the ``(G, n', n')`` lower factor of ``a`` padded with an identity block to a multiple of 16
        (and ``shift`` on its diagonal), and per block the inverse of its diagonal block.

    Raises:
        torch.linalg.LinAlgError: where a diagonal block is not positive definite.
    """
    if block % _ALIGN:
        raise ValueError(f"the factorisation's block must be a multiple of {_ALIGN}, got {block}.")
    size = a.shape[-1]
    pad = -size % _ALIGN
    if pad:
        a = F.pad(a, (0, pad, 0, pad))
        a[:, size:, size:] = torch.eye(pad, dtype=a.dtype, device=a.device)
    n = a.shape[-1]
    if workspace is not None and (workspace.shape, workspace.dtype, workspace.device) == (a.shape, a.dtype, a.device):
        lower = workspace  # only entries on and below the block diagonal are written and read
    else:
        lower = torch.zeros_like(a)
    inverses: list[torch.Tensor] = []
    for j0 in range(0, n, block):
        j1 = min(j0 + block, n)
        column = a[:, j0:, j0:j1].clone()
        if shift and j0 < size:
            column[:, : min(j1, size) - j0].diagonal(dim1=1, dim2=2).add_(shift)
        if j0:
            column -= torch.bmm(lower[:, j0:, :j0], lower[:, j0:j1, :j0].transpose(1, 2))
        with _one_thread(a.device):
            diag, info = torch.linalg.cholesky_ex(column[:, : j1 - j0])
            if bool((info > 0).any()):
                raise torch.linalg.LinAlgError(f"the {size}x{size} matrix is not positive definite in float32.")
            identity = torch.eye(j1 - j0, dtype=a.dtype, device=a.device).expand_as(diag)
            inverse = torch.linalg.solve_triangular(diag, identity, upper=False)
        lower[:, j0:j1, j0:j1] = diag
        if j1 < n:
            torch.bmm(column[:, j1 - j0 :], inverse.transpose(1, 2), out=lower[:, j1:, j0:j1])
        inverses.append(inverse)
    return lower, inverses


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
        return torch.cholesky_inverse(torch.linalg.cholesky(matrix.double())).to(matrix.dtype)


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
