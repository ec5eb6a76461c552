import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from monai.networks.nets import SegResNet, UNet

from monai_effq import EfficientQConfig, quantize, save_quantized
from monai_effq.ptq import QuantizedLayer
from monai_effq.ptq.journal import remove_journal
from monai_effq.utils.errors import OutputWriteError, UserInputError

from .conftest import sphere_volumes

ROOT = Path(__file__).resolve().parents[2]

# One quantization with a journal, slowed after each finished layer when asked (so a test can kill it
# between layers); the network and calibration volume are the same in every process.
CHILD = textwrap.dedent(
    """
    import logging, sys, time
    import torch
    from monai.networks.nets import UNet
    from monai_effq import EfficientQConfig, quantize, save_quantized

    save_path, journal, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])

    class Pause(logging.Handler):
        def emit(self, record):
            time.sleep(pause)

    logging.basicConfig(level=logging.INFO)
    if pause:
        log = logging.getLogger("monai_effq")
        log.setLevel(logging.DEBUG)
        log.addHandler(Pause(logging.DEBUG))
    torch.manual_seed(0)
    net = UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1).eval()
    calibration = torch.randn(1, 1, 24, 24, 24, generator=torch.Generator().manual_seed(1))
    result = quantize(net, calibration, EfficientQConfig(weight_bits=4), progress=False, journal=journal)
    save_quantized(result, save_path)
    """
)


def _child(tmp_path: Path, save: str, journal: str, pause: float = 0.0) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / save), str(tmp_path / journal), str(pause)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def same_checkpoint(a: Path, b: Path) -> bool:
    """Whether two checkpoint files are the same, byte for byte (checkpoints carry no timings)."""
    return a.read_bytes() == b.read_bytes()


def test_killed_run_rerun_gives_the_checkpoint_of_an_uninterrupted_run(tmp_path):
    journal = tmp_path / "resumed.pt.journal"
    # the uninterrupted run needs nothing from the others: it runs while the killed one pauses
    whole = _child(tmp_path, "whole.pt", "whole.pt.journal")
    try:
        killed = _child(tmp_path, "resumed.pt", journal.name, pause=1.0)
        deadline = time.monotonic() + 120
        while not list(journal.glob("*.pt")):
            assert killed.poll() is None, killed.stderr.read().decode()
            assert time.monotonic() < deadline, "no layer was journaled within two minutes"
            time.sleep(0.05)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        finished = len(list(journal.glob("*.pt")))
        assert not (tmp_path / "resumed.pt").exists() and 1 <= finished < 10  # killed mid-run, between layers
        logs = []
        for run in (_child(tmp_path, "resumed.pt", journal.name), whole):
            _, err = run.communicate(timeout=300)
            assert run.returncode == 0, err.decode()
            logs.append(err.decode())
    finally:
        whole.kill()  # no-op once it has finished
    assert f"{finished} layers already finished" in logs[0] and "already finished" not in logs[1]
    assert same_checkpoint(tmp_path / "resumed.pt", tmp_path / "whole.pt")


def test_a_second_run_on_a_journal_in_use_is_refused_and_the_first_keeps_its_layers(small_run, tmp_path):
    net, calibration = small_run
    journal = tmp_path / "model.pt.journal"
    first = _child(tmp_path, "model.pt", journal.name, pause=1.0)
    try:
        deadline = time.monotonic() + 120
        while not list(journal.glob("layer.*.pt")):
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "no layer was journaled within two minutes"
            time.sleep(0.05)
        kept = {p.name: p.read_bytes() for p in journal.glob("layer.*.pt")}
        # other settings: without the lock this run discarded the first one's layers as "another run's"
        with pytest.raises(UserInputError, match=r"journal .*model.pt.journal is in use by another quantization run.*nothing was changed"):
            quantize(net, calibration, EfficientQConfig(weight_bits=2), progress=False, journal=journal)
        assert all(journal.joinpath(name).read_bytes() == data for name, data in kept.items())
    finally:
        first.kill()
        first.wait()
    # a killed run holds no lock: the folder is this run's now
    quantize(net, calibration, EfficientQConfig(weight_bits=2), progress=False, journal=journal)


