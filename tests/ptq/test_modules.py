"""The quantized modules: what their state holds is what they compute."""

import torch
import torch.nn as nn

from monai_effq import EfficientQConfig, quantize


def _quantized(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1)).eval()
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    return quantize(net, x, EfficientQConfig(weight_bits=4, act_bits=8, validation_fraction=0.0), progress=False).network


def test_a_quantized_network_computes_with_the_weights_load_state_dict_gives_it():
    # nnU-Net's predictor runs a fold ensemble by loading each fold's state dict into one network
    first, second = _quantized(0), _quantized(1)
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = second(x)
        assert not torch.allclose(first(x), expected)
        first.load_state_dict(second.state_dict())
        assert torch.equal(first(x), expected)
