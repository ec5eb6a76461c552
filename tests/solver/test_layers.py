import math

import pytest
import torch
import torch.nn as nn

from monai_effq.solver import GramAccumulator, layer_view

LAYERS = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 11)),
    "conv2d_stride2_dilation2_groups2": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), (2, 4, 9, 10)),
    "conv2d_same_reflect": (lambda: nn.Conv2d(3, 5, (3, 2), padding="same", padding_mode="reflect"), (2, 3, 7, 6)),
    "conv3d_stride2_groups2": (lambda: nn.Conv3d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 7, 6, 5)),
    "conv3d_depthwise": (lambda: nn.Conv3d(4, 4, 3, padding=1, groups=4), (1, 4, 5, 5, 5)),
    "conv3d_pointwise_no_bias": (lambda: nn.Conv3d(5, 3, 1, bias=False), (2, 5, 4, 3, 2)),
    "conv_transpose2d_stride2_groups2": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
        (2, 4, 5, 4),
    ),
    "conv_transpose3d_k2_s2": (lambda: nn.ConvTranspose3d(4, 3, 2, stride=2), (2, 4, 3, 4, 3)),
    "conv_transpose3d_monai_unet_up": (
        lambda: nn.ConvTranspose3d(3, 2, 3, stride=2, padding=1, output_padding=1, dilation=1),
        (1, 3, 4, 3, 5),
    ),
    "conv_transpose1d_dilated": (lambda: nn.ConvTranspose1d(2, 3, 3, stride=3, dilation=2, padding=2), (2, 2, 6)),
    "conv_transpose1d_k2_s3_cropped": (lambda: nn.ConvTranspose1d(3, 4, 2, stride=3, padding=2), (2, 3, 6)),
    "conv_transpose2d_k5_s3_output_padding2": (
        lambda: nn.ConvTranspose2d(2, 3, 5, stride=(3, 2), padding=(3, 1), output_padding=(2, 1)),
        (1, 2, 4, 5),
    ),
    "linear": (lambda: nn.Linear(7, 5), (2, 3, 7)),
}


def _brute_force_columns(layer, x):
    """Columns of the im2col matrix via one-hot weights through the layer's own functional forward."""
    view = layer_view(layer)
    g, m, n = view.groups, view.out_per_group, view.in_per_group
    cols = []
    for j in range(n):
        onehot = torch.zeros(g, m, n)
        onehot[:, :, j] = 1.0
        probe = type(layer).__new__(type(layer))
        probe.__dict__ = dict(layer.__dict__)
        probe._parameters = {"weight": nn.Parameter(view.native_weight(onehot)), "bias": None}
        out = probe(x)
        if view.kind == "linear":
            cols.append(out.reshape(-1, view.out_channels)[:, 0])  # (V,)
        else:
            cols.append(out[:, ::m].transpose(0, 1).reshape(g, -1))  # first channel of each group
    if view.kind == "linear":
        return torch.stack(cols).unsqueeze(0)  # (1, n, V)
    return torch.stack(cols, dim=1)  # (G, n, V)


def _layer_output(name: str):
    """An input of layer ``name``, its output, and the layer's view, weight matrix and bias per group."""
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(shape)
    with torch.no_grad():
        y = layer(x)
    view = layer_view(layer)
    w = view.weight_matrix(layer.weight)
    b = torch.zeros(view.groups, view.out_per_group) if layer.bias is None else layer.bias.detach().reshape(view.groups, -1)
    return x, y, view, w, b


@pytest.mark.parametrize("name", list(LAYERS))
def test_unfolded_chunks_reproduce_the_layers_output(name):
    x, y, view, w, b = _layer_output(name)
    view.check_shapes(x, y)
    seen = 0
    for chunk in view.iter_chunks(x, y, max_elements=40):
        pred = torch.bmm(chunk.inputs, w.transpose(1, 2)) + b[:, None, :]
        assert torch.allclose(pred, chunk.targets, atol=1e-5)
        seen += chunk.weights.numel()
    assert seen * view.out_channels == y.numel()


@pytest.mark.parametrize("name", [name for name in LAYERS if name.startswith("conv_transpose")])
def test_parity_chunks_reproduce_the_layers_output_from_the_taps_they_keep(name):
    x, y, view, w, b = _layer_output(name)
    if not view.splits_by_parity:  # dilated: its taps read the input in another pattern
        with pytest.raises(ValueError, match="use iter_chunks"):
            next(view.iter_parity_chunks(x, y))
        return
    seen, kept = 0, 0
    for chunk in view.iter_parity_chunks(x, y, max_elements=40):
        pred = torch.bmm(chunk.inputs, w[:, :, chunk.columns].transpose(1, 2)) + b[:, None, :]
        assert torch.allclose(pred, chunk.targets, atol=1e-5)
        seen += chunk.weights.numel()
        kept += chunk.weights.numel() * chunk.columns.numel()
    assert seen * view.out_channels == y.numel()
    assert kept < seen * view.in_per_group  # the inserted zeros' columns are left out


