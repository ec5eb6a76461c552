import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from monai_effq.quant.grid import UniformGrid
from monai_effq.solver import admm, kernels
from monai_effq.solver.admm import AdmmSettings, _compiled_update, _OnGridObjective
from monai_effq.solver.api import solve_layer
from monai_effq.solver.rounding import GridFit
from monai_effq.utils.errors import UserInputError


def _objective_inputs(groups: int, m: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, 3 * n, n, generator=g)
    a = torch.bmm(x.transpose(1, 2), x) / n
    stats = SimpleNamespace(A=a, B=torch.randn(groups, m, n, generator=g))
    w0 = torch.randn(groups, m, n, generator=g) * 0.1
    fit = GridFit(UniformGrid(2), torch.tensor(0.07), torch.tensor(1.5), "free")
    codes = torch.randint(0, 4, (groups, m, n), generator=g).float()
    steps = []
    # under 1/32 of the codes each (the incremental update, not a fresh product), several per row, by
    # odd steps: 3 a is inexact in float32, so a fused multiply-add and a product then a sum differ
    for count in (1, 5, groups * m * n // 40, 0, 2):
        new = (steps[-1] if steps else codes).clone()
        where = torch.randperm(groups * m * n, generator=g)[:count]
        new.view(-1)[where] = 3 - new.view(-1)[where]
        steps.append(new)
    return stats, w0, fit, codes, steps


@pytest.mark.parametrize("groups, m, n", [(1, 32, 96), (2, 5, 27)])
def test_the_compiled_objective_update_gives_the_same_bits_as_the_sparse_product(groups, m, n, monkeypatch):
    pytest.importorskip("numba")
    if _compiled_update() is None:
        pytest.skip("no compiled loop adds as torch's sparse product does on this CPU (see _compiled_update)")
    stats, w0, fit, codes, steps = _objective_inputs(groups, m, n, seed=m + n)
    compiled = _OnGridObjective(stats, w0, fit, codes)
    monkeypatch.setattr(admm, "_compiled_update", lambda: None)
    plain = _OnGridObjective(stats, w0, fit, codes)
    assert compiled._compiled is not None and plain._compiled is None
    for new in steps:
        compiled.update(new)
        plain.update(new)
        assert compiled.fresh and plain.fresh
        assert torch.equal(compiled.qa.view(torch.int32), plain.qa.view(torch.int32))
        assert compiled.error(fit.scale) == plain.error(fit.scale)
    # and the incremental product is the product of the codes it has reached
    fresh = torch.bmm(steps[-1] - 1.5, stats.A)
    assert torch.allclose(compiled.qa, fresh, rtol=1e-5, atol=1e-4)
    assert not torch.equal(compiled.qa, torch.bmm(codes - 1.5, stats.A))


def test_many_changed_codes_mark_the_objective_stale_until_an_error_is_asked_for():
    stats, w0, fit, codes, _ = _objective_inputs(1, 8, 32, seed=0)
    objective = _OnGridObjective(stats, w0, fit, codes)
    moved = (codes + 1).clamp(0, 3)
    objective.update(moved)
    assert not objective.fresh
    error = objective.error(fit.scale)
    assert objective.fresh and torch.equal(objective.qa, torch.bmm(moved - 1.5, stats.A))
    assert error == objective.error(fit.scale)


def test_the_objective_update_stays_in_torch_where_no_compiled_loop_adds_as_it_does(monkeypatch):
    loops = pytest.importorskip("monai_effq.solver._numba_kernels")
    monkeypatch.setattr(kernels, "numba_kernels", lambda: loops)
    monkeypatch.setattr(loops, "add_code_changes", lambda qa, *args: qa.__iadd__(1e-3))  # adds the wrong thing
    _compiled_update.cache_clear()
    try:
        assert _compiled_update() is None
        stats, w0, fit, codes, steps = _objective_inputs(1, 8, 40, seed=1)
        objective = _OnGridObjective(stats, w0, fit, codes)
        objective.update(steps[1])
        assert torch.allclose(objective.qa, torch.bmm(steps[1] - 1.5, stats.A), rtol=1e-5, atol=1e-4)
    finally:
        _compiled_update.cache_clear()


def test_fused_multiply_adds_are_used_where_torch_fuses_them():
    loops = pytest.importorskip("monai_effq.solver._numba_kernels")
    found = _compiled_update()
    if found is None:
        pytest.skip("no compiled loop matches torch's sparse product here")
    g = torch.Generator().manual_seed(7)
    a = torch.rand(1, 24, 24, generator=g) - 0.5
    steps = torch.where(torch.rand(1, 4, 24, generator=g) < 0.5, 3.0, 0.0)  # a dozen steps of 3 per row
    results = []
    for fused in (True, False):
        qa = torch.zeros(1, 4, 24)
        loops.add_code_changes(qa.numpy(), steps.numpy(), torch.zeros_like(steps).numpy(), a.numpy(), fused)
        results.append(qa)
    assert not torch.equal(results[0], results[1])  # 3 a is inexact: fusing shows in the bits
    want = torch.sparse.mm(steps[0].to_sparse(), a[0])
    assert torch.equal(results[0 if found[1] else 1][0], want)


def test_an_assignment_reached_straight_from_exploration_is_scored_and_kept():
    # Under the paper's schedule the first phase flips many codes each step (the tracked product goes
    # stale) until the stall rule cuts it; the second settles at once and ends the solve. Before the
    # settled iterates were scored, the solve returned its start, round to nearest, at 4x this error.
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(6, 15, 3, padding=1)
    x = torch.randn(1, 6, 8, 8)
    with torch.no_grad():
        y = layer(x)
    x_quantized = x + 0.3 * torch.randn_like(x)
    sol = solve_layer(layer, x_quantized, y, 4, admm=AdmmSettings.paper())
    assert sol.trace.best_iteration > 0
    assert sol.mse < 0.5 * sol.mse_rtn


def test_only_scored_iterates_count_towards_the_stall_rule(make_layer):
    # this layer's first steps flip many codes: iterations 2 and 3 go unscored (nan), which the stall
    # rule used to count as two steps without improvement, ending the phase there
    layer, x, y = make_layer(16, 16, 8, seed=5)
    settings = AdmmSettings(iterations=60, rho_every=60, stall_patience=2, patience=59, refine_sweeps=0)
    objective = solve_layer(layer, x, y, 2, admm=settings).trace.objective[1:]
    assert math.isnan(objective[1]) and math.isnan(objective[2])
    scored = [e for e in objective if not math.isnan(e)]
    # the phase ran on past them and ended when two scored iterates in a row did not improve on its best
    assert len(objective) > 3
    assert len(objective) == 60 or min(scored[-2:]) >= min(scored[:-2])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lowrank": "false"}, "lowrank must be True, False or 'auto', got 'false'"),
        ({"stall_patience": "20"}, "stall_patience must be an integer of at least 1, got '20' .*arrives as text"),
        ({"stall_patience": 0}, "stall_patience must be an integer of at least 1, got 0"),
        ({"iterations": float("nan")}, "iterations must be an integer of at least 1, got nan"),
        ({"refine_sweeps": 1.5}, "refine_sweeps must be an integer of at least 0, got 1.5"),
        ({"eta": float("inf")}, "eta must be a non-negative number, got inf"),
        ({"rho_end": "80"}, "rho_end must be a positive number, got '80' .*arrives as text"),
    ],
)
def test_admm_settings_of_the_wrong_type_are_refused_by_name(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        AdmmSettings(**kwargs)


def test_admm_settings_of_the_right_types_are_kept_as_given():
    settings = AdmmSettings(iterations=30, rho_start=5, lowrank=np.True_)
    assert settings.rho_start == 5.0 and isinstance(settings.rho_start, float)
    assert settings.lowrank is True and AdmmSettings(lowrank="auto").lowrank == "auto"


def test_the_iterates_are_the_method_docs_admm_and_the_best_scored_one_is_returned():
    """An independent float64 transcription of the method's ADMM (W-step, G-step with its ALS scale, U-step, the
    scaled dual rescaled at each change of rho) gives the solver's objective at every iteration it scores."""
    import torch.nn as nn

    from monai_effq.quant.grid import fit_scale_als
    from monai_effq.quant.spec import WeightSpec
    from monai_effq.solver.admm import AdmmLayerSolver
    from monai_effq.solver.gram import GramAccumulator
    from monai_effq.solver.layers import layer_view
    from monai_effq.solver.methods.efficientq import paper_problem_scale
    from monai_effq.solver.rounding import fit_grid, round_to_nearest

    torch.manual_seed(3)
    layer = nn.Conv3d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 6, 6, 6)
    with torch.no_grad():
        y = layer(x + 0.2 * torch.randn_like(x))
    view = layer_view(layer)
    acc = GramAccumulator(view)
    acc.add_batch(x, y)
    stats = acc.statistics()
    w0 = view.weight_matrix(layer.weight).float()
    fit = fit_grid(w0, WeightSpec.of(2, "midrise"))
    start = round_to_nearest(w0, fit)
    settings = AdmmSettings(iterations=40, rho_start=10, rho_end=1000, rho_every=10, eta=1.0, patience=0, refine_sweeps=0)
    s = paper_problem_scale(stats, w0)
    codes, best_fit, trace = AdmmLayerSolver(stats, w0, settings, s).solve(start, fit)

    a, b, w_fp = stats.A64[0], stats.B64[0], w0[0].double()

    def error(w):  # the output error up to a constant, as the solver scores it
        return float((w * (0.5 * w @ a - b)).sum())

    g, u, scale, eta, previous, reference = fit.values(start)[0].double(), None, fit.scale.clone(), settings.eta * s, None, []
    u = torch.zeros_like(g)
    for r in settings.rho_schedule():
        rho = r * s
        if previous is not None:
            u *= previous / rho  # the scaled dual is the multiplier over rho
        previous = rho
        system = a + (rho + eta) * torch.eye(a.shape[0], dtype=torch.float64)
        for _ in range(settings.rho_every):
            w = torch.linalg.solve(system, (b + rho * (g - u) + eta * w_fp).T).T
            v = (w + u).float()
            scale, _ = fit_scale_als(v, fit.grid, per_channel=False, max_iter=4, init=scale, zero_point=fit.zero_point)
            g = GridFit(fit.grid, scale, fit.zero_point).values(GridFit(fit.grid, scale, fit.zero_point).codes(v[None]))[0].double()
            u += w - g
            reference.append(error(g) - error(w_fp))
    scored = np.array(trace.objective[1:], dtype=np.float64)
    expected = np.array(reference[: len(scored)])
    kept = ~np.isnan(scored)
    assert kept.sum() >= 10 and trace.phases == 4
    assert np.abs(scored[kept] - expected[kept]).max() < 1e-4 * np.abs(expected).max()
    returned = error(best_fit.values(codes)[0].double()) - error(w_fp)
    assert returned == pytest.approx(np.nanmin(trace.objective), rel=1e-5, abs=1e-6)