def _codes(result) -> list[torch.Tensor]:
    return [m.codes for m in result.network.modules() if isinstance(m, QuantizedLayer)]


@pytest.fixture
def small_run():
    torch.manual_seed(0)
    net = UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    calibration, _ = sphere_volumes(1, size=16, seed=2)
    return net, calibration


@pytest.mark.parametrize("per_layer", [False, True], ids=["windows", "per_layer"])
def test_journaled_layers_are_restored_not_solved(small_run, tmp_path, monkeypatch, per_layer):
    net, calibration = small_run
    if per_layer:  # batches of two shapes: each layer gets its own passes over both
        calibration = [calibration, calibration[..., :8]]
    config = EfficientQConfig(weight_bits=4)
    first = quantize(net, calibration, config, progress=False, journal=tmp_path / "j")
    from monai_effq.ptq import pipeline

    def no_solve(*_args, **_kwargs):
        raise AssertionError("a journaled layer was solved again")

    monkeypatch.setattr(pipeline._Run, "_solve", no_solve)
    again = quantize(net, calibration, config, progress=False, journal=tmp_path / "j")
    assert all(torch.equal(a, b) for a, b in zip(_codes(first), _codes(again)))
    with torch.no_grad():
        x = calibration[0] if per_layer else calibration
        assert torch.equal(first.network(x), again.network(x))
    assert [r.mse for r in again.report.layers] == [r.mse for r in first.report.layers]


@pytest.mark.parametrize(
    "change, what",
    [
        ({"config": EfficientQConfig(weight_bits=3)}, "config"),
        ({"calibration": 1}, "calibration data"),
        ({"weights": 1}, "FP weights"),
        ({"body_mask": 1}, "body mask"),
    ],
)
def test_changed_input_starts_afresh_saying_what_changed(small_run, tmp_path, caplog, change, what):
    net, calibration = small_run
    quantize(net, calibration, EfficientQConfig(weight_bits=4), progress=False, journal=tmp_path / "j")
    config = change.get("config", EfficientQConfig(weight_bits=4))
    if "calibration" in change:
        calibration = calibration.flip(-1)
    if "weights" in change:
        with torch.no_grad():
            next(net.parameters()).mul_(1.01)
    mask = (calibration[:, 0] > 0) if "body_mask" in change else None
    with caplog.at_level(logging.INFO, logger="monai_effq"):
        resumed = quantize(net, calibration, config, progress=False, journal=tmp_path / "j", body_mask=mask)
    assert any(f"({what} changed)" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    fresh = quantize(net, calibration, config, progress=False, body_mask=mask)
    assert all(torch.equal(a, b) for a, b in zip(_codes(resumed), _codes(fresh)))


def test_a_network_rebuilt_with_other_settings_and_the_same_weights_starts_afresh(tmp_path, caplog):
    def segresnet(groups: int) -> torch.nn.Module:
        torch.manual_seed(0)  # the same weights: GroupNorm's groups change no parameter
        net = SegResNet(3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1), blocks_up=(1,), norm=("group", {"num_groups": groups}))
        return net.eval()

    calibration = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    config = EfficientQConfig(method="gptq")
    quantize(segresnet(8), calibration, config, progress=False, journal=tmp_path / "j")
    with caplog.at_level(logging.INFO, logger="monai_effq"):
        resumed = quantize(segresnet(4), calibration, config, progress=False, journal=tmp_path / "j")
    assert any("(network architecture changed)" in r.getMessage() for r in caplog.records)
    fresh = quantize(segresnet(4), calibration, config, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(_codes(resumed), _codes(fresh)))


