"""BraTS and LiTS preprocessing: channels, label conventions, cropping, and label-range checks."""

from __future__ import annotations

import inspect
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

from monai_effq.data import (
    CheckLabelRange,
    CheckLabelRanged,
    ConvertBrats2023Labels,
    ConvertMsdBratsLabels,
    ConvertMsdBratsLabelsd,
    DatasetError,
    brats_transforms,
    load_datalist,
    lits_transforms,
    make_brats_demo,
    make_lits_demo,
    make_msd_demo,
    synth_brats_case,
    synth_lits_case,
)

from ..brats2023 import as_brats2023

SHAPE = (40, 36, 32)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """One synthetic case per dataset, written in both layouts from the same seed."""
    root = tmp_path_factory.mktemp("transforms")
    return {
        "brats": make_brats_demo(root / "brats", n_cases=1, shape=SHAPE),
        "msd_brats": make_msd_demo(root / "Task01", "Task01_BrainTumour", n_cases=1, shape=SHAPE),
        "lits": make_lits_demo(root / "lits", n_cases=1, shape=SHAPE),
        "msd_lits": make_msd_demo(root / "Task03", "Task03_Liver", n_cases=1, shape=SHAPE),
    }


@pytest.fixture(scope="module")
def brats_native(data) -> dict:
    return brats_transforms("native", train=False)(load_datalist(data["brats"])[0])


@pytest.fixture(scope="module")
def lits_eval(data) -> dict:
    return lits_transforms(train=False)(load_datalist(data["lits"])[0])


def test_brats_gives_four_image_channels_and_three_float_label_channels(brats_native):
    image, label = brats_native["image"], brats_native["label"]
    assert image.shape == (4, *SHAPE) and image.dtype == torch.float32
    assert label.shape == (3, *SHAPE) and label.dtype == torch.float32
    assert set(torch.unique(label).tolist()) == {0.0, 1.0}


def test_brats_label_channels_are_nested_whole_tumour_over_core_over_enhancing(brats_native):
    tc, wt, et = (brats_native["label"][i].bool() for i in range(3))
    assert bool(et.any()) and bool((tc & ~et).any()) and bool((wt & ~tc).any())
    assert not bool((et & ~tc).any()) and not bool((tc & ~wt).any())


def test_brats_channel_sizes_match_the_native_labels(brats_native):
    seg = synth_brats_case(0, 0, SHAPE)["seg"]
    counts = brats_native["label"].sum(dim=(1, 2, 3)).tolist()
    assert counts == [np.isin(seg, (1, 4)).sum(), np.isin(seg, (1, 2, 4)).sum(), (seg == 4).sum()]


def test_decathlon_and_native_layouts_of_the_same_case_give_the_same_tensors(data, brats_native):
    msd = brats_transforms("msd", train=False)(load_datalist(data["msd_brats"])[0])
    assert torch.equal(msd["label"].as_tensor(), brats_native["label"].as_tensor())
    assert torch.allclose(msd["image"].as_tensor(), brats_native["image"].as_tensor())


def test_the_brats_2023_release_of_the_same_case_gives_the_same_tensors(data, brats_native, tmp_path):
    case = load_datalist(as_brats2023(data["brats"], tmp_path / "brats2023"))[0]
    out = brats_transforms("brats2023", train=False)(case)
    assert torch.equal(out["label"].as_tensor(), brats_native["label"].as_tensor())
    assert torch.equal(out["image"].as_tensor(), brats_native["image"].as_tensor())
    # its labels read with the Decathlon's convention pass the range check (the same values) but give
    # another tumour core: the layout, detected from the file names, is what tells them apart
    as_msd = brats_transforms("msd", train=False)(case)
    assert not torch.equal(as_msd["label"][0].as_tensor(), brats_native["label"][0].as_tensor())


def test_brats_2023_labels_give_necrosis_and_enhancing_tumour_as_core_and_oedema_as_whole_tumour_only():
    labels = np.array([0, 1, 2, 3]).reshape(1, 4, 1, 1)  # background, NCR, SNFH (oedema), ET
    assert ConvertBrats2023Labels()(labels)[:, :, 0, 0].astype(int).tolist() == [[0, 1, 0, 1], [0, 1, 1, 1], [0, 0, 0, 1]]
    assert ConvertMsdBratsLabels()(labels)[:, :, 0, 0].astype(int).tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]]


