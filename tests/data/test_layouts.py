"""Dataset lists for the Decathlon, BraTS and LiTS layouts, and the errors a broken dataset gives."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from monai_effq.data import (
    DatasetError,
    brats2023_datalist,
    brats_datalist,
    check_nifti,
    detect_layout,
    lits_datalist,
    load_datalist,
    make_brats_demo,
    make_lits_demo,
    make_msd_demo,
    msd_datalist,
    resolve_layout,
    split_datalist,
    validate_datalist,
)

from ..brats2023 import as_brats2023

SHAPE = (32, 32, 32)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Two-case demo datasets in every layout, shared read-only by the tests of this module."""
    root = tmp_path_factory.mktemp("layouts")
    return {
        "brats": make_brats_demo(root / "brats", n_cases=2, shape=SHAPE),
        "lits": make_lits_demo(root / "lits", n_cases=2, shape=SHAPE),
        "msd_brats": make_msd_demo(root / "Task01_BrainTumour", "Task01_BrainTumour", n_cases=2, shape=SHAPE),
        "msd_lits": make_msd_demo(root / "Task03_Liver", "Task03_Liver", n_cases=2, shape=SHAPE),
    }


@pytest.fixture(scope="module")
def brats2023(tmp_path_factory, data) -> Path:
    """The BraTS demo cases laid out as the BraTS 2023 releases are."""
    return as_brats2023(data["brats"], tmp_path_factory.mktemp("layouts2023") / "BraTS2023-GLI-Challenge-TrainingData")


def test_brats_2023_folders_are_detected_and_list_their_contrasts_in_the_2020_channel_order(brats2023, data):
    assert detect_layout(brats2023) == "brats2023" and detect_layout(brats2023.parent) == "brats2023"  # one folder down too
    datalist = load_datalist(brats2023, dataset="brats")
    assert datalist == load_datalist(brats2023, layout="native", dataset="brats") == brats2023_datalist(brats2023)
    assert [Path(p).name for p in datalist[0]["image"]] == [f"BraTS-GLI-00001-000-{m}.nii.gz" for m in ("t2f", "t1n", "t1c", "t2w")]
    assert Path(datalist[1]["label"]).name == "BraTS-GLI-00002-000-seg.nii.gz"
    validate_datalist(datalist, read_data=True)
    with pytest.raises(DatasetError, match="looks like the 'brats2023' layout"):
        load_datalist(brats2023, dataset="lits")


def test_a_brats_2023_case_without_a_contrast_names_the_file_expected(tmp_path, brats2023):
    root = _copy(brats2023, tmp_path / "brats2023")
    (root / "BraTS-GLI-00002-000" / "BraTS-GLI-00002-000-t1c.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"BraTS-GLI-00002-000 has no 't1c' file.*BraTS-GLI-00002-000-t1c\.nii\.gz"):
        load_datalist(root)


def test_native_means_the_brats_release_the_folder_holds_also_beside_a_dataset_json(tmp_path, brats2023):
    root = _copy(brats2023, tmp_path / "brats2023")
    (root / "dataset.json").write_text(json.dumps({"training": []}))  # a user's own list beside the release
    assert resolve_layout(root) == "msd" and resolve_layout(root, "native", "brats") == "brats2023"
    assert Path(load_datalist(root, layout="native", dataset="brats")[0]["label"]).name == "BraTS-GLI-00001-000-seg.nii.gz"


def test_a_folder_holding_cases_of_both_brats_releases_is_refused_naming_one_of_each(tmp_path, data, brats2023):
    root = _copy(brats2023, tmp_path / "mixed")
    shutil.copytree(data["brats"] / "BraTS20_Training_001", root / "BraTS20_Training_001")
    for layout in ("auto", "native"):
        with pytest.raises(DatasetError, match=r"two releases, .*BraTS20_Training_001 .*BraTS-GLI-00001-000 "):
            load_datalist(root, layout=layout, dataset="brats")


def test_native_brats_without_cases_names_the_files_of_both_releases(tmp_path):
    with pytest.raises(DatasetError, match=r"BraTS20_Training_XXX_\{flair.*or BraTS 2023 folders BraTS-GLI"):
        load_datalist(tmp_path, layout="native", dataset="brats")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_brats_native_lists_four_contrasts_in_decathlon_order_and_the_segmentation(data):
    datalist = load_datalist(data["brats"], layout="native", dataset="brats")
    assert len(datalist) == 2
    first = datalist[0]
    assert [Path(p).name for p in first["image"]] == [
        f"BraTS20_Training_001_{m}.nii.gz" for m in ("flair", "t1", "t1ce", "t2")
    ]
    assert Path(first["label"]).name == "BraTS20_Training_001_seg.nii.gz"
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in [*first["image"], first["label"]])
    assert Path(datalist[1]["label"]).parent.name == "BraTS20_Training_002"


