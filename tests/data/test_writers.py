import errno
import logging
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import SaveImaged

from monai_effq.data import AtomicNibabelWriter
from monai_effq.utils.errors import OutputWriteError, find_user_error


def _mask() -> MetaTensor:
    affine = torch.diag(torch.tensor([0.8, 0.8, 2.5, 1.0], dtype=torch.float64))
    values = torch.randint(0, 3, (1, 6, 7, 5), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    return MetaTensor(values, affine=affine, meta={"filename_or_obj": "/data/case_7.nii.gz"})


def _save(folder, writer) -> SaveImaged:
    return SaveImaged(
        keys="pred", output_dir=str(folder), output_postfix="seg", output_dtype=torch.uint8, resample=False,
        separate_folder=False, print_log=False, writer=writer,
    )  # fmt: skip


def test_save_imaged_with_the_atomic_writer_writes_the_mask_monai_s_writer_writes(tmp_path):
    mask = _mask()
    _save(tmp_path / "ours", "monai_effq.data.AtomicNibabelWriter")({"pred": mask})
    _save(tmp_path / "monai", "NibabelWriter")({"pred": mask.clone()})
    ours, theirs = (nib.load(str(tmp_path / f / "case_7_seg.nii.gz")) for f in ("ours", "monai"))
    assert np.array_equal(ours.get_fdata(), theirs.get_fdata()) and np.array_equal(ours.affine, theirs.affine)
    assert ours.get_data_dtype() == np.uint8
    assert [p.name for p in (tmp_path / "ours").iterdir()] == ["case_7_seg.nii.gz"]  # no temporary left


def test_a_mask_whose_write_fails_part_way_leaves_no_file_under_its_name(tmp_path, monkeypatch):
    def half_then_fail(image, filename):
        with open(filename, "wb") as f:
            f.write(b"\x1f\x8b half a gzip stream")
        raise OSError("No space left on device")

    monkeypatch.setattr(nib, "save", half_then_fail)
    writer = AtomicNibabelWriter()
    writer.set_data_array(_mask(), channel_dim=0)
    with pytest.raises(OSError, match="No space left"):
        writer.write(tmp_path / "case_7_seg.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_under_save_imaged_is_reported_as_the_mask_that_could_not_be_written(tmp_path, monkeypatch):
    def full_disk(image, filename):
        with open(filename, "wb") as f:
            f.write(b"\x1f\x8b half a gzip stream")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(nib, "save", full_disk)
    # MONAI's SaveImage tries each writer, keeps their tracebacks as text and raises an error of its own
    with pytest.raises(RuntimeError, match="cannot find a suitable writer") as raised:
        _save(tmp_path, "monai_effq.data.AtomicNibabelWriter")({"pred": _mask()})
    found = find_user_error(raised.value)
    assert isinstance(found, OutputWriteError), raised.value
    assert str(found).startswith(f"could not write {tmp_path / 'case_7_seg.nii.gz'}: No space left on device; free space")
    assert list(tmp_path.iterdir()) == []


def test_the_writer_logs_the_mask_s_own_name_not_the_temporary_s(tmp_path, caplog):
    writer = AtomicNibabelWriter()
    writer.set_data_array(_mask(), channel_dim=0)
    with caplog.at_level(logging.INFO):
        writer.write(tmp_path / "case_7_seg.nii.gz", verbose=True)
    assert [r.getMessage() for r in caplog.records if "writing" in r.getMessage()] == [f"writing: {tmp_path / 'case_7_seg.nii.gz'}"]