def test_brats_is_reoriented_to_ras_and_z_scored_inside_the_brain(brats_native):
    affine = brats_native["image"].affine
    assert bool((torch.diagonal(affine)[:3] > 0).all())  # the files are stored LPS-like
    image = brats_native["image"]
    brain = image[0] != 0
    for channel in image:
        inside = channel[brain]
        assert abs(float(inside.mean())) < 1e-3 and abs(float(inside.std()) - 1.0) < 1e-2
    assert float(image[:, ~brain].abs().max()) == 0.0


def test_brats_training_crops_and_pads_to_the_roi(data):
    item = load_datalist(data["brats"])[0]
    out = brats_transforms("native", train=True, roi_size=(32, 32, 24))(item)
    assert out["image"].shape == (4, 32, 32, 24) and out["label"].shape == (3, 32, 32, 24)
    out = brats_transforms("native", train=True, roi_size=(48, 48, 48))(item)
    assert out["image"].shape == (4, 48, 48, 48) and out["label"].shape == (3, 48, 48, 48)
    with pytest.raises(ValueError, match="roi_size"):
        brats_transforms("native", train=True, roi_size=None)
    with pytest.raises(ValueError, match="layout"):
        brats_transforms("decathlon", train=False)


def test_brats_resamples_to_the_requested_spacing(data):
    out = brats_transforms("msd", train=False, pixdim=(2.0, 2.0, 2.0))(load_datalist(data["msd_brats"])[0])
    assert out["image"].shape == (4, 20, 18, 16) and out["label"].shape == (3, 20, 18, 16)
    assert set(torch.unique(out["label"]).tolist()) == {0.0, 1.0}


def test_decathlon_labels_map_oedema_to_whole_tumour_only_unlike_monais_et3_transform():
    msd = np.array([0, 1, 2, 3]).reshape(1, 4, 1, 1)
    ours = ConvertMsdBratsLabels()(msd)
    assert ours.shape == (3, 4, 1, 1)
    assert ours[:, :, 0, 0].astype(int).tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]]
    as_tensor = ConvertMsdBratsLabelsd(keys="label")({"label": torch.as_tensor(msd)})["label"]
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.int().tolist() == ours.astype(int).tolist()
    if "et_label" in inspect.signature(ConvertToMultiChannelBasedOnBratsClasses).parameters:  # MONAI 1.5 on
        builtin = ConvertToMultiChannelBasedOnBratsClasses(et_label=3)(msd)
        assert builtin[0, 1, 0, 0] and not ours[0, 1, 0, 0]  # the built-in counts oedema as tumour core


def test_a_native_brats_label_read_as_decathlon_is_refused_naming_the_file(data):
    wrong = {"image": load_datalist(data["brats"])[0]["image"], "label": load_datalist(data["brats"])[0]["label"]}
    expected = r"label file .*BraTS20_Training_001_seg\.nii\.gz has values \{4\} outside .*\{0, 1, 2, 3\}"
    with pytest.raises(DatasetError, match=expected):
        brats_transforms("msd", train=False)(wrong)
    # and with the check off, the mislabelled case goes through (the caller asked for it)
    assert brats_transforms("msd", train=False, check_labels=False)(wrong)["label"].shape == (3, *SHAPE)


def test_a_lits_label_out_of_range_is_refused_naming_the_file_and_values(tmp_path, data):
    seg = synth_lits_case(0, 0, SHAPE)["seg"]
    seg[0, 0, 0], seg[0, 0, 1] = 3, 7
    bad = tmp_path / "segmentation-0.nii"
    nib.save(nib.Nifti1Image(seg, np.eye(4)), bad)
    item = {"image": str(data["lits"] / "volume-0.nii"), "label": str(bad)}
    expected = r"segmentation-0\.nii has values \{3, 7\} outside the allowed set \{0, 1, 2\}"
    with pytest.raises(DatasetError, match=expected):
        lits_transforms(train=False)(item)
    with pytest.raises(DatasetError, match="outside the allowed set"):  # also through a MONAI Dataset
        Dataset([item], lits_transforms(train=False))[0]


