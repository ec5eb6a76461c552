"""Group and instance norms exported from per-channel statistics: the same function, run by every runtime."""

import functools

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from monai.networks.blocks.segresnet_block import ResBlock
from monai.networks.nets import SegResNet

import monai_effq
from monai_effq.deploy import (
    ChannelStatsGroupNorm,
    ChannelStatsGroupNormOp,
    OnnxRuntimeNetwork,
    OpenVINONetwork,
    export_form,
    export_onnx,
    export_options,
    group_norm_form_for,
    runtime_network,
)
from monai_effq.deploy.norms import ONNX_TRANSLATIONS


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "norm",
    [
        nn.GroupNorm(4, 16),
        nn.GroupNorm(8, 16),
        nn.GroupNorm(1, 16),
        nn.InstanceNorm3d(16, affine=True),
        nn.InstanceNorm3d(16),
    ],
    ids=["4-groups", "2-channel-groups", "layer-norm", "affine-instance", "instance"],
)
def test_channel_statistics_compute_the_same_normalization(norm):
    torch.manual_seed(0)
    for p in norm.parameters():
        nn.init.normal_(p)
    form = ChannelStatsGroupNorm.from_module(norm)
    offsets = torch.linspace(-20, 20, 16).reshape(1, 16, 1, 1, 1)
    x = torch.randn(2, 16, 9, 7, 5) * 3 + offsets
    torch.testing.assert_close(form(x), norm(x), atol=2e-5, rtol=1e-5)
    # channel means 65 standard deviations from zero: E[x^2] - E[x]^2 loses digits, not the result
    far = torch.randn(2, 16, 9, 7, 5) * 3 + offsets * 10
    assert torch.linalg.vector_norm(form(far) - norm(far)) <= 5e-4 * torch.linalg.vector_norm(norm(far))
    # a variance below eps: eps must be added where GroupNorm adds it
    norm.eps = 0.1
    quiet = torch.randn(2, 16, 9, 7, 5) * 0.05
    torch.testing.assert_close(ChannelStatsGroupNorm.from_module(norm)(quiet), norm(quiet), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("spatial", [(11,), (9, 7), (9, 7, 5)], ids=["1d", "2d", "3d"])
def test_channel_statistics_normalize_inputs_of_any_spatial_rank(spatial):
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 16)
    x = torch.randn(2, 16, *spatial) * 3 + torch.linspace(-20, 20, 16).reshape(1, 16, *(1,) * len(spatial))
    torch.testing.assert_close(ChannelStatsGroupNorm.from_module(norm)(x), norm(x), atol=2e-5, rtol=1e-5)


def reduction_axes(model: onnx.ModelProto) -> list[tuple[str, tuple[int, ...]]]:
    """Each reduction of an ONNX graph with the axes it reduces (read from its constant input)."""
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    return [
        (n.op_type, tuple(int(a) for a in consts[n.input[1]].reshape(-1)))
        for n in model.graph.node
        if n.op_type.startswith("Reduce") and len(n.input) > 1
    ]


def test_the_channel_statistics_reduce_the_inner_spatial_axes_before_the_outer_one(tmp_path):
    # OpenVINO runs a reduction that keeps only the channels on one thread, one that keeps the
    # outer spatial axis on all of them; a ReduceSum follows so that it does not merge the two
    norm = nn.Sequential(nn.Conv3d(2, 16, 3, padding=1), nn.GroupNorm(8, 16))
    form = nn.Sequential(norm[0], ChannelStatsGroupNorm.from_module(norm[1])).eval()
    path = tmp_path / "norm.onnx"
    torch.onnx.export(form, (torch.rand(1, 2, 8, 8, 8),), str(path), dynamo=True, opset_version=18)
    axes = reduction_axes(onnx.load(str(path)))
    assert ("ReduceMean", (3, 4)) in axes and ("ReduceL2", (3, 4)) in axes
    assert axes.count(("ReduceSum", (2,))) == 2
    assert not [a for a in axes if set(a[1]) >= {2, 3, 4}]


def _onnx_of(form: nn.Module, x: torch.Tensor, dynamic: dict[int, object], **options) -> onnx.ModelProto:
    with torch.no_grad():
        program = torch.onnx.export(form, (x,), dynamo=True, opset_version=21, dynamic_shapes=(dynamic,), verbose=False, **options)
    return program.model_proto


