import pytest
import torch
import torch.nn as nn

from monai_effq.solver import OutputError, layer_view, solve_layer, solve_weights

LAYERS = {
    "conv": (lambda: nn.Conv3d(4, 6, 3, padding=1), (3, 4, 6, 6, 6)),
    "grouped conv without bias": (lambda: nn.Conv3d(4, 6, 3, padding=1, groups=2, bias=False), (3, 4, 6, 6, 6)),
    "transposed conv": (lambda: nn.ConvTranspose3d(4, 6, 2, stride=2), (3, 4, 4, 4, 4)),
    "linear": (lambda: nn.Linear(5, 7), (3, 9, 5)),
}


def _problem(kind: str):
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    layer = make()
    x = torch.randn(shape)
    with torch.no_grad():
        y = layer(x) + 0.05 * torch.randn_like(layer(x))
    h = torch.rand(y.shape[:-1]) if kind == "linear" else torch.rand(y.shape[0], *y.shape[2:])
    return layer, x, y, h


@pytest.mark.parametrize("kind", LAYERS)
def test_measured_errors_of_round_to_nearest_equal_those_from_the_statistics(kind):
    layer, x, y, h = _problem(kind)
    summed = solve_layer(layer, x, y, 3, voxel_weights=h, method="rtn")  # float32 sums: 1e-5 is their precision here
    sol = solve_weights(layer_view(layer), layer.weight, layer.bias, 3)
    assert torch.equal(sol.codes, summed.codes) and torch.equal(sol.weight, summed.weight) and torch.equal(sol.bias, summed.bias)
    meter = OutputError(layer, {"fp": (layer.weight, layer.bias), "rtn": (sol.weight, sol.bias)})
    meter.add_batch(x, y, h)
    assert meter.mse("rtn") == pytest.approx(summed.mse, rel=1e-5)
    assert meter.mse("fp") == pytest.approx(summed.mse_fp, rel=1e-5)
    assert meter.voxels == y.numel() // layer_view(layer).out_channels


def test_weights_measure_no_error_on_their_own_outputs_but_kernel_rounding():
    layer, x, _, h = _problem("conv")
    with torch.no_grad():
        y = layer(x)
    meter = OutputError(layer, {"fp": (layer.weight, layer.bias)})
    meter.add_batch(x, y, h)
    assert meter.mse("fp") < 1e-12  # a lone window and a batch may take kernels that round differently


def test_figures_are_the_same_bits_however_windows_are_batched_or_gathered():
    layer, x, y, h = _problem("conv")
    candidates = {"fp": (layer.weight, layer.bias)}
    whole = OutputError(layer, candidates)
    whole.add_batch(x, y, h)
    parts = [OutputError(layer, candidates), OutputError(layer, candidates)]
    parts[1].add_batch(x[2:], y[2:], h[2:], windows=[2])
    parts[0].add_batch(x[:2], y[:2], h[:2], windows=[0, 1])
    shares = [p._windows for p in parts]
    parts[0].gather(lambda obj: shares)  # as all_gather_objects returns every rank's share
    assert parts[0].mse("fp") == whole.mse("fp") and parts[0].effective_voxels == whole.effective_voxels


def test_figures_read_between_batches_and_before_a_gather_follow_the_windows_added_later():
    layer, x, y, h = _problem("conv")
    candidates = {"fp": (layer.weight, layer.bias)}
    whole = OutputError(layer, candidates)
    whole.add_batch(x, y, h)
    meter, other = OutputError(layer, candidates), OutputError(layer, candidates)
    meter.add_batch(x[:1], y[:1], h[:1], windows=[0])
    first = (meter.mse("fp"), meter.voxels, meter.effective_voxels)
    meter.add_batch(x[1:2], y[1:2], h[1:2], windows=[1])
    assert meter.voxels == 2 * first[1] and meter.mse("fp") != first[0]
    other.add_batch(x[2:], y[2:], h[2:], windows=[2])
    shares = [meter._windows, other._windows]
    meter.gather(lambda obj: shares)
    assert (meter.mse("fp"), meter.voxels, meter.effective_voxels) == (whole.mse("fp"), whole.voxels, whole.effective_voxels)


def test_candidates_with_the_same_weights_are_run_once_and_share_their_figure():
    layer, x, y, h = _problem("conv")
    sol = solve_weights(layer_view(layer), layer.weight, layer.bias, 3)
    runs = []
    layer.register_forward_hook(lambda module, args, out: runs.append(module.weight))  # the measured copies keep it
    meter = OutputError(layer, {"fp": (layer.weight, layer.bias), "quantized": (sol.weight, sol.bias), "rtn": (sol.weight.clone(), sol.bias)})
    meter.add_batch(x, y, h, windows=[0, 1, 2])
    assert len(runs) == 2 * 3  # fp and the one rounding, per window
    assert meter.mse("rtn") == meter.mse("quantized") != meter.mse("fp")
    shifted = OutputError(layer, {"quantized": (sol.weight, sol.bias), "rtn": (sol.weight, sol.bias + 1)})
    shifted.add_batch(x, y, h)
    assert shifted.mse("rtn") > shifted.mse("quantized") == meter.mse("quantized")


def test_bad_input_is_refused_by_name():
    layer, x, y, h = _problem("conv")
    meter = OutputError(layer, {"fp": (layer.weight, layer.bias)})
    with pytest.raises(ValueError, match="NaN or Inf"):
        meter.add_batch(x.clone().fill_(float("nan")), y)
    with pytest.raises(ValueError, match="voxel_weights .* must have shape"):
        meter.add_batch(x, y, h[:, :2])
    meter.add_batch(x, y, windows=[0, 1, 2])
    with pytest.raises(ValueError, match="window 1 was added twice"):
        meter.add_batch(x[:1], y[:1], windows=[1])
    with pytest.raises(ValueError, match=r"'rtn' is not a candidate of .*pass one of \['fp'\]"):
        meter.mse("rtn")
    with pytest.raises(ValueError, match="fits its codes to the calibration data"):
        solve_weights(layer_view(layer), layer.weight, layer.bias, 3, method="efficientq")