def test_label_check_works_on_plain_arrays_and_rejects_fractions():
    label = np.zeros((1, 4, 4, 4), dtype=np.float32)
    assert CheckLabelRanged("label", (0, 1, 2))({"label": label})["label"] is label
    label[0, 0, 0, 0] = 0.5
    with pytest.raises(DatasetError, match=r"case\.nii has values \{0\.5\}"):
        CheckLabelRanged("label", (0, 1, 2))({"label": label, "label_meta_dict": {"filename_or_obj": "case.nii"}})
    with pytest.raises(DatasetError, match=r"<label in memory> has values \{9\}.*check the dataset and layout"):
        CheckLabelRange((0, 1))(torch.tensor([0, 1, 9]))
    # a label resampled with linear interpolation: a value a hair below 2 is not printed as 2, an allowed value
    with pytest.raises(DatasetError, match=r"has values \{1\.99999988\} outside the allowed set .*non-integer values: round the label"):
        CheckLabelRange((0, 1, 2))(torch.tensor([0.0, 1.0, 1.9999999]))


def test_lits_gives_a_windowed_image_and_an_integer_multiclass_label(lits_eval):
    image, label = lits_eval["image"], lits_eval["label"]
    assert image.shape[0] == 1 and label.shape == image.shape
    assert image.dtype == torch.float32 and float(image.min()) == 0.0 and float(image.max()) == 1.0
    assert label.dtype == torch.int64 and set(torch.unique(label).tolist()) == {0, 1, 2}


def test_lits_crops_away_the_air_but_keeps_the_whole_body_and_liver(lits_eval):
    case = synth_lits_case(0, 0, SHAPE)
    body = np.argwhere(case["ct"] > -500)
    assert tuple(lits_eval["image"].shape[1:]) == tuple(body.max(0) - body.min(0) + 1)
    assert lits_eval["image"].shape[2] < SHAPE[1]  # the body is narrower than the field of view front to back
    assert [int((lits_eval["label"] == k).sum()) for k in (1, 2)] == [int((case["seg"] == k).sum()) for k in (1, 2)]


def test_lits_decathlon_and_native_layouts_agree(data, lits_eval):
    msd = lits_transforms(train=False)(load_datalist(data["msd_lits"])[0])
    assert torch.equal(msd["label"].as_tensor(), lits_eval["label"].as_tensor())
    assert torch.allclose(msd["image"].as_tensor(), lits_eval["image"].as_tensor())


def test_lits_training_returns_roi_sized_samples_that_batch(data):
    transform = lits_transforms(train=True, roi_size=(24, 24, 24), pixdim=(1.5, 1.5, 1.5), num_samples=2)
    transform = pickle.loads(pickle.dumps(transform))  # multi-process loaders pickle the pipeline
    samples = transform(load_datalist(data["lits"])[0])
    assert len(samples) == 2
    for sample in samples:
        assert sample["image"].shape == (1, 24, 24, 24) and sample["label"].dtype == torch.int64
    loader = DataLoader(Dataset(load_datalist(data["lits"]) * 2, transform), batch_size=2, num_workers=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 1, 24, 24, 24) and batch["label"].shape == (4, 1, 24, 24, 24)


def test_lits_refuses_an_empty_window():
    with pytest.raises(ValueError, match="a_min"):
        lits_transforms(train=False, a_min=100.0, a_max=100.0)


@pytest.mark.parametrize("dataset", ["lits", "brats"])
def test_inference_preprocessing_names_only_the_image_and_gives_the_evaluation_image(data, dataset):
    from monai.transforms import LoadImaged

    from monai_effq.bundle import image_preprocessing

    transform = image_preprocessing(dataset)
    # MONAI Label swaps each top-level LoadImaged for a loader that loads every key it names
    assert isinstance(transform.transforms[0], LoadImaged)
    assert all(tuple(t.keys) == ("image",) for t in transform.transforms if hasattr(t, "keys"))
    case = load_datalist(data[dataset])[0]
    full = (lits_transforms(train=False) if dataset == "lits" else brats_transforms("native", train=False))(case)
    image = transform({"image": case["image"]})
    assert set(image) == {"image"}
    assert torch.equal(image["image"].as_tensor(), full["image"].as_tensor())


