import os

import pytest

from monai_effq.utils.io import atomic_write, atomic_write_text


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
