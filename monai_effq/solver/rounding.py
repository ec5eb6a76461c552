"""Rounding a weight matrix onto a grid: round to nearest, GPTQ's error-feedback rounding and a
coordinate-descent refinement of any rounding.

They work on ``(G, m, n)`` weight matrices (``G`` groups of ``m`` output rows) and return integer
codes together with the scale and zero point they were rounded with.
"""

from __future__ import annotations

import numpy as np
import torch

from monai_effq.quant.fixed_point import snap_to_power_of_two
from monai_effq.quant.grid import UniformGrid, dequantize, fit_scale, fit_scale_als, grid_codes
from monai_effq.quant.spec import SCALE_RULES, WeightSpec
from monai_effq.solver.column_loops import descend_columns, round_columns
from monai_effq.solver.linalg import cholesky

__all__ = ["SCALE_RULES", "GridFit", "fit_grid", "round_to_nearest", "gptq_round", "refine_codes"]


class GridFit:
    """Scale and zero point of a weight matrix's grid, flattened over channels.

    Args:
        grid: the grid.
        scale: 0-d (per tensor) or ``(G * m,)`` (per output channel).
        zero_point: same shape as ``scale``.
        scale_rule: what a solver may do to the scale when it refits it: ``"free"`` (any value),
            ``"power_of_two"`` (fixed point with ``f`` chosen per tensor/channel) or ``"fixed"``
            (an explicit fixed-point format: never changed).
    """

    def __init__(
        self, grid: UniformGrid, scale: torch.Tensor, zero_point: torch.Tensor, scale_rule: str = "free"
    ) -> None:
        if scale_rule not in SCALE_RULES:
            raise ValueError(f"scale_rule must be one of {SCALE_RULES}, got {scale_rule!r}.")
        self.grid = grid
        self.scale = scale
        self.zero_point = zero_point
        self.scale_rule = scale_rule

    def refit(self, w: torch.Tensor, max_iter: int = 4) -> GridFit:
        """The fit of new ``(G, m, n)`` values under the same rule, zero point kept.

        Alternating least squares from the current scale (the EfficientQ projection), then snapped
        to a power of two when the rule asks; a fixed scale is returned unchanged.

        Args:
            w: the values to fit.
            max_iter: ALS alternations.

        Returns:
            the new :class:`GridFit`.
        """
        if self.scale_rule == "fixed":
            return self
        flat = w.reshape(-1, w.shape[-1])
        scale, _ = fit_scale_als(
            flat, self.grid, per_channel=self.per_channel, max_iter=max_iter, init=self.scale, zero_point=self.zero_point
        )
        if self.scale_rule == "power_of_two":
            scale, _ = snap_to_power_of_two(flat, scale, self.zero_point, self.grid, self.per_channel, keep_zero_point=True)
        return GridFit(self.grid, scale, self.zero_point, self.scale_rule)

    @property
    def per_channel(self) -> bool:
        """Whether there is one scale per output channel (a ``(1,)`` scale: per channel, of one channel)."""
        return self.scale.dim() > 0

    def per_row(self, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Broadcast a per-row parameter (``scale``/``zero_point``) against a ``(G, m, cols)`` block."""
        if t.dim() == 0:
            return t
        return t.reshape(shape[0], shape[1], 1)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Nearest codes of ``w`` (``(G, m, k)`` columns of the weight matrix)."""
        return grid_codes(w, self.per_row(self.scale, w.shape), self.per_row(self.zero_point, w.shape), self.grid)

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """Real values of ``(G, m, k)`` codes."""
        return dequantize(codes, self.per_row(self.scale, codes.shape), self.per_row(self.zero_point, codes.shape))


def fit_grid(weight: torch.Tensor, spec: WeightSpec) -> GridFit:
    """Fit a spec's scale to a ``(G, m, n)`` weight matrix.

    Args:
        weight: the weights.
        spec: the layer's :class:`~monai_effq.quant.spec.WeightSpec` (grid, granularity, scale rule).

    Returns:
        the :class:`GridFit`: the fitted scale (snapped to the better neighbouring power of two
        under that rule) or the spec's fixed step.
    """
    g, m, n = weight.shape
    grid = spec.grid
    if spec.scale_rule == "fixed":
        dev = weight.device
        scale = torch.full((g * m,), float(spec.step), device=dev) if spec.per_channel else torch.tensor(float(spec.step), device=dev)
        zero = torch.full_like(scale, float(grid.fixed_zero_point or 0.0))
        return GridFit(grid, scale, zero, spec.scale_rule)
    flat = weight.reshape(g * m, n)
    scale, zero = fit_scale(flat, grid, per_channel=spec.per_channel, method=spec.scale_method)
    if spec.scale_rule == "power_of_two":
        scale, zero = snap_to_power_of_two(flat, scale, zero, grid, spec.per_channel)
    return GridFit(grid, scale, zero, spec.scale_rule)


def round_to_nearest(weight: torch.Tensor, fit: GridFit) -> torch.Tensor:
    """Codes of the nearest grid points.

    Args:
        weight: ``(G, m, n)`` weights.
        fit: the grid and its scale.

    Returns:
        float tensor of integer codes, shaped like ``weight``.
    """
    return fit.codes(weight)


# GPTQ's ridge is retried this many times larger when the damped Gram matrix still is not positive definite
_RIDGE_BOOSTS = (1.0, 10.0, 100.0)


def gptq_round(
    weight: torch.Tensor, hessian: torch.Tensor, fit: GridFit, damp: float = 0.01, block: int = 128
) -> torch.Tensor:
    """GPTQ/OBQ rounding: columns in order, each one's error fed back to the columns after it.

    Minimises ``tr((W - Q) H (W - Q)ᵀ)`` greedily over columns (Frantar et al. 2022). GPTQ feeds
    back through the upper Cholesky factor ``U`` of ``H⁻¹``; with ``H = V Vᵀ`` (``V = U⁻¹``, upper)
    the same rounding reads ``q_j = round(w_j + Σ_{i<j} (w_i - q_i) V_ij / V_jj)`` (as Babai's
    nearest plane), so one Cholesky factorisation of the reversed ``H`` replaces the inverse and the
    second factorisation. It is computed in float32, as GPTQ's own code does, by the thread-invariant
    :func:`~monai_effq.solver.linalg.cholesky`.

    Args:
        weight: ``(G, m, n)`` weights to round.
        hessian: ``(G, n, n)`` positive semi-definite ``H`` (the layer's Gram matrix).
        fit: the grid and its scale.
        damp: ridge added to ``H`` as a fraction of its mean diagonal (10 and then 100 times
            larger when ``H`` plus that ridge is still not numerically positive definite).
        block: columns updated together before the lazy batch update.

    Returns:
        float tensor of integer codes, shaped like ``weight``.

    Raises:
        ValueError: when ``H`` plus the largest ridge is still not positive definite.
    """
    w0 = weight.clone().float()
    h = hessian.clone().float()
    g, m, n = w0.shape
    diag = torch.diagonal(h, dim1=1, dim2=2)
    dead = diag <= 0
    diag[dead] = 1.0
    w0.masked_fill_(dead[:, None, :], 0.0)
    ridge = damp * diag.mean(dim=1).clamp_min(1e-12)
    undamped = diag.clone()
    for boost in _RIDGE_BOOSTS:
        diag.copy_(undamped + boost * ridge[:, None])
        try:
            # H = V Vᵀ with V upper: the lower factor of the reversed H, reversed.
            v = cholesky(h.flip(-1, -2)).flip(-1, -2)
            break
        except torch.linalg.LinAlgError:
            # float32 sums of a rank-deficient H (fewer voxels than columns) can leave it slightly
            # indefinite; a larger ridge makes it definite at the least cost to the rounding
            continue
    else:
        raise ValueError(
            f"GPTQ could not factorise the Gram matrix even with a ridge of {damp * _RIDGE_BOOSTS[-1]:g} "
            "of its mean diagonal: its sums are not those of real inputs (check the calibration data for "
            "extreme values), or choose another method."
        )
    feedback = v / torch.diagonal(v, dim1=1, dim2=2)[:, None, :]  # V_ij / V_jj
    w = w0.clone()  # w_j plus the feedback of the columns before it, brought up to date lazily
    codes = torch.zeros_like(w0)
    # scale and zero point laid out once per row, as the column loop reads them
    s, z = (fit.per_row(t.to(w0), w0.shape) for t in (fit.scale, fit.zero_point))
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        block_codes, err1 = _round_block(w[:, :, i1:i2], w0[:, :, i1:i2], s, z, feedback[:, i1:i2, i1:i2], fit.grid)
        codes[:, :, i1:i2] = block_codes
        w[:, :, i2:] += torch.bmm(err1, feedback[:, i1:i2, i2:])
    return codes


def _columns_as_rows(*tensors: torch.Tensor) -> list[np.ndarray]:
    """``(G, m, b)`` tensors as ``(G, b, m)`` NumPy copies, so that a column loop reads ``m`` adjacent values.

    Always copies: with one row or one column the transpose is already contiguous, and
    ``np.ascontiguousarray`` would hand back the tensor's own memory (``.numpy()`` shares it) for
    the loop to write into.
    """
    return [t.detach().cpu().numpy().transpose(0, 2, 1).copy() for t in tensors]


def _per_row(t: torch.Tensor, shape: torch.Size) -> np.ndarray:
    """A per-row (or 0-d) scale or zero point as a contiguous ``(G, m)`` NumPy array."""
    return np.ascontiguousarray(t.detach().cpu().expand(*shape[:2], 1).numpy()[:, :, 0])


def _round_block(
    w: torch.Tensor, w0: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, feedback: torch.Tensor, grid: UniformGrid
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column loop over one block: each column rounded, its error fed to the block's later columns.

    The loop runs on the CPU, in :func:`~monai_effq.solver.column_loops.round_columns` (compiled
    by Numba where it is installed, else NumPy; a torch loop's call overhead cost more than the
    arithmetic: 44 ms for a 32 x 864 layer against NumPy's 25 ms); the same float32 operations in
    the same order give the same codes (``round(w / s + z)`` clipped, as :func:`grid_codes`).

    Args:
        w: ``(G, m, b)`` the block's weights with the feedback of the columns before it (not modified).
        w0: ``(G, m, b)`` the block's original weights.
        scale: ``(G, m, 1)`` or 0-d grid step, in ``w``'s dtype.
        zero_point: shaped like ``scale``.
        feedback: ``(G, b, b)`` ``V_ij / V_jj`` within the block.
        grid: the grid.

    Returns:
        ``(codes, errors)``: the block's codes and each column's rounding error ``w0 - s (q - z)``,
        on ``w``'s device.
    """
    x, x0 = _columns_as_rows(w, w0)
    s, z = _per_row(scale, w.shape), _per_row(zero_point, w.shape)
    fb = np.ascontiguousarray(feedback.detach().cpu().numpy())
    codes, errors = round_columns(x, x0, s, z, fb, grid.qmin, grid.qmax)
    codes, errors = (np.ascontiguousarray(t.transpose(0, 2, 1)) for t in (codes, errors))
    return torch.from_numpy(codes).to(w.device), torch.from_numpy(errors).to(w.device)


def refine_codes(
    codes: torch.Tensor, fit: GridFit, hessian: torch.Tensor, target: torch.Tensor, sweeps: int = 2, block: int = 64
) -> tuple[torch.Tensor, int]:
    """Greedy coordinate descent on the codes of ``E(W) = ½ tr(W H Wᵀ) - tr(W Tᵀ)`` at a fixed scale.

    Each weight in turn moves to the grid point that minimises ``E`` with the others fixed (the
    rounded minimiser of a one-dimensional quadratic, so ``E`` never increases), all output rows
    at once; the gradient ``W H - T`` is kept exact within a block of columns and brought up to
    date for the rest by one product per block. A sweep visits every column once; the descent
    stops early once a sweep changes nothing.

    Args:
        codes: ``(G, m, n)`` float integer codes to start from.
        fit: the grid and its scale (kept).
        hessian: ``(G, n, n)`` ``H``: the layer's centred Gram matrix ``A`` (ADMM passes ``A + ηI``).
        target: ``(G, m, n)`` ``T``: the layer's centred ``B`` (ADMM passes ``B + η W0``).
        sweeps: passes over all columns.
        block: columns whose gradient is updated exactly before the lazy product.

    Returns:
        ``(codes, changed)``: the refined codes and how many code changes were made.
    """
    codes = codes.clone()
    g, m, n = codes.shape
    s = fit.per_row(fit.scale, codes.shape).to(codes)
    if s.dim() == 0:
        s = s.expand(g, m, 1)
    grad = torch.bmm(fit.values(codes), hessian) - target
    # Per weight, the step in codes that minimises E along it is round(-grad / (s H_jj)).
    inv_curvature = 1.0 / (s * torch.diagonal(hessian, dim1=1, dim2=2).clamp_min(1e-30)[:, None, :])
    qmin, qmax = fit.grid.qmin, fit.grid.qmax
    changed = 0
    for _ in range(sweeps):
        moved = 0
        for j0 in range(0, n, block):
            j1 = min(j0 + block, n)
            grad_block = grad[:, :, j0:j1]
            codes_block = codes[:, :, j0:j1]
            step = torch.round(-grad_block * inv_curvature[:, :, j0:j1])
            if not bool(((codes_block + step).clamp(qmin, qmax) != codes_block).any()):
                continue  # no weight of the block moves on its own, and none moves before it does
            start = codes_block.clone()
            codes_block.copy_(_descend_block(grad_block, start, inv_curvature[:, :, j0:j1], s, hessian[:, j0:j1, j0:j1], qmin, qmax))
            delta = codes_block - start
            count = int(delta.count_nonzero())
            if count:
                grad += torch.bmm(s * delta, hessian[:, j0:j1, :])
                moved += count
        changed += moved
        if not moved:
            break
    return codes, changed


def _descend_block(
    grad: torch.Tensor, codes: torch.Tensor, inv_curvature: torch.Tensor, scale: torch.Tensor, hessian: torch.Tensor,
    qmin: int | float, qmax: int | float,
) -> torch.Tensor:
    """One pass of :func:`refine_codes` over a block of columns, the gradient kept exact within it.

    The column-by-column loop runs on the CPU, in
    :func:`~monai_effq.solver.column_loops.descend_columns` (compiled by Numba where it is
    installed, else NumPy; torch took 0.030 s for two sweeps of a 32 x 864 layer where NumPy takes
    0.015 s and Numba 0.003 s), and the same float32 operations in the same order give the same bits.

    Args:
        grad: ``(G, m, b)`` the gradient of the block's columns (not modified).
        codes: ``(G, m, b)`` the block's codes (not modified).
        inv_curvature: ``(G, m, b)`` ``1 / (s H_jj)`` of the block's columns.
        scale: ``(G, m, 1)`` the rows' scales.
        hessian: ``(G, b, b)`` the block's diagonal block of ``H``.
        qmin: the grid's smallest code.
        qmax: the grid's largest code.

    Returns:
        the block's new codes, on ``codes``'s device.
    """
    g, c, neg_ic = _columns_as_rows(grad, codes, inv_curvature)
    np.negative(neg_ic, out=neg_ic)  # -(g ic) == g (-ic), exactly
    h = np.ascontiguousarray(hessian.detach().cpu().numpy())  # a block of H: a view, one layout for the compiled loop
    descend_columns(g, c, neg_ic, _per_row(scale, codes.shape), h, qmin, qmax)
    return torch.from_numpy(np.ascontiguousarray(c.transpose(0, 2, 1))).to(codes.device)