def test_training_without_the_label_is_refused():
    with pytest.raises(ValueError, match="with_label"):
        lits_transforms(train=True, roi_size=(8, 8, 8), with_label=False)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_inference_reads_nrrd_and_metaimage_through_itk_as_it_reads_the_nifti(data, tmp_path, suffix):
    itk = pytest.importorskip("itk")
    from monai_effq.bundle import image_preprocessing

    case = load_datalist(data["lits"])[0]
    itk.imwrite(itk.imread(case["image"]), str(tmp_path / f"ct{suffix}"))  # what 3D Slicer / MONAI Label clients send
    transform = image_preprocessing("lits")
    nifti, other = (transform({"image": path})["image"] for path in (case["image"], str(tmp_path / f"ct{suffix}")))
    assert other.shape == nifti.shape
    assert torch.allclose(other.as_tensor(), nifti.as_tensor(), atol=1e-5)


def test_a_truncated_image_is_refused_by_the_loader_naming_the_file(tmp_path, data):
    case = load_datalist(data["lits"])[0]
    bad = tmp_path / "volume-0.nii"
    bad.write_bytes(Path(case["image"]).read_bytes()[:-4096])  # the header still parses
    item = {"image": str(bad), "label": case["label"]}
    with pytest.raises(DatasetError, match=r"corrupt or unreadable NIfTI file .*volume-0\.nii"):
        lits_transforms(train=False)(item)
    with pytest.raises(DatasetError, match=r"corrupt or unreadable NIfTI file .*volume-0\.nii"):
        Dataset([item], lits_transforms(train=False))[0]


@pytest.mark.parametrize("damage", ["header", "truncated", "truncated_compressed"])
@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_a_corrupt_nrrd_or_metaimage_file_is_refused_naming_it(tmp_path, suffix, damage):
    itk = pytest.importorskip("itk")
    from monai_effq.bundle import image_preprocessing

    bad = tmp_path / f"ct{suffix}"
    if damage == "header":
        bad.write_bytes(b"not an image header\n" * 20)
    else:  # ITK 5.3 read a MetaImage cut short without an error, the missing voxels left as they were in memory
        volume = np.random.default_rng(0).random((24, 32, 32), dtype=np.float32)
        itk.imwrite(itk.image_from_array(volume), str(bad), compression=damage == "truncated_compressed")
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size * 3 // 4])
    with pytest.raises(DatasetError, match=rf"cannot read image file\(s\) \['.*ct\{suffix}'\]: .*; re-export or remove them"):
        image_preprocessing("lits")({"image": str(bad)})


def test_an_image_with_nan_voxels_is_refused_naming_the_file(tmp_path, data):
    case = load_datalist(data["lits"])[0]
    image = np.asarray(nib.load(case["image"]).dataobj, dtype=np.float32)
    image[5, 5, 5] = np.nan
    bad = tmp_path / "volume-0.nii"
    nib.save(nib.Nifti1Image(image, np.eye(4)), bad)
    with pytest.raises(DatasetError, match=r"image .*volume-0\.nii holds 1 NaN or Inf voxel"):
        lits_transforms(train=False)({"image": str(bad), "label": case["label"]})


def test_a_ct_with_no_voxel_above_minus_500_hu_is_refused_after_the_body_crop_naming_the_file(tmp_path, data):
    case = load_datalist(data["lits"])[0]
    shifted = tmp_path / "volume-0.nii"  # the rescale intercept applied twice: every voxel 1024 HU too low
    nib.save(nib.Nifti1Image(np.full(SHAPE, -1500, np.int16), nib.load(case["image"]).affine), shifted)
    expected = (
        r"image .*volume-0\.nii has no voxel above -500 HU, so the body crop left nothing: is it a CT in Hounsfield "
        r"units \(check its rescale slope and intercept\)\?"
    )
    with pytest.raises(DatasetError, match=expected):
        lits_transforms(train=False)({"image": str(shifted), "label": case["label"]})
    with pytest.raises(DatasetError, match=expected):  # inference, and through a MONAI Dataset, alike
        Dataset([{"image": str(shifted)}], lits_transforms(train=False, with_label=False))[0]