@pytest.mark.parametrize("damage", ["cut_short", "keys_missing"])
def test_unreadable_entry_is_solved_again(small_run, tmp_path, damage):
    net, calibration = small_run
    config = EfficientQConfig(weight_bits=4)
    first = quantize(net, calibration, config, progress=False, journal=tmp_path / "j")
    entry = sorted((tmp_path / "j").glob("*.pt"))[0]
    if damage == "cut_short":
        entry.write_bytes(b"half a file")
    else:  # a whole file that is not a journal entry of this version
        torch.save({"codes": torch.zeros(3, dtype=torch.uint8)}, entry)
    again = quantize(net, calibration, config, progress=False, journal=tmp_path / "j")
    assert all(torch.equal(a, b) for a, b in zip(_codes(first), _codes(again)))
    assert torch.load(entry, weights_only=True)["codes"].dtype == torch.uint8  # journaled afresh


@pytest.mark.parametrize("damage", ["changed_byte", "other_layers_entry", "other_runs_entry"])
def test_a_whole_entry_that_is_not_this_runs_layer_is_solved_again(small_run, tmp_path, caplog, damage):
    net, calibration = small_run
    config = EfficientQConfig(weight_bits=4)
    first = quantize(net, calibration, config, progress=False, journal=tmp_path / "j")
    entries = sorted((tmp_path / "j").glob("*.pt"))
    if damage == "changed_byte":  # torch reads it without complaint
        payload = torch.load(entries[0], weights_only=True)
        payload["codes"].view(-1)[0] ^= 1
        torch.save(payload, entries[0])
    elif damage == "other_layers_entry":  # a file copied under another layer's name
        entries[0].write_bytes(entries[1].read_bytes())
    else:  # a run of other settings that shares the folder wrote it after this run's manifest
        other = quantize(net, calibration, EfficientQConfig(weight_bits=3), progress=False, journal=tmp_path / "k")
        entries[0].write_bytes((tmp_path / "k" / entries[0].name).read_bytes())
        assert not all(torch.equal(a, b) for a, b in zip(_codes(first), _codes(other)))
    with caplog.at_level(logging.WARNING):
        again = quantize(net, calibration, config, progress=False, journal=tmp_path / "j")
    assert f"journal entry {entries[0]} is damaged or from another run" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(_codes(first), _codes(again)))


@pytest.mark.parametrize("damaged", ['{"format": ', "[]"], ids=["cut_short", "not_a_dict"])
def test_a_damaged_manifest_discards_the_journal_and_the_run_starts_afresh(small_run, tmp_path, caplog, damaged):
    net, calibration = small_run
    config = EfficientQConfig(weight_bits=4)
    first = quantize(net, calibration, config, progress=False, journal=tmp_path / "j")
    (tmp_path / "j" / "manifest.json").write_text(damaged)
    with caplog.at_level(logging.INFO, logger="monai_effq"):
        again = quantize(net, calibration, config, progress=False, journal=tmp_path / "j")
    assert any("has a damaged manifest: starting afresh" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert not any("already finished" in r.getMessage() for r in caplog.records)
    assert all(torch.equal(a, b) for a, b in zip(_codes(first), _codes(again)))
    assert json.loads((tmp_path / "j" / "manifest.json").read_text())["format"]  # written whole again


def test_removing_the_journal_of_a_run_that_kept_none_does_nothing(tmp_path):
    (tmp_path / "j").mkdir()
    remove_journal(None)  # a TypeError from shutil on Python 3.13, which crashed rank 0 of a torchrun quantize
    remove_journal(tmp_path / "absent")
    remove_journal(tmp_path / "j")
    assert not (tmp_path / "j").exists()


def test_a_folder_holding_files_a_journal_does_not_write_is_refused_and_keeps_them(small_run, tmp_path):
    net, calibration = small_run
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match=r"holds 1 entries a journal does not write \(notes.txt\).*folder of its own"):
        quantize(net, calibration, EfficientQConfig(weight_bits=4), progress=False, journal=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_checkpoint_saved_into_a_journal_survives_a_run_of_other_settings(small_run, tmp_path):
    net, calibration = small_run
    journal = tmp_path / "j"
    first = quantize(net, calibration, EfficientQConfig(weight_bits=4), progress=False, journal=journal)
    save_quantized(first, journal / "model_w4.pt")
    before = {p.name: p.read_bytes() for p in journal.iterdir()}
    with pytest.raises(UserInputError, match=r"\(model_w4.pt\)"):
        quantize(net, calibration, EfficientQConfig(weight_bits=2), progress=False, journal=journal)
    assert {p.name: p.read_bytes() for p in journal.iterdir()} == before  # nothing removed, nothing written


def test_removing_a_journal_removes_only_what_it_wrote(small_run, tmp_path):
    net, calibration = small_run
    journal = tmp_path / "j"
    quantize(net, calibration, EfficientQConfig(weight_bits=4), progress=False, journal=journal)
    (journal / "notes.txt").write_text("mine")
    remove_journal(journal)
    assert sorted(p.name for p in journal.iterdir()) == ["notes.txt"]
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "encoder.pt").write_bytes(b"a file of the user's")
    remove_journal(tmp_path / "work")  # no journal's manifest: a folder of someone else's
    assert (tmp_path / "work" / "encoder.pt").read_bytes() == b"a file of the user's"