def test_parity_classes_of_a_unet_up_sampling_read_one_or_two_taps_per_axis():
    view = layer_view(nn.ConvTranspose3d(2, 2, 3, stride=2, padding=1, output_padding=1))
    classes = view.parity_classes((8, 8, 8))
    assert len(classes) == 8 and sum(math.prod(p.count) for p in classes) == 8**3
    assert sorted(math.prod(p.taps) for p in classes) == [1, 2, 2, 2, 4, 4, 4, 8]
    # even outputs read the centre tap, odd ones the two outer taps
    assert {(p.first[0], p.first_tap[0], p.taps[0]) for p in classes} == {(0, 1, 1), (1, 0, 2)}


@pytest.mark.parametrize("name", list(LAYERS))
def test_gram_matrices_equal_a_brute_force_unfold(name):
    make, shape = LAYERS[name]
    torch.manual_seed(1)
    layer = make()
    x = torch.randn(shape)
    with torch.no_grad():
        y = layer(x) + 0.1 * torch.randn_like(layer(x))
    view = layer_view(layer)
    h_shape = y.shape[:-1] if view.kind == "linear" else (y.shape[0], *y.shape[2:])
    h = torch.rand(h_shape)
    acc = GramAccumulator(view, max_chunk_elements=50)
    acc.add_batch(x, y, h)
    stats = acc.statistics()

    X = _brute_force_columns(layer, x).double()  # (G, n, V)
    if view.kind == "linear":
        Y = y.reshape(-1, view.out_channels).T.unsqueeze(0).double()
    else:
        Y = y.transpose(0, 1).reshape(view.groups, view.out_per_group, -1).double()
    hv = h.reshape(-1).double()
    xm = (X * hv).sum(-1, keepdim=True) / hv.sum()
    ym = (Y * hv).sum(-1, keepdim=True) / hv.sum()
    A = 2 * torch.einsum("gnv,gkv,v->gnk", X - xm, X - xm, hv)
    B = 2 * torch.einsum("gmv,gnv,v->gmn", Y - ym, X - xm, hv)
    assert torch.allclose(stats.A64, A, rtol=1e-5, atol=1e-5)
    assert torch.allclose(stats.B64, B, rtol=1e-5, atol=1e-5)


def test_low_rank_factor_reproduces_the_centred_gram_matrix():
    layer = nn.Conv3d(8, 4, 3, padding=1)
    x = torch.relu(torch.randn(1, 8, 4, 4, 4))
    with torch.no_grad():
        y = layer(x)
    acc = GramAccumulator(layer_view(layer))
    acc.add_batch(x, y, torch.rand(1, 4, 4, 4))
    stats = acc.statistics()
    assert stats.factor is not None  # 64 voxels < 8 * 27 columns
    assert torch.allclose(2 * stats.factor @ stats.factor.transpose(1, 2), stats.A, atol=1e-4, rtol=1e-4)


def test_weight_matrix_round_trips_to_the_native_layout():
    for make, _ in LAYERS.values():
        layer = make()
        view = layer_view(layer)
        assert torch.equal(view.native_weight(view.weight_matrix(layer.weight)), layer.weight.detach())


def test_unsupported_layers_are_named_in_a_type_error():
    with pytest.raises(TypeError, match="BatchNorm3d"):
        layer_view(nn.BatchNorm3d(4))


def test_targets_of_the_wrong_shape_are_rejected_with_both_shapes():
    layer = nn.Conv3d(2, 3, 3, stride=2, padding=1)
    with pytest.raises(ValueError, match=r"\(1, 3, 4, 4, 4\)"):
        layer_view(layer).check_shapes(torch.zeros(1, 2, 8, 8, 8), torch.zeros(1, 3, 8, 8, 8))


def test_inputs_with_the_wrong_channel_count_are_rejected():
    with pytest.raises(ValueError, match="expects inputs"):
        layer_view(nn.Conv2d(2, 3, 3)).check_shapes(torch.zeros(1, 5, 8, 8), torch.zeros(1, 3, 6, 6))


def test_non_finite_calibration_data_is_refused_naming_inputs_or_targets():
    view = layer_view(nn.Conv2d(2, 3, 3))
    x, y = torch.zeros(1, 2, 8, 8), torch.zeros(1, 3, 6, 6)
    view.check_finite(x, y)
    with pytest.raises(ValueError, match="calibration inputs of Conv2d contain NaN or Inf"):
        view.check_finite(x.clone().fill_(float("nan")), y)
    with pytest.raises(ValueError, match="calibration targets of Conv2d contain NaN or Inf"):
        view.check_finite(x, y.clone().fill_(float("inf")))


@pytest.mark.parametrize("n, block", [(7, 3), (512, 512), (1100, 512), (1025, 256)])
def test_the_blocked_symmetric_gram_equals_the_full_product(n, block):
    from monai_effq.solver.gram import symmetric_gram

    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, 300, n, generator=g)
    xh = x * torch.rand(2, 300, 1, generator=g)
    full = torch.bmm(xh.transpose(1, 2), x)
    got = symmetric_gram(xh, x, block=block)
    assert torch.allclose(got, full, rtol=1e-4, atol=1e-3)
    assert torch.allclose(got, got.transpose(1, 2), rtol=1e-5, atol=1e-4)
