"""Networks built the way nnU-Net v2 builds them, without its packages."""

import torch
import torch.nn as nn


class ConvNormNonlin(nn.Module):
    """A block as nnU-Net builds them (``dynamic_network_architectures``' ``ConvDropoutNormReLU``): each
    layer registered by its name and again in the sequence the forward runs."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm = nn.InstanceNorm3d(cout, affine=True)
        self.nonlin = nn.LeakyReLU()
        self.all_modules = nn.Sequential(self.conv, self.norm, self.nonlin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_modules(x)


def nnunet_like(seed: int = 0, in_channels: int = 1) -> nn.Module:
    """Two such blocks and a 1x1x1 head, with the weights of ``seed``, in eval mode (a cascade stage reads
    one more input channel per foreground label of the previous stage)."""
    torch.manual_seed(seed)
    return nn.Sequential(ConvNormNonlin(in_channels, 8), ConvNormNonlin(8, 8), nn.Conv3d(8, 2, 1)).eval()
