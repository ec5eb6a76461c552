"""The ONNX QDQ export: integer weights, calibrated activation ranges, the same function as fake-quant."""

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from monai.networks.nets import UNet
from onnx import numpy_helper

import monai_effq
from monai_effq.deploy import OnnxRuntimeNetwork, export_onnx, widest_int8_weight
from monai_effq.deploy.export import (
    EXPORTER_VERSION_KEY,
    compact_names,
    drop_initializer_identities,
    exporter_version,
    fold_weight_quantization,
    layers_off_the_output,
    source_digest,
)
from monai_effq.ptq import QuantizedLayer
from monai_effq.utils.errors import UserInputError

from .conftest import bn_unet


def test_the_exported_graph_run_unoptimised_reproduces_the_fake_quant_network(exported):
    result, path = exported
    x = torch.rand(2, 2, 20, 28, 12, generator=torch.Generator().manual_seed(5))  # not the export shape
    with torch.no_grad():
        expected = result.network(x)
    got = OnnxRuntimeNetwork(path, optimize=False)(x)
    assert got.shape == expected.shape
    # Same codes, same ranges: outputs agree to float tolerance except where a conv's different
    # summation order moves an activation across a rounding boundary (a one-step flip downstream).
    exact = torch.isclose(got, expected, atol=1e-5, rtol=1e-5).float().mean()
    assert exact > 0.98, float(exact)
    assert float((got - expected).norm() / expected.norm()) < 2e-3


def test_weights_are_stored_as_integer_codes_with_one_tensor_per_quantized_layer(exported):
    result, path = exported
    model = onnx.load(str(path))
    # 2-bit layers go to 4-bit containers by default (tests/deploy/test_containers.py)
    integer = (onnx.TensorProto.INT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    int8 = [i for i in model.graph.initializer if i.data_type in integer and len(i.dims) > 1]
    layers = [m for m in result.network.modules() if isinstance(m, QuantizedLayer)]
    assert len(int8) == len(layers)
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in {i.name for i in model.graph.initializer} for n in model.graph.node)
    # a W2 layer holds 4 distinct values on the midrise grid (odd integers after doubling)
    bits = sorted(m.grid.bits for m in layers)
    values = [np.unique(numpy_helper.to_array(i)) for i in int8]
    assert min(len(v) for v in values) <= 2 ** bits[0]


