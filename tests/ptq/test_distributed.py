"""Quantization across two gloo ranks on CPU equals one process on the same windows."""

import logging
import pickle
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from monai.networks.nets import SegResNet

from monai_effq import EfficientQConfig, quantize
from monai_effq.ptq import QuantizedLayer
from monai_effq.utils import distributed

from ..ranks import free_port, gloo_rank
from ..threads import torch_threads

TIMEOUT_S = 300


def _network() -> torch.nn.Module:
    torch.manual_seed(0)
    return SegResNet(spatial_dims=3, init_filters=8, in_channels=2, out_channels=3, blocks_down=(1, 1), blocks_up=(1,)).eval()


def _windows(count: int, size: int) -> torch.Tensor:
    return torch.randn(count, 2, size, size, size, generator=torch.Generator().manual_seed(3))


def _config(**changes) -> EfficientQConfig:
    return EfficientQConfig(weight_bits=4, **changes)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _rank_main(rank: int, world: int, port: int, out_dir: str, cases: dict[str, tuple[dict, tuple[int, int], str | None]]) -> None:
    """Quantize this rank's share of each case's windows in one process group (with the case's journal,
    if any); ``rank<r>_<case>.pkl`` for each."""
    with gloo_rank(rank, world, port):
        torch.set_num_threads(1)
        calls = []
        all_reduce = dist.all_reduce

        def counted(tensor, *args, **kwargs):
            calls.append(tensor.numel() * tensor.element_size())
            return all_reduce(tensor, *args, **kwargs)

        distributed.dist.all_reduce = counted
        logging.getLogger("monai_effq").setLevel(logging.DEBUG)
        for name, (config, windows, journal) in cases.items():
            calls.clear()
            lines = _Lines()
            logging.getLogger("monai_effq").addHandler(lines)
            share = _windows(*windows).chunk(world)[rank]
            if journal is not None and rank > 0:  # the same path on a disk of its own, as on another node: empty
                journal = f"{journal}.rank{rank}"
            result = quantize(_network(), share, EfficientQConfig.from_dict(config), progress=False, journal=journal)
            logging.getLogger("monai_effq").removeHandler(lines)
            state = {k: v.clone() for k, v in result.network.state_dict().items()}
            layers = [(r.name, r.voxels, r.mse) for r in result.report.layers]
            with open(f"{out_dir}/rank{rank}_{name}.pkl", "wb") as f:
                pickle.dump({"state": state, "layers": layers, "calls": list(calls), "lines": lines.lines,
                             "calibration": result.report.sources["calibration"]}, f)


