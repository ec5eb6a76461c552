"""Exact (fixed-point) sums of GramAccumulator: the same statistics however the windows are grouped."""

import pytest
import torch
import torch.nn as nn

from monai_effq.solver import gram
from monai_effq.solver.gram import GramAccumulator, SumBounds
from monai_effq.solver.layers import LayerView, layer_view

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
    # weighted sums from shifted products plus the gathered columns of the voxels weighted otherwise than 1
    "conv3d_shifted": (lambda: nn.Conv3d(3, 4, 3, padding=1), (3, 6, 5, 4)),
    "conv3d_stride2": (lambda: nn.Conv3d(3, 4, 3, stride=2, padding=1), (3, 6, 5, 4)),
    "linear_tokens": (lambda: nn.Linear(7, 5), (9, 7)),
    "conv_transpose3d_unet_up": (lambda: nn.ConvTranspose3d(3, 4, 3, stride=2, padding=1, output_padding=1), (3, 3, 4, 2)),
}


# 1/64: data 64 times their bounds (their squares 4096), past 2**53 on the grid: the float64 sums move into int64 midway
@pytest.mark.parametrize("under", [1.0, 1 / 64])
@pytest.mark.parametrize("name", list(LAYERS))
def test_exact_sums_are_the_same_in_any_batches_or_reduced_shares(name, under, monkeypatch):
    monkeypatch.setattr(gram, "shifted_products_pay", lambda voxels, channels: name.endswith("shifted"))
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


TRANSPOSED = {
    "3d unet up-sampling": (lambda: nn.ConvTranspose3d(3, 4, 3, stride=2, padding=1, output_padding=1), (3, 4, 3, 5)),
    "3d kernel 2 stride 2": (lambda: nn.ConvTranspose3d(3, 2, 2, stride=2), (3, 3, 4, 3)),
    "2d output_padding 0": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1), (3, 5, 4)),
    "2d strides 2 and 3, groups 2": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=(2, 3), padding=(0, 2), groups=2), (4, 5, 4)),
    "1d kernel 2 stride 3 (taps that read no input)": (lambda: nn.ConvTranspose1d(3, 4, 2, stride=3), (3, 7)),
    "1d kernel 5 stride 3 output_padding 2": (lambda: nn.ConvTranspose1d(3, 4, 5, stride=3, padding=3, output_padding=2), (3, 7)),
    "1d padding beyond the kernel (crops)": (lambda: nn.ConvTranspose1d(3, 4, 2, stride=3, padding=2), (3, 7)),
    "1d dilated (keeps the dense columns)": (lambda: nn.ConvTranspose1d(3, 4, 3, stride=3, dilation=2, padding=2), (3, 7)),
}


def _accumulate_transposed(layer, x, y, h, held, bounds, keep_factor=False) -> GramAccumulator:
    acc = GramAccumulator(layer_view(layer), max_chunk_elements=256, keep_factor=keep_factor, bounds=bounds)
    for start, stop in ((0, 2), (2, WINDOWS)):
        acc.add_batch(x[start:stop], y[start:stop], None if h is None else h[start:stop], None if held is None else held[start:stop])
    return acc


