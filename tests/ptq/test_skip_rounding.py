"""One rounding for an identity-skip residual unit's input: which units get it, what they compute, and
that checkpoints and the ONNX export keep it."""

import copy

import pytest
import torch
import torch.nn as nn
from monai.networks.blocks import ResidualUnit
from monai.networks.nets import UNet

from monai_effq import EfficientQConfig, load_quantized, quantize, save_quantized
from monai_effq.ptq.modules import ActivationQuantizer, QuantizedLayer, shared_input_quantizer
from monai_effq.ptq.skip_rounding import share_skip_roundings


def _unet() -> UNet:
    torch.manual_seed(0)
    return UNet(3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval()


def _quantize(net: nn.Module, **settings) -> nn.Module:
    cfg = EfficientQConfig(weight_bits=4, method="rtn", attention=False, **settings)
    return quantize(net, torch.rand(1, 1, 16, 16, 16), cfg, progress=False).network


def _identity_units(net: nn.Module) -> dict[str, ResidualUnit]:
    return {n: m for n, m in net.named_modules() if isinstance(m, ResidualUnit) and isinstance(m.residual, nn.Identity)}


def _first_conv(unit: ResidualUnit) -> QuantizedLayer:
    return unit.conv.unit0.conv


def test_each_identity_skip_unit_of_a_unet_reads_one_rounding_of_its_input_on_both_paths():
    net = _unet()
    quantized = _quantize(net)
    units = _identity_units(quantized)
    assert units  # the decoder's units keep their channels and resolution
    for unit in units.values():
        assert isinstance(shared_input_quantizer(unit), ActivationQuantizer)
        assert _first_conv(unit).input_quantizer is None
    # units with a convolution on the residual path keep their layers' own roundings
    for unit in quantized.modules():
        if isinstance(unit, ResidualUnit) and not isinstance(unit.residual, nn.Identity):
            assert shared_input_quantizer(unit) is None and _first_conv(unit).input_quantizer is not None


def test_the_skip_adds_the_rounded_input_and_the_first_layer_sees_what_it_saw_before():
    quantized = _quantize(_unet(), share_skip_rounding=False)
    before = copy.deepcopy(quantized)
    assert len(share_skip_roundings(quantized)) == len(_identity_units(quantized)) > 0
    name, unit = next(iter(_identity_units(quantized).items()))
    old = before.get_submodule(name)
    x = torch.randn(1, unit.conv.unit0.conv.layer.in_channels, 4, 4, 4)
    rounded = _first_conv(old).input_quantizer(x)
    with torch.no_grad():
        torch.testing.assert_close(unit(x), old.conv(x) + rounded, rtol=0, atol=0)
        assert not torch.equal(old(x), unit(x))  # the skip changed: it adds the rounded tensor


def test_the_option_off_or_inputs_under_eight_bits_leave_units_as_they_were():
    off = _quantize(_unet(), share_skip_rounding=False)
    assert all(shared_input_quantizer(m) is None for m in off.modules())
    assert share_skip_roundings(_quantize(_unet(), act_bits=None)) == []
    # at 6-bit activations only the last layer's unit (8 bits, last_layer_bits) shares its rounding
    six = _quantize(_unet(), act_bits=6)
    kept = [u for u in _identity_units(six).values() if shared_input_quantizer(u) is None]
    assert kept and all(_first_conv(u).input_quantizer.grid.bits == 6 for u in kept)
    assert all(shared_input_quantizer(u).grid.bits == 8 for u in _identity_units(six).values() if u not in kept)


def test_a_unit_is_given_its_shared_rounding_once():
    quantized = _quantize(_unet())
    assert share_skip_roundings(quantized) == []


def test_a_checkpoint_brings_the_shared_roundings_back_with_the_same_outputs(tmp_path):
    net = _unet()
    result = quantize(net, torch.rand(1, 1, 16, 16, 16), EfficientQConfig(weight_bits=4, method="rtn", attention=False), progress=False)
    save_quantized(result, tmp_path / "q.pt")
    loaded = load_quantized(tmp_path / "q.pt", _unet())
    assert [n for n, m in loaded.named_modules() if shared_input_quantizer(m) is not None] == list(_identity_units(loaded))
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.network(x), rtol=0, atol=0)


def test_the_onnx_export_rounds_a_shared_input_once_for_both_paths(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from monai_effq.deploy import export_onnx

    quantized = _quantize(_unet())
    x = torch.randn(1, 1, 16, 16, 16)
    export_onnx(quantized, tmp_path / "q.onnx", x, dynamic_spatial=False)
    graph = onnx.load(tmp_path / "q.onnx").graph
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    # each unit's rounded input goes to its convolution and to the skip add
    shared = [o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output if sorted(readers.get(o, [])) == ["Add", "Conv"]]
    assert len(shared) == len(_identity_units(quantized))
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {graph.input[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), quantized(x), rtol=1e-4, atol=1e-4)
