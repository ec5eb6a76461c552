import pytest
import torch
import torch.nn as nn

from monai_effq import AdmmSettings, solve_layer
from monai_effq.quant import dequantize
from monai_effq.solver import GramAccumulator, layer_view
from monai_effq.solver.admm import _ShiftedSystem


def _weighted_mse(layer, sol, x, y, h=None):
    with torch.no_grad():
        probe = type(layer).__new__(type(layer))
        probe.__dict__ = dict(layer.__dict__)
        probe._parameters = {"weight": nn.Parameter(sol.weight), "bias": nn.Parameter(sol.bias)}
        err = (probe(x) - y).pow(2)
    if h is None:
        return err.mean().item()
    h = h.unsqueeze(1)
    return ((err * h).sum() / (h.sum() * y.shape[1])).item()


def test_eight_bit_weights_reproduce_the_full_precision_output(make_layer):
    layer, x, y = make_layer(8, 8, 8, seed=0, noise=0.0)
    sol = solve_layer(layer, x, y, 8)
    assert sol.mse < 1e-3 * y.pow(2).mean().item()  # 30 dB signal-to-error at least


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_efficientq_beats_round_to_nearest_and_from_gptqs_start_is_no_worse_than_gptq(make_layer, bits, seed):
    layer, x, y = make_layer(16, 16, 8, seed=seed)
    effq = solve_layer(layer, x, y, bits)
    from_gptq = solve_layer(layer, x, y, bits, init="gptq")
    gptq = solve_layer(layer, x, y, bits, method="gptq")
    rtn = solve_layer(layer, x, y, bits, method="rtn")
    assert effq.mse < rtn.mse == pytest.approx(effq.mse_rtn)
    assert from_gptq.mse <= gptq.mse * (1 + 1e-6) and from_gptq.info["init_mse"] <= gptq.mse * (1 + 1e-6)
    assert from_gptq.info["init_mse"] <= effq.info["init_mse"]  # the better baseline, no worse than RTN's codes
    assert effq.info["init_mse"] == solve_layer(layer, x, y, bits, init="rtn").info["init_mse"]  # the default start


def test_paper_admm_from_round_to_nearest_beats_round_to_nearest(make_layer):
    layer, x, y = make_layer(32, 32, 6, seed=3)  # fewer voxels than weights per row: the low-rank form
    sol = solve_layer(layer, x, y, 2, init="rtn", refit_bias=False)
    assert sol.info["lowrank"]
    assert sol.trace.best_iteration > 0
    assert sol.mse < 0.8 * sol.mse_rtn


def test_reported_mse_equals_the_error_of_the_returned_weights(make_layer):
    layer, x, y = make_layer(8, 12, 6, seed=4)
    h = torch.rand(1, 6, 6, 6)
    for method in ("efficientq", "gptq", "rtn"):
        sol = solve_layer(layer, x, y, 3, method=method, voxel_weights=h)
        assert sol.mse == pytest.approx(_weighted_mse(layer, sol, x, y, h), rel=1e-4)


@pytest.mark.parametrize("per_channel", [False, True])
def test_weights_are_the_codes_times_the_scale(make_layer, per_channel):
    layer, x, y = make_layer(8, 8, 6, seed=5)
    sol = solve_layer(layer, x, y, 3, per_channel=per_channel)
    assert sol.codes.dtype == torch.uint8 and int(sol.codes.max()) < 8
    assert sol.scale.numel() == (8 if per_channel else 1)
    assert torch.allclose(dequantize(sol.codes.long(), sol.scale, sol.zero_point), sol.weight, atol=1e-6)
    assert torch.unique(sol.weight).numel() <= (8 * 8 if per_channel else 8)


def test_voxel_weights_pull_the_solution_toward_the_weighted_voxels(make_layer):
    layer, x, y = make_layer(8, 8, 8, seed=6)
    h = torch.ones(1, 8, 8, 8)
    h[:, :, :, :3] = 50.0  # a small, important "tumour" region
    mask = torch.zeros(1, 8, 8, 8)
    mask[:, :, :, :3] = 1.0
    plain = solve_layer(layer, x, y, 2)
    weighted = solve_layer(layer, x, y, 2, voxel_weights=h)
    assert not torch.equal(plain.codes, weighted.codes)
    assert _weighted_mse(layer, weighted, x, y, mask) < _weighted_mse(layer, plain, x, y, mask)