def test_msd_lists_absolute_image_and_label_paths(data):
    for key, prefix in (("msd_brats", "BRATS_"), ("msd_lits", "liver_")):
        datalist = load_datalist(data[key], layout="msd")
        assert len(datalist) == 2
        for item in datalist:
            assert set(item) == {"image", "label"}
            assert Path(item["image"]).is_absolute() and Path(item["image"]).parent.name == "imagesTr"
            assert Path(item["label"]).parent.name == "labelsTr" and Path(item["label"]).name.startswith(prefix)


def test_a_decathlon_task_with_another_number_of_labels_is_refused_for_a_dataset_and_listed_without_one(tmp_path, data):
    spleen = tmp_path / "Task09_Spleen"
    shutil.copytree(data["msd_lits"], spleen)
    meta = json.loads((spleen / "dataset.json").read_text())
    (spleen / "dataset.json").write_text(json.dumps({**meta, "labels": {"0": "background", "1": "spleen"}}))
    with pytest.raises(DatasetError, match=r"declares 2 labels \(background, spleen\) where a lits network segments 3 .*Task03_Liver"):
        load_datalist(spleen, dataset="lits")
    assert len(load_datalist(spleen)) == 2  # no dataset named: nothing to compare with
    assert len(load_datalist(data["msd_lits"], dataset="lits")) == len(load_datalist(data["msd_brats"], dataset="brats")) == 2


def test_lits_native_pairs_volume_and_segmentation_by_number(data):
    datalist = load_datalist(data["lits"], layout="lits")
    assert [(Path(d["image"]).name, Path(d["label"]).name) for d in datalist] == [
        ("volume-0.nii", "segmentation-0.nii"),
        ("volume-1.nii", "segmentation-1.nii"),
    ]


def test_lits_pairs_across_sub_folders_and_sorts_numerically(tmp_path, data):
    batch1, batch2 = tmp_path / "Training Batch 1", tmp_path / "Training Batch 2"
    batch1.mkdir()
    batch2.mkdir()
    shutil.copy(data["lits"] / "volume-0.nii", batch1 / "volume-10.nii")
    shutil.copy(data["lits"] / "segmentation-0.nii", batch2 / "segmentation-10.nii")
    with open(data["lits"] / "volume-1.nii", "rb") as f, gzip.open(batch2 / "volume-2.nii.gz", "wb") as g:
        g.write(f.read())
    shutil.copy(data["lits"] / "segmentation-1.nii", batch2 / "segmentation-2.nii")
    datalist = load_datalist(tmp_path)
    assert [Path(d["image"]).name for d in datalist] == ["volume-2.nii.gz", "volume-10.nii"]
    assert [Path(d["label"]).name for d in datalist] == ["segmentation-2.nii", "segmentation-10.nii"]
    validate_datalist(datalist, read_data=True)


@pytest.mark.parametrize(
    "key, layout", [("brats", "brats"), ("lits", "lits"), ("msd_brats", "msd"), ("msd_lits", "msd")]
)
def test_auto_detects_each_layout_and_lists_the_same_cases(data, key, layout):
    assert detect_layout(data[key]) == layout
    assert load_datalist(data[key]) == load_datalist(data[key], layout=layout)


def test_auto_finds_brats_cases_one_folder_down_as_the_official_archive_unpacks(tmp_path, data):
    _copy(data["brats"], tmp_path / "MICCAI_BraTS2020_TrainingData")
    assert detect_layout(tmp_path) == "brats"
    assert len(load_datalist(tmp_path)) == 2


