"""A transposed convolution's per-channel scales run along its weight's axis 1 in every module form,
and reduce_range re-rounds weights with the grid's rounding."""

import pytest
import torch
import torch.nn as nn

from monai_effq import EfficientQConfig, quantize
from monai_effq.deploy.export import REDUCED_WEIGHT_RANGE, QdqLayer
from monai_effq.ptq import QuantizedConvTranspose, QuantizedLayer, QuantizedLinear
from monai_effq.qat import TrainableQuantizedLayer, prepare_finetune
from monai_effq.quant import UniformGrid


def _transposed(groups: int = 1) -> QuantizedConvTranspose:
    """A 4-bit midrise ConvTranspose3d with a different step per output channel.

    As many input as output channels, so scales applied along the wrong axis would still broadcast.
    """
    torch.manual_seed(0)
    conv = nn.ConvTranspose3d(6, 6, 2, stride=2, groups=groups)
    codes = torch.randint(0, 16, conv.weight.shape).to(torch.uint8)
    grid = UniformGrid(4, "midrise")
    return QuantizedConvTranspose(conv, codes, torch.linspace(0.01, 0.06, 6), torch.full((6,), grid.fixed_zero_point), grid, conv.bias)


def _reference_weight(module: QuantizedLayer) -> torch.Tensor:
    """``scale[o] * (codes - zero_point[o])``, element by element, ``o`` the output channel an element feeds."""
    c_in, out_per_group = module.codes.shape[:2]
    in_per_group = c_in // module.layer.groups
    weight = torch.empty(module.codes.shape)
    for i in range(c_in):
        for j in range(out_per_group):
            o = (i // in_per_group) * out_per_group + j
            weight[i, j] = module.scale[o] * (module.codes[i, j].float() - module.zero_point[o])
    return weight


@pytest.mark.parametrize("groups", [1, 2], ids=["plain", "grouped"])
def test_fake_quant_and_qat_scale_a_transposed_convolutions_output_channels_on_axis_1(groups):
    module = _transposed(groups)
    expected = _reference_weight(module)
    assert module.channel_axis == 1 and torch.equal(module.weight(), expected)
    trainable = TrainableQuantizedLayer.from_quantized(module)
    assert torch.equal(trainable.codes(), module.codes.long())
    assert torch.equal(trainable.quantized_weight(), expected)
    assert torch.equal(trainable.weight_step().expand_as(expected) * (module.codes.float() - 7.5), expected)
    assert torch.equal(trainable.to_quantized().weight(), expected)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_the_export_form_scales_a_transposed_convolutions_output_channels_on_axis_1(exporter):
    module = _transposed().eval()
    qdq = QdqLayer(module, exporter=exporter)
    assert qdq.axis == 1 and tuple(qdq.weight_scale.shape) == (6,)
    x = torch.randn(1, 6, 3, 3, 3)
    with torch.no_grad():
        assert torch.equal(qdq(x), nn.functional.conv_transpose3d(x, _reference_weight(module), module.bias, stride=2))


def test_a_grouped_transposed_convolution_with_per_channel_scales_is_refused_by_the_export():
    with pytest.raises(ValueError, match="grouped transposed convolution with per-channel scales"):
        QdqLayer(_transposed(groups=2))


def test_exporting_a_network_with_such_a_layer_names_it_and_the_override_that_exports_it(tmp_path):
    from monai_effq import EfficientQConfig, export_onnx, quantize
    from monai_effq.utils.errors import UserInputError

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.ConvTranspose3d(8, 6, 2, stride=2, groups=2), nn.Conv3d(6, 3, 1))
    x = torch.randn(1, 1, 16, 16, 16)
    result = quantize(net.eval(), x, EfficientQConfig(weight_bits=4, per_channel=True), progress=False)
    with pytest.raises(UserInputError, match=r"layer 2 is a grouped transposed convolution .*\(overrides=\{'2': \{'per_channel': False\}\}"):
        export_onnx(result, tmp_path / "net.onnx", (1, 1, 16, 16, 16))
    assert not (tmp_path / "net.onnx").exists()


def test_quantize_and_finetune_build_transposed_layers_with_the_plans_channel_axis():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.ConvTranspose3d(4, 4, 2, stride=2), nn.Conv3d(4, 2, 1)).eval()
    x = torch.randn(1, 1, 4, 4, 4)
    config = EfficientQConfig(per_channel=True, method="rtn", attention=False)
    ptq = quantize(net, x, config, progress=False)
    trainable = prepare_finetune(net, x, config)
    for layers in ({n: m for n, m in ptq.network.named_modules() if isinstance(m, QuantizedLayer)}, trainable.layers()):
        assert {name: m.channel_axis for name, m in layers.items()} == {"0": 0, "2": 1, "3": 0}
    assert torch.equal(ptq.network.get_submodule("2").weight(), _reference_weight(ptq.network.get_submodule("2")))


@pytest.mark.parametrize("top, factor", [(254, 2), (255, 3)], ids=["ties", "thirds"])
def test_reduce_range_rounds_wide_int8_weights_half_to_even_onto_seven_bits(top, factor):
    linear = nn.Linear(top + 1, 1)
    codes = torch.arange(top + 1).reshape(1, -1)  # every int8 offset from -128 to top - 128
    module = QuantizedLinear(linear, codes, torch.tensor(0.01), torch.tensor(128.0), UniformGrid(8, "signed"), linear.bias)
    qdq = QdqLayer(module, reduce_range=True)
    lo, hi = REDUCED_WEIGHT_RANGE
    # Python's round() rounds halves to even, as torch.round does
    expected = [min(max(round((c - 128) / factor), lo), hi) for c in range(top + 1)]
    assert qdq.reduced and qdq.weight_codes.dtype == torch.int8
    assert qdq.weight_codes.reshape(-1).tolist() == expected
    assert qdq.weight_scale == pytest.approx(0.01 * factor, rel=1e-6)
