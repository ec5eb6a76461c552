"""The held-out check across ``torch.distributed`` ranks: every rank gets the score of all ranks' windows."""

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from monai_effq.qat import score_windows

from ..ranks import free_port, gloo_rank

RANKS = 2


def _windows(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 3, 5, 5, 5, generator=g), torch.randint(0, 3, (1, 1, 5, 5, 5), generator=g)) for _ in range(2)]


def _loss(logits, label):
    return logits.mean()


def _score_on_rank(rank: int, port: int, scores) -> None:
    with gloo_rank(rank, RANKS, port):
        score = score_windows(nn.Identity(), _windows(rank), _loss, "multiclass", across_ranks=True)
        scores[rank] = (score.loss, score.dice, score.windows)


@pytest.mark.slow
def test_every_rank_scores_the_windows_of_all_ranks_as_one_process_would():
    port = free_port()
    scores = mp.Manager().dict()
    mp.spawn(_score_on_rank, args=(port, scores), nprocs=RANKS, join=True)
    one = score_windows(nn.Identity(), _windows(0) + _windows(1), _loss, "multiclass")
    assert scores[0] == scores[1]  # one decision on every rank
    loss, dice, windows = scores[0]
    assert windows == 4 and math.isclose(loss, one.loss, rel_tol=1e-12)
    assert dice == one.dice  # the Dice counts are whole numbers: their float64 sum is exact in any order