def _beside_a_validation_archive(root: Path, data) -> Path:
    """The BraTS demo as the training archive, and one unlabelled case of the validation archive beside it."""
    _copy(data["brats"], root / "MICCAI_BraTS2020_TrainingData")
    validation = root / "MICCAI_BraTS2020_ValidationData" / "BraTS20_Validation_001"
    validation.mkdir(parents=True)
    for contrast in ("flair", "t1", "t1ce", "t2"):
        shutil.copy(next(data["brats"].glob(f"*/*_{contrast}.nii.gz")), validation / f"BraTS20_Validation_001_{contrast}.nii.gz")
    return validation


def test_beside_the_validation_archive_only_the_training_cases_are_listed(tmp_path, data):
    _beside_a_validation_archive(tmp_path, data)
    datalist = load_datalist(tmp_path)
    assert [Path(d["label"]).parent.name for d in datalist] == ["BraTS20_Training_001", "BraTS20_Training_002"]


def test_a_brats_case_whose_segmentation_has_another_name_uses_its_one_seg_file(tmp_path, data):
    root = _copy(data["brats"], tmp_path / "MICCAI_BraTS2020_TrainingData")
    case = root / "BraTS20_Training_002"
    # BraTS 2020's case 355 ships its segmentation as W39_1998.09.19_Segm.nii
    (case / "BraTS20_Training_002_seg.nii.gz").rename(case / "W39_1998.09.19_Segm.nii.gz")
    assert load_datalist(root)[1]["label"] == str(case / "W39_1998.09.19_Segm.nii.gz")


def test_lits_batches_linked_from_another_disk_are_listed_as_folders_are(tmp_path, data):
    elsewhere = tmp_path / "other_disk" / "Training Batch 2"
    elsewhere.mkdir(parents=True)
    shutil.copy(data["lits"] / "volume-1.nii", elsewhere / "volume-28.nii")
    shutil.copy(data["lits"] / "segmentation-1.nii", elsewhere / "segmentation-28.nii")
    root = tmp_path / "LiTS"
    (root / "Training Batch 1").mkdir(parents=True)
    shutil.copy(data["lits"] / "volume-0.nii", root / "Training Batch 1" / "volume-0.nii")
    shutil.copy(data["lits"] / "segmentation-0.nii", root / "Training Batch 1" / "segmentation-0.nii")
    (root / "Training Batch 2").symlink_to(elsewhere, target_is_directory=True)
    (root / "Training Batch 1" / "loop").symlink_to(root, target_is_directory=True)  # walked once, not forever
    assert [Path(d["image"]).name for d in load_datalist(root)] == ["volume-0.nii", "volume-28.nii"]
    only_linked = tmp_path / "linked_only"
    only_linked.mkdir()
    (only_linked / "batch").symlink_to(elsewhere, target_is_directory=True)
    assert detect_layout(only_linked) == "lits"


def test_a_link_to_a_batch_or_case_on_a_disk_that_is_not_mounted_is_named_instead_of_leaving_its_cases_out(tmp_path, data):
    root = _copy(data["lits"], tmp_path / "LiTS")
    (root / "Training Batch 2").symlink_to(tmp_path / "unmounted" / "Training Batch 2", target_is_directory=True)
    with pytest.raises(DatasetError, match=r"Training Batch 2 is a link to .*unmounted/Training Batch 2, which does not exist: mount"):
        load_datalist(root)
    brats = _copy(data["brats"], tmp_path / "BraTS")
    (brats / "BraTS20_Training_003").symlink_to(tmp_path / "unmounted" / "BraTS20_Training_003", target_is_directory=True)
    with pytest.raises(DatasetError, match=r"BraTS20_Training_003 is a link to .*, which does not exist"):
        load_datalist(brats)


def test_files_whose_extension_is_upper_case_are_listed_as_the_others(tmp_path, data):
    lits = _copy(data["lits"], tmp_path / "LiTS")
    (lits / "volume-1.nii").rename(lits / "volume-1.NII")
    (lits / "segmentation-1.nii").rename(lits / "segmentation-1.NII")
    assert [Path(d["image"]).name for d in load_datalist(lits)] == ["volume-0.nii", "volume-1.NII"]  # was one case
    brats = _copy(data["brats"], tmp_path / "BraTS")
    case = brats / "BraTS20_Training_002"
    for file in case.iterdir():
        file.rename(case / file.name.replace(".nii.gz", ".NII.GZ"))
    second = load_datalist(brats)[1]
    assert [Path(p).name for p in second["image"]] == [f"BraTS20_Training_002_{m}.NII.GZ" for m in ("flair", "t1", "t1ce", "t2")]
    assert Path(second["label"]).name == "BraTS20_Training_002_seg.NII.GZ"
    validate_datalist([second], read_data=True)


