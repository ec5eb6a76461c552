"""The synthetic demo data: deterministic, realistic enough to learn, and written safely."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_effq.data import demo
from monai_effq.data.demo import make_brats_demo, make_lits_demo, make_msd_demo, synth_brats_case, synth_lits_case

SHAPE = (40, 40, 32)
N_CASES = 3


@pytest.fixture(scope="module")
def brats_cases() -> list[dict[str, np.ndarray]]:
    return [synth_brats_case(0, i, SHAPE) for i in range(N_CASES)]


@pytest.fixture(scope="module")
def lits_cases() -> list[dict[str, np.ndarray]]:
    return [synth_lits_case(0, i, SHAPE) for i in range(N_CASES)]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_same_seed_gives_identical_arrays_and_a_different_seed_does_not():
    a, b, c = synth_brats_case(3, 1, SHAPE), synth_brats_case(3, 1, SHAPE), synth_brats_case(4, 1, SHAPE)
    for key in ("flair", "t1", "t1ce", "t2", "seg"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["flair"], c["flair"])
    x, y = synth_lits_case(3, 1, SHAPE), synth_lits_case(3, 1, SHAPE)
    np.testing.assert_array_equal(x["ct"], y["ct"])
    np.testing.assert_array_equal(x["seg"], y["seg"])


def test_regenerating_a_dataset_writes_byte_identical_files(tmp_path):
    make_brats_demo(tmp_path / "a", n_cases=2, shape=SHAPE, seed=5)
    make_brats_demo(tmp_path / "b", n_cases=2, shape=SHAPE, seed=5)
    make_lits_demo(tmp_path / "c", n_cases=2, shape=SHAPE, seed=5)
    make_lits_demo(tmp_path / "d", n_cases=2, shape=SHAPE, seed=5)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "c") == _files(tmp_path / "d")
    assert len(_files(tmp_path / "a")) == 10 and len(_files(tmp_path / "c")) == 4


def test_a_case_does_not_depend_on_how_many_cases_are_generated(tmp_path):
    make_lits_demo(tmp_path, n_cases=2, shape=SHAPE, seed=0)
    on_disk = np.asanyarray(nib.load(tmp_path / "volume-1.nii").dataobj)
    np.testing.assert_array_equal(on_disk, synth_lits_case(0, 1, SHAPE)["ct"])


def test_every_brats_case_holds_all_three_tumour_labels_and_nothing_else(brats_cases):
    for case in brats_cases:
        assert case["seg"].dtype == np.int16
        assert set(np.unique(case["seg"]).tolist()) == {0, 1, 2, 4}
        # large enough to learn: at least a few dozen voxels per region at this small size
        assert all(np.count_nonzero(case["seg"] == label) >= 20 for label in (1, 2, 4))


def test_brats_contrasts_differ_and_show_the_tumour_parts_where_radiologists_look(brats_cases):
    for case in brats_cases:
        seg = case["seg"]
        brain = case["flair"] > 0
        normal = brain & (seg == 0)
        assert not brain[0, 0, 0] and all(case[m][0, 0, 0] == 0 for m in ("flair", "t1", "t1ce", "t2"))
        # oedema is bright on FLAIR and T2, the enhancing rim on T1ce, the necrotic core dark on T1ce
        assert case["flair"][seg == 2].mean() > 1.4 * case["flair"][normal].mean()
        assert case["t2"][seg == 2].mean() > 1.4 * case["t2"][normal].mean()
        assert case["t1ce"][seg == 4].mean() > 1.8 * case["t1ce"][normal].mean()
        assert case["t1ce"][seg == 1].mean() < 0.6 * case["t1ce"][seg == 4].mean()
        modalities = ("flair", "t1", "t1ce", "t2")
        means = np.array([[case[m][seg == label].mean() for label in (0, 1, 2, 4)] for m in modalities])
        assert len({tuple(np.argsort(row)) for row in means}) >= 3  # tissue orderings differ between contrasts
        assert all(case[m].dtype == np.int16 and case[m].min() >= 0 for m in ("flair", "t1", "t1ce", "t2"))


def test_every_lits_case_holds_liver_and_lesion_labels(lits_cases):
    for case in lits_cases:
        assert case["seg"].dtype == np.int16
        assert set(np.unique(case["seg"]).tolist()) == {0, 1, 2}
        assert np.count_nonzero(case["seg"] == 2) >= 30


def test_lits_intensities_are_plausible_hounsfield_units(lits_cases):
    for case in lits_cases:
        ct, seg = case["ct"], case["seg"]
        assert ct.dtype == np.int16 and ct.min() >= -1024 and ct.max() <= 3071
        assert abs(float(np.median(ct[0, :, :])) + 1000) < 40  # air at the field-of-view edge
        liver, lesion = ct[seg == 1].mean(), ct[seg == 2].mean()
        assert 40 < liver < 80 and 0 < lesion < 40 and liver - lesion > 20
        assert ct.max() > 400  # bone
        assert np.count_nonzero((ct > -150) & (ct < -50)) > 100  # fat
        assert 5 < ct[seg == 1].std() < 25  # noise of a real scanner, not a flat phantom


def test_the_liver_lies_on_the_patients_right(tmp_path):
    make_lits_demo(tmp_path, n_cases=1, shape=SHAPE)
    img = nib.as_closest_canonical(nib.load(tmp_path / "segmentation-0.nii"))  # RAS: x grows to the left
    seg = np.asanyarray(img.dataobj)
    liver_x = np.argwhere(seg == 1)[:, 0].mean()
    assert liver_x < SHAPE[0] / 2


def test_files_store_the_requested_spacing(tmp_path):
    make_brats_demo(tmp_path, n_cases=1, shape=SHAPE, spacing=(2.0, 2.0, 1.5))
    img = nib.load(tmp_path / "BraTS20_Training_001" / "BraTS20_Training_001_t1ce.nii.gz")
    assert img.header.get_zooms() == (2.0, 2.0, 1.5)
    assert img.shape == SHAPE


def test_msd_brats_holds_the_native_cases_stacked_and_relabelled(tmp_path, brats_cases):
    root = make_msd_demo(tmp_path / "Task01_BrainTumour", "Task01_BrainTumour", n_cases=2, shape=SHAPE)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["labels"]["1"] == "edema"
    assert meta["training"][1] == {"image": "./imagesTr/BRATS_002.nii.gz", "label": "./labelsTr/BRATS_002.nii.gz"}
    image = np.asanyarray(nib.load(root / "imagesTr" / "BRATS_002.nii.gz").dataobj)
    label = np.asanyarray(nib.load(root / "labelsTr" / "BRATS_002.nii.gz").dataobj)
    native = brats_cases[1]
    assert image.shape == (*SHAPE, 4)
    for channel, modality in enumerate(("flair", "t1", "t1ce", "t2")):
        np.testing.assert_array_equal(image[..., channel], native[modality])
    np.testing.assert_array_equal(label == 1, native["seg"] == 2)  # oedema
    np.testing.assert_array_equal(label == 2, native["seg"] == 1)  # non-enhancing / necrotic
    np.testing.assert_array_equal(label == 3, native["seg"] == 4)  # enhancing


def test_msd_liver_holds_the_native_cases(tmp_path, lits_cases):
    root = make_msd_demo(tmp_path, "Task03_Liver", n_cases=1, shape=SHAPE)
    image = np.asanyarray(nib.load(root / "imagesTr" / "liver_0.nii.gz").dataobj)
    label = np.asanyarray(nib.load(root / "labelsTr" / "liver_0.nii.gz").dataobj)
    np.testing.assert_array_equal(image, lits_cases[0]["ct"])
    np.testing.assert_array_equal(label, lits_cases[0]["seg"])


def test_an_interrupted_write_leaves_no_file_under_the_real_name(tmp_path, monkeypatch):
    make_lits_demo(tmp_path, n_cases=1, shape=SHAPE, seed=0)
    before = _files(tmp_path)

    write_bytes = Path.write_bytes

    def write_half_then_die(path, data):
        write_bytes(path, data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", write_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        make_lits_demo(tmp_path, n_cases=2, shape=SHAPE, seed=1)
    assert _files(tmp_path) == before  # old complete files untouched, no partial files left


def test_bad_arguments_are_refused_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        make_brats_demo(tmp_path, shape=(8, 8, 8))
    with pytest.raises(ValueError, match="n_cases"):
        make_lits_demo(tmp_path, n_cases=0)
    with pytest.raises(ValueError, match="task"):
        make_msd_demo(tmp_path, task="Task02_Heart")
    assert not any(tmp_path.iterdir())


def test_the_command_line_writes_a_decathlon_folder(tmp_path, capsys):
    out = demo.main(
        ["--dataset", "lits", "--layout", "msd", "--out", str(tmp_path), "--n-cases", "2", "--shape", "32", "32", "32"]
    )
    assert out == tmp_path and str(tmp_path) in capsys.readouterr().out
    assert json.loads((tmp_path / "dataset.json").read_text())["numTraining"] == 2
    with pytest.raises(SystemExit):
        demo.main(["--dataset", "brats", "--out", str(tmp_path), "--shape", "10", "10", "10"])


def test_the_module_runs_as_a_script(tmp_path):
    args = ["--dataset", "brats", "--out", str(tmp_path), "--n-cases", "1", "--shape", "32", "32", "32"]
    subprocess.run([sys.executable, "-m", "monai_effq.data.demo", *args], check=True, capture_output=True, timeout=120)
    assert sorted(p.name for p in (tmp_path / "BraTS20_Training_001").iterdir()) == [
        f"BraTS20_Training_001_{part}.nii.gz" for part in ("flair", "seg", "t1", "t1ce", "t2")
    ]
