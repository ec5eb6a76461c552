from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_effq.data import DatasetError, check_image, dicom_series_files, load_datalist, make_brats_demo, make_lits_demo, mask_subject

from ..dicom import write_dicom_series, write_non_image_dicom

itk = pytest.importorskip("itk")


@pytest.fixture(scope="module")
def lits(tmp_path_factory) -> list[dict]:
    return load_datalist(make_lits_demo(tmp_path_factory.mktemp("images") / "lits", n_cases=2, shape=(40, 36, 32)))


@pytest.fixture
def series(lits, tmp_path) -> tuple[Path, list[str]]:
    """The first CT as a scanner's archive hands it out: one DICOM file per slice in a folder."""
    folder = tmp_path / "ct"
    return folder, write_dicom_series(lits[0]["image"], folder)


def test_a_dicom_series_folder_is_preprocessed_as_the_nifti_it_was_made_from(lits, series):
    from monai_effq.bundle import image_preprocessing

    folder, _ = series
    transform = image_preprocessing("lits")
    dicom, nifti = (transform({"image": path})["image"] for path in (str(folder), lits[0]["image"]))
    assert dicom.shape == nifti.shape
    assert torch.equal(dicom.as_tensor(), nifti.as_tensor())
    assert np.allclose(dicom.affine, nifti.affine)  # the slices' positions give the NIfTI's geometry
    check_image(str(folder))


def test_the_four_brats_contrasts_as_four_dicom_series_are_preprocessed_as_their_nifti_files(tmp_path):
    from monai_effq.bundle import image_preprocessing

    case = load_datalist(make_brats_demo(tmp_path / "brats", n_cases=1, shape=(40, 36, 32)))[0]
    folders = [str(tmp_path / f"series{i}") for i in range(4)]
    for i, (contrast, folder) in enumerate(zip(case["image"], folders)):
        write_dicom_series(contrast, folder, series_uid=f"1.2.826.0.1.3680043.2.1125.{i + 1}")
    transform = image_preprocessing("brats")
    dicom, nifti = (transform({"image": paths})["image"] for paths in (folders, case["image"]))
    assert dicom.shape == nifti.shape == (4, 40, 36, 32)
    assert torch.equal(dicom.as_tensor(), nifti.as_tensor()) and np.allclose(dicom.affine, nifti.affine)
    check_image(folders)


def test_the_images_of_one_case_must_share_a_grid_whatever_their_formats(tmp_path):
    import nibabel as nib

    case = load_datalist(make_brats_demo(tmp_path / "brats", n_cases=1, shape=(40, 36, 32)))[0]
    flair, t1, t1gd, t2 = case["image"]
    series = tmp_path / "t1_series"
    write_dicom_series(t1, series)
    check_image([flair, str(series), t1gd, t2])  # a NIfTI and a series of the same grid are one grid
    # a T2 acquired with thicker slices, as an archive holds it before registration
    image = nib.load(t2)
    thick = tmp_path / "t2_thick.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj)[:, :, ::2], image.affine @ np.diag([1.0, 1.0, 2.0, 1.0])), str(thick))
    with pytest.raises(DatasetError, match=r"the images of one case are not on one grid: .*t2_thick.nii.gz is 40x36x16 voxels of 1x1x2 mm"):
        check_image([flair, str(series), t1gd, str(thick)])
    moved = tmp_path / "t2_moved.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine @ _translation(0.0, 0.0, 1.0)), str(moved))
    with pytest.raises(DatasetError, match="not on one grid"):  # the same size, one slice further up
        check_image([flair, str(moved)])


def _translation(*offset: float) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = offset
    return matrix


def test_a_folder_of_two_series_is_refused_before_monai_reads_only_the_first(lits, series):
    from monai_effq.bundle import image_preprocessing

    folder, _ = series
    write_dicom_series(lits[1]["image"], folder, series_uid="1.2.826.0.1.3680043.2.1125.2", prefix="B")
    with pytest.raises(DatasetError, match=r"folder .*ct holds 2 DICOM series .*(32 files).*put each series in a folder of its own"):
        check_image(str(folder), read_data=False)
    with pytest.raises(DatasetError, match="holds 2 DICOM series"):  # also where the pipeline loads it
        image_preprocessing("lits")({"image": str(folder)})


def test_a_folder_without_dicom_files_is_refused_saying_what_to_pass(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=r"holds no DICOM series: pass an image file .* or a folder holding the DICOM files of one series"):
        dicom_series_files(tmp_path)


def test_a_damaged_slice_is_named_though_the_series_would_read_without_an_error(series):
    folder, files = series
    damaged = Path(files[10])
    damaged.write_bytes(damaged.read_bytes()[:-2000])  # the preamble stays: still recognisably DICOM
    # ITK 5.4.7's GDCM leaves it out of the series, 5.4.0's reads it with made-up voxels: both without an error
    with pytest.raises(DatasetError, match=rf"DICOM file .*{damaged.name} in folder .* cannot be read"):
        check_image(str(folder))