def test_every_transposed_convolution_reads_int8_without_a_zero_point(exported):
    _, path = exported
    graph = onnx.load(str(path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    inputs = [producer[n.input[0]] for n in graph.node if n.op_type == "ConvTranspose"]
    # a decoder's transposed convolution reads a concatenation of rounded tensors
    inputs = [producer[i] if n.op_type == "Concat" else n for n in inputs for i in (n.input if n.op_type == "Concat" else [None])]
    assert inputs and all(dq.op_type == "DequantizeLinear" for dq in inputs)
    # OpenVINO computes a transposed convolution in f32 when its input has a zero point
    zero_points = [constants[dq.input[2]] for dq in inputs]
    assert all(z.dtype == np.int8 and not z.any() for z in zero_points)


def test_each_concatenation_reads_rounded_inputs_instead_of_being_rounded_after(exported):
    _, path = exported
    graph = onnx.load(str(path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    concats = [n for n in graph.node if n.op_type == "Concat"]
    # OpenVINO then writes int8 from the convolutions before and concatenates int8
    assert concats and all(producer[i].op_type == "DequantizeLinear" for n in concats for i in n.input)
    assert not any(n.op_type in ("Clip", "QuantizeLinear") and producer.get(n.input[0]) in concats for n in graph.node)


def test_the_int8_file_is_at_most_027_of_the_fp32_file(tmp_path):
    torch.manual_seed(0)
    net = UNet(3, 1, 3, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2, norm="batch").eval()
    x = torch.rand(1, 1, 16, 16, 16)
    result = monai_effq.quantize(net, x, monai_effq.EfficientQConfig(method="rtn", attention=False), progress=False)
    # fixed axes: the size is the weights', and torch exports dynamic ones two to three times slower
    fp = export_onnx(net, tmp_path / "fp.onnx", x, require_quantized=False, dynamic_spatial=False)
    q = export_onnx(result, tmp_path / "q.onnx", x, dynamic_spatial=False)
    assert q.stat().st_size <= 0.27 * fp.stat().st_size


def test_activation_ranges_below_8_bits_are_clipped_to_the_calibrated_grid(exported):
    result, path = exported
    model = onnx.load(str(path))
    grids = [m.input_quantizer.grid for m in result.network.modules() if isinstance(m, QuantizedLayer) and m.input_quantizer]
    clips = sum(n.op_type == "Clip" for n in model.graph.node)
    # the symmetric 8-bit grid leaves int8's -128 unused, as grids of fewer bits leave most codes
    assert (clips > 0) == any(g.bits < 8 or g.kind == "symmetric" for g in grids)


def test_eight_bit_layers_use_the_symmetric_grid_and_fit_int8(exported):
    result, _ = exported
    edge = [m for m in result.network.modules() if isinstance(m, QuantizedLayer) and m.grid.bits == 8]
    assert edge and all(m.grid.kind == "symmetric" for m in edge)


def test_reduce_range_keeps_weights_in_seven_bits_and_warns(quantized, tmp_path):
    with pytest.warns(UserWarning, match="7 bits"):
        path = export_onnx(quantized, tmp_path / "r.onnx", (1, 2, 16, 16, 16), reduce_range=True, dynamic_spatial=False)
    assert widest_int8_weight(path) <= 64
    x = torch.rand(1, 2, 16, 16, 16)
    with torch.no_grad():
        ref = quantized.network(x)
    out = OnnxRuntimeNetwork(path, optimize=False)(x)
    assert float((out - ref).norm() / ref.norm()) < 0.05  # only the 8-bit edge layers were re-rounded


def test_an_export_under_info_logging_logs_no_line_per_initializer(quantized, tmp_path, caplog):
    with caplog.at_level(logging.INFO):  # a bundle's logging.conf logs at INFO
        export_onnx(quantized, tmp_path / "m.onnx", (1, 2, 16, 16, 16), dynamic_spatial=False)
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("onnx_ir")]
    assert logging.getLogger("onnx_ir").level == logging.NOTSET  # put back afterwards


def test_the_source_digest_changes_with_the_source_of_the_graph_and_not_with_the_rest(tmp_path):
    files = {"deploy/export.py": "x = 1\n", "ptq/modules.py": "y = 2\n", "solver/admm.py": "z = 3\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    digest = lambda: source_digest(tmp_path, ("deploy", "ptq", "quant"))  # noqa: E731
    first = digest()
    (tmp_path / "solver/admm.py").write_text("z = 4\n")
    assert digest() == first  # the solver changes the codes, which the checkpoint fingerprint tells apart
    (tmp_path / "deploy/export.py").write_text("x = 1  # a fix\n")
    second = digest()
    assert second != first
    (tmp_path / "quant").mkdir()
    (tmp_path / "quant/grid.py").write_text("")
    assert digest() not in (first, second)


def test_a_file_records_the_release_the_graph_source_and_the_torch_that_exported_it(exported, monkeypatch):
    _, path = exported
    recorded = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}[EXPORTER_VERSION_KEY]
    package = Path(monai_effq.__file__).parent
    assert recorded == exporter_version()
    assert recorded.startswith(f"{monai_effq.__version__}+src.{source_digest(package, ('deploy', 'ptq', 'quant'))} torch {torch.__version__.split('+')[0]} ")
    monkeypatch.setattr(torch, "__version__", f"{torch.__version__.split('+')[0]}+cu121")
    assert exporter_version.__wrapped__() == recorded  # a GPU build of the same release writes the same file
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert exporter_version.__wrapped__() != recorded  # after a torch upgrade the files are exported again


def test_exporting_a_network_that_was_never_quantized_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no quantized layers"):
        export_onnx(bn_unet(), tmp_path / "x.onnx", (1, 2, 16, 16, 16))
    assert not (tmp_path / "x.onnx").exists()


def test_a_bad_example_input_or_opset_is_an_error(quantized, tmp_path):
    with pytest.raises(ValueError, match="example_input"):
        export_onnx(quantized, tmp_path / "x.onnx", (16, 16))
    with pytest.raises(ValueError, match="opset"):
        export_onnx(quantized, tmp_path / "x.onnx", (1, 2, 16, 16, 16), opset=11)
    with pytest.raises(TypeError, match="QuantizationResult"):
        export_onnx("model.pt", tmp_path / "x.onnx", (1, 2, 16, 16, 16))


@pytest.fixture(scope="module")
def rtn_unet():
    return monai_effq.quantize(bn_unet(), torch.randn(1, 2, 16, 16, 16), monai_effq.EfficientQConfig(method="rtn"), progress=False)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 16, 16, 16), r"example_input of shape \(1, 16, 16, 16\) does not fit the network \(.+\): give it as \(N, C, \*spatial\)"),
        ((1, 3, 16, 16, 16), r"of shape \(1, 3, 16, 16, 16\) does not fit the network \(.*to have 2 channels, but got 3.*\)"),
        ((1, 2, 16, 16.5, 16), r"each example_input size must be an integer of at least 1, got 16\.5"),
        (torch.zeros(1, 2, 0, 16, 16), r"example_input must be \(N, C, \*spatial\) with no empty axis, got shape \(1, 2, 0, 16, 16\)"),
    ],
    ids=["no_batch_axis", "other_channels", "fractional_size", "empty_axis"],
)
def test_an_example_input_the_network_does_not_take_is_named_in_one_error_and_nothing_is_written(rtn_unet, tmp_path, capfd, shape, message):
    with pytest.raises(UserInputError, match=message):
        export_onnx(rtn_unet, tmp_path / "x.onnx", shape)
    assert "Traceback" not in capfd.readouterr().err  # torch.export's logged tracebacks of its fake tensors
    assert list(tmp_path.iterdir()) == []


