"""OpenVINO and ONNX Runtime networks: torch in, torch out, inside MONAI's inferers, with clear errors."""

import os
import time

import pytest
import torch
from monai.inferers import SlidingWindowInferer

import monai_effq
import monai_effq.deploy.runtime as runtime
from monai_effq.deploy import OnnxRuntimeNetwork, OpenVINONetwork, runtime_network

from .conftest import bn_unet


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("cls", [OpenVINONetwork, OnnxRuntimeNetwork])
def test_runtime_networks_run_in_a_sliding_window_inferer_on_an_odd_sized_volume(exported, cls):
    result, path = exported
    volume = torch.rand(1, 2, 23, 29, 19, generator=torch.Generator().manual_seed(2))
    inferer = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=2, overlap=0.25)
    with torch.no_grad():
        expected = inferer(volume, result.network)
    got = inferer(volume, cls(path))
    assert got.shape == expected.shape == (1, 3, 23, 29, 19)
    assert rel_l2(got, expected) < 2e-3  # integer kernels: the same codes, a different summation order


def test_openvino_matches_the_fake_quant_network_closely(exported):
    result, path = exported
    x = torch.rand(1, 2, 16, 16, 16)
    with torch.no_grad():
        expected = result.network(x)
    assert rel_l2(OpenVINONetwork(path)(x), expected) < 2e-3


def test_runtime_output_follows_the_input_device_and_type(exported):
    _, path = exported
    out = OpenVINONetwork(path)(torch.rand(1, 2, 16, 16, 16, dtype=torch.float64))
    assert out.dtype == torch.float32 and out.device.type == "cpu"


@pytest.mark.parametrize("cls", [OpenVINONetwork, OnnxRuntimeNetwork])
def test_wrong_input_channels_name_the_expected_channels(exported, cls):
    _, path = exported
    with pytest.raises(ValueError, match="expects 2 input channels"):
        cls(path)(torch.rand(1, 3, 16, 16, 16))


@pytest.mark.parametrize("cls", [OpenVINONetwork, OnnxRuntimeNetwork])
def test_a_missing_or_corrupt_onnx_file_is_an_error_naming_it(tmp_path, cls):
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        cls(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not an onnx graph" * 10)
    with pytest.raises(ValueError, match="corrupt.onnx"):
        cls(corrupt)


@pytest.mark.parametrize("flag, cls", [("_has_ov", OpenVINONetwork), ("_has_ort", OnnxRuntimeNetwork)])
def test_a_missing_runtime_names_the_extra_to_install(exported, monkeypatch, flag, cls):
    _, path = exported
    monkeypatch.setattr(runtime, flag, False)
    with pytest.raises(ImportError, match=r"monai-effq\[deploy\]"):
        cls(path)


def test_runtime_network_exports_a_checkpoint_once_and_again_when_it_changes(quantized, tmp_path):
    ckpt = monai_effq.save_quantized(quantized, tmp_path / "model_w4a8.pt")
    onnx_path = tmp_path / "model_w4a8.onnx"
    net = runtime_network("onnxruntime", onnx_path, ckpt, bn_unet(), (1, 2, 16, 16, 16))
    assert onnx_path.is_file() and isinstance(net, OnnxRuntimeNetwork)
    first = onnx_path.stat().st_mtime_ns
    runtime_network("onnxruntime", onnx_path, ckpt, bn_unet(), (1, 2, 16, 16, 16))
    assert onnx_path.stat().st_mtime_ns == first
    later = time.time() + 5
    os.utime(ckpt, (later, later))
    runtime_network("onnxruntime", onnx_path, ckpt, bn_unet(), (1, 2, 16, 16, 16))
    assert onnx_path.stat().st_mtime_ns != first
    with pytest.raises(ValueError, match="runtime must be one of"):
        runtime_network("tflite", onnx_path)


def test_openvino_options_it_cannot_compile_with_are_an_error_naming_them(exported):
    _, path = exported
    net = OpenVINONetwork(path, precision="f7")
    with pytest.raises(ValueError, match=r"cannot compile model\.onnx for input shape \(1, 2, 8, 8, 8\).*f7"):
        net(torch.rand(1, 2, 8, 8, 8))


@pytest.mark.parametrize("cls", [OpenVINONetwork, OnnxRuntimeNetwork])
def test_nan_input_is_refused_instead_of_turned_into_finite_output(exported, cls):
    _, path = exported
    x = torch.rand(1, 2, 16, 16, 16)
    x[0, 1, 4, 5, 6] = float("nan")
    with pytest.raises(ValueError, match=r"the input to model\.onnx holds 1 NaN or Inf voxel"):
        cls(path)(x)
