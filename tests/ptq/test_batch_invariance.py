"""Under WindowByWindow, a window's activations do not depend on the windows batched with it."""

import pytest
import torch
import torch.nn as nn
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import SegResNet, UNet

from monai_effq import EfficientQConfig, quantize
from monai_effq.ptq.batch_invariance import WindowByWindow


def _segresnet() -> nn.Module:
    torch.manual_seed(0)
    return SegResNet(spatial_dims=3, init_filters=8, in_channels=2, out_channels=3, blocks_down=(1, 2), blocks_up=(1,)).eval()


def _unet() -> nn.Module:  # strided and transposed convolutions, batch norms, PReLU
    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=2, out_channels=3, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm="batch").eval()


class _Head(nn.Module):  # a 1x1 convolution and a linear layer over the channels
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 8, 1)
        self.linear = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.conv(x).movedim(1, -1))


def _windows() -> torch.Tensor:
    return torch.randn(6, 2, 16, 16, 16, generator=torch.Generator().manual_seed(1))


def _forward(network: nn.Module, x: torch.Tensor, window_by_window: bool = True) -> torch.Tensor:
    with torch.no_grad():
        if not window_by_window:
            return network(x)
        with WindowByWindow():
            return network(x)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("network", [_segresnet, _unet, _Head], ids=["segresnet", "unet", "head"])
def test_every_split_of_the_windows_gives_the_bits_of_one_batch(network, one_thread):
    net, x = network(), _windows()
    whole = _forward(net, x)
    for size in (1, 2, 4):  # alone, in pairs, and a batch of four followed by a pair
        assert torch.equal(torch.cat([_forward(net, part) for part in x.split(size)]), whole), size


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch's CPU kernel choice differs only with oneDNN")
def test_without_it_a_lone_window_rounds_differently(one_thread):
    net, x = _segresnet(), _windows()
    alone = torch.cat([_forward(net, w, window_by_window=False) for w in x.split(1)])
    assert not torch.equal(alone, _forward(net, x, window_by_window=False))  # what the mode is for
    assert torch.allclose(alone, _forward(net, x), atol=1e-4)  # the same numbers, rounded apart


def test_the_thread_count_does_not_change_a_window(one_thread):
    net, x = _unet(), _windows()
    one = _forward(net, x)
    torch.set_num_threads(2)
    assert torch.equal(_forward(net, x), one)


def test_unbatched_and_non_float32_inputs_keep_their_shape_and_type():
    conv = nn.Conv3d(2, 4, 3, padding="same").double()
    x = torch.randn(2, 5, 5, 5, dtype=torch.float64)
    with torch.no_grad(), WindowByWindow():
        out = conv(x)
    assert out.shape == (4, 5, 5, 5) and out.dtype == torch.float64
    assert torch.allclose(out, conv(x.unsqueeze(0)).squeeze(0).detach())


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch's CPU kernel choice differs only with oneDNN")
def test_paused_runs_plain_pytorch_inside_the_block_and_the_mode_again_after_it(one_thread):
    net, x = _segresnet(), _windows()[:1]
    plain, invariant = _forward(net, x, window_by_window=False), _forward(net, x)
    assert not torch.equal(plain, invariant)  # a lone window: PyTorch's native kernel against oneDNN
    with torch.no_grad(), WindowByWindow() as mode:
        with mode.paused():
            inside = net(x)
        after = net(x)
    assert torch.equal(inside, plain) and torch.equal(after, invariant)


def test_a_fake_quant_network_infers_the_same_bits_with_any_sw_batch_size_inside_it(one_thread):
    volume = torch.randn(1, 2, 40, 40, 40, generator=torch.Generator().manual_seed(2))
    qnet = quantize(_segresnet(), _windows(), EfficientQConfig(weight_bits=4, act_bits=8, method="rtn"), progress=False).network
    outputs = {}
    for size in (1, 4):
        inferer = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=size, overlap=0.25)
        outputs[size] = _forward(lambda x: inferer(x, qnet), volume)
    assert torch.equal(outputs[1], outputs[4])