def test_a_journal_of_an_earlier_format_is_discarded_and_the_run_starts_afresh(small_run, tmp_path, caplog):
    net, calibration = small_run
    journal = tmp_path / "j"
    journal.mkdir()
    (journal / "manifest.json").write_text(json.dumps({"format": "monai-effq-journal/2"}))
    torch.save({"codes": torch.zeros(2, dtype=torch.uint8), "scale": torch.ones(1), "report": "{}"}, journal / "model.0.conv.pt")
    with caplog.at_level(logging.WARNING, logger="monai_effq"):
        quantize(net, calibration, EfficientQConfig(weight_bits=4), progress=False, journal=journal)
    assert any("(journal format changed): starting afresh" in r.getMessage() for r in caplog.records)
    assert not (journal / "model.0.conv.pt").exists() and json.loads((journal / "manifest.json").read_text())["format"].endswith("/3")


def test_a_journal_path_that_is_a_file_is_refused_naming_it(small_run, tmp_path):
    net, calibration = small_run
    (tmp_path / "j").write_text("mine")
    with pytest.raises(OutputWriteError, match=r"the journal .*j is a file, not a folder"):
        quantize(net, calibration, EfficientQConfig(weight_bits=4), progress=False, journal=tmp_path / "j")
    assert (tmp_path / "j").read_text() == "mine"


def test_an_operating_systems_clutter_neither_blocks_a_journal_nor_keeps_a_finished_ones_folder(small_run, tmp_path):
    from monai_effq.ptq.journal import journal_unfinished

    net, calibration = small_run
    journal = tmp_path / "j"
    quantize(net, calibration, EfficientQConfig(weight_bits=4), progress=False, journal=journal)
    (journal / ".DS_Store").write_bytes(b"Finder")  # a person looked into the folder during the run
    quantize(net, calibration, EfficientQConfig(weight_bits=4), progress=False, journal=journal)  # resumes
    assert journal_unfinished(journal)
    remove_journal(journal)
    assert not journal.exists() and not journal_unfinished(journal)


def test_an_earlier_formats_journal_discards_its_layer_files_and_keeps_a_checkpoint_saved_beside_them(small_run, tmp_path):
    net, calibration = small_run
    journal = tmp_path / "j"
    result = quantize(net, calibration, EfficientQConfig(weight_bits=4), progress=False, journal=journal)
    for layer in journal.glob("layer.*.pt"):  # as format 2 named them
        layer.rename(journal / layer.name.removeprefix("layer."))
    (journal / "manifest.json").write_text(json.dumps({"format": "monai-effq-journal/2"}))
    save_quantized(result, journal / "model.pt")  # a user's checkpoint, e.g. with journal="."
    with pytest.raises(UserInputError, match=r"holds 1 entries a journal does not write \(model.pt\)"):
        quantize(net, calibration, EfficientQConfig(weight_bits=4), progress=False, journal=journal)
    (journal / "model.pt").rename(tmp_path / "model.pt")
    quantize(net, calibration, EfficientQConfig(weight_bits=4), progress=False, journal=journal)
    assert all(p.name.startswith(("layer.", "manifest")) for p in journal.iterdir())  # format 2's files discarded
