"""The held-out check across ``torch.distributed`` ranks: every rank gets the score of all ranks' windows."""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from monai_effq.qat import score_windows
from monai_effq.utils import distributed

RANKS = 2


def _windows(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 3, 5, 5, 5, generator=g), torch.randint(0, 3, (1, 1, 5, 5, 5), generator=g)) for _ in range(2)]


def _loss(logits, label):
    return logits.mean()


def _score_on_rank(rank: int, port: int, scores) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS)
    try:
        score = score_windows(nn.Identity(), _windows(rank), _loss, "multiclass", across_ranks=True)
        scores[rank] = (score.loss, score.dice, score.windows)
    except BaseException:
        dist.destroy_process_group()  # no barrier: the other rank may be waiting in a collective
        raise
    distributed.shutdown_process_group()


@pytest.mark.slow
def test_every_rank_scores_the_windows_of_all_ranks_as_one_process_would():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scores = mp.Manager().dict()
    mp.spawn(_score_on_rank, args=(port, scores), nprocs=RANKS, join=True)
    one = score_windows(nn.Identity(), _windows(0) + _windows(1), _loss, "multiclass")
    assert scores[0] == scores[1]  # one decision on every rank
    loss, dice, windows = scores[0]
    assert windows == 4 and math.isclose(loss, one.loss, rel_tol=1e-12)
    assert dice == one.dice  # the Dice counts are whole numbers: their float64 sum is exact in any order
