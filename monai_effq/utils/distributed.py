"""The few ``torch.distributed`` calls a run spread over ranks needs (``torchrun`` starts the ranks).

Everything here works without an initialised process group: one process is rank 0 of a world of
one, its reductions return their input and communicate nothing. The solver and the grids never
import this module; the PTQ pipeline reduces their statistics through it.
"""

from __future__ import annotations

import atexit
import gc
import os

import torch
import torch.distributed as dist

from monai_effq.utils.errors import UserInputError

__all__ = [
    "all_gather_objects",
    "all_gather_rows",
    "all_reduce_sum",
    "broadcast_object",
    "default_backend",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "is_rank_zero",
    "rank_device",
    "shutdown_process_group",
]

# Python references to destroyed groups, dropped at exit once nothing else holds them (shutdown_process_group)
_DESTROYED: list[dist.ProcessGroup] = []


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_rank_zero() -> bool:
    """Whether this process is the one that writes files (rank 0, or the only process)."""
    return get_rank() == 0


def default_backend() -> str:
    """``"nccl"`` where CUDA GPUs are visible, ``"gloo"`` (CPU) otherwise."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def rank_device() -> str:
    """The device of this rank: ``cuda:<LOCAL_RANK>`` on a GPU machine (``torchrun`` sets it), else ``cpu``.

    Raises:
        UserInputError: when this process's local rank has no GPU of its own (more processes per node
            than GPUs): NCCL takes one GPU per process.
    """
    if not torch.cuda.is_available():
        return "cpu"
    local_rank, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if local_rank >= count:
        raise UserInputError(
            f"local rank {local_rank} has no GPU of its own: this machine has {count} CUDA GPU(s) and NCCL takes one per process. "
            f"Start at most {count} process(es) per node (torchrun --nproc_per_node={count}), or hide the GPUs "
            "(CUDA_VISIBLE_DEVICES='') to run every rank on the CPU with gloo."
        )
    return f"cuda:{local_rank}"


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensors: list[torch.Tensor]) -> int:
    """Sum ``tensors`` over all ranks in place, with one all-reduce of one flat buffer.

    Args:
        tensors: tensors of one dtype, shaped alike on every rank, in the same order.

    Returns:
        the bytes of the buffer reduced (0 without a process group: nothing is communicated).

    Raises:
        ValueError: when the tensors are of more than one dtype.
    """
    if not is_distributed() or not tensors:
        return 0
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"all_reduce_sum reduces tensors of one dtype in one buffer, got {sorted(map(str, dtypes))}.")
    device = _collective_device()
    flat = torch.cat([t.reshape(-1).to(device) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].reshape(t.shape))
        offset += t.numel()
    return flat.numel() * flat.element_size()


def all_gather_rows(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's ``rows`` (of any length along axis 0), concatenated in rank order.

    Args:
        rows: ``(n_r, *shape)`` with the same trailing shape and dtype on every rank; ``n_r`` may differ
            (and be 0).

    Returns:
        ``(all rows, bytes this rank received)``; without a process group ``(rows, 0)``.
    """
    if not is_distributed():
        return rows, 0
    device = _collective_device()
    world = get_world_size()
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    longest = max(sizes)
    padded = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    gathered = torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(rows.device)
    return gathered, padded.numel() * padded.element_size() * (world - 1)


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` without a process group).

    Args:
        obj: a small picklable value (a fingerprint, a count).

    Returns:
        the list of the ranks' values.
    """
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself without a process group).

    Args:
        obj: the value on rank ``src``; what the other ranks pass is ignored.
        src: the rank whose value every rank gets.

    Returns:
        rank ``src``'s value.
    """
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def _join_destroyed_groups() -> None:
    # The workflow that held the group (a DistributedDataParallel's reducer, the config around it) is garbage
    # by now; collecting it leaves ``_DESTROYED`` the last holder. Dropping that reference frees the group
    # through torch's Python holder, which releases the GIL while gloo joins its threads, so a thread that
    # still has to return a tensor to Python can take it.
    gc.collect()
    _DESTROYED.clear()


def shutdown_process_group() -> bool:
    """Destroy the default process group once every rank reached this point, and join its threads before exit.

    ``torch.distributed.destroy_process_group`` unregisters the group but does not stop gloo's worker threads
    while anything still holds it (a ``DistributedDataParallel``'s reducer, objects Python has not collected yet):
    the threads then outlive the script, and one that returns the last collective's tensor to Python while the
    interpreter is finalizing aborts the process ("terminate called without an active exception", exit code -6)
    after the work itself succeeded; torch has no guard for it yet (pytorch/pytorch#190489). So this function also
    registers an exit hook that frees the group while Python is still whole.

    Returns:
        whether a process group was destroyed (``False`` without one).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()  # no rank tears down while another still communicates
    atexit.unregister(_join_destroyed_groups)  # once, however many groups a process destroys
    atexit.register(_join_destroyed_groups)
    _DESTROYED.append(dist.group.WORLD)
    dist.destroy_process_group()
    return True
