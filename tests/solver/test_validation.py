import pytest
import torch
import torch.nn as nn

from monai_effq.quant.spec import WeightSpec
from monai_effq.solver.admm import AdmmSettings
from monai_effq.solver.api import as_weight_spec, solve_statistics
from monai_effq.solver.gram import GramAccumulator
from monai_effq.solver.layers import layer_view
from monai_effq.solver.rounding import fit_grid
from monai_effq.solver.validation import candidates_for, solve_validated


def _layer_and_data(voxels_side: int, seed: int = 0):
    torch.manual_seed(seed)
    conv = nn.Conv3d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, voxels_side, voxels_side, voxels_side)
    with torch.no_grad():
        y = conv(x) + 0.1 * torch.randn(1, 8, voxels_side, voxels_side, voxels_side)
    return conv, x, y


def _slab_mask(shape, every=4):
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[:, every - 1 :: every] = True
    return mask


def test_fit_and_holdout_errors_add_up_to_the_error_on_all_voxels():
    conv, x, y = _layer_and_data(8)
    view = layer_view(conv)
    acc = GramAccumulator(view)
    h = torch.rand(1, 8, 8, 8)
    acc.add_batch(x, y, h, _slab_mask((1, 8, 8, 8)))
    full, fit, held = acc.statistics(), acc.statistics("fit"), acc.statistics("holdout")
    w = view.weight_matrix(conv.weight.detach()) + 0.01
    b = conv.bias.detach().reshape(1, -1)
    total = full.weighted_mse(w, b) * full.weight_sum
    parts = fit.weighted_mse(w, b) * fit.weight_sum + held.weighted_mse(w, b) * held.weight_sum
    assert total == pytest.approx(parts, rel=1e-6)
    assert fit.voxels + held.voxels == full.voxels == 512


