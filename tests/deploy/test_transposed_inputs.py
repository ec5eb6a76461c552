import numpy as np
import onnx
import torch
from onnx import numpy_helper

from monai_effq.deploy import OnnxRuntimeNetwork, OpenVINONetwork
from monai_effq.deploy.transposed_inputs import shift_transposed_inputs


def _transposed_input_zero_points(model: onnx.ModelProto) -> list[np.ndarray]:
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    sources = [producer[n.input[0]] for n in graph.node if n.op_type == "ConvTranspose"]
    readers = [producer[i] for s in sources for i in (s.input if s.op_type == "Concat" else [])] + [
        s for s in sources if s.op_type != "Concat"
    ]
    return [constants[dq.input[2]] for dq in readers]


def test_a_transposed_convolutions_int8_input_becomes_uint8_at_128_and_computes_the_same(exported, tmp_path):
    _, path = exported
    model = onnx.load(str(path))
    assert shift_transposed_inputs(model) > 0
    assert all(z.dtype == np.uint8 and int(z) == 128 for z in _transposed_input_zero_points(model))
    onnx.checker.check_model(model)
    shifted = tmp_path / "shifted.onnx"
    onnx.save(model, str(shifted))
    x = torch.rand(1, 2, 16, 16, 16, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(OnnxRuntimeNetwork(shifted, optimize=False)(x), OnnxRuntimeNetwork(path, optimize=False)(x), atol=0, rtol=0)


def test_openvino_network_shifts_them_only_on_cpus_without_avx512(exported, monkeypatch):
    _, path = exported
    for capability, shifted in (("AVX2", True), ("AVX512", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        source = OpenVINONetwork(path, precision="f32")._model_source()
        model = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(source)
        assert all((z.dtype == np.uint8) == shifted for z in _transposed_input_zero_points(model)), capability
