"""The solver follows its inputs' device.

A tensor made without a device would land on the default device; run under ``torch.device("meta")``
such a tensor is a meta tensor, and mixing it with the CPU inputs fails or leaks into the result.
So a CPU solve that succeeds there, equal to the ordinary one, makes every tensor where its inputs are.
"""

import pytest
import torch

from monai_effq import AdmmSettings, solve_layer
from monai_effq.quant import FixedPointFormat
from monai_effq.solver import GramAccumulator, layer_view
from monai_effq.solver.api import solve_statistics
from monai_effq.solver.validation import solve_validated

OPTIONS = {
    "efficientq": {},
    "efficientq low-rank": {"admm": AdmmSettings(lowrank=True)},
    "efficientq per channel, power of two": {"per_channel": True, "power_of_two": True},
    "efficientq fixed point": {"weight_format": FixedPointFormat.parse("Q0.3")},
    "gptq": {"method": "gptq"},
    "rtn": {"method": "rtn"},
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_a_cpu_solve_makes_no_tensor_on_the_default_device(make_layer, name):
    layer, x, y = make_layer(6, 6, 4 if "low-rank" in name else 6, seed=5)
    h = torch.rand(1, *y.shape[2:], generator=torch.Generator().manual_seed(0)) + 0.5
    want = solve_layer(layer, x, y, 2, voxel_weights=h, **OPTIONS[name])
    with torch.device("meta"):
        got = solve_layer(layer, x, y, 2, voxel_weights=h, **OPTIONS[name])
    for field in ("codes", "weight", "bias", "scale"):
        assert getattr(got, field).device.type == "cpu"
        assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_validated_and_unweighted_solves_make_no_tensor_on_the_default_device(make_layer):
    layer, x, y = make_layer(4, 4, 6, seed=6)
    xs, ys = torch.cat([x, x.flip(2), x.flip(3), x.flip(4)]), None
    with torch.no_grad():
        ys = layer(xs)

    def solve():
        acc = GramAccumulator(layer_view(layer))
        held = torch.zeros(ys.shape[0], *ys.shape[2:], dtype=torch.bool, device="cpu")
        held[3] = True
        acc.add_batch(xs, ys, holdout=held)
        view, args = layer_view(layer), dict(weight=layer.weight, bias=layer.bias, spec=3)
        plain = GramAccumulator(view)
        plain.add_batch(xs, ys)  # the shifted-product path
        return (
            solve_validated(view, acc.statistics(), fit=acc.statistics("fit"), holdout=acc.statistics("holdout"), **args),
            solve_statistics(view, plain.statistics(), **args),
        )

    want = solve()
    with torch.device("meta"):
        got = solve()
    for a, b in zip(got, want):
        assert a.codes.device.type == "cpu" and torch.equal(a.codes, b.codes)


def test_parity_sums_of_a_strided_transposed_conv_make_no_tensor_on_the_default_device():
    layer = torch.nn.ConvTranspose3d(3, 2, 3, stride=2, padding=1, output_padding=1)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 3, 4, 3, generator=g)
    with torch.no_grad():
        y = layer(x)
    h = torch.rand(2, *y.shape[2:], generator=g)
    held = h > 0.7

    def statistics():
        acc = GramAccumulator(layer_view(layer), keep_factor=False)
        acc.add_batch(x, y, h, held)
        return acc.statistics("fit")

    assert layer_view(layer).splits_by_parity
    want = statistics()
    with torch.device("meta"):
        got = statistics()
    assert got.A64.device.type == "cpu" and torch.equal(got.A64, want.A64) and torch.equal(got.B64, want.B64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_layer_is_solved_on_the_gpu_as_well_as_on_the_cpu(make_layer):
    layer, x, y = make_layer(16, 16, 12, seed=9)
    cpu = solve_layer(layer, x, y, 2)
    gpu = solve_layer(layer.cuda(), x.cuda(), y.cuda(), 2)
    assert gpu.codes.device.type == "cuda" and gpu.weight.device.type == "cuda"
    assert gpu.mse < gpu.mse_rtn
    assert gpu.mse == pytest.approx(cpu.mse, rel=0.05)
