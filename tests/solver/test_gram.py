"""Exact (fixed-point) sums of GramAccumulator: the same statistics however the windows are grouped."""

import pytest
import torch
import torch.nn as nn

from monai_effq.solver.gram import GramAccumulator, SumBounds
from monai_effq.solver.layers import layer_view

WINDOWS = 6


def _data(layer: nn.Module, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.relu(torch.randn(WINDOWS, *shape, generator=g)) * torch.rand(WINDOWS, 1, *([1] * (len(shape) - 1)), generator=g) * 50
    with torch.no_grad():
        y = layer(x)
    voxels = y.shape[:-1] if isinstance(layer, nn.Linear) else (y.shape[0], *y.shape[2:])
    h = torch.rand(voxels, generator=g) * 3
    held = torch.zeros(voxels, dtype=torch.bool)
    held[1::3] = True
    return x, y, h, held


def _bounds(x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, under: float = 1.0) -> SumBounds:
    """Bounds of the data, or ``under`` times them (data above their bounds fill more of the int64 grid)."""
    return SumBounds(voxels=h.numel(), weight=float(h.max()), inputs=under * float(x.abs().max()), targets=under * float(y.abs().max()))


def _accumulate(layer, x, y, h, held, cuts, bounds) -> GramAccumulator:
    acc = GramAccumulator(layer_view(layer), max_chunk_elements=4096, keep_factor=False, bounds=bounds)
    for start, stop in zip([0, *cuts], [*cuts, WINDOWS]):
        acc.add_batch(x[start:stop], y[start:stop], h[start:stop], held[start:stop])
    return acc


def _figures(acc: GramAccumulator) -> list:
    out = []
    for part in ("all", "fit", "holdout"):
        st = acc.statistics(part)
        out += [st.A64, st.B64, st.x_mean, st.y_mean, st.y_energy, torch.tensor([st.weight_sum, st.effective_voxels, st.voxels])]
    return out


LAYERS = {
    "conv3d": (lambda: nn.Conv3d(3, 4, 3, padding=1), (3, 6, 5, 4)),
    "conv3d_stride2": (lambda: nn.Conv3d(3, 4, 3, stride=2, padding=1), (3, 6, 5, 4)),
    "linear_tokens": (lambda: nn.Linear(7, 5), (9, 7)),
}


# 1/64: data 64 times their bounds (their squares 4096), past 2**53 on the grid: the float64 sums move into int64 midway
@pytest.mark.parametrize("under", [1.0, 1 / 64])
@pytest.mark.parametrize("name", list(LAYERS))
def test_exact_sums_are_the_same_in_any_batches_or_reduced_shares(name, under):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = make()
    x, y, h, held = _data(layer, shape)
    bounds = _bounds(x, y, h, under)
    whole = _figures(_accumulate(layer, x, y, h, held, [], bounds))
    for cuts in ([1], [2, 3], [1, 2, 3, 4, 5]):
        assert all(torch.equal(a, b) for a, b in zip(_figures(_accumulate(layer, x, y, h, held, cuts, bounds)), whole))
    # two accumulators (as two ranks) with windows 0-1 and 2-5, reduced: the sums of one accumulator
    first = _accumulate(layer, x[:2], y[:2], h[:2], held[:2], [], bounds)
    second = _accumulate(layer, x[2:], y[2:], h[2:], held[2:], [1], bounds)
    parts: list[torch.Tensor] = []
    second.reduce(lambda tensors: parts.extend(tensors) or 0)
    assert {t.dtype for t in parts} == {torch.int64}  # the same 8 bytes per value as float64 sums
    first.reduce(lambda tensors: sum(t.add_(other).numel() * 8 for t, other in zip(tensors, parts)))
    assert all(torch.equal(a, b) for a, b in zip(_figures(first), whole))
    # and within rounding of float64 sums of the same parts (window by window)
    floating = _figures(_accumulate(layer, x, y, h, held, list(range(1, WINDOWS)), None))
    for a, b in zip(whole, floating):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * float(b.abs().max()))


def test_data_far_beyond_their_bounds_move_to_a_coarser_grid_that_ranks_refuse_to_combine():
    layer = nn.Conv3d(2, 2, 3, padding=1)
    x, y, h, held = _data(layer, (2, 4, 4, 4))
    small = SumBounds(voxels=h.numel(), weight=1.0, inputs=1e-6, targets=1e-6)
    beyond = _accumulate(layer, x, y, h, held, [1], small)  # the bounds are 1e6x too small: no int64 grid holds them
    # the statistics still agree with float64 sums to float32 precision
    floating = _figures(_accumulate(layer, x, y, h, held, [1], None))
    for a, b in zip(_figures(beyond), floating):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))
    # but the coarser grid is this accumulator's own, so combining it with another rank's is refused
    with pytest.raises(ValueError, match="exceeded the full-precision bounds.*one process"):
        beyond.reduce(lambda tensors: 0)