def _spawn_ranks(main, world: int, *args) -> None:
    """Run ``main(rank, world, port, *args)`` on ``world`` spawned gloo ranks until all finish (killed after TIMEOUT_S)."""
    context = mp.start_processes(main, args=(world, free_port(), *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} ranks did not finish within {TIMEOUT_S} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()


def _run_ranks(
    tmp_path, cases: dict[str, tuple[EfficientQConfig, tuple[int, int], str | None]], world: int = 2
) -> dict[str, list[dict]]:
    """Quantize each case (config, windows, journal) on the same ``world`` spawned gloo ranks (spawned once: each
    pays the imports); each case's outcome per rank (killed after TIMEOUT_S)."""
    jobs = {name: (config.to_dict(), windows, journal) for name, (config, windows, journal) in cases.items()}
    _spawn_ranks(_rank_main, world, str(tmp_path), jobs)
    return {name: [pickle.loads((tmp_path / f"rank{r}_{name}.pkl").read_bytes()) for r in range(world)] for name in cases}


# (windows, their size, config): all windows in one pass; or windows of 20^3 whose largest layer output
# (64000 values) lets 1 MiB of targets hold 4 windows, so they go in 2 interleaved chunks: 8 windows
# give each rank two windows of each chunk; 6 windows leave each rank one chunk with a lone window
# (rank 0 holds 0-2: chunk 0 is {0, 2}, chunk 1 is {1}), which a batched CPU convolution would round
# about 1e-6 apart from the batch of three that one process convolves (ptq.batch_invariance).
CASES = {
    "one_pass": ((4, 24), {}),
    "chunked": ((8, 20), {"target_memory_mib": 1}),
    "lone_window_in_a_chunk": ((6, 20), {"target_memory_mib": 1}),
    # each rank mirrors its own 2 windows: 16 windows a rank, chunked by source with their copies
    "mirrored_in_chunks": ((4, 20), {"target_memory_mib": 1, "calibration_flips": True}),
}


# the chunked case, quantized by one process with a journal that then loses its later layers, as if killed
RESUMED = CASES["chunked"]


def _forget_layers(journal, names: list[str]) -> None:
    """Take ``names`` out of ``journal``, as a run killed before it solved them would have left it."""
    for name in names:
        (journal / f"layer.{name}.pt").unlink()


@pytest.fixture(scope="module")
def cut_short_journal(tmp_path_factory):
    """A journal one process left holding its first layers only; that process's uninterrupted result; the names
    of the layers the journal keeps."""
    journal = tmp_path_factory.mktemp("journal") / "model.pt.journal"
    (windows, changes) = RESUMED
    with torch_threads(1):
        single = quantize(_network(), _windows(*windows), _config(**changes), progress=False, journal=journal)
    order = [r.name for r in single.report.layers]
    kept = order[: len(order) // 2]
    _forget_layers(journal, order[len(kept) :])
    return journal, single, kept


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, cut_short_journal) -> dict[str, list[dict]]:
    """Every case quantized on two gloo ranks, and the cut-short journal resumed by them: ``{case: [rank 0's
    outcome, rank 1's]}``."""
    cases = {name: (_config(**changes), windows, None) for name, (windows, changes) in CASES.items()}
    cases["resumed"] = (_config(**RESUMED[1]), RESUMED[0], str(cut_short_journal[0]))
    return _run_ranks(tmp_path_factory.mktemp("ranks"), cases)


@pytest.fixture(scope="module", params=list(CASES))
def one_and_two(request, two_ranks):
    windows, changes = CASES[request.param]
    with torch_threads(1):  # as each rank: the float32 products of the reported errors depend on it
        single = quantize(_network(), _windows(*windows), _config(**changes), progress=False)
    return single, two_ranks[request.param], request.param


def test_two_gloo_ranks_give_the_checkpoint_of_one_process_on_the_same_windows(one_and_two):
    single, ranks, _ = one_and_two
    expected = single.network.state_dict()
    assert sum(isinstance(m, QuantizedLayer) for m in single.network.modules()) > 5
    for outcome in ranks:
        assert outcome["state"].keys() == expected.keys()
        different = [k for k, v in expected.items() if not torch.equal(v, outcome["state"][k])]
        assert not different, f"differ from one process: {different}"
        # exact sums: the same statistics, so the same reported errors, to the last bit
        assert outcome["layers"] == [(r.name, r.voxels, r.mse) for r in single.report.layers]
        assert outcome["calibration"] == single.report.sources["calibration"]


def test_each_layer_all_reduces_its_statistics_once_and_logs_their_size(one_and_two):
    single, ranks, _ = one_and_two
    names = [r.name for r in single.report.layers]
    for outcome in ranks:
        logged = [line for line in outcome["lines"] if "all-reduce:" in line]
        assert [line.split()[0] for line in logged] == names
        for line in logged:
            sent, stats = int(line.split()[2]), int(line.split()[5])
            assert sent == stats
        # one all-reduce per layer plus one for the class-attention counts; all of statistics size
        per_layer = [int(line.split()[2]) for line in logged]
        counts_bytes = outcome["calls"][0]
        assert outcome["calls"] == [counts_bytes] + per_layer
        assert counts_bytes == 3 * 8  # the float64 voxel counts of the three classes


def test_two_ranks_resume_a_journal_one_process_left_and_rank_zero_completes_it(two_ranks, cut_short_journal):
    journal, single, kept = cut_short_journal
    names = [r.name for r in single.report.layers]
    expected = single.network.state_dict()
    for rank, outcome in enumerate(two_ranks["resumed"]):
        assert all(torch.equal(v, outcome["state"][k]) for k, v in expected.items())
        assert outcome["layers"] == [(r.name, r.voxels, r.mse) for r in single.report.layers]
        # the journaled layers came from rank 0's journal, not from a solve: only the others reduced statistics
        solved = [line.split()[0] for line in outcome["lines"] if "all-reduce:" in line]
        assert solved == [n for n in names if n not in kept]
        resumed = [line for line in outcome["lines"] if "already finished" in line]
        assert resumed == ([f"resuming from journal {journal}: {len(kept)} layers already finished"] if rank == 0 else [])
    assert sorted(p.stem.removeprefix("layer.") for p in journal.glob("*.pt")) == sorted(names)  # rank 0 journaled the layers solved after
    assert not journal.with_name(f"{journal.name}.rank1").exists()  # rank 1 read and wrote no journal of its own

    # and the journal the ranks completed resumes in one process
    _forget_layers(journal, names[len(kept) :])
    with torch_threads(1):
        again = quantize(_network(), _windows(*RESUMED[0]), _config(**RESUMED[1]), progress=False, journal=journal)
    assert all(torch.equal(v, again.network.state_dict()[k]) for k, v in expected.items())


# what rank 1 is given otherwise than rank 0, in ways the ranks' summed statistics would hide
DISAGREEMENTS = ("weights", "bits", "task", "window_shape")


def _disagreeing_rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    """Quantize with rank 1 given another FP network, bits, task or window shape; ``rank<r>_refusals.pkl``: each
    case's error, or ``None`` where the run went through."""
    with gloo_rank(rank, world, port):
        torch.set_num_threads(1)
        refusals = {}
        for case in DISAGREEMENTS:
            net, config, task, size = _network(), _config(), "multilabel", 16
            if rank == 1:
                if case == "weights":  # a node whose copy of the checkpoint differs
                    with torch.no_grad():
                        next(net.parameters()).mul_(1.1)
                config = EfficientQConfig(weight_bits=2) if case == "bits" else config
                task = "multiclass" if case == "task" else task
                size = 20 if case == "window_shape" else size
            try:
                quantize(net, _windows(2, size), config, task=task, progress=False)
                refusals[case] = None
            except ValueError as e:
                refusals[case] = str(e)
        with open(f"{out_dir}/rank{rank}_refusals.pkl", "wb") as f:
            pickle.dump(refusals, f)


def test_ranks_given_other_weights_settings_task_or_window_shapes_are_refused_on_every_rank(tmp_path):
    _spawn_ranks(_disagreeing_rank_main, 2, str(tmp_path))
    ranks = [pickle.loads((tmp_path / f"rank{r}_refusals.pkl").read_bytes()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank stops with the same message: none waits for the others
    expected = {
        "weights": "the ranks were given different FP weights: rank(s) [1] differ from rank 0",
        "bits": "the ranks were given different config: rank(s) [1] differ from rank 0",
        "task": "the ranks were given different task: rank(s) [1] differ from rank 0",
        "window_shape": "the ranks' windows differ in shape (rank 0: (2, 16, 16, 16), rank 1: (2, 20, 20, 20))",
    }
    for case, message in expected.items():
        assert ranks[0][case] is not None and message in ranks[0][case], (case, ranks[0][case])
