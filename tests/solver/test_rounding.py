import pytest
import torch

from monai_effq.quant import WeightSpec
from monai_effq.solver import GramAccumulator, layer_view
from monai_effq.solver.rounding import fit_grid, gptq_round, refine_codes, round_to_nearest


@pytest.fixture
def problem(make_layer):
    layer, x, y = make_layer(8, 6, 6, seed=3)
    view = layer_view(layer)
    acc = GramAccumulator(view)
    acc.add_batch(x, y)
    return view.weight_matrix(layer.weight).float(), acc.statistics()


def _objective(codes, fit, stats):
    w = fit.values(codes).double()
    return float((w * (0.5 * torch.bmm(w, stats.A64) - stats.B64)).sum())


@pytest.mark.parametrize("bits,per_channel", [(2, False), (3, True), (4, False)])
def test_refinement_never_raises_the_objective_and_keeps_codes_on_the_grid(problem, bits, per_channel):
    w0, stats = problem
    fit = fit_grid(w0, WeightSpec.of(bits, "midrise", per_channel))
    start = round_to_nearest(w0, fit)
    refined, changed = refine_codes(start, fit, stats.A, stats.B, sweeps=3)
    assert changed > 0
    assert _objective(refined, fit, stats) < _objective(start, fit, stats)
    assert torch.equal(refined, refined.round())
    assert refined.min() >= fit.grid.qmin and refined.max() <= fit.grid.qmax


def test_refinement_improves_even_gptqs_rounding(problem):
    w0, stats = problem
    fit = fit_grid(w0, WeightSpec.of(2))
    gptq = gptq_round(w0, stats.A, fit)
    refined, _ = refine_codes(gptq, fit, stats.A, stats.B)
    assert _objective(refined, fit, stats) < _objective(gptq, fit, stats)


def test_refinement_stops_at_a_coordinate_wise_minimum(problem):
    w0, stats = problem
    fit = fit_grid(w0, WeightSpec.of(2))
    once, _ = refine_codes(round_to_nearest(w0, fit), fit, stats.A, stats.B, sweeps=50)
    again, changed = refine_codes(once, fit, stats.A, stats.B, sweeps=1)
    assert changed == 0 and torch.equal(again, once)


@pytest.mark.parametrize("rows,block", [(1, 64), (1, 43), (8, 43)])  # 216 columns: with 43 the last block is one column
def test_the_refinement_counts_every_move_and_lowers_the_objective_of_one_row_and_one_column_blocks(problem, rows, block):
    w0, stats = problem
    row, hessian, target = w0[:, :rows], stats.A, stats.B[:, :rows]
    fit = fit_grid(row, WeightSpec.of(2))
    start = round_to_nearest(row, fit)
    refined, changed = refine_codes(start, fit, hessian, target, block=block)

    def objective(codes):
        w = fit.values(codes).double()
        return float((w * (0.5 * torch.bmm(w, hessian.double()) - target.double())).sum())

    moved = int((refined != start).sum())
    assert moved > 0 and changed >= moved
    assert objective(refined) < objective(start)


def test_the_nearby_error_equals_the_float64_error(problem):
    w0, stats = problem
    error = stats.error_near(w0)
    fit = fit_grid(w0, WeightSpec.of(2))
    bias = torch.randn(stats.y_mean.shape, generator=torch.Generator().manual_seed(1))
    for w in (w0, fit.values(round_to_nearest(w0, fit)), 1.1 * w0):
        for b in (None, bias):
            assert error(w, b) == pytest.approx(stats.weighted_mse(w, b), rel=1e-6, abs=1e-12)


def _textbook_gptq(w0, hessian, fit, damp=0.01):
    """GPTQ as Frantar et al. write it: error feedback through the upper Cholesky factor of H⁻¹, in float64."""
    h = hessian[0].double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    w, codes = w0.double().clone(), torch.zeros_like(w0)
    for j in range(w.shape[-1]):
        q = fit.codes(w[:, :, j : j + 1].float())
        codes[:, :, j : j + 1] = q
        err = (w[:, :, j] - fit.values(q)[:, :, 0].double()) / u[j, j]
        w[:, :, j:] -= err[:, :, None] * u[j, j:]
    return codes


@pytest.mark.parametrize("bits,rows", [(2, 8), (4, 8), (2, 1)])
def test_gptq_rounds_as_the_textbook_error_feedback_does(problem, bits, rows):
    w0, stats = problem
    w0 = w0[:, :rows]
    fit = fit_grid(w0, WeightSpec.of(bits))
    codes = gptq_round(w0, stats.A, fit, block=32)  # several blocks: the lazy updates are exercised
    want = _textbook_gptq(w0, stats.A, fit)
    assert torch.equal(codes, want)
    assert not torch.equal(codes, round_to_nearest(w0, fit))


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_refit_fits_the_scale_for_the_zero_point_it_keeps(per_channel):
    torch.manual_seed(0)
    w = torch.randn(1, 6, 40) + 0.7  # skewed, so a min/max zero point of new values would differ
    fit = fit_grid(w, WeightSpec.of(4, "asymmetric", per_channel))
    moved = w * 1.3 - 0.4
    new = fit.refit(moved, max_iter=50)
    assert torch.equal(new.zero_point, fit.zero_point)
    # a least-squares fixed point: the refitted scale is the best one for its own codes and that zero point
    q = new.codes(moved) - new.per_row(new.zero_point, moved.shape)
    dims = (1, 2) if not per_channel else 2
    best = (q * moved).sum(dims, dtype=torch.float64) / (q * q).sum(dims, dtype=torch.float64)
    assert torch.allclose(new.scale.double().reshape(best.shape), best, rtol=1e-5)


def _rank_deficient_gram(n: int = 24, voxels: int = 8, negative: float = 0.0) -> torch.Tensor:
    """``(1, n, n)``: the Gram matrix of fewer voxels than columns, less ``negative`` along one null direction."""
    x = torch.randn(voxels, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = x.T @ x
    null = torch.linalg.eigh(h).eigenvectors[:, 0]  # an eigenvalue ~0: rank ≤ voxels
    return (h - negative * torch.diagonal(h).mean() * torch.outer(null, null)).float()[None]


def test_gptq_rounds_a_gram_matrix_that_its_ridge_leaves_indefinite_with_a_larger_ridge():
    # float32 sums of few voxels can leave -1e-4..-1e-3 of the mean diagonal along a null direction
    w0 = torch.randn(1, 4, 24, generator=torch.Generator().manual_seed(1))
    fit = fit_grid(w0, WeightSpec.of(4))
    h = _rank_deficient_gram(negative=0.05)  # more than the default ridge (1%), less than 10x
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky((h + 0.01 * torch.diagonal(h, dim1=1, dim2=2).mean() * torch.eye(24)).double())
    codes = gptq_round(w0, h, fit)
    assert torch.equal(codes, gptq_round(w0, h, fit, damp=0.1))  # rounded with the 10x ridge
    assert codes.min() >= fit.grid.qmin and codes.max() <= fit.grid.qmax


def test_gptq_refuses_a_gram_matrix_no_ridge_makes_definite():
    w0 = torch.randn(1, 4, 24, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="GPTQ could not factorise the Gram matrix"):
        gptq_round(w0, _rank_deficient_gram(negative=10.0), fit_grid(w0, WeightSpec.of(4)))
