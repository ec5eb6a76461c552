"""Dense factorisations and solves whose results do not depend on how many threads compute them.

MKL's float32 Cholesky, Cholesky inverse and triangular solves split their work by thread count, so
one matrix factorised with 1 and with 2 threads gives results that differ in the last bits, and ADMM
and GPTQ then round some weights the other way (issue 18: on the BraTS demo, 1 vs 2 threads changed
up to a quarter of some layers' codes; a float32 triangular solve with 16 right-hand sides differs
between 1 and 2 threads). On the CPU the factorisations run in float64 and are rounded back, which
leaves the differences between thread counts far below float32's resolution, and the many solves
of ADMM's W-step are matrix products against the rounded factor, which MKL does not split along
their sums.

On other devices (CUDA) there is no thread count to depend on, and float64 runs at a small fraction
of float32's speed on most GPUs, so the factorisations stay in the input's dtype there
(:func:`factor_dtype`).
"""

from __future__ import annotations

import torch

__all__ = ["CholeskyRows", "cholesky", "factor_dtype", "spd_inverse"]


def factor_dtype(device: torch.device) -> torch.dtype:
    """The dtype factorisations run in on ``device``: float64 on the CPU, float32 elsewhere."""
    return torch.float64 if device.type == "cpu" else torch.float32


def cholesky(matrix: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """The Cholesky factor of symmetric positive definite matrices, in :func:`factor_dtype`.

    Args:
        matrix: ``(..., n, n)`` symmetric positive definite matrices.
        upper: the upper factor ``U`` (``matrix = Uᵀ U``) instead of the lower ``L`` (``matrix = L Lᵀ``).

    Returns:
        the factor (float64 on the CPU: round it with ``.to(dtype)`` where it is used as is).
    """
    return torch.linalg.cholesky(matrix.to(factor_dtype(matrix.device)), upper=upper)


def spd_inverse(matrix: torch.Tensor) -> torch.Tensor:
    """The inverse of symmetric positive definite matrices through their Cholesky factor.

    Args:
        matrix: ``(..., n, n)`` symmetric positive definite matrices.

    Returns:
        the inverse, in ``matrix``'s dtype.
    """
    return torch.cholesky_inverse(cholesky(matrix)).to(matrix.dtype)


class CholeskyRows:
    """Solves ``X M = R`` for many ``R`` with one Cholesky factorisation ``M = L Lᵀ``.

    The two triangular solves are done in blocks of ``block`` columns: each block is a matrix
    product with the solved blocks before it and one with its diagonal block's inverse (both made
    once, in :func:`factor_dtype`), so a solve is matrix products only, in ``M``'s dtype. That is as
    fast as a float32 triangular solve and, unlike it, the same on any thread count.

    Args:
        matrix: ``(G, n, n)`` symmetric positive definite matrices.
        block: columns per block.
    """

    def __init__(self, matrix: torch.Tensor, block: int = 256) -> None:
        lower = cholesky(matrix)
        n = matrix.shape[-1]
        self.lower = lower.to(matrix.dtype)
        self.blocks = [(s, min(s + block, n)) for s in range(0, n, block)]
        self.diagonal_inverses = []
        for s, e in self.blocks:
            eye = torch.eye(e - s, dtype=lower.dtype, device=lower.device).expand(lower.shape[0], -1, -1)
            inverse = torch.linalg.solve_triangular(lower[:, s:e, s:e], eye, upper=False)
            self.diagonal_inverses.append(inverse.to(matrix.dtype))

    def solve_rows(self, rhs: torch.Tensor) -> torch.Tensor:
        """``rhs (L Lᵀ)⁻¹`` for ``(G, m, n)`` right-hand sides.

        Args:
            rhs: the right-hand sides, one per row.

        Returns:
            the solution, in the factor's dtype.
        """
        rhs = rhs.to(self.lower.dtype)
        lower = self.lower
        y = torch.empty_like(rhs)  # y Lᵀ = rhs, Lᵀ upper: blocks first to last
        for (s, e), inverse in zip(self.blocks, self.diagonal_inverses):
            part = rhs[:, :, s:e]
            if s:
                part = part - torch.bmm(y[:, :, :s], lower[:, s:e, :s].transpose(1, 2))
            y[:, :, s:e] = torch.bmm(part, inverse.transpose(1, 2))
        x = torch.empty_like(rhs)  # x L = y: blocks last to first
        n = rhs.shape[-1]
        for (s, e), inverse in zip(reversed(self.blocks), reversed(self.diagonal_inverses)):
            part = y[:, :, s:e]
            if e < n:
                part = part - torch.bmm(x[:, :, e:], lower[:, e:, s:e])
            x[:, :, s:e] = torch.bmm(part, inverse)
        return x