def test_a_mask_written_beside_an_unlabelled_case_is_not_taken_for_its_segmentation(tmp_path, data):
    validation = _beside_a_validation_archive(tmp_path, data)
    # the name inference gives the mask of a case's first contrast, written into the case's folder
    shutil.copy(next(data["brats"].glob("*/*_seg.nii.gz")), validation / "BraTS20_Validation_001_flair_seg.nii.gz")
    datalist = load_datalist(tmp_path)
    assert [Path(d["label"]).parent.name for d in datalist] == ["BraTS20_Training_001", "BraTS20_Training_002"]


def test_a_macos_copy_of_a_segmentation_with_another_name_is_not_a_second_candidate(tmp_path, data, caplog):
    root = _copy(data["brats"], tmp_path / "MICCAI_BraTS2020_TrainingData")
    case = root / "BraTS20_Training_002"
    (case / "BraTS20_Training_002_seg.nii.gz").rename(case / "W39_1998.09.19_Segm.nii.gz")
    (case / "._W39_1998.09.19_Segm.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    with caplog.at_level("WARNING"):
        assert load_datalist(root)[1]["label"] == str(case / "W39_1998.09.19_Segm.nii.gz")
    assert "its segmentation is taken to be W39_1998.09.19_Segm.nii.gz" in caplog.text
    shutil.copy(case / "W39_1998.09.19_Segm.nii.gz", case / "W39_segmentation_v2.nii.gz")
    with pytest.raises(DatasetError, match=r"several files that could be its segmentation \(W39_1998.09.19_Segm.nii.gz, W39_segmentation_v2.nii.gz\)"):
        load_datalist(root)


def test_a_decathlon_folder_given_from_the_home_folder_is_checked_as_the_same_folder(tmp_path, data, monkeypatch):
    spleen = tmp_path / "Task09_Spleen"
    shutil.copytree(data["msd_lits"], spleen)
    meta = json.loads((spleen / "dataset.json").read_text())
    (spleen / "dataset.json").write_text(json.dumps({**meta, "labels": {"0": "background", "1": "spleen"}}))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DatasetError, match="declares 2 labels"):
        load_datalist("~/Task09_Spleen", dataset="lits")


def test_brats_accepts_uncompressed_nifti(tmp_path, data):
    root = _copy(data["brats"], tmp_path / "brats")
    gz = root / "BraTS20_Training_001" / "BraTS20_Training_001_t2.nii.gz"
    with gzip.open(gz, "rb") as f:
        (gz.parent / "BraTS20_Training_001_t2.nii").write_bytes(f.read())
    gz.unlink()
    assert load_datalist(root)[0]["image"][3].endswith("BraTS20_Training_001_t2.nii")


def test_a_dataset_hint_that_contradicts_the_folder_is_an_error(data):
    with pytest.raises(DatasetError, match="looks like the 'lits' layout"):
        load_datalist(data["lits"], dataset="brats")
    with pytest.raises(ValueError, match="native"):
        load_datalist(data["lits"], layout="native")


def test_a_missing_modality_names_the_case_and_the_file_expected(tmp_path, data):
    root = _copy(data["brats"], tmp_path / "brats")
    (root / "BraTS20_Training_002" / "BraTS20_Training_002_t1ce.nii.gz").unlink()
    expected = r"BraTS20_Training_002 has no 't1ce' file.*BraTS20_Training_002_t1ce\.nii\.gz"
    with pytest.raises(DatasetError, match=expected):
        brats_datalist(root)


