"""TorchScript export of a quantized network, for servers that load ``models/model.ts`` as it is.

MONAI Label's bundle loader, Triton and MONAI Deploy run a TorchScript file without the Python code
that built the network, which is what a fake-quant network needs: its layers are monai-effq modules.
``torch.jit.trace`` records the network's operations on one example window; the export then checks
that the traced module, saved and loaded back, gives the network's own output on a fresh input.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from monai_effq.deploy.export import _refuse_a_misfit
from monai_effq.utils.errors import check_integer, check_number
from monai_effq.utils.io import atomic_write

__all__ = ["export_torchscript"]


def export_torchscript(
    network: nn.Module, path: str | os.PathLike, input_shape: Sequence[int], atol: float = 1e-5, seed: int = 0
) -> Path:
    """Trace ``network`` on an ``input_shape`` window and save it where ``torch.jit.load`` finds it.

    Args:
        network: the network to export (e.g. :func:`monai_effq.load_quantized`'s fake-quant network);
            put into eval mode.
        path: the ``.ts`` file to write (atomically).
        input_shape: the window the network will see, ``(batch, channels, *spatial)``: a sliding-window
            inferer's ``roi_size`` with the network's input channels.
        atol: largest absolute difference allowed between the network and the saved file's outputs.
        seed: seed of the random example and check inputs.

    Returns:
        the path written.

    Raises:
        ValueError: when ``input_shape`` is not a batch, channel and 2 or 3 spatial sizes.
        RuntimeError: when the saved module's output differs from the network's by more than ``atol``
            (the file is not written).
    """
    sizes = list(input_shape)
    if len(sizes) not in (4, 5):
        raise ValueError(f"input_shape must be (batch, channels, *spatial) with 2 or 3 positive spatial sizes, got {input_shape!r}.")
    # a size of 32.7 was taken as 32 without a word
    shape = tuple(check_integer(s, f"input_shape[{i}] (of {tuple(input_shape)})", low=1) for i, s in enumerate(sizes))
    atol = check_number(atol, "atol", low=0.0)
    network = network.eval()
    device = next(iter(network.parameters()), torch.empty(0)).device
    generator = torch.Generator().manual_seed(seed)
    # one check input: random inputs of one distribution take the same branches, so a second one
    # found nothing more and cost a third of the bundles' MONAI Label export (3.65 s -> 2.4 s)
    example, *checks = (torch.rand(shape, generator=generator).to(device) for _ in range(2))
    with torch.no_grad():
        try:
            traced = torch.jit.trace(network, example, check_trace=False)
        except RuntimeError:
            _refuse_a_misfit(network, example, setting="input_shape")
            raise
        with atomic_write(path) as tmp:
            # through a Python file: torch's own file writer aborts the process on a full disk ("basic_ios::clear")
            with open(tmp, "wb") as f:
                torch.jit.save(traced, f)
            loaded = torch.jit.load(str(tmp), map_location=device)
            for x in checks:
                diff = (loaded(x) - network(x)).abs().max().item()
                if not diff <= atol:
                    raise RuntimeError(
                        f"the TorchScript trace of {type(network).__name__} differs from the network by {diff:.3g} "
                        f"(> {atol:g}) on a {list(shape)} input, so {path} was not written: the network's forward "
                        "depends on its input's values through Python code that tracing cannot record."
                    )
    return Path(path)
