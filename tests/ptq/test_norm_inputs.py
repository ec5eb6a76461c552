"""The norm-input quantization point: which norms get it, what it computes, and what the config allows."""

import pytest
import torch
import torch.nn as nn
from monai.networks.nets import SegResNet

from monai_effq import EfficientQConfig, load_quantized, quantize, save_quantized
from monai_effq.ptq.modules import ActivationQuantizer, QuantizedNorm, shared_input_quantizer
from monai_effq.ptq.norm_inputs import quantize_norm_inputs
from monai_effq.quant.spec import ActivationSpec
from monai_effq.utils.errors import UserInputError


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.tracked = nn.InstanceNorm3d(8, track_running_stats=True)
        self.unused = nn.GroupNorm(1, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tracked(self.norm(self.conv(x)))


def test_every_group_norm_the_forward_reaches_reads_its_input_on_the_calibrated_grid():
    torch.manual_seed(0)
    net = _Block().eval()
    x = torch.randn(1, 2, 8, 8, 8)
    with torch.no_grad():
        norm_input = net.conv(x)
    assert quantize_norm_inputs(net, x, ActivationSpec(8)) == ["norm"]
    assert isinstance(net.norm, QuantizedNorm)
    # running statistics make a per-channel affine map, and a norm never run has no range to calibrate
    assert isinstance(net.tracked, nn.InstanceNorm3d) and isinstance(net.unused, nn.GroupNorm)
    expected = ActivationQuantizer.calibrate(norm_input, 8, signed_kind="signed")
    assert float(net.norm.input_quantizer.scale) == float(expected.scale)
    with torch.no_grad():
        torch.testing.assert_close(net.norm(norm_input), net.norm.norm(expected(norm_input)), rtol=0, atol=0)


def test_a_norm_input_with_negative_values_is_rounded_without_a_zero_point_unless_the_spec_names_a_kind():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 8, 8, 8)
    net = _Block().eval()
    quantize_norm_inputs(net, x, ActivationSpec(8))
    quantizer = net.norm.input_quantizer
    # int8 with zero point 0: a fitted zero point would keep OpenVINO's norm reading floats
    assert quantizer.grid.kind == "signed" and float(quantizer.zero_point) == quantizer.grid.fixed_zero_point
    named = _Block().eval()
    quantize_norm_inputs(named, x, ActivationSpec(8, kind="asymmetric"))
    assert named.norm.input_quantizer.grid.kind == "asymmetric"
    shifted = _Block().eval()
    with torch.no_grad():  # a non-negative norm input keeps the unsigned grid
        shifted.conv.bias.fill_(100.0)
    quantize_norm_inputs(shifted, x, ActivationSpec(8))
    assert shifted.norm.input_quantizer.grid.kind == "unsigned"


def test_quantize_puts_every_segresnet_norm_input_on_the_activation_grid():
    torch.manual_seed(0)
    net = SegResNet(3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1), blocks_up=(1,)).eval()
    calib = torch.rand(1, 1, 16, 16, 16)
    cfg = EfficientQConfig(weight_bits=4, act_bits=6, method="rtn", attention=False, quantize_norm_inputs=True)
    quantized = quantize(net, calib, cfg, progress=False).network
    norms = [m for m in quantized.modules() if isinstance(m, QuantizedNorm)]
    blocks = [m for m in quantized.modules() if shared_input_quantizer(m) is not None]
    # a residual block's first norm is covered by the rounding of the block's input
    covered = sum(isinstance(m, nn.GroupNorm) for b in blocks for m in b.children())
    assert len(norms) + covered == sum(isinstance(m, nn.GroupNorm) for m in net.modules())
    assert {m.input_quantizer.grid.bits for m in norms} | {shared_input_quantizer(b).grid.bits for b in blocks} == {6}
    off = quantize(net, calib, EfficientQConfig(weight_bits=4, method="rtn", attention=False), progress=False).network
    assert not any(isinstance(m, QuantizedNorm) for m in off.modules())


def test_quantizing_norm_inputs_without_activation_bits_is_an_error_saying_what_to_set():
    with pytest.raises(UserInputError, match="set act_bits or turn it off"):
        EfficientQConfig(act_bits=None, quantize_norm_inputs=True)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)
        self.conv = nn.Conv3d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.norm(x))) + x


def test_a_residual_blocks_norm_and_skip_path_read_one_input_rounded_on_the_signed_grid():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), _Residual()).eval()
    x = torch.randn(1, 2, 8, 8, 8)
    with torch.no_grad():
        block_input = net[0](x)
    assert quantize_norm_inputs(net, x, ActivationSpec(8)) == ["1"]
    quantizer = shared_input_quantizer(net[1])
    assert quantizer.grid.kind == "signed" and isinstance(net[1].norm, nn.GroupNorm)
    assert float(quantizer.scale) == float(ActivationQuantizer.calibrate(block_input, 8, kind="signed").scale)
    rounded = quantizer(block_input)
    assert not torch.equal(rounded, block_input)
    with torch.no_grad():  # the skip path adds the rounded input, not the float one
        expected = net[1].conv(torch.relu(net[1].norm(rounded))) + rounded
        torch.testing.assert_close(net(x), expected, rtol=0, atol=0)


def test_a_checkpoint_with_shared_block_inputs_loads_the_same_network(tmp_path):
    torch.manual_seed(0)
    net = SegResNet(3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1), blocks_up=(1,)).eval()
    calib = torch.rand(1, 1, 16, 16, 16)
    cfg = EfficientQConfig(weight_bits=4, act_bits=8, method="rtn", attention=False, quantize_norm_inputs=True)
    result = quantize(net, calib, cfg, progress=False)
    save_quantized(result, tmp_path / "q.pt")
    loaded = load_quantized(tmp_path / "q.pt", net)
    names = [n for n, m in loaded.named_modules() if shared_input_quantizer(m) is not None]
    assert names == [n for n, m in result.network.named_modules() if shared_input_quantizer(m) is not None] != []
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib), result.network(calib), rtol=0, atol=0)


def test_norm_input_rounding_across_ranks_is_refused_before_any_pass(monkeypatch):
    import monai_effq.ptq.pipeline as pipeline

    monkeypatch.setattr(pipeline, "get_world_size", lambda: 2)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.GroupNorm(2, 4), torch.nn.Conv3d(4, 2, 1))
    config = EfficientQConfig(method="rtn", quantize_norm_inputs=True)
    with pytest.raises(UserInputError, match="quantize_norm_inputs is not supported across ranks"):
        quantize(net, torch.randn(1, 1, 8, 8, 8), config, progress=False)


def test_a_shared_input_rounding_goes_on_a_block_once_and_never_on_a_sequential():
    from monai_effq.ptq.modules import quantize_shared_input

    x = torch.randn(1, 2, 4, 4, 4)
    quantizer = ActivationQuantizer.from_spec(x, ActivationSpec(8, "signed"))
    with pytest.raises(ValueError, match="a Sequential runs every child in turn: round the input of its first child"):
        quantize_shared_input(nn.Sequential(nn.Conv3d(2, 2, 1)), quantizer)
    block = nn.Conv3d(2, 2, 1)
    quantize_shared_input(block, quantizer)
    assert shared_input_quantizer(block) is quantizer
    with pytest.raises(ValueError, match="the input of Conv3d is already quantized: attach one quantizer per block"):
        quantize_shared_input(block, quantizer)
    with torch.no_grad():
        assert torch.equal(block(x), nn.functional.conv3d(quantizer(x), block.weight, block.bias))
