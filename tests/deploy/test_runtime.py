"""OpenVINO and ONNX Runtime networks: torch in, torch out, inside MONAI's inferers, with clear errors."""

import functools
import logging
import os
import time
import warnings

import pytest
import torch
from monai.inferers import SlidingWindowInferer

import monai_effq
import monai_effq.deploy.runtime as runtime
from monai_effq.deploy import OnnxRuntimeNetwork, OpenVINONetwork, runtime_network
from monai_effq.deploy.runtime import float_precision_for
from monai_effq.utils.errors import MissingInputError, UserInputError

from .conftest import bn_unet


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# f32 float parts where outputs are compared tightly: bf16 (the default on CPUs that have it) moves them ~1%
F32_OPENVINO = functools.partial(OpenVINONetwork, precision="f32")

# Without VNNI the int8 kernels add pairs of u8 x s8 products in 16 bits and saturate on the fixture's
# 8-bit first and last layers (rel-L2 0.03-0.045 with OpenVINO's oneDNN capped at AVX2, 1.8e-7 capped at
# AVX2-VNNI); test_both_runtimes_warn_of_saturating_8_bit_weights_only_on_a_cpu_without_vnni covers that
def exact_int8_kernels(key: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        runtime.int8_kernels_have_vnni(key) is False,
        reason=f"{key}'s int8 kernels here have no VNNI: they saturate on 8-bit weights (warned)",
    )


def int8_tolerance(key: str) -> float:
    """The rel-L2 a runtime's int8 output may differ from the fake-quant network's by: rounding with VNNI,
    the saturation above without it (a broken graph differs by far more)."""
    return 1e-3 if runtime.int8_kernels_have_vnni(key) is not False else 0.1


@pytest.mark.parametrize(
    "cls",
    [
        pytest.param(F32_OPENVINO, marks=exact_int8_kernels("openvino"), id="openvino"),
        pytest.param(OnnxRuntimeNetwork, marks=exact_int8_kernels("onnxruntime"), id="onnxruntime"),
    ],
)
def test_runtime_networks_run_in_a_sliding_window_inferer_on_an_odd_sized_volume(exported, cls):
    result, path = exported
    volume = torch.rand(1, 2, 23, 29, 19, generator=torch.Generator().manual_seed(2))
    inferer = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=2, overlap=0.25)
    with torch.no_grad():
        expected = inferer(volume, result.network)
    got = inferer(volume, cls(path))
    assert got.shape == expected.shape == (1, 3, 23, 29, 19)
    assert rel_l2(got, expected) < 2e-3  # integer kernels: the same codes, a different summation order


@exact_int8_kernels("openvino")
def test_openvino_matches_the_fake_quant_network_closely(exported):
    result, path = exported
    x = torch.rand(1, 2, 16, 16, 16)
    with torch.no_grad():
        expected = result.network(x)
    assert rel_l2(OpenVINONetwork(path, precision="f32")(x), expected) < 2e-3


class _Capabilities:
    """An ``openvino.Core`` stand-in that reports a chosen CPU capability list."""

    def __init__(self, capabilities: list[str]) -> None:
        self.capabilities = capabilities

    def get_property(self, device: str, key: str) -> list[str]:
        assert key == "OPTIMIZATION_CAPABILITIES"
        return self.capabilities


def test_float_parts_run_in_bf16_only_on_cpus_that_compute_it_natively():
    assert float_precision_for(_Capabilities(["FP32", "BF16", "INT8"])) == "bf16"
    assert float_precision_for(_Capabilities(["WINOGRAD", "FP32", "INT8", "BIN"])) == "f32"
    assert float_precision_for(_Capabilities(["FP16"]), "GPU.0") is None


@pytest.mark.parametrize("capabilities, expected", [(["FP32", "INT8"], "f32"), (None, None)])
def test_openvino_network_follows_the_cpu_and_says_what_it_chose(exported, monkeypatch, caplog, capabilities, expected):
    _, path = exported
    if capabilities is not None:
        monkeypatch.setattr(runtime, "float_precision_for", lambda core, device: float_precision_for(_Capabilities(capabilities)))
    else:  # this machine's own answer
        import openvino

        expected = float_precision_for(openvino.Core())
    net = OpenVINONetwork(path)
    with caplog.at_level(logging.INFO, logger="monai_effq"):
        net(torch.rand(1, 2, 8, 8, 8))
    assert net.chosen_precision == expected
    assert f"in {expected} on CPU" in caplog.text