def test_low_rank_and_dense_w_steps_agree(make_layer):
    layer, x, y = make_layer(16, 8, 4, seed=7)
    acc = GramAccumulator(layer_view(layer))
    acc.add_batch(x, y)
    stats = acc.statistics()
    rhs = torch.randn(stats.B.shape, generator=torch.Generator().manual_seed(0))
    n = stats.A.shape[-1]
    mean_diag = float(stats.A.diagonal(dim1=1, dim2=2).mean())
    for shift in (0.01 * mean_diag, mean_diag):  # ADMM's shifts (ρ + η)s lie in this range
        exact = torch.linalg.solve(stats.A64 + shift * torch.eye(n, dtype=torch.float64), rhs.double().mT).mT
        for lowrank in (False, True):
            system = _ShiftedSystem(stats, lowrank=lowrank)
            system.set_shift(shift)
            err = (system.solve_rows(rhs).double() - exact).abs().max() / exact.abs().max()
            assert err < 1e-3, (lowrank, shift, float(err))


def test_the_low_rank_solve_beats_round_to_nearest(make_layer):
    layer, x, y = make_layer(16, 8, 4, seed=7)
    low = solve_layer(layer, x, y, 2, admm=AdmmSettings(lowrank=True))
    assert low.info["lowrank"] and low.mse < low.mse_rtn


def test_several_calibration_samples_are_one_problem(make_layer):
    layer, x, y = make_layer(8, 8, 6, seed=8)
    x2 = torch.cat([x, x.flip(-1)])
    with torch.no_grad():
        y2 = layer(x2)
    sol = solve_layer(layer, x2, y2, 4)
    assert sol.mse == pytest.approx(_weighted_mse(layer, sol, x2, y2), rel=1e-4)


@pytest.mark.parametrize(
    "layer,x",
    [
        (nn.Linear(12, 6), torch.randn(40, 12)),
        (nn.ConvTranspose3d(6, 4, 2, stride=2), torch.relu(torch.randn(1, 6, 4, 4, 4))),
        (nn.Conv2d(6, 6, 3, padding=1, groups=3), torch.relu(torch.randn(2, 6, 8, 8))),
    ],
)
def test_every_supported_layer_kind_is_solved(layer, x):
    with torch.no_grad():
        y = layer(x)
    sol = solve_layer(layer, x, y, 4)
    assert sol.weight.shape == layer.weight.shape
    assert sol.mse < sol.mse_rtn
    assert sol.mse == pytest.approx(_weighted_mse(layer, sol, x, y), rel=1e-3)


@pytest.mark.parametrize("settings,phases,first,last", [(AdmmSettings(), 3, 20.0, 80.0), (AdmmSettings.paper(), 4, 10.0, 1000.0)])
def test_rho_schedule_runs_from_rho_start_to_rho_end(settings, phases, first, last):
    rhos = settings.rho_schedule()
    assert len(rhos) == phases
    assert rhos[0] == pytest.approx(first) and rhos[-1] == pytest.approx(last)
    assert all(b > a for a, b in zip(rhos, rhos[1:]))


def test_the_final_refinement_lowers_the_error_of_admms_iterate(make_layer):
    layer, x, y = make_layer(16, 16, 8, seed=11)
    plain = solve_layer(layer, x, y, 2, admm=AdmmSettings(refine_sweeps=0))
    refined = solve_layer(layer, x, y, 2)
    assert plain.trace.refined == 0 and refined.trace.refined > 0
    assert refined.mse < plain.mse


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"refine_sweeps": -1}, "refine_sweeps must be an integer of at least 0, got -1"),
        ({"iterations": 0}, "iterations must be an integer of at least 1, got 0"),
        ({"rho_every": 0}, "rho_every must be an integer of at least 1, got 0"),
        ({"eta": -1.0}, "eta must be a non-negative number, got -1.0"),
        ({"rho_start": 100.0}, "need rho_start <= rho_end, got 100.0 and 80.0"),
        ({"rho_start": 0.0}, "rho_start must be a positive number, got 0.0"),
    ],
)
def test_admm_settings_out_of_range_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdmmSettings(**kwargs)


