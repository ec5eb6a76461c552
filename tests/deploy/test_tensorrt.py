"""TensorRT through MONAI's trt_compile: symmetric int8 graphs, clear refusals, and the engine where a GPU exists."""

import importlib.util

import onnx
import pytest
import torch
from monai.networks.utils import convert_to_onnx

import monai_effq
from monai_effq.deploy import export_form, export_onnx, runtime_network, tensorrt_network, tensorrt_violations

from .conftest import bn_unet

HAS_TENSORRT = torch.cuda.is_available() and all(importlib.util.find_spec(m) for m in ("tensorrt", "polygraphy"))


def quantized(calibration, act_grid: str):
    config = monai_effq.EfficientQConfig(weight_bits=4, act_bits=8, act_grid=act_grid, method="rtn", attention=False)
    return monai_effq.quantize(bn_unet(), calibration, config, progress=False)


@pytest.fixture(scope="module")
def symmetric(calibration):
    return quantized(calibration, "symmetric")


def test_symmetric_activations_calibrate_to_zero_point_zero_and_export_as_int8(symmetric, tmp_path):
    quantizers = [m.input_quantizer for m in symmetric.network.modules() if getattr(m, "input_quantizer", None)]
    assert quantizers and all(q.grid.kind == "symmetric" for q in quantizers)
    # TensorRT reads int8 weights only: a file for it is exported with int8 containers
    path = export_onnx(symmetric, tmp_path / "sym.onnx", (1, 2, 16, 16, 16), weight_container="int8", dynamic_spatial=False)
    assert tensorrt_violations(path) == []


def test_the_default_calibration_is_named_as_what_tensorrt_cannot_build(calibration, tmp_path):
    path = export_onnx(quantized(calibration, "auto"), tmp_path / "auto.onnx", (1, 2, 16, 16, 16), weight_container="int8", dynamic_spatial=False)
    problems = tensorrt_violations(path)
    assert problems and all("UINT8" in p or "zero point" in p for p in problems)


def test_the_onnx_monai_trt_compile_builds_from_is_tensorrt_legal(symmetric, tmp_path):
    # trt_compile exports the module it is given with MONAI's convert_to_onnx; this is that file
    form, _ = export_form(symmetric.network, exporter="torchscript")  # what trt_compile exports
    x = torch.rand(1, 2, 16, 16, 16)
    convert_to_onnx(form, (x,), filename=str(tmp_path / "trt.onnx"), input_names=["x"], output_names=["y"], dynamo=False)
    model = onnx.load(str(tmp_path / "trt.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert tensorrt_violations(model) == []


def test_a_network_with_unsigned_activations_is_refused_naming_the_setting(calibration, tmp_path):
    with pytest.raises(ValueError, match="act_grid='symmetric'"):
        tensorrt_network(quantized(calibration, "auto"), tmp_path / "engine")


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the refusal on machines without TensorRT")
def test_without_cuda_or_tensorrt_the_error_says_what_is_missing(symmetric, tmp_path):
    with pytest.raises(RuntimeError, match="CUDA GPU and the tensorrt and polygraphy packages"):
        tensorrt_network(symmetric, tmp_path / "engine")


@pytest.mark.skipif(not HAS_TENSORRT, reason="needs a CUDA GPU with tensorrt and polygraphy")
def test_the_tensorrt_engine_matches_the_fake_quant_network(symmetric, tmp_path):
    net = tensorrt_network(symmetric, tmp_path / "engine", precision="fp32")
    x = torch.rand(1, 2, 16, 16, 16)
    with torch.no_grad():
        expected = symmetric.network(x)
    got = net(x)
    assert got.device == x.device and got.shape == expected.shape
    assert float((got - expected).norm() / expected.norm()) < 2e-2
    assert (tmp_path / "engine.plan").is_file()


def test_symmetric_activation_quantizers_survive_a_checkpoint(symmetric, tmp_path):
    path = monai_effq.save_quantized(symmetric, tmp_path / "sym.pt")
    loaded = monai_effq.load_quantized(path, bn_unet())
    x = torch.rand(1, 2, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), symmetric.network(x), atol=0, rtol=0)
    kinds = {m.input_quantizer.grid.kind for m in loaded.modules() if getattr(m, "input_quantizer", None)}
    assert kinds == {"symmetric"}


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the refusal on machines without TensorRT")
def test_the_bundles_runtime_switch_reaches_tensorrt_and_says_what_is_missing(symmetric, tmp_path):
    checkpoint = monai_effq.save_quantized(symmetric, tmp_path / "model_w4a8.pt")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        runtime_network("tensorrt", tmp_path / "model_w4a8.onnx", checkpoint, bn_unet(), (1, 2, 16, 16, 16))


def test_a_quantize_node_without_zero_point_is_named_as_uint8():
    from onnx import TensorProto, helper

    node = helper.make_node("QuantizeLinear", ["x", "s"], ["q"], name="q0")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("q", TensorProto.UINT8, [1])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])],
    )
    assert tensorrt_violations(helper.make_model(graph)) == ["QuantizeLinear q0: no zero point, so UINT8 (TensorRT quantizes to INT8 only)"]


def test_a_norm_input_on_an_asymmetric_grid_is_refused_naming_the_norm(tmp_path):
    from monai.networks.nets import SegResNet

    from monai_effq.ptq.modules import ActivationQuantizer, QuantizedNorm

    torch.manual_seed(0)
    net = SegResNet(3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1), blocks_up=(1,)).eval()
    calibration = torch.rand(1, 1, 16, 16, 16)
    # the layers' inputs symmetric and the norms' inputs asymmetric: only the norms are named
    config = monai_effq.EfficientQConfig(weight_bits=4, act_grid="symmetric", method="rtn", attention=False, quantize_norm_inputs=True)
    result = monai_effq.quantize(net, calibration, config, progress=False)
    for module in result.network.modules():
        if isinstance(module, QuantizedNorm):
            module.input_quantizer = ActivationQuantizer.calibrate(calibration, 8, kind="asymmetric")
    with pytest.raises(ValueError, match="norm input on an unsigned/asymmetric grid"):
        tensorrt_network(result, tmp_path / "engine")


def test_checking_a_file_for_tensorrt_without_onnx_names_the_extra_to_install(monkeypatch, tmp_path):
    from monai_effq.deploy import tensorrt

    monkeypatch.setattr(tensorrt, "_has_onnx", False)
    with pytest.raises(ImportError, match=r"tensorrt_violations needs the 'onnx' package.*monai-effq\[deploy\]"):
        tensorrt_violations(tmp_path / "model.onnx")