def test_a_file_listed_in_dataset_json_but_absent_is_named(tmp_path, data):
    root = _copy(data["msd_lits"], tmp_path / "Task03_Liver")
    (root / "labelsTr" / "liver_1.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"missing file .*labelsTr/liver_1\.nii\.gz listed in .*dataset\.json"):
        load_datalist(root)


def test_a_malformed_or_empty_dataset_json_is_reported(tmp_path, data):
    root = _copy(data["msd_lits"], tmp_path / "Task03_Liver")
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"cannot parse .*dataset\.json"):
        msd_datalist(root)
    (root / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.raises(DatasetError, match="lists no cases under 'training'"):
        msd_datalist(root)


def test_the_decathlon_test_section_lists_bare_image_paths_as_image_entries(tmp_path, data):
    root = _copy(data["msd_lits"], tmp_path / "Task03_Liver")
    meta = json.loads((root / "dataset.json").read_text())
    meta["test"] = [entry["image"] for entry in meta["training"]]
    (root / "dataset.json").write_text(json.dumps(meta))
    test = msd_datalist(root, section="test")
    assert [set(item) for item in test] == [{"image"}, {"image"}]
    assert [item["image"] for item in test] == [item["image"] for item in msd_datalist(root)]
    meta["test"] = []
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="lists no cases under 'test'"):
        msd_datalist(root, section="test")


def test_dataset_json_entries_that_are_not_cases_are_refused_naming_the_section(tmp_path, data):
    root = _copy(data["msd_lits"], tmp_path / "Task03_Liver")
    (root / "dataset.json").write_text(json.dumps({"training": ["./imagesTr/liver_0.nii.gz"]}))
    with pytest.raises(DatasetError, match=r"dataset\.json: 'training' must list entries like \{\"image\""):
        msd_datalist(root)
    (root / "dataset.json").write_text(json.dumps({"training": [{"label": "./labelsTr/liver_0.nii.gz"}]}))
    with pytest.raises(DatasetError, match=r"training\[0\] must be a dict with an 'image' key"):
        msd_datalist(root)
    (root / "dataset.json").write_text(json.dumps({"training": [{"image": "./imagesTr/liver_0.nii.gz"}]}))
    with pytest.raises(DatasetError, match=r"training\[0\] has no 'label'"):
        msd_datalist(root)
    (root / "dataset.json").write_text(json.dumps({"validation": []}))
    with pytest.raises(DatasetError, match="has no 'training' section"):
        msd_datalist(root)


def test_a_lits_volume_without_segmentation_names_the_file_expected(tmp_path, data):
    root = _copy(data["lits"], tmp_path / "lits")
    (root / "segmentation-1.nii").unlink()
    with pytest.raises(DatasetError, match=r"volume-1\.nii has no segmentation: expected segmentation-1\.nii"):
        lits_datalist(root)


def test_an_unlabelled_lits_or_brats_release_says_to_segment_its_images_with_datalist(tmp_path, data):
    root = tmp_path / "lits_test"  # the LiTS test set: volumes only
    root.mkdir()
    shutil.copy(data["lits"] / "volume-0.nii", root / "volume-0.nii")
    expected = r"volume-0\.nii has no segmentation: .*; to segment unlabelled images, pass them to inference with --datalist"
    with pytest.raises(DatasetError, match=expected):
        load_datalist(root)
    brats = _copy(data["brats"], tmp_path / "brats_validation")  # a BraTS validation folder: no seg files
    for seg in brats.glob("*/*_seg.nii*"):
        seg.unlink()
    with pytest.raises(DatasetError, match=r"BraTS20_Training_001 has no 'seg' file: .*; to segment unlabelled images, pass them"):
        load_datalist(brats)
    release = tmp_path / "lits_test_release"  # as LiTS ships it: test-volume-N.nii
    release.mkdir()
    shutil.copy(data["lits"] / "volume-0.nii", release / "test-volume-0.nii")
    expected = r"holds LiTS' unlabelled test release \(test-volume-0\.nii, \.\.\.\).*pass them to inference with --datalist"
    with pytest.raises(DatasetError, match=expected):
        load_datalist(release)


