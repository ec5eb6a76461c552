"""Forward passes whose result for each window does not depend on the other windows in its batch.

PyTorch chooses a CPU convolution kernel per call, by the batch size among other things: a small
window alone (fewer than about 20,000 input rows) goes to PyTorch's native kernel, the same window
in a batch of two or more to oneDNN, and a 1x1 convolution on one thread to the native kernel
below 16 windows. The two kernels round differently, about 1e-6 apart. A rank holding half of the
calibration windows, or a lone window of a chunk, would then see other activations than one
process holding them all, and the statistics built on them would differ from there on.

Inside :class:`WindowByWindow`, every convolution, transposed convolution and linear layer
computes each window of its batch on its own (one call per window, so the kernel is chosen from
the window's shape alone), and a float32 convolution on CPU always goes to oneDNN directly (the
kernel PyTorch picks for batches; on the demo SegResNet's 32^3 windows, one oneDNN call per window
took less time than the batched call). The norms, activations, sums and resampling of the
supported networks already compute each window apart from the others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["WindowByWindow"]

# the functions that compute a window from its neighbours' rows: their spatial rank
_CONVOLUTIONS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_TRANSPOSED = {torch.conv_transpose1d: 1, torch.conv_transpose2d: 2, torch.conv_transpose3d: 3}


def _expand(value: int | tuple[int, ...] | list[int], dims: int) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [int(value)] * dims


def _convolve(dims: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:  # fmt: skip
    """One window's convolution, through oneDNN where it applies (``F.conv*d``'s arguments)."""
    onednn = (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and not isinstance(padding, str)  # "same" and "valid" stay with PyTorch's own padding rules
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )
    if not onednn:
        conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        return conv(x, weight, bias, stride, padding, dilation, groups)
    return torch.mkldnn_convolution(
        x, weight, bias, _expand(padding, dims), _expand(stride, dims), _expand(dilation, dims), groups
    )


class WindowByWindow(TorchFunctionMode):
    """Within this context, convolutions and linear layers compute each window (index of the first
    axis) of a batch on its own, so that a window's output is the same bits in any batch.

    The result of a whole pass is then the same whether a batch holds all windows or a rank holds
    some of them (measured bit for bit on the bundles' SegResNet and UNet, on 1 and 2 threads,
    against every split of 16 windows). Other batched operations (an attention's ``matmul``) are
    left as they are.

    Example::

        with torch.no_grad(), WindowByWindow():
            logits = network(windows)
    """

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the mode for a block run from inside a pass (a layer's solve in a forward hook): every
        torch call under the mode goes through Python, which a solver's many small operations would pay."""
        self.__exit__(None, None, None)
        try:
            yield
        finally:
            self.__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - TorchFunctionMode signature
        kwargs = kwargs or {}
        if not args or not isinstance(args[0], torch.Tensor):
            return func(*args, **kwargs)
        x, rest = args[0], args[1:]
        if func in _CONVOLUTIONS:
            dims = _CONVOLUTIONS[func]
            if x.dim() != dims + 2:  # an unbatched window
                return _convolve(dims, x.unsqueeze(0), *rest, **kwargs).squeeze(0)
            if x.shape[0] == 1:
                return _convolve(dims, x, *rest, **kwargs)
            return torch.cat([_convolve(dims, w, *rest, **kwargs) for w in x.split(1)])
        batched = (func in _TRANSPOSED and x.dim() == _TRANSPOSED[func] + 2) or (func is F.linear and x.dim() > 1)
        if batched and x.shape[0] > 1:
            return torch.cat([func(w, *rest, **kwargs) for w in x.split(1)])
        return func(*args, **kwargs)
