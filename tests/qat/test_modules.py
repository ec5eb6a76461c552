import torch
import torch.nn as nn

from monai_effq.qat import TrainableQuantizedLayer, straight_through
from monai_effq.quant import UniformGrid


def _layer_with_shadow_weights_past_the_clip() -> TrainableQuantizedLayer:
    torch.manual_seed(1)
    conv = nn.Conv3d(2, 3, 3)
    scale = torch.tensor([0.0123, 0.0321, 0.0071])  # fitted steps, not powers of two
    layer = TrainableQuantizedLayer(conv, conv.weight, conv.bias, UniformGrid(4, "symmetric"), scale, torch.full((3,), 8.0))
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight) * 0.3)  # most weights several clips beyond the grid
    return layer


def test_the_trained_weight_is_exactly_the_frozen_layer_s_weight_also_for_shadow_weights_past_the_clip():
    layer = _layer_with_shadow_weights_past_the_clip()
    frozen = layer.to_quantized()
    assert torch.equal(layer.quantized_weight().detach(), frozen.weight())
    x = torch.randn(1, 2, 6, 6, 6)
    with torch.no_grad():
        assert torch.equal(layer.eval()(x), frozen(x))


def test_straight_through_passes_the_identity_gradient_to_the_shadow_weight():
    x = torch.tensor([0.3, -2.0, 5.0], requires_grad=True)
    out = straight_through(x, torch.tensor([0.25, -0.5, 0.5]))
    assert torch.equal(out.detach(), torch.tensor([0.25, -0.5, 0.5]))
    (out * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 3.0]))