def test_an_empty_folder_says_which_files_were_looked_for(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset\.json.*BraTS20_Training_XXX.*volume-N\.nii"):
        load_datalist(tmp_path)
    with pytest.raises(DatasetError, match=r"no BraTS cases found .*BraTS20_Training_XXX_\{flair,t1,t1ce,t2,seg\}"):
        brats_datalist(tmp_path)
    with pytest.raises(DatasetError, match=r"no LiTS cases found .*volume-N\.nii and segmentation-N\.nii"):
        lits_datalist(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        load_datalist(tmp_path / "nowhere")


def test_a_truncated_nifti_gz_is_reported_as_corrupt_by_name(tmp_path, data):
    root = _copy(data["msd_brats"], tmp_path / "Task01_BrainTumour")
    image = root / "imagesTr" / "BRATS_002.nii.gz"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    datalist = load_datalist(root, check_headers=True)  # the header still parses: only the data is cut
    expected = r"corrupt or unreadable NIfTI file .*BRATS_002\.nii\.gz: .*re-export or remove it"
    with pytest.raises(DatasetError, match=expected):
        validate_datalist(datalist, read_data=True)


def test_a_truncated_or_foreign_file_is_reported_as_corrupt(tmp_path, data):
    short = tmp_path / "volume-0.nii"
    short.write_bytes((data["lits"] / "volume-0.nii").read_bytes()[:5000])
    with pytest.raises(DatasetError, match=r"corrupt or unreadable NIfTI file .*volume-0\.nii"):
        check_nifti(short)
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image")
    with pytest.raises(DatasetError, match=r"notes\.nii\.gz"):
        check_nifti(text, read_data=False)
    with pytest.raises(DatasetError, match=r"missing NIfTI file .*absent\.nii"):
        check_nifti(tmp_path / "absent.nii")


def test_check_nifti_returns_the_shape_of_a_good_file(data):
    assert check_nifti(data["msd_brats"] / "imagesTr" / "BRATS_001.nii.gz") == (*SHAPE, 4)


def test_validation_catches_an_image_and_label_on_different_grids(tmp_path, data):
    brats_seg = data["brats"] / "BraTS20_Training_001" / "BraTS20_Training_001_seg.nii.gz"
    mixed = [{"image": str(data["lits"] / "volume-0.nii"), "label": str(brats_seg)}]
    validate_datalist(mixed)  # same shape: fine
    other = make_lits_demo(tmp_path, n_cases=1, shape=(40, 32, 32))
    mixed[0]["label"] = str(other / "segmentation-0.nii")
    with pytest.raises(DatasetError, match=r"spatial shape \(40, 32, 32\) of .*segmentation-0\.nii differs"):
        validate_datalist(mixed)


def test_split_is_deterministic_disjoint_and_keeps_both_sides_non_empty():
    cases = [{"image": f"case{i}"} for i in range(10)]
    train, val = split_datalist(cases, val_fraction=0.2, seed=0)
    assert (train, val) == split_datalist(cases, val_fraction=0.2, seed=0)
    assert len(val) == 2 and len(train) == 8
    assert sorted(c["image"] for c in train + val) == sorted(c["image"] for c in cases)
    assert any(split_datalist(cases, 0.2, seed=s)[1] != val for s in range(1, 5))
    assert [len(part) for part in split_datalist(cases[:2], val_fraction=0.01)] == [1, 1]
    assert [len(part) for part in split_datalist(cases[:2], val_fraction=0.99)] == [1, 1]


def test_split_refuses_what_cannot_be_split():
    with pytest.raises(DatasetError, match="need at least 2"):
        split_datalist([{"image": "a"}])
    with pytest.raises(ValueError, match="val_fraction"):
        split_datalist([{"image": "a"}, {"image": "b"}], val_fraction=1.0)


def test_a_lits_case_present_twice_or_a_segmentation_without_volume_is_named(tmp_path, data):
    root = _copy(data["lits"], tmp_path / "lits")
    (root / "segmentation-7.nii").write_bytes((root / "segmentation-0.nii").read_bytes())
    with pytest.raises(DatasetError, match=r"segmentation-7\.nii has no volume: expected volume-7\.nii"):
        lits_datalist(root)
    (root / "segmentation-7.nii").unlink()
    with open(root / "volume-1.nii", "rb") as f, gzip.open(root / "volume-1.nii.gz", "wb") as g:
        g.write(f.read())
    with pytest.raises(DatasetError, match=r"LiTS case 1 appears twice, as .*volume-1\.nii.* and .*volume-1\.nii\.gz; keep one"):
        lits_datalist(root)


def test_a_decathlon_folder_without_dataset_json_or_with_an_entry_that_is_not_a_path_is_named(tmp_path, data):
    root = _copy(data["msd_lits"], tmp_path / "Task03_Liver")
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["image"] = 7
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"must be a relative file path string, got 7"):
        msd_datalist(root)
    (root / "dataset.json").unlink()
    with pytest.raises(DatasetError, match=r"missing .*dataset\.json"):
        msd_datalist(root)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dataset": "kits"}, "dataset must be one of"),
        ({"layout": "nnunet"}, "layout must be 'auto', 'native' or one of"),
        ({"layout": "lits", "section": "test"}, "the 'lits' layout only has a 'training' section, got section='test'"),
    ],
)
def test_load_datalist_names_an_unknown_dataset_layout_or_section(data, kwargs, message):
    from monai_effq.utils.errors import UserInputError

    with pytest.raises(UserInputError, match=message):  # a bundle setting: one line from the bundle command
        load_datalist(data["lits"], **kwargs)


