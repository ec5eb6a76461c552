"""ScatterND nodes that write nothing: taken out, so OpenVINO reads the graph, with the same output."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from monai_effq.deploy.empty_scatters import drop_empty_scatters  # noqa: E402


def _scatter_into_empty_slice(updates_shape: list[int], start: int = 3) -> "onnx.ModelProto":
    """``y = concat(x, scatter(x[:, start:3], [[1]], updates))``: SwinUNETR's mask assignment to a slice, empty at ``start`` 3."""
    size = int(np.prod(updates_shape))
    inits = [
        helper.make_tensor("index", TensorProto.INT64, [1, 1], [1]),
        helper.make_tensor("updates", TensorProto.FLOAT, updates_shape, [7.0] * size),
        helper.make_tensor("start", TensorProto.INT64, [1], [start]),
        helper.make_tensor("end", TensorProto.INT64, [1], [3]),
        helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
    ]
    nodes = [
        helper.make_node("Slice", ["x", "start", "end", "axis"], ["part"]),
        helper.make_node("ScatterND", ["part", "index", "updates"], ["scattered"], name="mask"),
        helper.make_node("Concat", ["x", "scattered"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", None])], inits,
    )
    # IR version 10, what opset 21 needs: newer onnx writes a newer one by default, which older ONNX Runtimes refuse
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _run_onnxruntime(model, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_openvino_reads_the_graph_once_the_empty_scatter_is_gone_and_computes_what_onnx_runtime_did():
    ov = pytest.importorskip("openvino")
    model = _scatter_into_empty_slice([1, 0])
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    before = _run_onnxruntime(model, x)
    with pytest.raises(RuntimeError, match="ScatterND"):
        ov.Core().read_model(model.SerializeToString(), b"")  # it reads the empty updates as a scalar

    assert drop_empty_scatters(model) == 1
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_array_equal(_run_onnxruntime(model, x), before)
    compiled = ov.Core().compile_model(ov.Core().read_model(model.SerializeToString(), b""), "CPU")
    np.testing.assert_array_equal(compiled(x)[0], before)


def test_a_scatter_that_writes_values_is_kept():
    model = _scatter_into_empty_slice([1, 2], start=1)
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    before = model.SerializeToString()
    assert drop_empty_scatters(model) == 0
    assert model.SerializeToString() == before
    assert (_run_onnxruntime(model, x)[1, 3:] == 7.0).all()


def test_a_swinunetr_stage_shifting_windows_along_two_axes_runs_in_openvino_as_in_torch(tmp_path):
    pytest.importorskip("openvino")
    import torch
    from monai.networks.nets.swin_unetr import BasicLayer

    from monai_effq.deploy import OpenVINONetwork, export_onnx

    torch.manual_seed(0)
    # SwinUNETR's third stage on 64x32x64 windows: 8x4x8 features, 7-voxel windows, shifted along two axes
    stage = BasicLayer(dim=6, depth=2, num_heads=1, window_size=(7, 7, 7), drop_path=[0.0, 0.0]).eval()
    x = torch.randn(1, 6, 8, 4, 8)
    path = export_onnx(stage, tmp_path / "stage.onnx", x, require_quantized=False)
    with torch.no_grad():
        expected = stage(x)
    got = OpenVINONetwork(path, precision="f32")(x)
    assert float((got - expected).norm() / expected.norm()) < 1e-5
