import pytest
import torch
from monai.networks.nets import UNet

import monai_effq

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")


def bn_unet(in_channels: int = 2) -> torch.nn.Module:
    """A small MONAI UNet with BatchNorm (folded before quantization), PReLU and transposed convolutions."""
    torch.manual_seed(0)
    net = UNet(3, in_channels, 3, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm="batch").eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding matters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net


@pytest.fixture(scope="session")
def calibration():
    return torch.rand(1, 2, 24, 24, 24, generator=torch.Generator().manual_seed(1)) * 2 - 0.5


@pytest.fixture(scope="session", params=[(4, 8, False), (2, 6, True)], ids=["W4A8", "W2A6-per-channel"])
def quantized(request, calibration):
    weight_bits, act_bits, per_channel = request.param
    # the midrise grid at 4 bits too: its doubled integers exercise the export's zero-point handling
    config = monai_effq.EfficientQConfig(
        weight_bits=weight_bits, act_bits=act_bits, per_channel=per_channel, method="rtn", attention=False,
        weight_grid="midrise",
    )
    return monai_effq.quantize(bn_unet(), calibration, config, progress=False)


@pytest.fixture(scope="session")
def exported(quantized, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return quantized, monai_effq.export_onnx(quantized, path, (1, 2, 16, 16, 16))
