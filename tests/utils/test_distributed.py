"""The torch.distributed helpers: one process is a world of one; two gloo ranks reduce and gather."""

import os
import pickle
import re
import subprocess
import sys
import textwrap

import torch
import torch.multiprocessing as mp

from monai_effq.utils import distributed

from ..ranks import free_port, gloo_rank


def test_without_a_process_group_nothing_is_communicated():
    t = torch.arange(3.0, dtype=torch.float64)
    assert distributed.all_reduce_sum([t]) == 0 and torch.equal(t, torch.arange(3.0, dtype=torch.float64))
    rows, received = distributed.all_gather_rows(torch.ones(2, 3))
    assert received == 0 and rows.shape == (2, 3)
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.is_rank_zero()) == (0, 1, True)
    assert distributed.default_backend() == ("nccl" if torch.cuda.is_available() else "gloo")
    assert distributed.shutdown_process_group() is False


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    with gloo_rank(rank, 2, port):
        a = torch.full((2, 3), float(rank + 1), dtype=torch.float64)
        b = torch.tensor([10.0 * (rank + 1)], dtype=torch.float64)
        sent = distributed.all_reduce_sum([a, b])
        rows, _ = distributed.all_gather_rows(torch.full((rank + 1, 2), float(rank)))
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
            pickle.dump((a, b, sent, rows, distributed.all_gather_objects(f"r{rank}")), f)


def test_two_ranks_sum_in_one_buffer_and_gather_rows_of_different_lengths(tmp_path):
    port = free_port()
    context = mp.start_processes(_rank_main, args=(port, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    try:
        for _ in range(12):
            if context.join(timeout=5):
                break
        else:
            raise AssertionError("the two ranks did not finish within 60 s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    for rank in range(2):
        a, b, sent, rows, names = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        assert torch.equal(a, torch.full((2, 3), 3.0, dtype=torch.float64)) and b.item() == 30.0
        assert sent == 7 * 8  # six and one float64 values, one buffer
        assert rows.tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        assert names == ["r0", "r1"]


# A workflow's end as `python -m monai.bundle run` has it: the DistributedDataParallel is garbage in a
# reference cycle (the workflow and its config) that no collection has freed yet when Python exits.
_WORKFLOW_END = textwrap.dedent(
    """
    import atexit, gc, os, sys
    import torch, torch.distributed as dist
    from monai_effq.utils import distributed

    gc.disable()  # whether a collection happens to run before exit depends on allocation counts
    threads = lambda: len(os.listdir(f"/proc/{os.getpid()}/task"))
    before = threads()
    # registered first, so it runs last of the exit hooks, just before Python finalizes
    atexit.register(lambda: print(f"threads: {before} before the group, {threads()} at exit", flush=True))

    def workflow():
        dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=0, world_size=1)
        network = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
        network(torch.randn(4, 3)).sum().backward()
        dist.all_reduce(torch.ones(5))
        config = {"network": network}
        config["self"] = config
        print(f"threads: {threads()} with the group", flush=True)
        if sys.argv[2] == "shutdown_process_group":
            assert distributed.shutdown_process_group() is True
        else:
            dist.destroy_process_group()

    workflow()
    """
)


def _threads_at_exit(tmp_path, teardown: str) -> tuple[int, int, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", _WORKFLOW_END, str(tmp_path / teardown), teardown]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    (during,) = re.findall(r"threads: (\d+) with the group", res.stdout)
    before, at_exit = re.findall(r"threads: (\d+) before the group, (\d+) at exit", res.stdout)[0]
    return int(before), int(during), int(at_exit)


def test_shutdown_process_group_joins_the_group_threads_before_python_finalizes(tmp_path):
    # A gloo thread still alive when Python finalizes aborts the process if it hands a tensor back to
    # Python then ("terminate called without an active exception", exit code -6): it happened to a rank
    # of tests/bundles/test_distributed.py once its training had finished.
    before, during, at_exit = _threads_at_exit(tmp_path, "shutdown_process_group")
    assert during > before and at_exit == before
    # torch's destroy_process_group alone leaves them to the finalizer while the network holds the group
    before, during, at_exit = _threads_at_exit(tmp_path, "destroy_process_group")
    assert at_exit == during > before
