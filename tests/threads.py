"""Run a block of a test on a given number of torch threads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["torch_threads"]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Compute on ``n`` torch threads inside the block, then on as many as before it.

    Args:
        n: the number of intra-op threads inside the block.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