def test_validation_refuses_an_empty_list_and_an_entry_without_image(data):
    with pytest.raises(DatasetError, match="the dataset list is empty"):
        validate_datalist([])
    with pytest.raises(DatasetError, match="dataset entry 1 has no 'image' key"):
        validate_datalist([{"image": str(data["lits"] / "volume-0.nii")}, {"label": "x.nii"}])


def _resaved(source: Path, target: Path, affine) -> str:
    import nibabel as nib
    import numpy as np

    image = nib.load(str(source))
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), np.asarray(affine, dtype=float)), str(target))
    return str(target)


def test_a_label_saved_with_another_header_than_its_image_is_refused_naming_both_files_and_grids(tmp_path, data):
    import numpy as np

    case = load_datalist(data["lits"])[0]  # the volumes are stored LPS-like, diag(-1, -1, 1)
    case["label"] = _resaved(Path(case["label"]), tmp_path / "segmentation-0.nii", np.eye(4))  # as some exporters save it
    expected = (
        r"label .*segmentation-0\.nii is not on the grid of its image .*volume-0\.nii: the label is 32x32x32 voxels of "
        r"1x1x1 mm towards RAS .*, the image 32x32x32 voxels of 1x1x1 mm towards LPS .* save it again with the image's header"
    )
    with pytest.raises(DatasetError, match=expected):
        validate_datalist([case])  # from the headers alone, before any voxel is read


def test_a_label_stored_in_another_axis_order_on_the_same_voxels_in_the_world_is_accepted_as_reorientation_pairs_it(tmp_path, data):
    import nibabel as nib
    import numpy as np

    from monai_effq.data import lits_transforms

    case = load_datalist(data["lits"])[0]
    label = nib.load(case["label"])
    affine = label.affine.copy()  # rows stored the other way, as dcm2niix stores them, with the header that says so
    affine[:3, 3] += affine[:3, 1] * (label.shape[1] - 1)
    affine[:3, 1] *= -1
    flipped = tmp_path / "segmentation-0.nii"
    nib.save(nib.Nifti1Image(np.asanyarray(label.dataobj)[:, ::-1].copy(), affine), str(flipped))
    validate_datalist([{**case, "label": str(flipped)}])
    load = lits_transforms(train=False)
    assert np.array_equal(load(case)["label"].numpy(), load({**case, "label": str(flipped)})["label"].numpy())


def test_a_label_a_thousandth_of_a_millimetre_off_its_image_is_on_its_grid(tmp_path, data):
    case = load_datalist(data["lits"])[0]
    import nibabel as nib

    affine = nib.load(case["image"]).affine.copy()
    affine[:3, 3] += 5e-4  # the same grid written by two programs
    case["label"] = _resaved(Path(case["label"]), tmp_path / "segmentation-0.nii", affine)
    validate_datalist([case])


def test_a_label_of_another_origin_only_is_accepted_with_a_warning_as_its_voxels_pair_as_stored(tmp_path, data, caplog):
    import nibabel as nib

    case = load_datalist(data["lits"])[0]
    affine = nib.load(case["image"]).affine.copy()
    affine[:3, 3] += (10.0, 20.0, -30.0)  # nnU-Net's LiTS conversion and TotalSegmentator's data hold such pairs
    case["label"] = _resaved(Path(case["label"]), tmp_path / "segmentation-0.nii", affine)
    with caplog.at_level("WARNING", logger="monai_effq"):
        validate_datalist([case])
    assert any("1 label(s) differ from their image in origin or rotation only" in r.getMessage() for r in caplog.records)


