import pytest
import torch
from monai.networks.nets import UNet

from ..threads import torch_threads


def sphere_volumes(n: int, size: int = 24, seed: int = 0, radius=(3, 7)):
    """Noisy volumes with one bright sphere each and the sphere's mask as label (a tiny imbalanced task)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    images, labels = [], []
    for _ in range(n):
        center = torch.randint(radius[1], size - radius[1], (3,), generator=g).float()
        r = torch.empty(1).uniform_(*radius, generator=g)
        mask = ((grid - center[:, None, None, None]).pow(2).sum(0) < r**2).float()
        images.append(mask * 1.5 + 0.3 * torch.randn(size, size, size, generator=g))
        labels.append(mask)
    return torch.stack(images)[:, None], torch.stack(labels)[:, None].long()


@pytest.fixture(scope="session")
def trained_unet():
    """A small MONAI UNet (ConvTranspose, InstanceNorm, PReLU) trained for a few seconds."""
    torch.manual_seed(0)
    net = UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    x, y = sphere_volumes(16, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    weight = torch.tensor([1.0, 5.0])
    with torch_threads(2):  # the network the tests' figures were measured on, also on a 1-thread xdist worker
        for step in range(60):
            i = torch.randint(0, 16, (4,))
            loss = torch.nn.functional.cross_entropy(net(x[i]), y[i, 0], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="session")
def validation_spheres():
    return sphere_volumes(6, seed=1)


def dice(net, x, y) -> float:
    with torch.no_grad():
        pred = net(x).argmax(1)
    inter = ((pred == 1) & (y[:, 0] == 1)).sum().item()
    return 2 * inter / ((pred == 1).sum().item() + (y[:, 0] == 1).sum().item() + 1e-8)
