import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F


def trained_looking_layer(c_in: int, c_out: int, size: int, seed: int, noise: float = 0.02):
    """A 3x3x3 conv with heavy-tailed, channel-scaled weights fed ReLU features, and its FP targets.

    The inputs are perturbed slightly, as the already-quantized layers before it would perturb them.
    """
    g = torch.Generator().manual_seed(seed)
    layer = nn.Conv3d(c_in, c_out, 3, padding=1)
    w = torch.randn(c_out, c_in, 3, 3, 3, generator=g) / (c_in * 27) ** 0.5
    w = w * (torch.rand(c_out, 1, 1, 1, 1, generator=g) + 0.5)
    w = w * (1 + 2 * (torch.rand(w.shape, generator=g) < 0.05))
    layer.weight.data = w
    layer.bias.data = 0.1 * torch.randn(c_out, generator=g)  # not from the global generator: tests run in any order
    mix = torch.randn(c_in, c_in, 3, 3, 3, generator=g) / (c_in * 27) ** 0.5
    x = F.relu(F.conv3d(torch.randn(1, c_in, size, size, size, generator=g), mix, padding=1) + 0.1)
    with torch.no_grad():
        y = layer(x)
    x_quantized = x + noise * x.std() * torch.randn(x.shape, generator=g)
    return layer, x_quantized, y


@pytest.fixture
def make_layer():
    return trained_looking_layer
