"""The torch.distributed helpers: one process is a world of one; two gloo ranks reduce and gather."""

import pickle
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from monai_effq.utils import distributed


def test_without_a_process_group_nothing_is_communicated():
    t = torch.arange(3.0, dtype=torch.float64)
    assert distributed.all_reduce_sum([t]) == 0 and torch.equal(t, torch.arange(3.0, dtype=torch.float64))
    rows, received = distributed.all_gather_rows(torch.ones(2, 3))
    assert received == 0 and rows.shape == (2, 3)
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.is_rank_zero()) == (0, 1, True)
    assert distributed.default_backend() == ("nccl" if torch.cuda.is_available() else "gloo")


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        a = torch.full((2, 3), float(rank + 1), dtype=torch.float64)
        b = torch.tensor([10.0 * (rank + 1)], dtype=torch.float64)
        sent = distributed.all_reduce_sum([a, b])
        rows, _ = distributed.all_gather_rows(torch.full((rank + 1, 2), float(rank)))
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
            pickle.dump((a, b, sent, rows, distributed.all_gather_objects(f"r{rank}")), f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_sum_in_one_buffer_and_gather_rows_of_different_lengths(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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