def test_contrasts_of_one_brats_case_on_different_grids_are_refused_from_the_headers_with_check_images_message(tmp_path, data):
    import nibabel as nib

    case = load_datalist(data["brats"])[0]
    affine = nib.load(case["image"][3]).affine.copy()
    affine[0, 3] += 5.0  # a T2 acquired apart and not registered
    case["image"][3] = _resaved(Path(case["image"][3]), tmp_path / "BraTS20_Training_001_t2.nii.gz", affine)
    with pytest.raises(DatasetError, match=r"the images of one case are not on one grid: .*_t2\.nii\.gz is 32x32x32 voxels .* from \[5\.0"):
        validate_datalist([case])


@pytest.mark.parametrize(
    "key, channels, found",
    [("lits", 1, r"volume-0\.nii\) holds 2 image channel"), ("msd_lits", 4, r"liver_\w+\.nii\.gz\) holds 1 image channel")],
)
def test_a_case_with_another_number_of_channels_than_the_network_takes_is_refused_naming_its_file(tmp_path, data, key, channels, found):
    import nibabel as nib
    import numpy as np

    case = load_datalist(data[key])[0]
    if key == "lits":  # a CT saved with two volumes (two phases)
        image = nib.load(case["image"])
        volume = np.asanyarray(image.dataobj)
        case["image"] = str(tmp_path / "volume-0.nii")
        nib.save(nib.Nifti1Image(np.stack([volume, volume], -1), image.affine), case["image"])
    with pytest.raises(DatasetError, match=rf"dataset entry 0 \(.*{found}\(s\), but the network takes {channels}"):
        validate_datalist([case], channels=channels)
    validate_datalist(load_datalist(data["msd_brats"]), channels=4)  # a Decathlon 4D file of four contrasts
    validate_datalist(load_datalist(data["brats"]), channels=4)  # four 3D files


def _nifti(path: Path, shape: tuple[int, ...]) -> str:
    """A small NIfTI file of ``shape``: a volume of body-like values with a labelled block in it."""
    import nibabel as nib
    import numpy as np

    values = np.zeros(shape, np.int16)
    values[(slice(2, 6),) * min(len(shape), 3)] = 1
    nib.save(nib.Nifti1Image(values, np.eye(4)), str(path))
    return str(path)


def test_a_2d_image_or_label_is_refused_naming_the_file_its_shape_and_that_a_slice_is_not_a_volume(tmp_path):
    flat = {"image": _nifti(tmp_path / "volume-0.nii", (64, 64)), "label": _nifti(tmp_path / "segmentation-0.nii", (64, 64))}
    expected = (
        r"image .*volume-0\.nii has 2 spatial axes \(64x64\); monai-effq segments 3D volumes: give the whole volume, "
        r"not a slice \(one slice saved as a 3D file is 64x64x1\)\."
    )
    with pytest.raises(DatasetError, match=expected):
        validate_datalist([flat], channels=1)  # its header alone, before the network or MONAI sees it
    flat["image"] = _nifti(tmp_path / "volume-1.nii", (64, 64, 1))  # one slice saved as a 3D file is a volume
    with pytest.raises(DatasetError, match=r"label .*segmentation-0\.nii has 2 spatial axes \(64x64\)"):
        validate_datalist([flat])
    validate_datalist([{"image": flat["image"], "label": _nifti(tmp_path / "segmentation-1.nii", (64, 64, 1))}])


@pytest.mark.parametrize("shape", [(24, 24, 16, 2), (24, 24, 16, 1, 1)])
def test_a_label_that_is_not_one_3d_volume_is_refused_naming_the_file_and_its_shape(tmp_path, shape):
    case = {"image": _nifti(tmp_path / "volume-0.nii", (24, 24, 16)), "label": _nifti(tmp_path / "segmentation-0.nii", shape)}
    size = "x".join(map(str, shape))
    expected = (
        rf"label .*segmentation-0\.nii is {size} voxels, not one 3D volume: save one 3D map of class values "
        r"\(24x24x16; e\.g\. the argmax of a one-hot or probability map\)"
    )
    with pytest.raises(DatasetError, match=expected):
        validate_datalist([case])
    case["label"] = _nifti(tmp_path / "segmentation-1.nii", (24, 24, 16, 1))  # a 3D map with a unit fourth axis is one
    validate_datalist([case], read_data=True)