def test_a_slice_cut_short_is_told_from_a_whole_one_by_its_declared_pixel_data_length(series):
    from monai_effq.data.images import _cut_short  # what refuses it where GDCM lists it (ITK 5.4.0)

    _, files = series
    whole, cut = Path(files[3]), Path(files[4])
    cut.write_bytes(cut.read_bytes()[:-100])
    assert not _cut_short(whole) and _cut_short(cut)


@pytest.mark.parametrize("damage", ["missing", "doubled"])
def test_a_series_with_a_missing_or_doubled_slice_is_refused_naming_the_gap(series, damage):
    folder, files = series
    if damage == "missing":
        Path(files[10]).unlink()
        expected = r"IM0009\.dcm and IM0011\.dcm are 2 mm apart where its other slices are 1 mm apart"
    else:
        (folder / "copy.dcm").write_bytes(Path(files[10]).read_bytes())
        expected = r"IM0010\.dcm and copy\.dcm are 0 mm apart"
    with pytest.raises(DatasetError, match=expected):
        dicom_series_files(folder)


def test_dicom_objects_without_voxels_beside_the_series_are_not_taken_for_damaged_slices(lits, series):
    from monai.transforms import LoadImage

    folder, files = series
    write_non_image_dicom(folder / "RS.dcm", "1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT")  # radiotherapy exports
    write_non_image_dicom(folder / "SR000001", "1.2.840.10008.5.1.4.1.1.88.33", "SR")
    assert dicom_series_files(folder) == [str(f) for f in files]
    assert LoadImage(image_only=True)(str(folder)).shape[-1] == len(files)  # as MONAI reads the folder


def test_a_gantry_tilted_series_is_refused_since_monai_would_stack_it_straight(lits, tmp_path):
    write_dicom_series(lits[0]["image"], tmp_path / "tilted", shift_per_slice=(0.0, 0.35))  # about 19 degrees on 1 mm slices
    with pytest.raises(DatasetError, match=r"sheared by 19\.\d degrees .* \(a gantry tilt\)"):
        dicom_series_files(tmp_path / "tilted")
    write_dicom_series(lits[0]["image"], tmp_path / "straight", shift_per_slice=(0.0, 0.001))
    dicom_series_files(tmp_path / "straight")  # rounding-sized shifts pass


def test_two_echoes_in_one_series_are_named_as_such(lits, tmp_path):
    for echo in ("E1_", "E2_"):  # the same series UID and positions, twice
        write_dicom_series(lits[0]["image"], tmp_path / "echoes", prefix=echo)
    with pytest.raises(DatasetError, match=r"about 2 slices at each position: several echoes, phases or time points"):
        dicom_series_files(tmp_path / "echoes")


def test_one_slice_of_a_series_given_on_its_own_is_refused_naming_the_folder(series):
    folder, files = series
    with pytest.raises(DatasetError, match=rf"image .*IM0003\.dcm is one slice of a DICOM series of 32 files: pass its folder, {folder}"):
        check_image(files[3])


def test_a_series_folder_is_masked_under_its_whole_name_with_or_without_a_trailing_separator(tmp_path):
    for name in ("2.000000-ARTERIAL-41234", "CT_venous"):
        (tmp_path / name).mkdir()
        assert Path(mask_subject(f"{tmp_path / name}{os.sep}")).stem == name  # the stand-in suffix is what MONAI strips
    assert mask_subject(tmp_path / "ct.nii.gz") == str(tmp_path / "ct.nii.gz")


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_an_itk_format_file_cut_short_is_refused_when_its_voxels_are_read(tmp_path, suffix):
    bad = tmp_path / f"ct{suffix}"
    itk.imwrite(itk.image_from_array(np.random.default_rng(0).random((24, 32, 32), dtype=np.float32)), str(bad))
    check_image(str(bad))
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size * 3 // 4])
    check_image(str(bad), read_data=False)  # the header alone still reads
    with pytest.raises(DatasetError, match=rf"cannot read image file\(s\) \['.*ct\{suffix}'\]: .*; re-export or remove them") as raised:
        check_image(str(bad))
    assert not re.search(r"\.cxx:\d+", str(raised.value)), raised.value  # ITK's reason, not its source line


def test_a_missing_image_and_a_corrupt_nifti_are_named(lits, tmp_path):
    with pytest.raises(DatasetError, match=r"image .*absent\.nii\.gz does not exist"):
        check_image(str(tmp_path / "absent.nii.gz"))
    bad = tmp_path / "volume-9.nii"
    bad.write_bytes(Path(lits[0]["image"]).read_bytes()[:-4096])
    with pytest.raises(DatasetError, match=r"corrupt or unreadable NIfTI file .*volume-9\.nii"):
        check_image([lits[0]["image"], str(bad)])  # a multi-modal case: each file is checked