def test_runtime_output_follows_the_input_device_and_type(exported):
    _, path = exported
    out = OpenVINONetwork(path)(torch.rand(1, 2, 16, 16, 16, dtype=torch.float64))
    assert out.dtype == torch.float32 and out.device.type == "cpu"


@pytest.mark.parametrize("cls", [OpenVINONetwork, OnnxRuntimeNetwork])
def test_calls_from_several_threads_each_get_their_own_output(exported, cls):
    import threading

    _, path = exported
    net = cls(path)
    xs = [torch.rand(1, 2, 16, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    expected = [net(x) for x in xs]
    wrong, errors = [], []

    def serve(k):  # a server answering requests from several threads with one network
        for call in range(20):
            i = (k + call) % len(xs)
            try:
                if not torch.equal(net(xs[i]), expected[i]):
                    wrong.append(i)
            except RuntimeError as e:  # OpenVINO's "Infer Request is busy"
                errors.append(str(e))

    threads = [threading.Thread(target=serve, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong, (errors[:1], len(wrong))


@pytest.mark.parametrize("cls", [OpenVINONetwork, OnnxRuntimeNetwork])
def test_an_image_s_metadata_comes_back_with_the_output_as_from_a_torch_network(exported, cls):
    from monai.data import MetaTensor

    quantized, path = exported
    x = MetaTensor(torch.rand(1, 2, 16, 16, 16), affine=torch.diag(torch.tensor([1.5, 1.5, 3.0, 1.0])), meta={"filename_or_obj": "case1.nii.gz"})
    x.applied_operations.append({"class": "ResizeWithPadOrCrop"})  # what Invertd undoes after a SimpleInferer
    out = cls(path)(x)
    with torch.no_grad():
        expected = quantized.network(x)
    assert isinstance(out, MetaTensor) and isinstance(expected, MetaTensor)
    assert out.meta["filename_or_obj"] == expected.meta["filename_or_obj"] == "case1.nii.gz"
    assert torch.equal(out.affine, expected.affine) and out.applied_operations == expected.applied_operations


@pytest.mark.parametrize("cls", [OpenVINONetwork, OnnxRuntimeNetwork])
def test_each_call_returns_its_own_output_and_leaves_the_input_untouched(exported, cls):
    _, path = exported
    net = cls(path)
    a, b = torch.rand(1, 2, 16, 16, 16), torch.rand(1, 2, 16, 16, 16)
    a_before = a.clone()
    out_a = net(a)
    out_a_before = out_a.clone()
    out_b = net(b)  # the runtime reuses its output memory for this call
    assert torch.equal(a, a_before)
    assert torch.equal(out_a, out_a_before) and not torch.equal(out_a, out_b)
    assert torch.equal(net(a), out_a)


@pytest.mark.parametrize("cls", [OpenVINONetwork, OnnxRuntimeNetwork])
def test_wrong_input_channels_name_the_expected_channels(exported, cls):
    _, path = exported
    with pytest.raises(ValueError, match="expects 2 input channels"):
        cls(path)(torch.rand(1, 3, 16, 16, 16))


@pytest.mark.parametrize("cls", [OpenVINONetwork, OnnxRuntimeNetwork])
def test_a_missing_or_corrupt_onnx_file_is_an_error_naming_it(tmp_path, cls):
    # user-input errors, which the bundle command reports in one line
    with pytest.raises(MissingInputError, match="missing.onnx"):
        cls(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not an onnx graph" * 10)
    with pytest.raises(UserInputError, match="corrupt.onnx"):
        cls(corrupt)


def test_an_operator_openvino_cannot_convert_is_named_and_the_file_not_called_corrupt(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Foo", ["x"], ["y"], domain="com.example")], "g",
        [value("x", TensorProto.FLOAT, [1, 1, 4, 4, 4])], [value("y", TensorProto.FLOAT, [1, 1, 4, 4, 4])],
    )
    path = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.example", 1)]), path)
    with pytest.raises(UserInputError, match=r"OpenVINO cannot convert com\.example\.Foo in .*custom\.onnx: the file is ONNX") as err:
        OpenVINONetwork(path)
    assert "corrupt" not in str(err.value) and "onnxruntime" in str(err.value)


@pytest.mark.parametrize("flag, cls", [("_has_ov", OpenVINONetwork), ("_has_ort", OnnxRuntimeNetwork)])
def test_a_missing_runtime_names_the_extra_to_install(exported, monkeypatch, flag, cls):
    _, path = exported
    monkeypatch.setattr(runtime, flag, False)
    with pytest.raises(ImportError, match=r"monai-effq\[deploy\]"):
        cls(path)


def _rtn(weight_bits: int, **settings):
    config = monai_effq.EfficientQConfig(weight_bits=weight_bits, method="rtn", attention=False, **settings)
    return monai_effq.quantize(bn_unet(), torch.rand(1, 2, 16, 16, 16, generator=torch.Generator().manual_seed(3)), config, progress=False)


def test_runtime_network_re_exports_by_checkpoint_content_not_modification_time(tmp_path):
    from monai_effq.deploy.runtime import exported_from
    from monai_effq.ptq.checkpoint import checkpoint_fingerprint

    ckpt = monai_effq.save_quantized(_rtn(4), tmp_path / "model_w4a8.pt")
    onnx_path = tmp_path / "model_w4a8.onnx"
    net = runtime_network("onnxruntime", onnx_path, ckpt, bn_unet(), (1, 2, 16, 16, 16))
    assert isinstance(net, OnnxRuntimeNetwork) and exported_from(onnx_path) == checkpoint_fingerprint(ckpt)
    first = onnx_path.stat().st_mtime_ns
    later = time.time() + 5
    os.utime(ckpt, (later, later))  # touched, same content: the export stands
    runtime_network("onnxruntime", onnx_path, ckpt, bn_unet(), (1, 2, 16, 16, 16))
    assert onnx_path.stat().st_mtime_ns == first
    # another checkpoint brought in with an older time (cp -p, rsync, a restore from backup)
    monai_effq.save_quantized(_rtn(3), ckpt)
    earlier = onnx_path.stat().st_mtime - 3600
    os.utime(ckpt, (earlier, earlier))
    runtime_network("onnxruntime", onnx_path, ckpt, bn_unet(), (1, 2, 16, 16, 16))
    assert exported_from(onnx_path) == checkpoint_fingerprint(ckpt)
    assert onnx_path.stat().st_mtime_ns != first
    with pytest.raises(ValueError, match="runtime must be one of"):
        runtime_network("tflite", onnx_path)


def test_a_file_whose_batch_axis_the_network_fixed_is_run_again_and_an_upgrade_exports_it_again(tmp_path, monkeypatch):
    import monai_effq.deploy.export as export_module

    ckpt = monai_effq.save_quantized(_rtn(4), tmp_path / "model_w4a8.pt")
    capture = export_module._export_with_torch_export

    def batch_fixed(form, x, opset, axes):  # a network whose graph torch.export captures for one batch size only
        if 0 in axes:
            raise export_module.TorchExportError("the batch size is specialized to 1")
        return capture(form, x, opset, axes)

    monkeypatch.setattr(export_module, "_export_with_torch_export", batch_fixed)
    exports = []
    export = runtime.export_onnx
    monkeypatch.setattr(runtime, "export_onnx", lambda *a, **k: exports.append(1) or export(*a, **k))
    onnx_path = tmp_path / "model_w4a8.onnx"
    for _ in range(2):  # the file the network allows is run again, not exported again in the hope of a dynamic batch axis
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runtime_network("onnxruntime", onnx_path, ckpt, bn_unet(), (1, 2, 16, 16, 16))
    assert len(exports) == 1 and not runtime._batch_axis_dynamic(runtime._header(onnx_path)[1])
    monkeypatch.setattr(runtime, "exporter_version", lambda: "99.0")  # an upgraded monai-effq finds the file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runtime_network("onnxruntime", onnx_path, ckpt, bn_unet(), (1, 2, 16, 16, 16))
    assert len(exports) == 2


def test_an_export_of_a_result_records_the_fingerprint_of_its_checkpoint(exported, tmp_path):
    from monai_effq.deploy.runtime import exported_from
    from monai_effq.ptq.checkpoint import checkpoint_fingerprint

    result, path = exported
    assert exported_from(path) == checkpoint_fingerprint(monai_effq.save_quantized(result, tmp_path / "q.pt"))


def test_tensorrt_engines_are_named_after_the_checkpoint_and_those_of_others_removed(tmp_path):
    from monai_effq.ptq.checkpoint import checkpoint_fingerprint

    ckpt = monai_effq.save_quantized(_rtn(4), tmp_path / "model_w4a8.pt")
    current = tmp_path / f"model_w4a8.{checkpoint_fingerprint(ckpt)}.plan"
    kept = [current, tmp_path / "model_w4a8_fp16.plan"]
    removed = [tmp_path / "model_w4a8.plan", tmp_path / "model_w4a8.0123456789abcdef.plan"]
    for plan in kept + removed:
        plan.write_bytes(b"engine")
    # the asymmetric activations (or a machine without TensorRT) stop the build after the cache is sorted
    with pytest.raises((ValueError, RuntimeError)):
        runtime_network("tensorrt", tmp_path / "model_w4a8.onnx", ckpt, bn_unet(), (1, 2, 16, 16, 16))
    assert sorted(tmp_path.glob("*.plan")) == sorted(kept)


def test_a_damaged_checkpoint_is_refused_before_anything_is_exported(tmp_path):
    ckpt = monai_effq.save_quantized(_rtn(4), tmp_path / "model_w4a8.pt")
    payload = torch.load(ckpt, weights_only=True)
    payload["codes"][0] ^= 1
    torch.save(payload, ckpt)
    with pytest.raises(ValueError, match="model_w4a8.pt is damaged"):
        runtime_network("onnxruntime", tmp_path / "model_w4a8.onnx", ckpt, bn_unet(), (1, 2, 16, 16, 16))
    assert not (tmp_path / "model_w4a8.onnx").exists()


@pytest.mark.parametrize(
    "option, choices",
    [({"precision": "fp32"}, "'auto', 'bf16', 'f16', 'f32'"), ({"hint": "latncy"}, "'LATENCY', 'THROUGHPUT'"), ({"device": "cuda"}, "'CPU'")],
)
def test_openvino_options_it_does_not_take_are_named_with_its_choices_when_the_network_is_made(exported, option, choices):
    _, path = exported
    # they failed only at the first call, where OpenVINO's message kept just "Exception from src/...core.cpp:117:"
    (name, value), = option.items()
    with pytest.raises(UserInputError, match=rf"OpenVINONetwork {name}='{value}' is not one OpenVINO takes here: choose from \[.*{choices}"):
        OpenVINONetwork(path, **option)
    net = OpenVINONetwork(path, device=" cpu", hint="latency", precision="F32")  # OpenVINO's spelling, whatever the case
    assert net.device == "CPU" and net.config == {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}


def test_an_option_value_openvino_refuses_when_it_compiles_is_named_with_openvinos_reason(exported):
    _, path = exported
    net = OpenVINONetwork(path, threads=-1)
    with pytest.raises(ValueError, match=r"cannot compile model\.onnx for input shape \(1, 2, 8, 8, 8\).*\(RuntimeError: .*INFERENCE_NUM_THREADS"):
        net(torch.rand(1, 2, 8, 8, 8))


def test_a_runtime_error_is_told_by_its_cause_not_the_source_line_that_threw_it():
    from monai_effq.deploy.runtime import error_text

    raised = RuntimeError("Exception from src/inference/src/cpp/core.cpp:117:\nException from src/x.cpp:9:\nWrong value fp32 for key")
    assert error_text(raised) == "Wrong value fp32 for key"
    assert error_text(RuntimeError("object is not initialized")) == "object is not initialized"


@pytest.mark.parametrize("cls", [OpenVINONetwork, OnnxRuntimeNetwork])
def test_an_input_without_its_batch_axis_or_without_values_is_named(exported, cls):
    _, path = exported
    # it was blamed on a graph that holds its example's size (window attention), with a roi_size to give
    with pytest.raises(UserInputError, match=r"model\.onnx takes inputs of 5 axes \(N, C, \*spatial\), got shape \(2, 16, 16, 16\)"):
        cls(path)(torch.rand(2, 16, 16, 16))
    with pytest.raises(UserInputError, match="a tensor on the 'meta' device, which holds no values"):
        cls(path)(torch.empty(1, 2, 16, 16, 16, device="meta"))


def test_onnx_runtime_providers_it_lacks_are_named_and_one_given_as_text_is_taken(exported):
    _, path = exported
    # it printed a banner, warned, and ran on the CPU
    with pytest.raises(UserInputError, match=r"ONNX Runtime here has no execution provider 'CPUExecutionProvidr': choose from \["):
        OnnxRuntimeNetwork(path, providers=["CPUExecutionProvidr"])
    assert OnnxRuntimeNetwork(path, providers="CPUExecutionProvider")(torch.rand(1, 2, 8, 8, 8)).shape == (1, 3, 8, 8, 8)


def test_openvino_widens_the_4_bit_weights_of_a_file_whatever_the_case_of_its_extension(tmp_path):
    result = _rtn(4)
    path = monai_effq.export_onnx(result, tmp_path / "model.onnx", (1, 2, 8, 8, 8))
    upper = tmp_path / "MODEL.ONNX"
    upper.write_bytes(path.read_bytes())
    assert isinstance(OpenVINONetwork(path)._model_source(), bytes)
    assert isinstance(OpenVINONetwork(upper)._model_source(), bytes)  # it was read as it was, twice as slow


@pytest.mark.parametrize("cls", [OpenVINONetwork, OnnxRuntimeNetwork])
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")], ids=["nan", "inf"])
def test_nan_or_inf_input_is_refused_instead_of_turned_into_finite_output(exported, cls, bad):
    _, path = exported
    x = torch.rand(1, 2, 16, 16, 16)
    x[0, 1, 4, 5, 6] = bad
    with pytest.raises(ValueError, match=r"the input to model\.onnx holds 1 NaN or Inf voxel"):
        cls(path)(x)
    x[0, 1, 4, 5, 6] = 0.0
    x[0, :, :2] = 3e38  # finite values near float32's limit are not refused
    assert cls(path)(x).shape == (1, 3, 16, 16, 16)


def test_a_missing_checkpoint_or_a_missing_network_to_export_from_is_an_error_saying_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model_w4a8\.pt does not exist: run the bundle's quantize workflow"):
        runtime_network("onnxruntime", tmp_path / "model_w4a8.onnx", tmp_path / "model_w4a8.pt", bn_unet(), (1, 2, 16, 16, 16))
    ckpt = monai_effq.save_quantized(_rtn(4), tmp_path / "model_w4a8.pt")
    with pytest.raises(ValueError, match="needs the FP `network` and an `example_shape`"):
        runtime_network("onnxruntime", tmp_path / "model_w4a8.onnx", ckpt)
    assert not (tmp_path / "model_w4a8.onnx").exists()


@pytest.fixture(scope="module")
def w8_files(tmp_path_factory):
    """An 8-bit RTN network exported as it is and with ``reduce_range`` (7-bit weights), and the network quantized
    at 7 bits, once for the tests that only read them (torch's exporter takes seconds), with the messages of the
    warnings the second export gave."""
    from monai_effq.deploy import export_onnx

    folder = tmp_path_factory.mktemp("w8")
    result = _rtn(8)
    wide = export_onnx(result, folder / "w8.onnx", (1, 2, 16, 16, 16), dynamic_spatial=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        narrow = export_onnx(result, folder / "w8_7bit.onnx", (1, 2, 16, 16, 16), reduce_range=True, dynamic_spatial=False)
    advised = _rtn(7, weight_grid="signed", first_layer_bits=7, last_layer_bits=7)  # every layer on a grid that cannot saturate
    seven = export_onnx(advised, folder / "w7.onnx", (1, 2, 16, 16, 16), dynamic_spatial=False)
    return wide, narrow, seven, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("cls", [OnnxRuntimeNetwork, OpenVINONetwork])
def test_both_runtimes_warn_of_saturating_8_bit_weights_only_on_a_cpu_without_vnni(w8_files, monkeypatch, cls):
    for cap in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):  # the CPU's flags alone decide here
        monkeypatch.delenv(cap, raising=False)

    wide, narrow, seven, export_warnings = w8_files
    assert any("reduce_range" in message for message in export_warnings), export_warnings
    monkeypatch.setattr(runtime, "cpu_has_vnni", lambda: False)
    with pytest.warns(UserWarning, match=f"int8 weights beyond 7 bits and {cls.runtime}'s int8 kernels on this CPU have no VNNI") as caught:
        cls(wide)
    assert any("weight_bits=7, weight_grid='signed', first_layer_bits=7, last_layer_bits=7" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        cls(narrow)
        cls(seven)  # the advice given: quantized at 7 bits, nothing can saturate
        monkeypatch.setattr(runtime, "cpu_has_vnni", lambda: True)
        cls(wide)


@pytest.mark.parametrize("cap", ["AVX2", "avx512_core", "AVX2_VNNI", "AVX512_CORE_AMX", ""])
def test_an_isa_cap_without_vnni_takes_it_from_openvino_only(monkeypatch, cap):
    monkeypatch.setattr(runtime, "cpu_has_vnni", lambda: True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    capped = cap.upper() in ("AVX2", "AVX512_CORE")
    assert runtime.int8_kernels_have_vnni("openvino") is (not capped)
    assert runtime.int8_kernels_have_vnni("onnxruntime") is True
    monkeypatch.setattr(runtime, "cpu_has_vnni", lambda: False)
    assert runtime.int8_kernels_have_vnni("openvino") is False


def test_openvino_warns_of_saturation_under_an_isa_cap_without_vnni(w8_files, monkeypatch):
    wide, *_ = w8_files
    monkeypatch.setattr(runtime, "cpu_has_vnni", lambda: True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    with pytest.warns(UserWarning, match="OpenVINO's int8 kernels on this CPU have no VNNI"):
        OpenVINONetwork(wide)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        OnnxRuntimeNetwork(wide)


def test_openvino_reads_an_ir_file_on_a_cpu_without_vnni_without_looking_for_onnx_weights(w8_files, tmp_path, monkeypatch):
    import openvino as ov

    wide, *_ = w8_files
    ov.save_model(ov.Core().read_model(str(wide)), str(tmp_path / "w8.xml"))
    monkeypatch.setattr(runtime, "cpu_has_vnni", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        net = OpenVINONetwork(tmp_path / "w8.xml")
    assert net(torch.rand(1, 2, 16, 16, 16)).shape[:2] == (1, 3)

@pytest.mark.parametrize("cls", [OpenVINONetwork, OnnxRuntimeNetwork])
def test_an_input_that_is_not_a_tensor_is_a_type_error_naming_the_runner(exported, cls):
    _, path = exported
    with pytest.raises(TypeError, match=f"{cls.__name__} expects a torch tensor, got ndarray"):
        cls(path)(torch.rand(1, 2, 8, 8, 8).numpy())


class _TokenHead(torch.nn.Module):
    """A convolution, then linear layers on its voxels as tokens ``(N, tokens, features)``, as a transformer runs them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 16)
        self.out = torch.nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, *size = x.shape
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        return self.out(torch.relu(self.fc(tokens))).transpose(1, 2).reshape(n, 2, *size)


@pytest.mark.parametrize("cls, key", [(F32_OPENVINO, "openvino"), (OnnxRuntimeNetwork, "onnxruntime")], ids=["openvino", "onnxruntime"])
def test_linear_layers_on_tokens_with_a_symmetric_input_grid_load_and_match_the_fake_quant_network(tmp_path, cls, key):
    # int8 (symmetric) inputs to a linear layer on tokens: ONNX Runtime's MatMulAddFusion, with its
    # Q/DQ passes, used to write an int8 Q with a uint8 zero point and refuse to load the file
    torch.manual_seed(0)
    x = torch.randn(1, 1, 8, 8, 8)
    config = monai_effq.EfficientQConfig(weight_bits=8, act_bits=8, overrides={"fc": {"act_grid": "symmetric"}})
    result = monai_effq.quantize(_TokenHead().eval(), x, config, progress=False)
    path = monai_effq.export_onnx(result, tmp_path / "tokens.onnx", x, dynamic_spatial=False)
    with torch.no_grad():
        expected = result.network(x)
    assert rel_l2(cls(path)(x), expected) < int8_tolerance(key)


class _SizedAttention(torch.nn.Module):
    """A buffer sized for 8x8x8 inputs, as SwinUNETR's attention mask holds its example's window count."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.register_buffer("mask", torch.rand(8, 64, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x)
        return (f.flatten(2) + self.mask.reshape(1, 1, 512)).reshape(f.shape)


@pytest.mark.parametrize("cls", [OpenVINONetwork, OnnxRuntimeNetwork])
def test_a_graph_that_holds_its_examples_size_fails_at_another_size_naming_the_size_to_run(tmp_path, cls):
    x = torch.randn(1, 1, 8, 8, 8)
    result = monai_effq.quantize(_SizedAttention().eval(), x, monai_effq.EfficientQConfig(weight_bits=8, method="rtn"), progress=False)
    net = cls(monai_effq.export_onnx(result, tmp_path / "sized.onnx", x))
    assert net(x).shape == (1, 4, 8, 8, 8)
    with pytest.raises(UserInputError, match=r"16x16x16 input \(.+\); it was exported on 8x8x8\. A network whose.* roi_size 8, 8, 8"):
        net(torch.randn(1, 1, 16, 16, 16))


class _DownUp(torch.nn.Module):
    """Halves its input and doubles it back onto a skip: an odd side cannot add up."""

    def __init__(self) -> None:
        super().__init__()
        self.down = torch.nn.Conv3d(1, 4, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose3d(4, 1, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.down(x))


def test_a_side_the_downsampling_does_not_divide_is_named_as_the_likely_cause(tmp_path):
    x = torch.randn(1, 1, 8, 8, 8)
    result = monai_effq.quantize(_DownUp().eval(), x, monai_effq.EfficientQConfig(method="rtn"), progress=False)
    net = OnnxRuntimeNetwork(monai_effq.export_onnx(result, tmp_path / "down_up.onnx", x))
    assert net(torch.randn(1, 1, 12, 8, 6)).shape == (1, 1, 12, 8, 6)  # even sides run, though not multiples of 8
    with pytest.raises(UserInputError, match=r"exported on 8x8x8\. Its side 7 divides by 1 at most, where every side of the export divides by 8: .*DivisiblePadd"):
        net(torch.randn(1, 1, 8, 8, 7))


def test_runtime_network_exports_at_the_window_with_any_batch_and_again_for_another_window_or_any_size(tmp_path):
    import onnx

    result = _rtn(4)
    ckpt = monai_effq.save_quantized(result, tmp_path / "model_w4a8.pt")
    onnx_path = tmp_path / "model_w4a8.onnx"

    def exported_size() -> str:
        props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
        return props["monai_effq.example_spatial_size"]

    def input_dims() -> list[str | int]:
        dims = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        return [d.dim_param or d.dim_value for d in dims]

    net = runtime_network("onnxruntime", onnx_path, ckpt, bn_unet(), (1, 2, 16, 16, 16))
    assert exported_size() == "16x16x16" and input_dims() == ["batch", 2, 16, 16, 16]
    windows = torch.rand(3, 2, 16, 16, 16, generator=torch.Generator().manual_seed(4))  # the inferer's sw_batch_size
    with torch.no_grad():
        assert rel_l2(net(windows), result.network(windows)) < int8_tolerance("onnxruntime")
        assert rel_l2(OpenVINONetwork(onnx_path, precision="f32")(windows), result.network(windows)) < int8_tolerance("openvino")
    # OpenVINO would reshape the file to another window and compute wrong output: both runtimes refuse it
    ov_net = OpenVINONetwork(onnx_path, precision="f32")
    for run in (net, ov_net, lambda x: ov_net.request_for(tuple(x.shape))):
        with pytest.raises(UserInputError, match=r"shape \?x2x16x16x16 \(\? marks a dynamic axis\) and cannot run a 1x2x16x24x16"):
            run(torch.rand(1, 2, 16, 24, 16))
    runtime_network("onnxruntime", onnx_path, ckpt, bn_unet(), (1, 2, 16, 24, 16))
    assert exported_size() == "16x24x16" and input_dims() == ["batch", 2, 16, 24, 16]
    # whole volumes of any size (no sliding window): the window's file is exported again with dynamic axes
    net = runtime_network("onnxruntime", onnx_path, ckpt, bn_unet(), (1, 2, 16, 24, 16), fixed_window=False)
    assert input_dims() == ["batch", 2, "spatial0", "spatial1", "spatial2"]
    volume = torch.rand(1, 2, 20, 16, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel_l2(net(volume), result.network(volume)) < 1e-3
