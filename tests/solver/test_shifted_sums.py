import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_effq.solver import GramAccumulator, layer_view
from monai_effq.solver import gram
from monai_effq.solver.gram import SumBounds, _Sums
from monai_effq.solver import shifted_sums as shifted_sums_module
from monai_effq.solver.shifted_sums import shifted_sums, supports_shifted_sums, voxel_columns

from ..threads import torch_threads


def _im2col_sums(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> _Sums:
    view = layer_view(layer)
    sums = _Sums.zeros(view.groups, view.in_per_group, view.out_per_group)
    for chunk in view.iter_chunks(x, y):
        sums.add(chunk.inputs, chunk.targets, chunk.weights)
    return sums


CASES = {
    "conv3d": (nn.Conv3d(4, 5, 3, padding=1), (2, 4, 5, 6, 7)),
    "conv3d with single-voxel axes": (nn.Conv3d(2, 3, 3, padding=1), (1, 2, 1, 4, 1)),
    "conv2d": (nn.Conv2d(3, 4, 3, padding=1), (1, 3, 6, 5)),
    "conv1d": (nn.Conv1d(2, 3, 3, padding=1), (3, 2, 9)),
    "stride-1 transposed conv3d": (nn.ConvTranspose3d(3, 4, 3, padding=1), (1, 3, 4, 5, 3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_shifted_sums_equal_the_im2col_sums(name):
    layer, shape = CASES[name]
    torch.manual_seed(0)
    x = torch.randn(shape)
    with torch.no_grad():
        y = layer(x)
    assert supports_shifted_sums(layer_view(layer))
    ref = _im2col_sums(layer, x, y)
    for got, want in zip(shifted_sums(x, y), (ref.xx, ref.yx, ref.x, ref.y, ref.yy)):
        assert got.dtype == torch.float64 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_sums_over_a_constant_background_stay_within_float32_rounding_of_float64_sums():
    # a scan's background is one value over most of the volume: one float32 product over all of it drifted by
    # 5e-4 of the sum here (the spans of _SPAN voxels, added in float64: 2e-5)
    g = torch.Generator().manual_seed(0)
    x = torch.full((1, 1, 64, 64, 64), 0.3)
    x[:, :, 20:40, 20:40, 20:40] += torch.rand(1, 1, 20, 20, 20, generator=g)
    y = torch.rand(1, 3, 64, 64, 64, generator=g)
    columns = F.pad(x.double(), (1,) * 6)[0].unfold(1, 3, 1).unfold(2, 3, 1).unfold(3, 3, 1).reshape(-1, 27)
    xx, yx = shifted_sums(x, y)[:2]
    for got, want in ((xx[0], columns.T @ columns), (yx[0], y.double().reshape(3, -1) @ columns)):
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4


@pytest.mark.parametrize("name", list(CASES))
def test_the_columns_gathered_for_some_voxels_are_their_im2col_columns(name):
    layer, shape = CASES[name]
    x = torch.randn(shape)
    with torch.no_grad():
        y = layer(x)
    view = layer_view(layer)
    first = torch.cat([c.inputs[0] for c in view.iter_chunks(x[:1], y[:1])])  # the first sample's voxels in order
    voxels = torch.randperm(first.shape[0])[: max(1, first.shape[0] // 3)]
    assert torch.equal(voxel_columns(x[0], voxels), first[voxels])


def _class_weights(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Voxel weights as class attention gives them: 1 on most voxels, a few larger, and zeros."""
    h = torch.ones(shape)
    h[torch.rand(shape, generator=g) < 0.2] = 3.5
    h[torch.rand(shape, generator=g) < 0.05] = 0.0
    return h


@pytest.mark.parametrize("held_out", ["whole samples and part of one", "nothing"])
@pytest.mark.parametrize("exact", [False, True], ids=["float64_sums", "exact_sums"])
@pytest.mark.parametrize("name", list(CASES))
def test_weighted_sums_from_shifted_products_equal_the_im2col_sums(name, exact, held_out, monkeypatch):
    layer, shape = CASES[name]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g)
    with torch.no_grad():
        y = layer(x)
    voxels = (y.shape[0], *y.shape[2:])
    h = _class_weights(voxels, g)
    holdout = None
    if held_out != "nothing":
        holdout = torch.zeros(voxels, dtype=torch.bool)
        if len(holdout) > 1:
            holdout[0] = True  # a whole sample
        last = holdout[-1].view(-1)
        last[-max(1, last.numel() // 4) :] = True  # and the end of the last
    bounds = SumBounds(voxels=h.numel(), weight=float(h.max()), inputs=float(x.abs().max()), targets=float(y.abs().max()))
    figures = {}
    for path in ("shifted", "im2col"):
        monkeypatch.setattr(gram, "shifted_products_pay", lambda voxels, channels: path == "shifted")
        acc = GramAccumulator(layer_view(layer), keep_factor=False, bounds=bounds if exact else None)
        acc.add_batch(x, y, voxel_weights=h, holdout=holdout)
        figures[path] = [acc.statistics(part) for part in (("all", "fit", "holdout") if holdout is not None else ("all",))]
    for got, want in zip(figures["shifted"], figures["im2col"]):
        assert (got.voxels, got.weight_sum, got.effective_voxels) == (want.voxels, want.weight_sum, want.effective_voxels)
        for a, b in ((got.A64, want.A64), (got.B64, want.B64), (got.x_mean, want.x_mean), (got.y_mean, want.y_mean), (got.y_energy, want.y_energy)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_only_the_voxels_weighted_otherwise_than_one_or_held_out_in_part_of_a_sample_are_gathered(monkeypatch):
    layer = nn.Conv3d(4, 5, 3, padding=1)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 4, 12, 11, 10, generator=g)
    with torch.no_grad():
        y = layer(x)
    h = _class_weights((3, 12, 11, 10), g)
    holdout = torch.zeros(3, 12, 11, 10, dtype=torch.bool)
    holdout[1] = True  # a whole sample: its held-out sums are its sums, nothing more to gather
    holdout[2, -3:] = True  # a slab: its voxels with a positive weight are gathered for the held-out sums
    gathered = []

    def spy(inputs: torch.Tensor, voxels: torch.Tensor) -> torch.Tensor:
        gathered.append(voxels.numel())
        return voxel_columns(inputs, voxels)

    monkeypatch.setattr(gram, "voxel_columns", spy)
    asked = []
    monkeypatch.setattr(gram, "shifted_products_pay", lambda voxels, channels: asked.append((voxels, channels)) or True)
    acc = GramAccumulator(layer_view(layer), keep_factor=False)
    acc.add_batch(x, y, voxel_weights=h, holdout=holdout)
    assert asked == [(12 * 11 * 10, 4)]  # once per batch, with the voxels of one sample
    assert sum(gathered) == int((h != 1).sum()) + int(((h > 0) & holdout)[2].sum())
    monkeypatch.setattr(gram, "shifted_products_pay", lambda voxels, channels: False)
    gathered.clear()
    GramAccumulator(layer_view(layer), keep_factor=False).add_batch(x, y, voxel_weights=h, holdout=holdout)
    assert gathered == []


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("voxels, channels, pays", [(24**3, 16, True), (24**3 - 1, 16, False), (24**3, 2, False)])
def test_shifted_products_take_weighted_sums_from_sizes_measured_faster_on_any_number_of_threads(threads, voxels, channels, pays):
    with torch_threads(threads):
        assert gram.shifted_products_pay(voxels, channels) is pays


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv3d(2, 3, 3, padding=1, stride=2),
        nn.Conv3d(2, 3, 3, padding=2, dilation=2),
        nn.Conv3d(2, 4, 3, padding=1, groups=2),
        nn.Conv3d(2, 3, 3, padding=0),
        nn.Conv3d(2, 3, 3, padding=1, padding_mode="replicate"),
        nn.Conv3d(2, 3, 1),
        nn.Conv3d(2, 3, (3, 3, 1), padding=(1, 1, 0)),
        nn.ConvTranspose3d(2, 3, 2, stride=2),
        nn.Linear(4, 3),
    ],
)
def test_other_layers_keep_the_im2col_path(layer):
    assert not supports_shifted_sums(layer_view(layer))


def test_the_accumulator_statistics_do_not_depend_on_the_path(make_layer):
    layer, x, y = make_layer(3, 4, 6, seed=1)
    fast = GramAccumulator(layer_view(layer), keep_factor=False)
    fast.add_batch(x, y)
    fast.add_batch(x.flip(2), y.flip(2))
    slow = GramAccumulator(layer_view(layer), keep_factor=False)
    slow.add_batch(x, y, voxel_weights=torch.ones(y.shape[0], *y.shape[2:]))
    slow.add_batch(x.flip(2), y.flip(2), voxel_weights=torch.ones(y.shape[0], *y.shape[2:]))
    a, b = fast.statistics(), slow.statistics()
    assert a.voxels == b.voxels == 2 * 6**3
    torch.testing.assert_close(a.A64, b.A64, rtol=1e-6, atol=1e-6 * float(b.A64.abs().max()))
    torch.testing.assert_close(a.B64, b.B64, rtol=1e-6, atol=1e-6 * float(b.B64.abs().max()))
    torch.testing.assert_close(a.y_energy, b.y_energy, rtol=1e-6, atol=1e-9)


def test_the_low_rank_factor_is_kept_while_fewer_voxels_than_columns_were_seen(make_layer):
    layer, x, y = make_layer(8, 4, 4, seed=2)  # 64 voxels < 216 columns
    acc = GramAccumulator(layer_view(layer))
    acc.add_batch(x, y)
    assert acc.statistics().factor is not None
    acc.add_batch(torch.cat([x] * 4), torch.cat([y] * 4))  # 320 voxels: the factor is dropped
    assert acc.statistics().factor is None


@pytest.mark.parametrize("channels, spatial", [(6, (12, 12, 12)), (9, (10, 14, 12))])
def test_the_sums_are_the_same_on_one_and_two_threads_for_channel_counts_off_sixteen(channels, spatial):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, channels, *spatial, generator=g), torch.randn(1, 4, *spatial, generator=g)
    runs = []
    for threads in (1, 2):
        with torch_threads(threads):
            runs.append(shifted_sums(x, y))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("shape", [(1, 5, 6, 7, 8), (2, 3, 9, 4), (1, 4, 11)])
def test_a_sample_too_large_for_the_shifted_stack_gets_the_same_sums_product_by_product(monkeypatch, shape):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(shape, generator=g), torch.randn(shape[0], 3, *shape[2:], generator=g)
    stacked = shifted_sums(x, y)
    monkeypatch.setattr(shifted_sums_module, "_STACK_ELEMENTS", 0)
    assert shifted_sums_module._inner_shifts(shifted_sums_module._pad(x[0])) is None
    for a, b in zip(stacked, shifted_sums(x, y)):  # the same bits on a Xeon; MKL may pick other kernels elsewhere
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))


def test_the_sums_follow_a_float64_default_dtype():
    x, y = torch.rand(1, 2, 4, 5, 3), torch.rand(1, 3, 4, 5, 3)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        xx = shifted_sums(x, y)[0]
    finally:
        torch.set_default_dtype(before)
    assert xx.dtype == torch.float64 and xx.shape == (1, 2 * 27, 2 * 27)


def test_planning_a_ct_sized_volume_makes_no_volume_sized_index(monkeypatch):
    sizes = []
    arange = torch.arange
    monkeypatch.setattr(torch, "arange", lambda *a, **kw: sizes.append(arange(*a, **kw).numel()) or arange(*a, **kw))
    shifted_sums_module._plan.cache_clear()
    plan = shifted_sums_module._plan((512, 512, 100))
    assert plan.gathered and max(sizes) < 1000  # lines of the volume, never its 27 million voxels