def test_a_nifti_label_of_another_shape_than_its_dicom_series_is_refused(lits, series, tmp_path):
    import nibabel as nib

    from monai_effq.data import validate_datalist

    folder, _ = series
    validate_datalist([{"image": str(folder), "label": lits[0]["label"]}])  # the segmentation of the CT the series holds
    label = nib.load(lits[0]["label"])
    cut = tmp_path / "segmentation-0.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(label.dataobj)[:, :, :30], label.affine), str(cut))
    with pytest.raises(DatasetError, match=r"spatial shape \(40, 36, 30\) of .*segmentation-0\.nii\.gz differs from \(40, 36, 32\) of the DICOM series in .*ct"):
        validate_datalist([{"image": str(folder), "label": str(cut)}])


def test_a_2d_nifti_image_is_refused_before_inference_naming_the_file_and_its_shape(tmp_path):
    import nibabel as nib

    flat = tmp_path / "ct2d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)), str(flat))
    expected = r"image .*ct2d\.nii\.gz has 2 spatial axes \(64x64\); monai-effq segments 3D volumes: give the whole volume"
    for read_data in (True, False):
        with pytest.raises(DatasetError, match=expected):
            check_image(str(flat), read_data=read_data)
    thin = tmp_path / "thin.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 1), np.int16), np.eye(4)), str(thin))
    check_image(str(thin))  # one slice saved as a 3D file is a volume


def test_a_nifti_label_of_several_volumes_for_a_dicom_series_is_refused_naming_it(lits, series, tmp_path):
    import nibabel as nib

    from monai_effq.data import validate_datalist

    folder, _ = series
    label = nib.load(lits[0]["label"])
    one_hot = np.stack([np.asanyarray(label.dataobj) == k for k in (1, 2)], -1).astype(np.uint8)
    stacked = tmp_path / "segmentation-0.nii.gz"
    nib.save(nib.Nifti1Image(one_hot, label.affine), str(stacked))
    with pytest.raises(DatasetError, match=r"label .*segmentation-0\.nii\.gz is 40x36x32x2 voxels, not one 3D volume: save one 3D map"):
        validate_datalist([{"image": str(folder), "label": str(stacked)}])


def test_a_dicom_series_grid_read_from_two_slice_headers_is_the_one_itk_and_monai_read(tmp_path):
    import nibabel as nib
    from monai.transforms import LoadImage

    from monai_effq.data.images import series_grid

    # an oblique, anisotropic CT away from the origin: every part of the affine is tested
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0.0], [s * 0.9, c * 0.9, 0.436], [-s * 0.436, -c * 0.436, 0.9]]) @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    voxels = (np.random.default_rng(0).random((30, 28, 12)) * 100).astype(np.int16)
    nib.save(nib.Nifti1Image(voxels, affine), str(tmp_path / "oblique.nii.gz"))
    files = write_dicom_series(tmp_path / "oblique.nii.gz", tmp_path / "oblique")
    shape, grid = series_grid(dicom_series_files(tmp_path / "oblique"))
    read = LoadImage(reader="ITKReader", image_only=True)(str(tmp_path / "oblique"))
    assert shape == tuple(read.shape) == (30, 28, 12) and len(files) == 12
    assert np.allclose(grid, read.affine.numpy(), atol=1e-4) and np.allclose(grid, affine, atol=1e-4)


def test_a_nifti_label_of_its_dicom_series_shape_but_another_header_is_refused_from_the_headers(lits, series, tmp_path):
    import nibabel as nib

    from monai_effq.data import validate_datalist

    folder, _ = series
    label = nib.load(lits[0]["label"])
    identity = tmp_path / "segmentation-0.nii.gz"  # an exporter's identity affine: x and y run the other way
    nib.save(nib.Nifti1Image(np.asanyarray(label.dataobj), np.eye(4)), str(identity))
    with pytest.raises(DatasetError, match=r"label .*segmentation-0\.nii\.gz is not on the grid of its image the DICOM series in .*ct: .*towards RAS.*towards LPS"):
        validate_datalist([{"image": str(folder), "label": str(identity)}])


def test_the_dicom_series_of_one_case_on_two_grids_are_refused_before_any_voxel_is_read(lits, series, tmp_path):
    import nibabel as nib

    from monai_effq.data import validate_datalist

    folder, _ = series
    image = nib.load(lits[0]["image"])
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj).astype(np.int16), image.affine @ np.diag([1.0, 1.0, 2.0, 1.0])), str(tmp_path / "t2.nii.gz"))
    write_dicom_series(tmp_path / "t2.nii.gz", tmp_path / "t2")
    with pytest.raises(DatasetError, match=r"the images of one case are not on one grid: .*t2 is .* where .*ct is"):
        validate_datalist([{"image": [str(folder), str(tmp_path / "t2")]}])
