"""The quantized modules: what their state holds is what they compute."""

import gc

import pytest
import torch
import torch.nn as nn

from monai_effq import EfficientQConfig, load_quantized, quantize, save_quantized
from monai_effq.ptq.modules import QuantizedLayer
from monai_effq.ptq.pipeline import _Run


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


def test_a_quantized_network_refuses_nan_or_inf_input_that_its_quantizers_would_round_away(tmp_path):
    network = _quantized(0)
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    x[0, 0, 1, 2, 3] = float("nan")
    x[0, 0, 4, 4, 4] = float("-inf")
    torch.save(network, tmp_path / "network.pt")  # as a user keeps the whole network
    for copy in (network, torch.load(tmp_path / "network.pt", weights_only=False)):
        with pytest.raises(ValueError, match=r"the input of the quantized Sequential holds 2 NaN or Inf voxel"):
            copy(x)
    with torch.no_grad():
        assert torch.isfinite(network(torch.nan_to_num(x))).all()


def test_a_quantized_network_loaded_from_its_checkpoint_refuses_nan_input(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1)).eval()
    result = quantize(net, torch.randn(1, 1, 8, 8, 8), EfficientQConfig(method="rtn"), progress=False)
    loaded = load_quantized(save_quantized(result, tmp_path / "q.pt"), net)
    x = torch.full((1, 1, 8, 8, 8), float("nan"))
    with torch.no_grad():
        assert torch.isnan(net(x)).all()  # what the full-precision network shows its user
    with pytest.raises(ValueError, match=r"holds 512 NaN or Inf voxel"):
        loaded(x)


def test_a_quantized_layer_keeps_no_hook_of_the_run_that_solved_it():
    network = _quantized(0)
    inner = [m.layer for m in network.modules() if isinstance(m, QuantizedLayer)]
    assert inner and not any(m._forward_hooks or m._forward_pre_hooks for m in inner)
    gc.collect()
    assert not any(isinstance(o, _Run) for o in gc.get_objects())  # the hook's closure held the whole run