def test_a_linear_head_exports_with_integer_weights(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5)).eval()
    x = torch.rand(4, 3, 8, 8)
    result = monai_effq.quantize(net, x, monai_effq.EfficientQConfig(method="rtn", attention=False), progress=False)
    path = export_onnx(result, tmp_path / "lin.onnx", x, dynamic_spatial=False)
    with torch.no_grad():
        expected = result.network(x)
    assert torch.allclose(OnnxRuntimeNetwork(path, optimize=False)(x), expected, atol=1e-4, rtol=1e-4)


def test_a_layer_the_output_does_not_depend_on_is_left_out_of_the_file_and_named(tmp_path, caplog):
    # DynUNet runs its deep-supervision heads in eval mode too and drops their outputs
    from monai.networks.nets import DynUNet

    torch.manual_seed(0)
    net = DynUNet(3, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2], filters=[4, 8, 8], deep_supervision=True, deep_supr_num=1).eval()
    x = torch.rand(1, 1, 8, 8, 8)
    result = monai_effq.quantize(net, x, monai_effq.EfficientQConfig(method="rtn", attention=False), progress=False)
    assert "deep_supervision_heads.0.conv.conv" in [r.name for r in result.report.layers]
    with caplog.at_level("INFO", logger="monai_effq"):
        path = export_onnx(result, tmp_path / "ds.onnx", x, dynamic_spatial=False)
    assert "does not depend on 1 quantized layer(s) (deep_supervision_heads.0.conv.conv)" in caplog.text
    # told in eval mode, where the heads' outputs are dropped, and the network's own mode is kept
    assert layers_off_the_output(result.network.train(), x) == ["deep_supervision_heads.0.conv.conv"]
    assert result.network.training
    result.network.eval()
    layers = sum(isinstance(m, QuantizedLayer) for m in result.network.modules())
    kinds = (onnx.TensorProto.INT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    integer = [i for i in onnx.load(str(path)).graph.initializer if i.data_type in kinds and len(i.dims) > 1]
    assert len(integer) == layers - 1
    with torch.no_grad():
        expected = result.network(x)
    assert torch.allclose(OnnxRuntimeNetwork(path, optimize=False)(x), expected, atol=1e-4, rtol=1e-4)


def test_runtime_network_does_not_export_again_a_file_whose_network_fixes_its_size(tmp_path, monkeypatch):
    import monai_effq.deploy.runtime as runtime

    torch.manual_seed(0)
    net, x = _PositionEmbedding().eval(), torch.rand(1, 1, 8, 8, 8)
    result = monai_effq.quantize(net, x, monai_effq.EfficientQConfig(method="rtn", attention=False), progress=False)
    ckpt = monai_effq.save_quantized(result, tmp_path / "pos.pt")
    exports = []
    monkeypatch.setattr(runtime, "export_onnx", lambda *a, **k: exports.append(a) or export_onnx(*a, **k))
    # whole volumes asked for: dynamic axes wanted, which this network cannot have
    with pytest.warns(UserWarning, match="fixes the size of its input"):
        runtime.runtime_network("onnxruntime", tmp_path / "pos.onnx", ckpt, _PositionEmbedding(), (1, 1, 8, 8, 8), fixed_window=False)
    runtime.runtime_network("onnxruntime", tmp_path / "pos.onnx", ckpt, _PositionEmbedding(), (1, 1, 8, 8, 8), fixed_window=False)
    assert len(exports) == 1


class _BranchOnBuffer(torch.nn.Module):
    """Python control flow on a buffer's value, as MONAI's DiNTS does on its architecture code."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.head = torch.nn.Conv3d(4, 2, 1)
        self.register_buffer("rectify", torch.tensor(True))

    def forward(self, x):
        x = self.conv(x)
        if self.rectify:
            x = torch.relu(x)
        return self.head(x)


def test_a_network_torch_export_cannot_capture_is_exported_by_tracing_with_a_one_line_reason(tmp_path, capfd):
    torch.manual_seed(0)
    net, x = _BranchOnBuffer().eval(), torch.rand(1, 1, 8, 8, 8)
    result = monai_effq.quantize(net, x, monai_effq.EfficientQConfig(method="rtn", attention=False), progress=False)
    with pytest.warns(UserWarning, match=r"torch.export cannot capture this network \(.+\), so it is traced .* shape \?x1x8x8x8 only"):
        path = export_onnx(result, tmp_path / "branch.onnx", x)
    assert "def forward" not in capfd.readouterr().err  # not torch's dump of the partly traced graph
    # a trace may hold sizes as constants, so only the batch axis stays dynamic
    runtime, y = OnnxRuntimeNetwork(path, optimize=False), torch.rand(2, 1, 8, 8, 8)
    with torch.no_grad():
        expected = result.network(y)
    assert torch.allclose(runtime(y), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(UserInputError, match=r"exported for inputs of shape \?x1x8x8x8"):
        runtime(torch.rand(1, 1, 12, 8, 4))


class _PositionEmbedding(torch.nn.Module):
    """A learned embedding of one input size, added after the first convolution, as UNETR's patch embedding does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.position = torch.nn.Parameter(torch.randn(1, 4, 8, 8, 8))
        self.head = torch.nn.Conv3d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x) + self.position))