def _run(model: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_torch_export_records_the_export_forms_norm_as_one_operator():
    norm = ChannelStatsGroupNormOp.from_module(nn.GroupNorm(4, 16))
    program = torch.export.export(norm, (torch.rand(1, 16, 6, 6, 6),))
    calls = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert calls == ["monai_effq.channel_stats_group_norm.default"]
    # eager, it is the channel-statistics norm
    x = torch.randn(2, 16, 5, 6, 7)
    torch.testing.assert_close(norm(x), ChannelStatsGroupNorm.from_module(nn.GroupNorm(4, 16))(x), atol=0, rtol=0)


@pytest.mark.parametrize("spatial", [(12,), (8, 10), (6, 8, 10)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("axes", ["batch", "all"])
def test_the_one_operator_norm_is_written_as_the_onnx_nodes_of_its_torch_operators_with_the_same_outputs(spatial, axes):
    torch.manual_seed(0)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(spatial) - 1](2, 16, 3, padding=1)
    norm = nn.GroupNorm(4, 16)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    nn.init.uniform_(norm.bias, -0.5, 0.5)
    forms = [nn.Sequential(conv, cls.from_module(norm), nn.ReLU()).eval() for cls in (ChannelStatsGroupNorm, ChannelStatsGroupNormOp)]
    dynamic = {0: torch.export.Dim.DYNAMIC} | ({d: torch.export.Dim.DYNAMIC for d in range(2, 2 + len(spatial))} if axes == "all" else {})
    example = torch.rand(1, 2, *spatial)
    operators, one_operator = _onnx_of(forms[0], example, dynamic), _onnx_of(forms[1], example, dynamic, custom_translation_table=ONNX_TRANSLATIONS)
    compute = lambda model: [n.op_type for n in model.graph.node if n.op_type not in ("Shape", "Squeeze", "Cast", "Mul", "ReduceProd")]  # noqa: E731
    if axes == "batch":  # the spatial counts are constants: node for node the same graph
        assert [n.op_type for n in one_operator.graph.node] == [n.op_type for n in operators.graph.node]
    else:  # each norm reads the counts from its own input's shape, torch's graph from the network's
        assert compute(one_operator) == compute(operators)
    x = torch.randn(3, 2, *(s + 2 for s in spatial)) if axes == "all" else torch.randn(3, 2, *spatial)
    x = x * 3 + 1
    np.testing.assert_array_equal(_run(one_operator, x), _run(operators, x))
    with torch.no_grad():
        np.testing.assert_allclose(_run(one_operator, x), forms[0](x).numpy(), atol=2e-5, rtol=1e-5)


def test_torchs_exporter_refuses_the_one_operator_norm_without_its_translation():
    form = nn.Sequential(nn.Conv3d(2, 16, 3, padding=1), ChannelStatsGroupNormOp.from_module(nn.GroupNorm(4, 16))).eval()
    with pytest.raises(Exception, match="channel_stats_group_norm"):
        _onnx_of(form, torch.rand(1, 2, 6, 6, 6), {})


def test_the_export_form_holds_the_one_operator_norm_for_torchs_current_exporter_only(segresnet_w4a8):
    def norms(form):
        return {type(m) for m in form.modules() if isinstance(m, ChannelStatsGroupNorm)}

    assert norms(export_form(segresnet_w4a8.network, group_norm="channel_stats")[0]) == {ChannelStatsGroupNormOp}
    assert norms(export_form(segresnet_w4a8.network, group_norm="channel_stats", exporter="torchscript")[0]) == {ChannelStatsGroupNorm}
    assert norms(export_form(segresnet_w4a8.network, group_norm="onnx")[0]) == set()


def test_an_instance_norm_with_running_statistics_is_left_as_it_is():
    assert ChannelStatsGroupNorm.from_module(nn.InstanceNorm3d(8, track_running_stats=True)) is None
    assert ChannelStatsGroupNorm.from_module(nn.BatchNorm3d(8)) is None


def test_a_wrong_channel_count_is_an_error_naming_the_expected_shape():
    with pytest.raises(ValueError, match=r"\(N, 16, \*spatial\)"):
        ChannelStatsGroupNorm(4, 16, 1e-5)(torch.rand(1, 8, 4, 4, 4))


@pytest.fixture(scope="module")
def segresnet_w4a8():
    """A small quantized SegResNet: GroupNorm after bias-free int8 convolutions, residual adds.

    OpenVINO 2026.4 compiled for dynamic shapes gets this network wrong (rel-L2 0.4 in the ONNX
    form of its group norms, 0.99 in the channel-statistics form); compiled per shape it is right.
    """
    torch.manual_seed(0)
    net = SegResNet(3, init_filters=8, in_channels=2, out_channels=3, blocks_down=(1, 2), blocks_up=(1,)).eval()
    calibration = torch.rand(1, 2, 24, 24, 24, generator=torch.Generator().manual_seed(1))
    # every layer at 4 bits, first and last too: 8-bit weights saturate the int8 kernels of CPUs without
    # VNNI (rel-L2 0.25 here with OpenVINO capped at AVX2), and these tests are about the norms
    config = monai_effq.EfficientQConfig(
        weight_bits=4, act_bits=8, per_channel=True, method="rtn", attention=False, first_layer_bits=None, last_layer_bits=None
    )
    return monai_effq.quantize(net, calibration, config, progress=False)


def _exported_once_per_form(result, folder):
    """``result`` exported at 1x2x16x16x16 once per group-norm form, for tests that only read the file (torch's
    exporter takes seconds): a function of the form that returns the file's path."""
    return functools.cache(lambda group_norm: export_onnx(result, folder / f"{group_norm}.onnx", (1, 2, 16, 16, 16), group_norm=group_norm))


@pytest.fixture(scope="module")
def segresnet_w4a8_file(segresnet_w4a8, tmp_path_factory):
    return _exported_once_per_form(segresnet_w4a8, tmp_path_factory.mktemp("segresnet_w4a8"))


def test_a_channel_stats_export_reproduces_the_fake_quant_network_in_both_runtimes(segresnet_w4a8, segresnet_w4a8_file):
    path = segresnet_w4a8_file("channel_stats")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "InstanceNormalization" not in ops and "ReduceMean" in ops
    assert export_options(path) == "group_norm=channel_stats;reduce_range=False;weight_container=int4"
    x = torch.rand(1, 2, 20, 24, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = segresnet_w4a8.network(x)
    form, _ = export_form(segresnet_w4a8.network, group_norm="channel_stats")
    with torch.no_grad():  # the written form computes the fake-quant function itself, in torch
        written = form(x)
    # to float rounding (each norm alone: test_channel_statistics_compute_the_same_normalization); here
    # its statistics are summed another way, an 8-bit activation now and then lands one step away, and
    # in this untrained network those flips grow through the residual path (rel-L2 1.1e-2, labels 99.6%)
    assert rel_l2(written, expected) < 2e-2
    assert (written.argmax(1) == expected.argmax(1)).float().mean() > 0.99
    # an untrained network: where a runtime's convolution sums in another order, one-step rounding flips
    # of the activations grow through the residual path to about 1e-2 (the same for both exporters)
    assert rel_l2(OnnxRuntimeNetwork(path, optimize=False)(x), expected) < 2e-2
    assert rel_l2(OnnxRuntimeNetwork(path)(x), expected) < 2e-2
    assert rel_l2(OpenVINONetwork(path, precision="f32")(x), expected) < 3e-2


@pytest.mark.parametrize("group_norm", ["onnx", "channel_stats"])
def test_openvino_is_right_on_group_norm_networks_in_both_forms(segresnet_w4a8, segresnet_w4a8_file, group_norm):
    path = segresnet_w4a8_file(group_norm)
    x = torch.rand(2, 2, 16, 20, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = segresnet_w4a8.network(x)
    assert rel_l2(OpenVINONetwork(path, precision="f32")(x), expected) < 3e-2


def test_openvino_compiles_once_per_input_shape_and_keeps_the_latest(segresnet_w4a8_file):
    net = OpenVINONetwork(segresnet_w4a8_file("channel_stats"), max_shapes=2)
    first = net.request_for((1, 2, 16, 16, 16))
    assert net.request_for((1, 2, 16, 16, 16)) is first
    for size in (8, 24):
        assert net(torch.rand(1, 2, size, size, size)).shape == (1, 3, size, size, size)
    assert list(net._requests) == [(1, 2, 8, 8, 8), (1, 2, 24, 24, 24)]


def test_an_unknown_group_norm_form_is_an_error(segresnet_w4a8, tmp_path):
    with pytest.raises(ValueError, match="group_norm must be one of"):
        export_onnx(segresnet_w4a8, tmp_path / "x.onnx", (1, 2, 16, 16, 16), group_norm="fused")


def _segresnet(init_filters):
    return SegResNet(3, init_filters=init_filters, in_channels=2, out_channels=3, blocks_down=(1, 2), blocks_up=(1,))


@pytest.mark.parametrize("precision, block", [("bf16", 16), ("f32", 8), ("BF16", 16), ("f16", 16)])
def test_openvino_gets_the_channel_stats_form_where_every_norm_fills_whole_channel_blocks_of_its_precision(precision, block):
    assert group_norm_form_for("openvino", _segresnet(16), precision) == "channel_stats"
    assert group_norm_form_for("openvino", _segresnet(8), precision) == ("channel_stats" if block == 8 else "onnx")
    assert group_norm_form_for("onnxruntime", _segresnet(8), precision) == "onnx"
    assert group_norm_form_for("openvino", nn.Conv3d(16, 16, 3), precision) == "onnx"


@pytest.mark.parametrize("picked, block", [("bf16", 16), ("f32", 8), (None, 16)])
def test_the_default_precision_is_the_one_openvino_picks_on_this_cpu(monkeypatch, picked, block):
    from monai_effq.deploy import norms

    monkeypatch.setattr(norms, "_default_openvino_precision", lambda: picked)
    assert norms.openvino_channel_block() == norms.openvino_channel_block("auto") == norms.openvino_channel_block(None) == block
    assert group_norm_form_for("openvino", _segresnet(8)) == ("channel_stats" if block == 8 else "onnx")


@pytest.mark.parametrize("capability, expected", [("AVX2", "f32"), ("AVX512", None), ("DEFAULT", None)])
def test_without_openvino_only_an_avx2_cpu_is_known_to_run_f32(monkeypatch, capability, expected):
    import builtins

    from monai_effq.deploy import norms

    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino":
            raise ImportError("no openvino")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert norms._default_openvino_precision() == expected


def test_the_default_precision_follows_openvinos_capability_query():
    pytest.importorskip("openvino")
    import openvino as ov

    from monai_effq.deploy import float_precision_for, norms

    assert norms._default_openvino_precision() == float_precision_for(ov.Core())


def _w4a8_checkpoint(tmp_path, init_filters):
    """A small SegResNet's W4A8 checkpoint, a maker of fresh FP networks, and the ONNX path beside it."""

    def fresh():
        return SegResNet(3, init_filters=init_filters, in_channels=2, out_channels=3, blocks_down=(1,), blocks_up=()).eval()

    config = monai_effq.EfficientQConfig(weight_bits=4, act_bits=8, method="rtn", attention=False)
    result = monai_effq.quantize(fresh(), torch.rand(1, 2, 16, 16, 16), config, progress=False)
    return fresh, monai_effq.save_quantized(result, tmp_path / "model_w4a8.pt"), tmp_path / "model_w4a8.onnx"


def test_runtime_network_re_exports_a_file_written_in_another_runtimes_form(tmp_path):
    fresh, checkpoint, onnx_path = _w4a8_checkpoint(tmp_path, 16)

    runtime_network("onnxruntime", onnx_path, checkpoint, fresh(), (1, 2, 16, 16, 16))
    assert export_options(onnx_path) == "group_norm=onnx;reduce_range=False;weight_container=int4"
    runtime_network("openvino", onnx_path, checkpoint, fresh(), (1, 2, 16, 16, 16))
    assert export_options(onnx_path) == "group_norm=channel_stats;reduce_range=False;weight_container=int4"
    written = onnx_path.stat().st_mtime_ns
    # OpenVINO again, and ONNX Runtime (which runs either form), use the file as it is
    runtime_network("openvino", onnx_path, checkpoint, fresh(), (1, 2, 16, 16, 16))
    runtime_network("onnxruntime", onnx_path, checkpoint, fresh(), (1, 2, 16, 16, 16))
    assert onnx_path.stat().st_mtime_ns == written


def test_runtime_network_exports_8_channel_norms_in_the_channel_stats_form_for_f32_float_parts(tmp_path, monkeypatch):
    from monai_effq.deploy import norms

    fresh, checkpoint, onnx_path = _w4a8_checkpoint(tmp_path, 8)
    monkeypatch.setattr(norms, "_default_openvino_precision", lambda: "bf16")  # a CPU with native bf16
    runtime_network("openvino", onnx_path, checkpoint, fresh(), (1, 2, 16, 16, 16))
    assert export_options(onnx_path).startswith("group_norm=onnx;")
    net = runtime_network("openvino", onnx_path, checkpoint, fresh(), (1, 2, 16, 16, 16), precision="f32")
    assert export_options(onnx_path).startswith("group_norm=channel_stats;")
    assert net(torch.rand(1, 2, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


@pytest.fixture(scope="module")
def segresnet_norm_inputs():
    """The small SegResNet quantized with its norms' inputs rounded to 8 bits as well."""
    torch.manual_seed(0)
    net = SegResNet(3, init_filters=8, in_channels=2, out_channels=3, blocks_down=(1, 2), blocks_up=(1,)).eval()
    calibration = torch.rand(1, 2, 24, 24, 24, generator=torch.Generator().manual_seed(1))
    config = monai_effq.EfficientQConfig(
        weight_bits=4,
        act_bits=8,
        per_channel=True,
        method="rtn",
        attention=False,
        quantize_norm_inputs=True,
        first_layer_bits=None,  # all weights at 4 bits, as in segresnet_w4a8
        last_layer_bits=None,
    )
    return monai_effq.quantize(net, calibration, config, progress=False)


@pytest.fixture(scope="module")
def segresnet_norm_inputs_file(segresnet_norm_inputs, tmp_path_factory):
    return _exported_once_per_form(segresnet_norm_inputs, tmp_path_factory.mktemp("segresnet_norm_inputs"))


@pytest.mark.parametrize("group_norm", ["onnx", "channel_stats"])
def test_quantized_norm_inputs_export_as_a_qdq_pair_that_reproduces_the_fake_quant_network(
    segresnet_norm_inputs, segresnet_norm_inputs_file, group_norm
):
    from monai_effq.ptq.modules import QuantizedNorm, shared_input_quantizer

    network = segresnet_norm_inputs.network
    path = segresnet_norm_inputs_file(group_norm)
    graph = onnx.load(str(path)).graph
    n_layers = sum(isinstance(m, monai_effq.ptq.modules.QuantizedLayer) for m in network.modules())
    n_norms = sum(isinstance(m, QuantizedNorm) for m in network.modules())
    n_blocks = sum(shared_input_quantizer(m) is not None for m in network.modules())
    assert n_norms > 0 and n_blocks > 0
    # one activation QuantizeLinear per layer input, per norm input and per shared block input
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) == n_layers + n_norms + n_blocks
    x = torch.rand(1, 2, 20, 24, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = network(x)
        form, _ = export_form(network, group_norm=group_norm)
        assert rel_l2(form(x), expected) < 1e-6
    # each rounding point can flip one step where a runtime sums in another order: more points, more flips
    for runtime in (OnnxRuntimeNetwork(path, optimize=False), OpenVINONetwork(path, precision="f32")):
        out = runtime(x)
        assert rel_l2(out, expected) < 5e-2
        assert (out.argmax(1) == expected.argmax(1)).float().mean() >= 0.97  # untrained: near-tied logits


def test_a_residual_blocks_shared_input_is_one_qdq_pair_read_by_its_norm_and_its_skip_add(segresnet_norm_inputs, segresnet_norm_inputs_file):
    from monai_effq.ptq.modules import shared_input_quantizer

    path = segresnet_norm_inputs_file("onnx")  # export_onnx's default form
    graph = onnx.load(str(path)).graph
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    dequantized = [n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in {
        i.name for i in graph.initializer
    }]
    shared = [t for t in dequantized if {"Add", "GroupNormalization"} <= readers.get(t, set())]
    blocks = [m for m in segresnet_norm_inputs.network.modules() if isinstance(m, ResBlock)]
    assert blocks and all(shared_input_quantizer(m) is not None for m in blocks)
    # in every residual block the skip add reads the dequantized int8 tensor its first norm reads
    assert len(shared) == len(blocks)
