import errno
import io
import os
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from monai_effq.utils.errors import OutputWriteError, UserInputError
from monai_effq.utils.io import atomic_directory, atomic_files, atomic_write, atomic_write_text


def test_a_written_file_gets_the_mode_the_umask_gives_ordinary_files(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "report.json", "{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_an_interrupted_write_leaves_the_old_file_and_no_partial_one(tmp_path):
    path = atomic_write_text(tmp_path / "model.pt", "old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


@pytest.mark.parametrize("fails", [False, True], ids=["written", "interrupted"])
def test_a_write_that_keeps_the_extension_gives_the_writer_it_and_leaves_no_staging_folder(tmp_path, fails):
    path = atomic_write_text(tmp_path / "sub-01.T1w_seg.nii.gz", "old")
    with pytest.raises(RuntimeError) if fails else nullcontext():
        with atomic_write(path, keep_extension=True) as tmp:
            # the format's extension, not the output's name that a search for finished outputs would find
            assert tmp.name == "partial.nii.gz" and tmp.parent.parent == tmp_path and tmp.parent.name.startswith(".")
            tmp.write_text("new")
            if fails:
                raise RuntimeError("interrupted")
    assert path.read_text() == ("old" if fails else "new")
    assert [p.name for p in tmp_path.iterdir()] == ["sub-01.T1w_seg.nii.gz"]


def test_an_interrupted_directory_write_leaves_the_old_folder_whole_and_no_partial_one(tmp_path):
    from monai_effq.utils.io import atomic_directory

    dest = tmp_path / "bundle"
    with atomic_directory(dest) as staging:
        (staging / "model.ts").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_directory(dest) as staging:
            (staging / "model.ts").write_text("half")
            raise RuntimeError("interrupted")
    assert (dest / "model.ts").read_text() == "first"
    with atomic_directory(dest) as staging:
        (staging / "model.ts").write_text("second")
    assert (dest / "model.ts").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


# The writer loads monai_effq/utils/io.py (standard library only) by its path: importing it as
# monai_effq.utils.io would first import the whole package, torch and MONAI (about 4 s a process).
_WRITER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("monai_effq_io", sys.argv[2])
io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io)
with io.atomic_write(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half a checkpoint")
    print(tmp, flush=True)
    time.sleep(120)
"""


def _start_writer(path):
    """A process stopped in the middle of an atomic write of ``path``; returns it and its temporary."""
    import subprocess
    import sys

    from monai_effq.utils import io

    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), io.__file__], stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


def test_a_write_killed_mid_way_leaves_no_temporary_after_the_next_write(tmp_path):
    import signal

    path = atomic_write_text(tmp_path / "model.pt", "old")
    writer, tmp = _start_writer(path)
    assert tmp.is_file() and tmp.parent == tmp_path
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert tmp.is_file()  # what kill -9 leaves behind
    atomic_write_text(tmp_path / "report.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "report.json"]
    assert path.read_text() == "old"


def test_a_concurrent_writers_temporary_survives_another_write_to_the_folder(tmp_path):
    writer, tmp = _start_writer(tmp_path / "model.pt")
    try:
        atomic_write_text(tmp_path / "model.pt", "the other run's")
        assert tmp.read_bytes() == b"half a checkpoint"
    finally:
        writer.kill()
        writer.wait()


def test_a_temporary_of_another_host_or_owner_is_removed_only_once_a_day_old(tmp_path):

    from monai_effq.utils.io import STALE_AFTER_SECONDS, remove_stale_temporaries

    other_host = tmp_path / ".model.pt.otherhost.4242.abcd1234.partial"
    old_format = tmp_path / ".model.pt.k2j4h5l6.partial"
    recent = tmp_path / ".report.json.otherhost.4243.efgh5678.partial"
    for p in (other_host, old_format, recent):
        p.write_text("half")
    day_ago = time.time() - STALE_AFTER_SECONDS - 60
    for p in (other_host, old_format):
        os.utime(p, (day_ago, day_ago))
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([other_host, old_format])
    assert [p.name for p in tmp_path.iterdir()] == [recent.name]


def test_a_live_writer_in_another_pid_namespace_of_this_host_keeps_its_temporary(tmp_path, monkeypatch):
    # two containers sharing the host name (docker --network host) count their pids apart: the other one's
    # writer can hold a pid that is no process here
    import subprocess
    import sys

    from monai_effq.utils import io as effq_io
    from monai_effq.utils.io import remove_stale_temporaries

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    with monkeypatch.context() as other_container:
        other_container.setattr(effq_io, "_pid_namespace", lambda: 4026531999)
        theirs = tmp_path / f"{effq_io._temporary_prefix(tmp_path / 'model.pt').rsplit('.', 2)[0]}.{dead}.abcd1234.partial"
    ours = tmp_path / f".report.json.{effq_io._host()}.{dead}.efgh5678.partial"
    for p in (theirs, ours):
        p.write_text("half")
    assert remove_stale_temporaries(tmp_path) == [ours]
    assert [p.name for p in tmp_path.iterdir()] == [theirs.name]


def test_a_staging_folder_of_a_dead_process_is_removed_by_the_next_directory_write(tmp_path):
    import subprocess
    import sys

    from monai_effq.utils import io as effq_io
    from monai_effq.utils.io import atomic_directory

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    staging = tmp_path / f".bundle.{effq_io._host()}.{int(dead.stdout)}.x1y2z3w4.partial"
    (staging / "models").mkdir(parents=True)
    with atomic_directory(tmp_path / "bundle") as fresh:
        (fresh / "model.ts").write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_this_processs_own_temporaries_even_a_day_old_and_a_missing_folder_are_left_alone(tmp_path):
    from monai_effq.utils import io as effq_io
    from monai_effq.utils.io import STALE_AFTER_SECONDS, remove_stale_temporaries

    mine = tmp_path / f".model.pt.{effq_io._host()}.{os.getpid()}.abcd1234.partial"
    not_a_temporary = tmp_path / ".model.pt.partial.bak"
    for p in (mine, not_a_temporary):
        p.write_text("half")
        day_ago = time.time() - STALE_AFTER_SECONDS - 60
        os.utime(p, (day_ago, day_ago))
    assert remove_stale_temporaries(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, not_a_temporary.name])
    assert remove_stale_temporaries(tmp_path / "missing") == []
    assert remove_stale_temporaries(mine) == []  # a file, not a folder


@pytest.mark.parametrize("fails", [False, True], ids=["written", "interrupted"])
def test_files_staged_for_a_shared_folder_appear_together_on_success_and_not_at_all_otherwise(tmp_path, fails):
    from monai_effq.utils.io import atomic_files

    (tmp_path / "mask_seg.nii.gz").write_text("mask")
    atomic_write_text(tmp_path / "dice_raw.csv", "old")
    with pytest.raises(RuntimeError) if fails else nullcontext():
        with atomic_files(tmp_path) as staging:
            assert staging.parent == tmp_path and staging.name.startswith(".")
            (staging / "dice_raw.csv").write_text("new")
            (staging / "metrics.csv").write_text("mean")
            if fails:
                raise RuntimeError("interrupted")
    files = {p.name: p.read_text() for p in tmp_path.iterdir()}
    expected = {"mask_seg.nii.gz": "mask", "dice_raw.csv": "new" if not fails else "old"}
    assert files == (expected if fails else {**expected, "metrics.csv": "mean"})


class _FullDisk(io.FileIO):
    """A file on a disk that fills up at the first write."""

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_names_the_output_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "model.pt", "old")
    with pytest.raises(OutputWriteError, match=f"could not write {path}: No space left on device; free space") as raised:
        with atomic_write(path) as tmp, _FullDisk(tmp, "wb") as f:
            torch.save({"w": torch.zeros(3)}, f)
    assert isinstance(raised.value, OSError)  # code that catches OSError keeps working
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_a_full_disk_that_torch_reports_as_its_own_runtime_error_is_still_named(tmp_path):
    with pytest.raises(OutputWriteError, match="No space left on device"):
        with atomic_write(tmp_path / "model.pt"):
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:  # what torch's archive writer raises while it handles a full disk
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1600 vs 1494")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("writer", [atomic_directory, atomic_files])
def test_a_folder_written_whole_reports_a_full_disk_by_its_name(tmp_path, writer):
    with pytest.raises(OutputWriteError, match=f"could not write (into )?{tmp_path / 'out'}: No space left"):
        with writer(tmp_path / "out") as staging:
            (staging / "a.csv").write_text("x")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_an_error_about_another_file_or_a_user_error_inside_a_write_passes_through_unchanged(tmp_path):
    # a checkpoint read beside the folder being written, as the MONAI Label export reads the quantized one
    beside = tmp_path / "models" / "model_rtn_w4a8.pt"
    with pytest.raises(PermissionError) as raised:
        with atomic_directory(tmp_path / "served"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(beside))
    assert not isinstance(raised.value, OutputWriteError)
    with pytest.raises(PermissionError) as raised:  # one naming no file is a write's only when the disk is full
        with atomic_files(tmp_path / "eval"):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
    assert not isinstance(raised.value, OutputWriteError)
    with pytest.raises(UserInputError, match="corrupt or unreadable quantized checkpoint") as raised:
        with atomic_write(tmp_path / "out" / "model.ts"):
            try:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "out" / "q.pt"))
            except PermissionError as error:
                raise UserInputError("corrupt or unreadable quantized checkpoint q.pt: re-run quantize.") from error
    assert not isinstance(raised.value, OutputWriteError)


@pytest.mark.parametrize("below", ["eval/m.nii.gz", "eval/seg/m.nii.gz"])
def test_a_file_where_the_output_folder_should_be_is_a_write_error_naming_the_output_and_the_file(tmp_path, below):
    (tmp_path / "eval").write_text("a file")
    output, in_the_way = tmp_path / below, tmp_path / "eval"
    with pytest.raises(OutputWriteError, match=f"cannot write {output}: {in_the_way} is a file, so no folder can be made inside it"):
        atomic_write_text(output, "x")
    assert in_the_way.read_text() == "a file"


@pytest.mark.parametrize("name", ["", "out/", "folder"], ids=["empty", "trailing_separator", "existing_folder"])
def test_a_destination_that_names_a_folder_is_refused_before_the_block_runs(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    ran = []
    with pytest.raises(OutputWriteError, match=f"cannot write '{name}': it names a folder.*give the file's own path"):
        with atomic_write(name) as tmp:
            ran.append(tmp)
    assert ran == [] and sorted(p.name for p in tmp_path.iterdir()) == ["folder"] and not any((tmp_path / "folder").iterdir())


def test_a_stale_temporary_that_is_not_ours_to_remove_does_not_stop_the_write(tmp_path, monkeypatch):
    from monai_effq.utils.io import remove_stale_temporaries

    foreign = tmp_path / ".report.json.otherhost.4242.abcd1234.partial"
    foreign.write_text("another user's, in a shared folder")
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(foreign, (day_ago, day_ago))
    unlink = Path.unlink

    def refused(path, *args, **kwargs):
        if path == foreign:  # what a sticky folder answers for another user's file
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(path))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", refused)
    assert remove_stale_temporaries(tmp_path) == []
    atomic_write_text(tmp_path / "report.json", "{}")
    assert (tmp_path / "report.json").read_text() == "{}" and foreign.exists()


def test_a_long_but_legal_file_name_is_written_although_its_temporary_would_be_longer(tmp_path):
    name = "x" * 230 + ".json"
    atomic_write_text(tmp_path / name, "whole")
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_threads_reading_the_umask_leave_it_as_it_was(tmp_path):
    import sys
    import threading

    from monai_effq.utils.io import current_umask

    old, interval = os.umask(0o027), sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        seen = []
        threads = [threading.Thread(target=lambda: seen.extend(current_umask() for _ in range(3000))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(seen) == {0o027}
        assert os.umask(0o027) == 0o027
    finally:
        sys.setswitchinterval(interval)
        os.umask(old)


def test_json_text_writes_nan_and_infinities_as_null_and_numpy_and_torch_numbers_as_floats():
    import json

    import numpy as np

    from monai_effq.utils.io import json_text

    text = json_text({"a": [float("nan"), 1.5], "b": {"c": float("-inf"), "d": np.float32(0.25), "e": torch.tensor(2.0)}, "f": None})
    assert json.loads(text) == {"a": [None, 1.5], "b": {"c": None, "d": 0.25, "e": 2.0}, "f": None}
    assert "NaN" not in text and "Infinity" not in text