@pytest.mark.parametrize("dataset", ["lits", "brats"])
def test_a_label_on_another_grid_than_its_image_is_refused_naming_both_instead_of_padded_into_place(tmp_path, data, dataset):
    case = load_datalist(data[dataset])[0]
    source = nib.load(case["label"])
    short = tmp_path / "label.nii.gz"  # two slices fewer than the image: padding would shift it against the anatomy
    nib.save(nib.Nifti1Image(np.asanyarray(source.dataobj)[..., :-2], source.affine), short)
    pipeline = lits_transforms(train=True, roi_size=(16, 16, 8)) if dataset == "lits" else brats_transforms("native", train=True, roi_size=(16, 16, 8))
    shape = "x".join(map(str, (*SHAPE[:2], SHAPE[2] - 2)))
    with pytest.raises(DatasetError, match=rf"label .*label\.nii\.gz is {shape} voxels but its image .* is {'x'.join(map(str, SHAPE))}"):
        pipeline({"image": case["image"], "label": str(short)})


def test_nan_voxels_in_one_brats_contrast_are_blamed_on_that_contrasts_file_not_the_first(tmp_path, data):
    case = load_datalist(data["brats"])[0]
    t1 = nib.load(case["image"][1])
    blank = tmp_path / "BraTS20_Training_001_t1.nii.gz"
    nib.save(nib.Nifti1Image(np.full(t1.shape, np.nan, np.float32), t1.affine), blank)
    images = [case["image"][0], str(blank), *case["image"][2:]]
    with pytest.raises(DatasetError, match=rf"image .*_t1\.nii\.gz holds {int(np.prod(SHAPE))} NaN or Inf voxel"):
        brats_transforms("native", train=False)({"image": images, "label": case["label"]})


def test_a_brats_case_loads_without_the_list_of_its_files_left_in_the_metadata(brats_native):
    assert not any("channel_files" in str(key) for key in brats_native["image"].meta)  # nothing extra reaches a batch


def test_an_image_stored_in_another_axis_order_than_its_label_on_the_same_voxels_pairs_as_the_untouched_one(tmp_path, data):
    from monai_effq.data import validate_datalist

    image = nib.load(str(data["lits"] / "volume-0.nii"))
    # the same world grid stored z, y, x (as some converters store rows): the axes swapped and the affine's columns with them
    swapped = nib.Nifti1Image(np.ascontiguousarray(np.asarray(image.dataobj).transpose(2, 1, 0)), image.affine[:, [2, 1, 0, 3]])
    nib.save(swapped, tmp_path / "volume-0.nii")
    label = str(data["lits"] / "segmentation-0.nii")
    item = {"image": str(tmp_path / "volume-0.nii"), "label": label}
    # its stored shape (32, 36, 40) was compared with the label's (40, 36, 32) and refused as another grid
    validate_datalist([item], read_data=True)
    loaded = lits_transforms(train=False)(item)
    untouched = lits_transforms(train=False)({"image": str(data["lits"] / "volume-0.nii"), "label": label})
    assert torch.equal(loaded["label"], untouched["label"]) and torch.allclose(loaded["image"], untouched["image"])
    off = nib.Nifti1Image(np.zeros((32, 36, 41), np.float32), image.affine)  # another voxel count is still refused
    nib.save(off, tmp_path / "volume-1.nii")
    with pytest.raises(DatasetError, match=r"spatial shape \(40, 36, 32\) of .*segmentation-0\.nii differs from \(32, 36, 41\)"):
        validate_datalist([{"image": str(tmp_path / "volume-1.nii"), "label": label}], read_data=True)