@pytest.mark.parametrize("method", ["rtn", "gptq", "efficientq"])
def test_a_per_channel_layer_of_one_output_channel_gets_one_scale_per_channel(method):
    # a binary segmentation head: its scale is (1,), as its zero point and the scale of any wider layer
    layer = nn.Conv3d(8, 1, 1)
    x = torch.randn(1, 8, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = layer(x)
    sol = solve_layer(layer, x, y, 2, per_channel=True, method=method)
    assert sol.scale.shape == sol.zero_point.shape == (1,)
    assert solve_layer(layer, x, y, 2, method=method).scale.shape == ()


def test_a_single_phase_holds_rho_at_its_start():
    assert AdmmSettings(iterations=10, rho_every=20).rho_schedule() == [20.0]


class TestBadInput:
    def setup_method(self):
        self.layer = nn.Conv3d(4, 4, 3, padding=1)
        self.x = torch.rand(1, 4, 5, 5, 5)
        with torch.no_grad():
            self.y = self.layer(self.x)

    def test_targets_that_do_not_match_the_layer(self):
        with pytest.raises(ValueError, match="targets have shape"):
            solve_layer(self.layer, self.x, self.y[:, :, :4], 4)

    def test_inputs_that_do_not_match_the_layer(self):
        with pytest.raises(ValueError, match="expects inputs"):
            solve_layer(self.layer, torch.rand(1, 3, 5, 5, 5), self.y, 4)

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_non_finite_calibration_data(self, bad):
        x = self.x.clone()
        x[0, 0, 0, 0, 0] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            solve_layer(self.layer, x, self.y, 4)

    @pytest.mark.parametrize("bits", [1, 9, 0])
    def test_bits_outside_two_to_eight(self, bits):
        with pytest.raises(ValueError, match="weight_bits"):
            solve_layer(self.layer, self.x, self.y, bits)

    def test_unsupported_layer_type(self):
        with pytest.raises(TypeError, match="BatchNorm"):
            solve_layer(nn.BatchNorm3d(4), self.x, self.x, 4)

    def test_empty_calibration(self):
        with pytest.raises(ValueError, match="empty calibration"):
            solve_layer(self.layer, self.x[:0], self.y[:0], 4)

    def test_unknown_method(self):
        with pytest.raises(ValueError, match="method"):
            solve_layer(self.layer, self.x, self.y, 4, method="adaround")

    def test_negative_voxel_weights(self):
        with pytest.raises(ValueError, match="non-negative"):
            solve_layer(self.layer, self.x, self.y, 4, voxel_weights=-torch.ones(1, 5, 5, 5))

    def test_voxel_weights_of_the_wrong_shape(self):
        with pytest.raises(ValueError, match="one weight per output"):
            solve_layer(self.layer, self.x, self.y, 4, voxel_weights=torch.ones(1, 4, 4, 4))


def test_a_method_registered_in_one_module_is_solved_and_configured_by_name(make_layer):
    from monai_effq import EfficientQConfig
    from monai_effq.solver import METHODS, MethodResult, register_method

    @register_method("lowest-code", refits_bias=False)
    def lowest(problem):
        return MethodResult(torch.full_like(problem.rtn_codes, problem.fit.grid.qmin), problem.fit)

    try:
        layer, x, y = make_layer(4, 4, 5, seed=12)
        sol = solve_layer(layer, x, y, 3, method="lowest-code")
        assert sol.method == "lowest-code" and int(sol.codes.max()) == sol.grid.qmin
        assert torch.equal(sol.bias, layer.bias.detach())  # it asked for the FP bias
        assert EfficientQConfig(method="lowest-code", overrides={"x": {"method": "lowest-code"}}).method == "lowest-code"
        from monai_effq.solver.validation import candidates_for

        assert candidates_for("lowest-code")[0].method == "lowest-code"  # the pipeline's validated solve tries it first
    finally:
        del METHODS["lowest-code"]
    with pytest.raises(ValueError, match="lowest-code"):
        solve_layer(layer, x, y, 3, method="lowest-code")


def test_a_misspelt_solver_option_fails_before_the_statistics(make_layer):
    layer, x, y = make_layer(4, 4, 4, seed=13)
    with pytest.raises(TypeError, match="unknown options \\['admm_settings'\\]"):
        solve_layer(layer, x[:, :, :0], y[:, :, :0], 2, admm_settings=AdmmSettings())
