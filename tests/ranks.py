"""Spawned test processes as the ranks of one gloo process group on this machine."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import torch.distributed as dist

from monai_effq.utils import distributed

__all__ = ["free_port", "gloo_rank"]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now, for the ranks to meet at (or a test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, port: int) -> Iterator[None]:
    """This process as ``rank`` of ``world`` gloo ranks meeting at ``port`` inside the block.

    The group ends as the bundles' ``multi_gpu_*.json`` overlays end it (``shutdown_process_group``),
    or, when the block raises, without the barrier: another rank may be waiting in a collective.

    Args:
        rank: this process's rank.
        world: the number of ranks.
        port: a port of 127.0.0.1 (:func:`free_port`, found by the parent before it spawns the ranks).
    """
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    distributed.shutdown_process_group()