def test_holdout_statistics_equal_those_of_the_held_out_voxels_alone():
    conv, x, y = _layer_and_data(8)
    view = layer_view(conv)
    mask = _slab_mask((1, 8, 8, 8))
    split, alone = GramAccumulator(view), GramAccumulator(view)
    split.add_batch(x, y, None, mask)
    alone.add_batch(x, y, mask.float())
    # float32 chunk products summed in another order: equal to float32 precision
    torch.testing.assert_close(split.statistics("holdout").A64, alone.statistics().A64, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(split.statistics("holdout").B64, alone.statistics().B64, rtol=1e-4, atol=1e-3)


def test_without_a_holdout_the_statistics_are_unchanged_and_the_holdout_part_is_refused():
    conv, x, y = _layer_and_data(6)
    view = layer_view(conv)
    plain, split = GramAccumulator(view), GramAccumulator(view)
    plain.add_batch(x, y)
    split.add_batch(x, y, None, _slab_mask((1, 6, 6, 6)))
    torch.testing.assert_close(plain.statistics().A64, split.statistics().A64)
    assert not plain.has_holdout and split.has_holdout
    with pytest.raises(ValueError, match="held out"):
        plain.statistics("holdout")


def test_effective_voxels_count_equal_weights_fully_and_skewed_weights_less():
    conv, x, y = _layer_and_data(6)
    view = layer_view(conv)
    flat, skewed = GramAccumulator(view), GramAccumulator(view)
    flat.add_batch(x, y)
    h = torch.ones(1, 6, 6, 6)
    h[:, :3] = 100.0
    skewed.add_batch(x, y, h)
    assert flat.statistics().effective_voxels == pytest.approx(216)
    assert skewed.statistics().effective_voxels < 216 * 0.6


def test_candidates_put_the_configured_setting_first_and_always_include_round_to_nearest():
    names = [c.name for c in candidates_for("efficientq", AdmmSettings(eta=2.0), gptq_damp=0.05)]
    assert names[0] == "efficientq eta=2"
    assert "rtn" in names and "gptq damp=0.05" in names
    assert [c.name for c in candidates_for("gptq")][0] == "gptq damp=0.01"
    assert [c.name for c in candidates_for("rtn")] == ["rtn"]


def test_a_registered_method_competes_with_the_configured_admm_settings_and_damping():
    settings = AdmmSettings(eta=7.0)
    own = candidates_for("my_method", settings, gptq_damp=0.5)[0]
    assert own.method == "my_method" and own.options == {"gptq_damp": 0.5, "admm": settings}


def test_an_underdetermined_layer_keeps_round_to_nearest():
    # 4x4x4 = 64 output voxels for 8*27 = 216 unknowns per output channel: the data cannot pin the weights.
    conv, x, y = _layer_and_data(4, seed=3)
    view = layer_view(conv)
    acc = GramAccumulator(view)
    acc.add_batch(x, y, None, _slab_mask((1, 4, 4, 4), every=2))
    sol = solve_validated(
        view, acc.statistics(), conv.weight, conv.bias, 2, fit=acc.statistics("fit"), holdout=acc.statistics("holdout")
    )
    rtn = solve_statistics(view, acc.statistics(), conv.weight, conv.bias, 2, method="rtn")
    assert sol.info["choice"] == "rtn (underdetermined)"
    assert torch.equal(sol.codes, rtn.codes) and torch.equal(sol.bias, rtn.bias)


def test_without_a_holdout_the_configured_setting_is_solved_on_all_voxels():
    conv, x, y = _layer_and_data(8, seed=3)
    view = layer_view(conv)
    acc = GramAccumulator(view)
    acc.add_batch(x, y)
    sol = solve_validated(view, acc.statistics(), conv.weight, conv.bias, 2, method="gptq")
    plain = solve_statistics(view, acc.statistics(), conv.weight, conv.bias, 2, method="gptq")
    assert sol.info["choice"] == "gptq damp=0.01" and "validation" not in sol.info
    assert torch.equal(sol.codes, plain.codes)


@pytest.mark.parametrize("method", ["efficientq", "gptq"])
def test_on_a_scarcely_determined_layer_the_chosen_setting_is_no_worse_than_round_to_nearest_held_out(method):
    # 8x8x8 = 512 output voxels for 216 unknowns per output channel, with noisy targets.
    conv, x, y = _layer_and_data(8, seed=3)
    view = layer_view(conv)
    acc = GramAccumulator(view)
    acc.add_batch(x, y, None, _slab_mask((1, 8, 8, 8)))
    fit, held, full = acc.statistics("fit"), acc.statistics("holdout"), acc.statistics()
    sol = solve_validated(view, full, conv.weight, conv.bias, 2, fit=fit, holdout=held, method=method)
    assert sol.info["holdout_mse"] <= sol.info["holdout_mse_rtn"]
    assert sol.info["choice"] in sol.info["validation"]
    assert sol.info["holdout_mse"] == min(sol.info["validation"].values())
    # the plain (unvalidated) fit on the fit voxels is what validation guards against
    plain = solve_statistics(view, fit, conv.weight, conv.bias, 2, method=method)
    g, m = view.groups, view.out_per_group
    plain_held = held.weighted_mse(view.weight_matrix(plain.weight).float(), plain.bias.reshape(g, m))
    assert sol.info["holdout_mse"] <= plain_held


def _small_conv_statistics():
    torch.manual_seed(0)
    layer = torch.nn.Conv3d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6, 6)
    view = layer_view(layer)
    acc = GramAccumulator(view)
    acc.add_batch(x, layer(x).detach())
    return layer, view, acc.statistics()


def test_a_grid_fit_handed_in_gives_the_solution_the_solver_fits_itself():
    layer, view, stats = _small_conv_statistics()
    spec = as_weight_spec(3)
    fitted = fit_grid(view.weight_matrix(layer.weight).float(), spec)
    for method in ("efficientq", "gptq", "rtn"):
        own = solve_statistics(view, stats, layer.weight, layer.bias, spec, method=method)
        given = solve_statistics(view, stats, layer.weight, layer.bias, spec, method=method, rtn_fit=fitted)
        assert torch.equal(own.codes, given.codes) and torch.equal(own.scale, given.scale) and own.mse == given.mse


def test_a_grid_fit_of_another_spec_is_refused_and_nan_weights_are_named_before_any_fit():
    layer, view, stats = _small_conv_statistics()
    per_tensor = fit_grid(view.weight_matrix(layer.weight).float(), as_weight_spec(3))
    per_channel = WeightSpec.of(3, per_channel=True)
    with pytest.raises(ValueError, match="rtn_fit given for Conv3d is not a fit of its spec"):
        solve_statistics(view, stats, layer.weight, layer.bias, per_channel, rtn_fit=per_tensor)
    broken = layer.weight.detach().clone()
    broken[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="the Conv3d weights contain NaN or Inf values"):
        solve_validated(view, stats, broken, layer.bias, 3)
