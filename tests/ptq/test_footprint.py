import math

import pytest
import torch
import torch.nn as nn
from monai.networks.blocks import ResidualUnit

from monai_effq import EfficientQConfig, quantize
from monai_effq.ptq import activation_footprint, weight_footprint


def _net() -> nn.Module:
    torch.manual_seed(0)
    # the largest layer input is the middle one: 6 channels, against the 2-channel image
    return nn.Sequential(nn.Conv3d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 1)).eval()


@pytest.fixture(scope="module")
def quantized():
    net = _net()
    x = torch.randn(1, 2, 8, 8, 8)
    # 8 bits on the first and last layers (the default), 4 in the middle; 6-bit activations
    return quantize(net, x, EfficientQConfig(weight_bits=4, act_bits=6, method="rtn"), progress=False).network, x


def test_an_fp_networks_weights_are_counted_at_32_bits_with_ratio_one():
    net = _net()
    fp = weight_footprint(net)
    weights = sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.Conv3d))
    assert fp.fp32_bytes == fp.packed_bytes == 4 * weights
    assert fp.ratio == 1.0


def test_quantized_weights_are_counted_packed_at_each_layers_bits(quantized):
    net, _ = quantized
    sizes = [m.weight.numel() for m in _net().modules() if isinstance(m, nn.Conv3d)]
    fp = weight_footprint(net)
    assert fp.fp32_bytes == 4 * sum(sizes)
    assert fp.packed_bytes == sizes[0] + math.ceil(sizes[1] * 4 / 8) + sizes[2]
    assert fp.ratio == pytest.approx(fp.fp32_bytes / fp.packed_bytes)


def test_the_activation_footprint_is_the_largest_layer_input_at_32_bits_and_at_its_quantizers_bits(quantized):
    net, x = quantized
    middle = 6 * 8**3  # the second convolution's input
    fp = activation_footprint(_net(), x)
    assert fp.fp32_bytes == fp.quantized_bytes == 4 * middle
    q = activation_footprint(net, x)
    assert q.fp32_bytes == 4 * middle
    assert q.quantized_bytes == math.ceil(middle * 6 / 8)
    assert q.ratio == pytest.approx(32 / 6, rel=1e-3)


def test_an_input_rounded_once_by_its_residual_unit_is_counted_at_its_bits():
    # share_skip_rounding moves the unit's first layer's input rounding to the unit: the layer reads 8 bits still
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv3d(1, 16, 3, stride=2, padding=1)
            self.unit = ResidualUnit(3, 16, 16, subunits=1)  # identity skip; its input, 16 x 8^3, is the largest
            self.head = nn.Conv3d(16, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.unit(torch.relu(self.stem(x))))

    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16, 16)
    result = quantize(Net().eval(), x, EfficientQConfig(method="rtn", share_skip_rounding=True), progress=False)
    assert result.network.unit.conv.unit0.conv.input_quantizer is None  # the rounding moved to the unit
    footprint = activation_footprint(result.network, x[:1])
    assert footprint.quantized_bytes == 16 * 8**3 and footprint.ratio == 4.0
