"""Every solver method honours power-of-two scales and explicit fixed-point formats."""

import pytest
import torch

from monai_effq import solve_layer
from monai_effq.quant import FixedPointFormat, dequantize, fractional_bits, is_power_of_two

METHODS = ["efficientq", "gptq", "rtn"]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_power_of_two_scales_survive_every_method(make_layer, method, per_channel):
    layer, x, y = make_layer(8, 8, 8, seed=0)
    sol = solve_layer(layer, x, y, 4, method=method, per_channel=per_channel, power_of_two=True)
    assert is_power_of_two(sol.scale)
    assert sol.scale.numel() == (8 if per_channel else 1)
    # The weights are shift-only: integer codes times 2^-f, nothing else.
    f = fractional_bits(sol.scale).reshape(-1, *[1] * 4) if per_channel else fractional_bits(sol.scale)
    ints = sol.codes.double() - sol.zero_point.double().reshape(f.shape)
    assert torch.equal((ints * torch.exp2(-f.double())).float(), sol.weight)


def test_power_of_two_efficientq_still_beats_round_to_nearest(make_layer):
    layer, x, y = make_layer(8, 16, 8, seed=1)
    sol = solve_layer(layer, x, y, 3, power_of_two=True)
    assert sol.mse < sol.mse_rtn


@pytest.mark.parametrize("method", METHODS)
def test_an_explicit_format_fixes_grid_and_step(make_layer, method):
    layer, x, y = make_layer(8, 8, 8, seed=2)
    fmt = FixedPointFormat.parse("Q0.4")
    sol = solve_layer(layer, x, y, 4, method=method, weight_format=fmt)
    assert sol.grid == fmt.grid and sol.grid.bits == 5
    assert float(sol.scale) == 1 / 16
    assert torch.equal(dequantize(sol.codes, sol.scale, sol.zero_point), sol.weight)
    assert sol.weight.abs().max() <= fmt.max_value
