import pytest
import torch

from monai_effq.quant import (
    GRID_KINDS,
    UniformGrid,
    channel_view,
    dequantize,
    fake_quantize,
    fit_scale,
    fit_scale_als,
    grid_codes,
    quantize_codes,
)


@pytest.mark.parametrize("kind", GRID_KINDS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_stay_in_range_and_dequantize_onto_the_grid(kind, bits):
    grid = UniformGrid(bits, kind)
    x = torch.randn(8, 50) * 3
    scale, zero = fit_scale(x, grid, per_channel=True)
    codes = quantize_codes(x, scale, zero, grid)
    assert codes.min() >= grid.qmin and codes.max() <= grid.qmax
    values = dequantize(codes, scale, zero)
    assert torch.allclose(fake_quantize(values, scale, zero, grid), values, atol=1e-6)


def test_midrise_grid_is_the_papers_symmetric_grid_without_zero():
    grid = UniformGrid(2, "midrise")
    values = dequantize(torch.arange(4), torch.tensor(1.0), grid.fixed_zero_point)
    assert values.tolist() == [-1.5, -0.5, 0.5, 1.5]  # alpha * {-1, -1/3, 1/3, 1} with alpha = 1.5


def test_signed_and_symmetric_grids_represent_zero_exactly():
    for kind in ("signed", "symmetric", "unsigned", "asymmetric"):
        grid = UniformGrid(3, kind)
        x = torch.tensor([0.0, 0.7, -0.3, 1.2]) if kind != "unsigned" else torch.tensor([0.0, 0.7, 1.2])
        scale, zero = fit_scale(x, grid)
        assert fake_quantize(torch.zeros(1), scale, zero, grid).item() == 0.0


def test_unsigned_grid_never_goes_below_zero():
    grid = UniformGrid(4, "unsigned")
    x = torch.rand(1000)
    scale, zero = fit_scale(x, grid)
    assert fake_quantize(x - 0.5, scale, zero, grid).min() == 0.0


@pytest.mark.parametrize("kind", ["signed", "midrise", "asymmetric"])
def test_fitted_scale_beats_min_max_scale(kind):
    grid = UniformGrid(3, kind)
    x = torch.randn(4096)
    s_mm, z_mm = fit_scale(x, grid, method="minmax")
    s_fit, z_fit = fit_scale(x, grid, method="als")
    err = lambda s, z: (fake_quantize(x, s, z, grid) - x).pow(2).sum()
    assert err(s_fit, z_fit) < err(s_mm, z_mm)


@pytest.mark.parametrize("kind", ["signed", "midrise"])
def test_the_least_squares_scale_is_the_least_squares_fit_of_its_own_codes(kind):
    grid = UniformGrid(3, kind)
    x = torch.randn(2048)
    scale, zero = fit_scale_als(x, grid, max_iter=50)
    q = grid_codes(x, scale, zero, grid) - zero
    assert torch.allclose(scale, (q * x).sum() / (q * q).sum(), rtol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
def test_values_all_at_the_zero_point_keep_the_starting_scale(per_channel):
    grid = UniformGrid(4, "signed")
    init = torch.full((3,), 0.25) if per_channel else torch.tensor(0.25)
    scale, _ = fit_scale_als(torch.zeros(3, 10), grid, per_channel=per_channel, init=init, zero_point=torch.zeros_like(init))
    assert torch.equal(scale, init)


def test_one_scale_for_the_tensor_is_the_scale_of_a_single_channel():
    grid = UniformGrid(2, "midrise")
    x, init, zero = torch.randn(1, 500), torch.tensor(0.4), torch.tensor(grid.fixed_zero_point)
    whole, _ = fit_scale_als(x, grid, init=init, zero_point=zero)
    channel, _ = fit_scale_als(x, grid, per_channel=True, init=init.reshape(1), zero_point=zero.reshape(1))
    assert whole.dim() == 0 and torch.equal(whole.reshape(1), channel)


def test_per_channel_scales_follow_each_channels_range():
    grid = UniformGrid(4, "signed")
    x = torch.randn(3, 100) * torch.tensor([[0.1], [1.0], [10.0]])
    scale, _ = fit_scale(x, grid, per_channel=True)
    assert scale.shape == (3,)
    assert scale[0] < scale[1] < scale[2]


@pytest.mark.parametrize("bits", [1, 9, 2.5, True])
def test_bits_outside_2_to_8_are_rejected(bits):
    with pytest.raises(ValueError, match="bits"):
        UniformGrid(bits)


def test_unknown_grid_kind_is_rejected():
    with pytest.raises(ValueError, match="grid kind"):
        UniformGrid(4, "logarithmic")


def test_fitting_a_scale_to_nan_values_is_rejected():
    with pytest.raises(ValueError, match="NaN"):
        fit_scale(torch.tensor([1.0, float("nan")]), UniformGrid(4))


def test_one_rounding_serves_any_channel_axis_and_laid_out_scales():
    grid = UniformGrid(3, "midrise")
    w = torch.randn(4, 5, 3, 3)  # a transposed conv's native weight: output channels on axis 1
    scale = torch.rand(5) + 0.1
    zero = torch.full((5,), 3.5)
    along_axis_1 = grid_codes(w, scale, zero, grid, axis=1)
    moved = grid_codes(w.transpose(0, 1), scale, zero, grid, axis=0).transpose(0, 1)
    laid_out = grid_codes(w, scale.reshape(1, 5, 1, 1).expand_as(w), zero.reshape(1, 5, 1, 1).expand_as(w), grid)
    assert torch.equal(along_axis_1, moved) and torch.equal(along_axis_1, laid_out)
    assert torch.equal(quantize_codes(w, scale, zero, grid, axis=1), along_axis_1.long())
    values = dequantize(along_axis_1, scale, zero, axis=1)
    assert torch.equal(values, scale.reshape(1, 5, 1, 1) * (along_axis_1 - zero.reshape(1, 5, 1, 1)))
    assert torch.equal(fake_quantize(w, scale, zero, grid, axis=1), values)


def test_activation_scale_is_the_same_on_one_and_two_threads():
    # ReLU outputs of one calibration window: float32 sums of this many values differed by thread count
    x = torch.relu(3 * torch.randn(1 << 18, generator=torch.Generator().manual_seed(1)) + 0.5)
    fits = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            fits.append(fit_scale(x, UniformGrid(8, "unsigned")))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(fits[0][0], fits[1][0]) and torch.equal(fits[0][1], fits[1][1])


def test_per_channel_rounding_along_axis_1_is_rounding_the_moved_axis_along_axis_0():
    grid = UniformGrid(3, "midrise")
    x = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(0))
    scale, zero = torch.linspace(0.1, 0.6, 6), torch.full((6,), grid.fixed_zero_point)
    moved = x.transpose(0, 1)
    codes = grid_codes(x, scale, zero, grid, axis=1)
    assert torch.equal(codes, grid_codes(moved, scale, zero, grid).transpose(0, 1))
    assert torch.equal(dequantize(codes, scale, zero, axis=1), dequantize(codes.transpose(0, 1), scale, zero).transpose(0, 1))


def test_channel_view_puts_each_grouped_transposed_channel_where_the_layer_reads_it():
    # a ConvTranspose with 2 groups of 3 inputs and 2 outputs: weight (6, 2, k), channel = group * 2 + column
    weight = torch.zeros(6, 2, 5)
    view = channel_view(torch.arange(4.0), weight, axis=1, groups=2).expand_as(weight)
    expected = torch.tensor([[(i // 3) * 2 + j for j in range(2)] for i in range(6)], dtype=torch.float32)
    assert torch.equal(view, expected[:, :, None].expand_as(weight))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_values_get_the_codes_of_their_float32_copies_also_in_an_all_zero_channel(dtype):
    torch.manual_seed(0)
    w = torch.randn(4, 64) * 0.05
    w[0] = 0.0  # a pruned output channel: its fitted step is 1e-12, which is 0 in float16
    grid = UniformGrid(8, "signed")
    scale, zero = fit_scale(w, grid, per_channel=True)
    x = w.to(dtype)
    codes = grid_codes(x, scale, zero, grid)
    assert codes.dtype == dtype
    assert torch.equal(codes.float(), grid_codes(x.float(), scale, zero, grid))
    assert torch.equal(quantize_codes(x, scale, zero, grid)[0], torch.full((64,), int(zero[0])))  # the zero code
    assert torch.isfinite(fake_quantize(x, scale, zero, grid)).all()