@pytest.mark.parametrize("weighting", ["voxel weights and holdout", "none"])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("name", list(TRANSPOSED))
def test_transposed_conv_sums_by_parity_class_equal_the_dense_im2col_sums(name, exact, weighting, monkeypatch):
    make, shape = TRANSPOSED[name]
    torch.manual_seed(0)
    layer = make()
    x, y, h, held = _data(layer, shape)
    assert layer_view(layer).splits_by_parity == ("dilated" not in name)
    bounds = _bounds(x, y, h) if exact else None
    if weighting == "none":
        h = held = None
    by_parity = _accumulate_transposed(layer, x, y, h, held, bounds)
    monkeypatch.setattr(LayerView, "splits_by_parity", property(lambda view: False))
    dense = _accumulate_transposed(layer, x, y, h, held, bounds)
    parts = ("all", "fit", "holdout") if held is not None else ("all",)
    for part in parts:
        for a, b in zip(_statistics(by_parity, part), _statistics(dense, part)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def _statistics(acc: GramAccumulator, part: str) -> list:
    st = acc.statistics(part)
    return [st.A64, st.B64, st.x_mean, st.y_mean, st.y_energy, torch.tensor([st.weight_sum, st.effective_voxels, st.voxels])]


def test_transposed_conv_keeps_the_dense_low_rank_factor_while_fewer_voxels_than_columns_were_seen(monkeypatch):
    layer = nn.ConvTranspose3d(4, 3, 3, stride=2, padding=1, output_padding=1)  # 108 columns
    x, y, h, held = _data(layer, (4, 2, 2, 2))  # 64 voxels per window

    def first_window_statistics():
        acc = GramAccumulator(layer_view(layer))
        acc.add_batch(x[:1], y[:1], h[:1], held[:1])
        return acc, acc.statistics("fit")

    acc, by_parity = first_window_statistics()
    monkeypatch.setattr(LayerView, "splits_by_parity", property(lambda view: False))
    _, dense = first_window_statistics()
    assert by_parity.factor is not None and torch.equal(by_parity.factor, dense.factor)
    torch.testing.assert_close(by_parity.A64, dense.A64, rtol=1e-5, atol=1e-5 * float(dense.A64.abs().max()))
    torch.testing.assert_close(2 * by_parity.factor @ by_parity.factor.transpose(1, 2), by_parity.A, rtol=1e-4, atol=1e-4)
    acc.add_batch(x[1:], y[1:], h[1:], held[1:])  # past the columns: the factor is dropped
    assert acc.statistics().factor is None


def test_an_accumulator_without_data_or_asked_for_a_part_it_lacks_says_what_is_missing():
    view = layer_view(nn.Conv3d(2, 3, 3, padding=1))
    acc = GramAccumulator(view, keep_factor=False)
    with pytest.raises(ValueError, match="no calibration data reached"):
        acc.statistics()
    with pytest.raises(ValueError, match="no calibration data reached .* add at least one batch before reducing"):
        acc.reduce(lambda t: t)
    assert acc.voxels == 0 and acc.statistics_bytes() == 0
    x = torch.randn(1, 2, 4, 4, 4)
    acc.add_batch(x, torch.randn(1, 3, 4, 4, 4))
    assert acc.voxels == 64 and acc.statistics_bytes() > 0
    with pytest.raises(ValueError, match="part must be 'all', 'fit' or 'holdout', got 'train'"):
        acc.statistics("train")
    with pytest.raises(ValueError, match="no voxel of .* was held out: pass holdout= to add_batch"):
        acc.statistics("holdout")
    # without held-out voxels the fit part is all of them
    assert torch.equal(acc.statistics("fit").A, acc.statistics().A)


def test_an_accumulator_keeping_its_low_rank_factor_cannot_be_reduced_over_ranks():
    view = layer_view(nn.Conv3d(2, 3, 3, padding=1))
    acc = GramAccumulator(view)  # keeps the factor while fewer voxels than columns were seen
    acc.add_batch(torch.randn(1, 2, 2, 2, 2), torch.randn(1, 3, 2, 2, 2), torch.ones(1, 2, 2, 2))
    with pytest.raises(ValueError, match="keeps its low-rank factor, which cannot be reduced: make it with keep_factor=False"):
        acc.reduce(lambda t: t)


@pytest.mark.parametrize("exact", [False, True])
def test_windows_of_parity_parts_add_up_bit_for_bit_as_their_dense_scatters_would(exact):
    from monai_effq.solver.gram import _ScatteredParts, _Sums, _weighted_parts

    g = torch.Generator().manual_seed(7)
    n, m = 12, 3
    subsets = [torch.tensor([0, 5, 7]), torch.tensor([1, 2, 11, 4]), torch.tensor([3, 6, 8, 9, 10])]
    exponents = SumBounds(voxels=400, weight=1.0, inputs=40.0, targets=40.0).exponents() if exact else None
    compact, dense = _Sums.zeros(1, n, m, exponents=exponents), _Sums.zeros(1, n, m, exponents=exponents)
    for window in range(3):
        parts = _ScatteredParts(n)
        scattered = {"xx": torch.zeros(1, n, n, dtype=torch.float64), "yx": torch.zeros(1, m, n, dtype=torch.float64),
                     "x": torch.zeros(1, n, dtype=torch.float64), "y": torch.zeros(1, m, dtype=torch.float64),
                     "yy": torch.zeros(1, m, dtype=torch.float64)}
        for i in range(5 + window):  # chunks of every subset, some twice
            columns = subsets[i % 3]
            x, y = torch.randn(1, 6 + i, len(columns), generator=g) * 9, torch.randn(1, 6 + i, m, generator=g)
            h = torch.rand(6 + i, generator=g)
            parts.add(x, y, h, columns)
            part = _weighted_parts(x, y, h)
            scattered["xx"][:, columns[:, None], columns[None, :]] += part["xx"]
            scattered["yx"][:, :, columns] += part["yx"]
            scattered["x"][:, columns] += part["x"]
            scattered["y"] += part["y"]
            scattered["yy"] += part["yy"]
        compact.add_scattered(parts)
        dense._put(scattered, parts.h, parts.h2, parts.voxels)
    compact.settle(), dense.settle()
    for name in ("xx", "yx", "x", "y", "yy"):
        assert torch.equal(getattr(compact, name), getattr(dense, name))
    assert compact.magnitude == dense.magnitude and (compact.h, compact.voxels) == (dense.h, dense.voxels)


def test_chunks_of_one_window_whose_column_subsets_overlap_are_refused():
    from monai_effq.solver.gram import _ScatteredParts

    parts = _ScatteredParts(6)
    parts.add(torch.ones(1, 3, 2), torch.ones(1, 3, 2), torch.ones(3), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="overlap"):
        parts.add(torch.ones(1, 3, 2), torch.ones(1, 3, 2), torch.ones(3), torch.tensor([1, 2]))


@pytest.mark.parametrize("exact", [False, True], ids=["float64_sums", "exact_sums"])
def test_a_linear_layers_statistics_stay_accurate_when_its_inputs_share_a_mean_far_above_their_spread(exact):
    # an attention output: each of 96 features is ~200 times its spread from zero, 64 tokens (rank ≤ 63);
    # float32 products, centred afterwards, were off by ~1e-3 of the largest eigenvalue and indefinite
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(96, 8)
    x = 200.0 + torch.randn(1, 64, 96, generator=g)
    with torch.no_grad():
        y = layer(x)
    bounds = SumBounds(voxels=64, weight=1.0, inputs=float(x.abs().max()), targets=float(y.abs().max())) if exact else None
    acc = GramAccumulator(layer_view(layer), bounds=bounds)
    acc.add_batch(x, y)
    a = acc.statistics().A64[0]
    centred = (x[0] - x[0].mean(0)).double()
    want = 2 * centred.T @ centred
    top = float(torch.linalg.eigvalsh(want).max())
    assert float((a - want).abs().max()) < 1e-9 * top
    assert float(torch.linalg.eigvalsh(a).min()) > -1e-9 * top
