import pytest
import torch

from monai_effq.quant.grid import UniformGrid, fit_minmax
from monai_effq.solver import kernels
from monai_effq.solver.projection import project_onto_grid
from monai_effq.solver.rounding import GridFit


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit: -0.0 and 0.0 differ, as they do in a checkpoint's float tensors."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _step_inputs(groups: int, m: int, n: int, kind: str, bits: int, per_channel: bool, seed: int):
    """An ADMM state: W-step weights, a dual, the codes before the step and the current fit."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(groups, m, n, generator=g) * (torch.rand(groups, m, 1, generator=g) + 0.2)
    grid = UniformGrid(bits, kind)
    scale, zero = fit_minmax(w.reshape(-1, n), grid, per_channel)
    fit = GridFit(grid, scale * 0.8, zero, "free")  # ALS shrinks a min/max scale: the alternations have work to do
    dual = 0.3 * torch.randn(w.shape, generator=g) * fit.per_row(fit.scale, w.shape)
    # some values exactly halfway between codes and some at the zero point: ties to even and signed zeros
    z = fit.per_row(fit.zero_point, w.shape)
    half = fit.per_row(fit.scale, w.shape) * (torch.randint(-2, 2, w.shape, generator=g) + 0.5 - z)
    w = torch.where(torch.rand(w.shape, generator=g) < 0.1, half - dual, w)
    w[..., ::7] = (-0.25 * fit.per_row(fit.scale, w.shape) - dual)[..., ::7]
    return w, dual, fit.codes(w + 0.05 * torch.randn(w.shape, generator=g)), fit


CASES = [
    (1, 32, 864, "signed", 2, False),
    (1, 64, 1728, "signed", 2, False),
    (1, 16, 300, "signed", 4, True),
    (2, 5, 27, "midrise", 4, True),
    (3, 7, 50, "symmetric", 3, False),
    (1, 8, 64, "unsigned", 8, False),
    (2, 4, 9, "asymmetric", 2, True),
    (1, 1, 1, "signed", 2, False),
]


@pytest.mark.parametrize("groups, m, n, kind, bits, per_channel", CASES)
@pytest.mark.parametrize("max_iter", [4, 1, 0])
def test_compiled_and_torch_projections_give_the_same_bits(groups, m, n, kind, bits, per_channel, max_iter):
    pytest.importorskip("numba")
    runs = []
    for use_compiled in (False, True):
        w, dual, before, fit = _step_inputs(groups, m, n, kind, bits, per_channel, seed=m * n + bits)
        codes, new_fit, values, changed = project_onto_grid(w, dual, before, fit, max_iter, use_compiled=use_compiled)
        runs.append((codes, new_fit.scale, new_fit.zero_point, values, dual, changed))
    (c0, s0, z0, v0, d0, ch0), (c1, s1, z1, v1, d1, ch1) = runs
    assert _same_bits(c0, c1) and _same_bits(v0, v1) and _same_bits(d0, d1)
    assert _same_bits(s0, s1) and s0.shape == s1.shape and _same_bits(z0.float(), z1.float())
    assert ch0 == ch1
    grid = UniformGrid(bits, kind)
    assert c0.min() >= grid.qmin and c0.max() <= grid.qmax
    if m * n > 1 and max_iter:
        assert not torch.equal(s0, _step_inputs(groups, m, n, kind, bits, per_channel, seed=m * n + bits)[3].scale)


def test_the_projection_puts_the_values_on_the_refitted_grid_and_moves_the_dual_by_their_gap():
    w, dual, before, fit = _step_inputs(1, 16, 200, "signed", 2, False, seed=3)
    start = dual.clone()
    codes, new_fit, values, changed = project_onto_grid(w, dual, before, fit)
    assert torch.equal(values, new_fit.values(codes))
    assert torch.equal(codes, new_fit.codes(w + start))
    assert _same_bits(dual, start + (w - values))
    assert changed == (not torch.equal(codes, before))
    _, _, _, again = project_onto_grid(w, start.clone(), codes, fit)
    assert not again  # the same step from its own codes changes none


def test_other_scale_rules_run_in_torch_and_are_refused_by_the_compiled_loop():
    pytest.importorskip("numba")
    w, dual, before, fit = _step_inputs(1, 4, 27, "signed", 4, False, seed=1)
    fixed = GridFit(fit.grid, fit.scale, fit.zero_point, "fixed")
    codes, new_fit, _, _ = project_onto_grid(w, dual.clone(), before, fixed)
    assert new_fit is fixed and torch.equal(codes, fixed.codes(w + dual))  # the scale kept as it was
    for rule in ("fixed", "power_of_two"):
        with pytest.raises(ValueError, match="'free' scale rule"):
            project_onto_grid(w, dual, before, GridFit(fit.grid, fit.scale, fit.zero_point, rule), use_compiled=True)
    with pytest.raises(ValueError, match="float32"):
        project_onto_grid(w.double(), dual.double(), before.double(), fit, use_compiled=True)


def test_the_projection_runs_in_torch_without_numba_and_says_what_to_install(monkeypatch):
    monkeypatch.setattr(kernels, "numba_kernels", lambda: None)
    w, dual, before, fit = _step_inputs(1, 4, 27, "signed", 2, True, seed=2)
    codes, _, _, _ = project_onto_grid(w, dual, before, fit)
    assert codes.shape == w.shape
    with pytest.raises(RuntimeError, match="Numba.*fast"):
        project_onto_grid(w, dual, before, fit, use_compiled=True)


@pytest.mark.parametrize("use_compiled", [False, True])
def test_a_negative_alternation_count_refits_nothing_on_either_path(use_compiled):
    if use_compiled:
        pytest.importorskip("numba")
    w, dual, before, fit = _step_inputs(1, 6, 40, "signed", 2, False, seed=4)
    codes, new_fit, values, _ = project_onto_grid(w, dual, before, fit, max_iter=-1, use_compiled=use_compiled)
    assert torch.equal(new_fit.scale, fit.scale)
    assert torch.equal(codes, fit.codes(w + dual - (w - values)))  # dual was moved by w - values
    assert codes.min() >= fit.grid.qmin and codes.max() <= fit.grid.qmax


def test_the_compiled_loop_takes_only_what_the_torch_path_reads_the_same_way():
    pytest.importorskip("numba")
    w, dual, before, fit = _step_inputs(2, 3, 20, "signed", 4, True, seed=5)
    wrong_zero = GridFit(fit.grid, fit.scale, fit.zero_point[:1], "free")  # (1,) for 6 rows: per_row cannot read it
    with pytest.raises(ValueError, match="per-row scale and zero point"):
        project_onto_grid(w, dual, before, wrong_zero, use_compiled=True)
    with pytest.raises(RuntimeError, match="shape"):
        project_onto_grid(w, dual, before, wrong_zero)  # the torch path refuses it as well
    with pytest.raises(ValueError, match="gradient"):
        project_onto_grid(w.clone().requires_grad_(), dual, before, fit, use_compiled=True)
    with pytest.raises(ValueError, match="contiguous"):
        project_onto_grid(w.transpose(1, 2).contiguous().transpose(1, 2), dual, before, fit, use_compiled=True)


def test_the_paths_differ_by_at_most_a_unit_in_the_last_place_where_float64_sums_round():
    """A built case whose products span more than float64 holds: the sums' order shows in the scale."""
    pytest.importorskip("numba")
    w = torch.tensor([2.0**20, 2.0**-4] + [2.0**-35] * 14).reshape(1, 1, 16)
    fit = GridFit(UniformGrid(2), torch.tensor(2.0**-39), torch.tensor(2.0), "free")
    scales = [
        project_onto_grid(w, torch.zeros_like(w), torch.zeros_like(w), fit, 1, use_compiled=flag)[1].scale
        for flag in (False, True)
    ]
    gap = (scales[0].view(torch.int32) - scales[1].view(torch.int32)).abs()
    assert gap <= 1
