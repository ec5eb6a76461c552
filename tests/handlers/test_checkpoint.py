import os
import re

import pytest
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver

from monai_effq.handlers import AtomicCheckpointSaver
from monai_effq.utils.errors import OutputWriteError
from tests.bundles.conftest import BUNDLES, ROOT


def _train(saver_class, folder, scores=(0.2, 0.5, 0.4)):
    """Three epochs of a tiny network, validated after each, saving the final weights and the best score's as
    the bundles' train.json does."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    trainer = Engine(lambda engine, batch: net.weight.data.add_(0.1))

    def score(engine, batch):
        engine.state.key_metric_name = "mean_dice"
        engine.state.metrics["mean_dice"] = scores[trainer.state.epoch - 1]

    validator = Engine(score)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: validator.run([0]))
    saver_class(save_dir=str(folder), save_dict={"model": net}, save_final=True, final_filename="model_final.pt").attach(trainer)
    saver_class(save_dir=str(folder), save_dict={"model": net}, save_key_metric=True, key_metric_filename="model_best.pt").attach(validator)
    trainer.run([0], max_epochs=len(scores))
    return net


def _weights(path):
    return torch.load(path, weights_only=True)["weight"] if path.is_file() else None


def test_the_atomic_saver_writes_the_files_and_weights_monai_s_saver_writes(tmp_path):
    _train(CheckpointSaver, tmp_path / "monai")
    _train(AtomicCheckpointSaver, tmp_path / "ours")
    names = sorted(p.name for p in (tmp_path / "monai").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ours").iterdir()) and "model_final.pt" in names
    for name in names:
        assert torch.equal(_weights(tmp_path / "monai" / name), _weights(tmp_path / "ours" / name)), name
    # the best is epoch 2's (0.5), two steps of 0.1 from the start, and the final weights moved on
    assert not torch.equal(_weights(tmp_path / "ours" / "model_best.pt"), _weights(tmp_path / "ours" / "model_final.pt"))


def test_a_checkpoint_save_that_fails_part_way_leaves_the_earlier_file_and_no_partial_one(tmp_path, monkeypatch):
    _train(AtomicCheckpointSaver, tmp_path)
    before = _weights(tmp_path / "model_final.pt")

    def full_disk(obj, f, **kwargs):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OutputWriteError, match=re.escape(f"could not write {tmp_path / 'model_final.pt'}: No space left")):
        _train(AtomicCheckpointSaver, tmp_path)
    monkeypatch.undo()
    assert torch.equal(_weights(tmp_path / "model_final.pt"), before)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_checkpoints_get_the_mode_the_umask_gives(tmp_path):
    old = os.umask(0o027)
    try:
        _train(AtomicCheckpointSaver, tmp_path)
    finally:
        os.umask(old)
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {0o640}


@pytest.mark.parametrize("name", list(BUNDLES))
def test_every_checkpoint_a_bundle_trains_is_written_whole(name):
    configs = sorted((ROOT / "bundles" / name / "configs").glob("*.json"))
    savers = [t for c in configs for t in re.findall(r'"_target_": "([^"]*CheckpointSaver)"', c.read_text())]
    assert len(savers) == 2 and set(savers) == {"monai_effq.handlers.AtomicCheckpointSaver"}


def test_a_checkpoint_folder_that_cannot_be_made_is_named_when_the_saver_is_built(tmp_path):
    (tmp_path / "runs").write_text("a file where the folder would be")
    net = torch.nn.Linear(3, 2)
    with pytest.raises(OutputWriteError, match=r"cannot write .*runs/models: .*runs is a file, so no folder can be made"):
        AtomicCheckpointSaver(save_dir=str(tmp_path / "runs" / "models"), save_dict={"model": net}, save_final=True)
    with pytest.raises(OutputWriteError, match="is a file, so no folder can be made"):
        AtomicCheckpointSaver(str(tmp_path / "runs" / "models"), {"model": net}, save_final=True)