def test_a_network_whose_graph_fixes_its_input_size_is_exported_with_fixed_spatial_axes_and_refuses_other_sizes(tmp_path):
    torch.manual_seed(0)
    net, x = _PositionEmbedding().eval(), torch.rand(1, 1, 8, 8, 8)
    result = monai_effq.quantize(net, x, monai_effq.EfficientQConfig(method="rtn", attention=False), progress=False)
    with pytest.warns(UserWarning, match=r"fixes the size of its input \(.+\), so the file runs inputs of shape \?x1x8x8x8 only"):
        path = export_onnx(result, tmp_path / "pos.onnx", x)
    runtime, y = OnnxRuntimeNetwork(path, optimize=False), torch.rand(3, 1, 8, 8, 8)  # the batch axis stays dynamic
    with torch.no_grad():
        expected = result.network(y)
    assert torch.allclose(runtime(y), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(UserInputError, match=r"exported for inputs of shape \?x1x8x8x8"):
        runtime(torch.rand(1, 1, 16, 8, 8))


def test_torchs_current_exporter_writes_the_graph_the_torchscript_exporter_wrote(quantized, tmp_path):
    current = export_onnx(quantized, tmp_path / "dynamo.onnx", (1, 2, 16, 16, 16), weight_container="int8")
    legacy = export_onnx(quantized, tmp_path / "torchscript.onnx", (1, 2, 16, 16, 16), weight_container="int8", opset=17)
    assert onnx.load(str(current)).opset_import[0].version == 21 and onnx.load(str(legacy)).opset_import[0].version == 17

    def integer_weights(path):
        graph = onnx.load(str(path)).graph
        read = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
        return sorted((numpy_helper.to_array(i).tobytes() for i in graph.initializer if i.name in read and len(i.dims) > 1))

    assert integer_weights(current) == integer_weights(legacy)  # the same integers, stored as they are
    x = torch.rand(1, 2, 20, 16, 12, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(
        OnnxRuntimeNetwork(current, optimize=False)(x), OnnxRuntimeNetwork(legacy, optimize=False)(x), atol=1e-6, rtol=1e-5
    )


def _branching_model() -> "onnx.ModelProto":
    """A traced network's ``If``: the branches read outer tensors by name (SwinUNETR on torch 2.11, traced),
    one an ``Identity`` of a weight, one a weight nothing else reads; names ``t0``/``t1`` are taken."""
    from onnx import TensorProto, helper

    def branch(name: str, reads: str) -> "onnx.GraphProto":
        out = helper.make_tensor_value_info("t0", TensorProto.FLOAT, [2])  # a branch-local name a short name could take
        return helper.make_graph([helper.make_node("Add", ["/scoped/doubled", reads], ["t0"])], name, [], [out])

    nodes = [
        helper.make_node("Identity", ["w"], ["/scoped/alias"]),
        helper.make_node("Add", ["x", "x"], ["/scoped/doubled"]),
        helper.make_node("ReduceSum", ["x"], ["/scoped/sum"], keepdims=0),
        helper.make_node("Greater", ["/scoped/sum", "t1"], ["/scoped/positive"]),
        helper.make_node("If", ["/scoped/positive"], ["y"], then_branch=branch("then", "/scoped/alias"), else_branch=branch("else", "v")),
    ]
    weights = [helper.make_tensor(n, TensorProto.FLOAT, dims, vals) for n, dims, vals in (("t1", [], [0.0]), ("w", [2], [3.0, 4.0]), ("v", [2], [5.0, 6.0]))]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], weights
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("graph_pass", [compact_names, drop_initializer_identities, fold_weight_quantization])
def test_graph_passes_keep_what_an_if_branch_reads_from_the_graph_around_it(graph_pass):
    ort = pytest.importorskip("onnxruntime")
    model = _branching_model()
    graph_pass(model)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for x, y in (([1.0, 2.0], [5.0, 8.0]), ([-1.0, -2.0], [3.0, 2.0])):  # x + x, plus w or v
        assert session.run(None, {"x": np.array(x, np.float32)})[0].tolist() == y
    if graph_pass is compact_names:
        assert not any(name.startswith("/scoped") for node in model.graph.node for name in [*node.input, *node.output])


def test_a_classifier_whose_output_has_no_spatial_axes_exports_with_the_default_dynamic_axes(tmp_path):
    from monai.networks.nets import Classifier

    from monai_effq import EfficientQConfig, quantize

    torch.manual_seed(0)
    net = Classifier(in_shape=(1, 16, 16, 16), classes=3, channels=(4, 8), strides=(2, 2)).eval()
    x = torch.randn(4, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    result = quantize(net, x, EfficientQConfig(weight_bits=8, attention=False), progress=False)
    # the output's axes 2.. were named as the input's were: IndexError
    path = export_onnx(result, tmp_path / "classifier.onnx", (1, 1, 16, 16, 16))
    with torch.no_grad():
        assert torch.allclose(OnnxRuntimeNetwork(path, optimize=False)(x), result.network(x), atol=0.02)
