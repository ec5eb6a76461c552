import pytest
import torch

from monai_effq.quant import (
    FixedPointFormat,
    UniformGrid,
    fake_quantize,
    fit_scale,
    fixed_point_scale,
    fractional_bits,
    is_power_of_two,
    snap_to_power_of_two,
)


def test_the_methods_formats_map_onto_sign_magnitude_and_unsigned_grids():
    weights = FixedPointFormat.parse("Q0.4")
    assert (weights.bits, weights.grid, weights.step) == (5, UniformGrid(5, "symmetric"), 1 / 16)
    assert weights.max_value == 15 / 16  # saturates just below 2^0
    acts = FixedPointFormat.parse("Q6.0", signed=False)
    assert (acts.bits, acts.grid.kind, acts.step, acts.max_value) == (6, "unsigned", 1.0, 63.0)
    assert str(acts) == "Q6.0"


def test_a_format_quantizes_to_multiples_of_its_step_and_saturates():
    fmt = FixedPointFormat(1, 2)  # sign + 1 + 2 bits: step 0.25, |x| <= 1.75
    x = torch.tensor([0.1, 0.13, -0.6, 5.0, -5.0])
    q = fake_quantize(x, torch.tensor(fmt.step), fmt.zero_point, fmt.grid)
    assert q.tolist() == [0.0, 0.25, -0.5, 1.75, -1.75]


@pytest.mark.parametrize(
    "text,message",
    [
        ("Q0.8", "9-bit word"),
        ("Q4.5", "10-bit word"),
        ("Q8.0", r"9-bit word .*: use at most 7 integer bits with 0 fractional bits"),  # not "at most -1 fractional bits"
        ("Q0.0", "at least 2 bits"),
        ("0.4", "Q<integer bits>"),
        ("Q\u0660.\u0664", "Q<integer bits>"),  # Arabic-Indic digits, which int() would read
    ],
)
def test_formats_that_overflow_the_word_or_are_malformed_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        FixedPointFormat.parse(text)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("kind", ["symmetric", "signed", "unsigned", "midrise"])
def test_fraction_bits_from_the_range_are_the_most_that_do_not_clip(kind, per_channel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=g) * torch.tensor([0.01, 0.1, 1.0, 3.0, 20.0, 0.5])[:, None]
    x = x.abs() if kind == "unsigned" else x
    grid = UniformGrid(4, kind)
    scale = fixed_point_scale(x, grid, per_channel)
    assert is_power_of_two(scale)
    zero = torch.full_like(scale, grid.fixed_zero_point)
    dims = 1 if per_channel else None
    hi = x.amax(dim=dims) if dims else x.max()
    lo = x.amin(dim=dims) if dims else x.min()
    zp = grid.fixed_zero_point
    # a two's-complement grid has one more level below zero than above
    below = grid.fixed_zero_point - grid.qmin if kind == "signed" else grid.qmax - zp
    covers = lambda s: (hi <= (grid.qmax - zp) * s + 1e-6) & (-lo <= below * s + 1e-6)  # noqa: E731
    assert torch.all(covers(scale))
    assert not torch.any(covers(scale / 2))  # one more fractional bit clips the largest value
    err = (fake_quantize(x, scale, zero, grid) - x).abs()
    assert torch.all(err <= scale.reshape(-1, 1) / 2 + 1e-6) if per_channel else torch.all(err <= scale / 2 + 1e-6)


def test_a_signed_grid_s_extra_negative_level_takes_the_most_negative_value():
    x = torch.tensor([-1.0, 0.3, -0.55])  # 4-bit two's complement: -1.0 is code -8 at a step of 1/8
    assert float(fixed_point_scale(x, UniformGrid(4, "signed"))) == 0.125
    assert float(fixed_point_scale(-x, UniformGrid(4, "signed"))) == 0.25  # +1.0 needs code 4 at 1/4: 8 is beyond 7


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_values_holding_nan_or_inf_have_no_fixed_point_scale(bad):
    with pytest.raises(ValueError, match="hold NaN or Inf"):
        fixed_point_scale(torch.tensor([0.5, bad]), UniformGrid(4, "symmetric"))


@pytest.mark.parametrize("kind", ["midrise", "signed", "asymmetric"])
def test_snapping_picks_the_better_neighbouring_power_of_two(kind):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)) * 0.3 + (0.2 if kind == "asymmetric" else 0.0)
    grid = UniformGrid(3, kind)
    scale, zero = fit_scale(x, grid, per_channel=True)
    snapped, snapped_zero = snap_to_power_of_two(x, scale, zero, grid, per_channel=True)
    assert is_power_of_two(snapped)
    exponent = fractional_bits(snapped)
    assert torch.all((snapped >= scale / 2) & (snapped <= scale * 2))
    err = ((fake_quantize(x, snapped, snapped_zero, grid) - x) ** 2).sum(1)
    for other in (torch.exp2(-(exponent - 1).float()), torch.exp2(-(exponent + 1).float())):
        z = snapped_zero if kind != "asymmetric" else torch.round(zero * scale / other).clamp(grid.qmin, grid.qmax)
        neighbour = ((fake_quantize(x, other, z, grid) - x) ** 2).sum(1)
        near = (other >= scale / 2) & (other <= scale * 2)  # only the two powers bracketing the fit compete
        assert torch.all(err[near] <= neighbour[near] + 1e-6)
