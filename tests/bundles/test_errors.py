"""What a user sees when a bundle workflow gets bad input: one line on stderr, no traceback, nothing written.

The cases that show what the user sees run the real command, ``python -m monai.bundle run``, in a
subprocess (about 5 s of imports each), on a small LiTS-layout dataset of this test's own or from
inside a copy of the bundle; the commands run together, in the :func:`runs` fixture, and each test
reads its result. The other bad settings and files raise a ``UserInputError`` (which the command
reports in that one line) and run in this process.
"""

import hashlib
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch

from monai_effq.bundle import datalist
from monai_effq.data import make_lits_demo
from monai_effq.ptq.journal import journal_path
from monai_effq.utils.errors import DEBUG_ENV, find_user_error

from ..dicom import write_dicom_series
from .conftest import ROOT, bundle, copy_bundle


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Three small LiTS cases; calibration uses training case 0."""
    folder = tmp_path_factory.mktemp("lits")
    make_lits_demo(folder, n_cases=3, shape=(32, 32, 32), seed=0)
    return folder


@pytest.fixture(scope="module")
def truncated(tmp_path_factory, dataset) -> tuple[Path, Path]:
    """A copy of the dataset whose calibration image is cut short (its header still parses)."""
    folder = tmp_path_factory.mktemp("lits_truncated")
    for path in dataset.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    image = Path(datalist(folder, "lits", "train")[0]["image"])
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    return folder, image


def _outputs(root: Path) -> tuple[str, ...]:
    out = root / "out"
    return (
        "--output_dir", str(out), "--quantized_path", str(out / "model_q.pt"), "--export_dir", str(out / "export"),
    )


def _assert_one_line(res, root: Path, message: str) -> None:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode != 0, res.stdout[-2000:]
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    assert lines[-1].startswith("error: "), res.stderr[-3000:]
    assert message in lines[-1], lines[-1]
    assert not (root / "out").exists() or not any((root / "out").rglob("*")), "the failed run wrote output"


# bad quantize settings: the first runs as a command, the others in this process
CASES = {
    "weight bits out of range": (("--weight_bits", "9"), "weight_bits must be an integer from 2 to 8, got 9."),
    "missing dataset folder": ((), "does not exist or is not a folder"),
    "weight bits as a word": (("--weight_bits", "four"), "weight_bits must be an integer from 2 to 8, got 'four'"),
    "calibration case past the end": (("--calibration_case", "99"), "calibration_case 99 is past the end of the 2 training cases"),
    "zero calibration crop": (("--calibration_crop", "[0,0,0]"), "each calibration_crop size must be an integer of at least 1, got 0"),
    "crop smaller than the downsampling": (
        ("--calibration_crop", "[12,12,12]", "--calibration_roi", "[12,12,12]"),
        "does not fit the network",
    ),
    "missing checkpoint": (("--fp_checkpoint", "missing/model.pt"), "FP checkpoint"),
    "a GPU this machine lacks": (("--device", "cuda:7"), "device 'cuda:7' was asked for but this machine has"),
}


def _quantize(folder: Path, root: Path, *overrides: str) -> tuple[str, ...]:
    return ("lits_effq", "quantize", "--dataset_dir", str(folder), *_outputs(root), *overrides)


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every command of this module, four at a time: ``{name: (result, its scratch folder)}``.

    Each is a fresh process whose ~5 s of imports use one core, so running them together keeps both
    cores of a small machine busy (about half the module's time on two cores).
    """
    # name: (scratch folder, bundle and workflow and overrides, environment, folder it runs in)
    commands: dict[str, tuple[Path, tuple[str, ...], dict[str, str], Path | None]] = {}
    root = tmp_path_factory.mktemp("case")
    commands["weight bits out of range"] = (root, _quantize(dataset, root, *CASES["weight bits out of range"][0]), {}, None)
    root = tmp_path_factory.mktemp("debug")
    commands["debug"] = (root, _quantize(dataset, root, "--weight_bits", "9"), {DEBUG_ENV: "1"}, None)
    if torch.cuda.device_count() <= 7:
        root = tmp_path_factory.mktemp("inference")
        args = ("lits_effq", "inference", "--dataset_dir", str(dataset), "--output_dir", str(root / "out"), "--device", "cuda:7")
        commands["inference on a GPU this machine lacks"] = (root, args, {}, None)
    # from inside copies of the bundle, with its defaults: no images given; the shipped weights in place
    copy = copy_bundle("lits_effq", tmp_path_factory.mktemp("no_images") / "lits_effq")
    commands["inference without images"] = (copy, ("lits_effq", "inference"), {}, copy)
    copy = copy_bundle("lits_effq", tmp_path_factory.mktemp("shipped") / "lits_effq")
    shutil.copy(ROOT / "bundles" / "lits_effq" / "large_files.yml", copy / "large_files.yml")
    commands["training over the shipped weights"] = (copy, ("lits_effq", "train", "--max_epochs", "1"), {}, copy)
    with ThreadPoolExecutor(max_workers=4) as pool:
        started = {
            name: pool.submit(bundle, *args, check=False, env=env, cwd=cwd) for name, (_, args, env, cwd) in commands.items()
        }
    return {name: (started[name].result(), commands[name][0]) for name in commands}


def test_bad_quantize_input_ends_with_one_line_and_writes_nothing(runs):
    _assert_one_line(*runs["weight bits out of range"], CASES["weight bits out of range"][1])


def _user_error(folder: Path, root: Path, *overrides: str) -> str:
    """The message of the ``UserInputError`` that quantize on ``folder`` with ``overrides`` ends with, in this process."""
    from monai_effq.utils.errors import find_user_error

    with pytest.raises(Exception) as raised:
        bundle(*_quantize(folder, root, *overrides))
    found = find_user_error(raised.value)
    assert found is not None, repr(raised.value)
    assert not (root / "out").exists() or not any((root / "out").rglob("*")), "the failed run wrote output"
    return str(found)


@pytest.mark.parametrize("case", list(CASES)[1:])
def test_bad_quantize_settings_are_user_input_errors_naming_them_before_anything_is_written(case, dataset, tmp_path):
    if case == "a GPU this machine lacks" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    overrides, message = CASES[case]
    folder = tmp_path / "absent" if case == "missing dataset folder" else dataset
    assert message in _user_error(folder, tmp_path, *overrides)


def test_truncated_calibration_image_is_named_before_the_network_runs(truncated, tmp_path):
    folder, image = truncated
    assert f"corrupt or unreadable NIfTI file {image}" in _user_error(folder, tmp_path)


def test_debug_switch_keeps_the_traceback(runs):
    res, _ = runs["debug"]
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "UserInputError: weight_bits must be an integer" in res.stderr


def test_inference_on_a_gpu_this_machine_lacks_ends_with_one_line_and_writes_nothing(runs):
    if "inference on a GPU this machine lacks" not in runs:
        pytest.skip("this machine has a cuda:7")
    _assert_one_line(*runs["inference on a GPU this machine lacks"], "device 'cuda:7' was asked for but this machine has")


def test_inference_never_generates_the_demo_data_and_says_how_to_get_images(runs):
    res, copy = runs["inference without images"]
    assert res.returncode != 0
    assert "never generates the demo data" in res.stderr and "--dataset_dir" in res.stderr
    assert not (copy / "data").exists()


def test_training_refuses_to_replace_the_shipped_checkpoint(runs):
    res, copy = runs["training over the shipped weights"]
    assert res.returncode != 0
    assert "is the checkpoint this bundle ships" in res.stderr and "--ckpt_dir" in res.stderr
    shipped = ROOT / "bundles" / "lits_effq" / "models" / "model.pt"  # what copy_bundle copied
    assert hashlib.md5((copy / "models" / "model.pt").read_bytes()).hexdigest() == hashlib.md5(shipped.read_bytes()).hexdigest()
    assert not (copy / "data").exists()  # stopped before anything ran


# Bad settings and files that the bundle command reports in one line because they raise a
# UserInputError (the one-line report itself is tested on the command above). They run in this
# process: a command each would add its ~5 s of imports to the suite.
IN_PROCESS_CASES = {
    "damaged FP checkpoint": (
        "quantize", lambda path: path.write_bytes(b"half a checkpoint" * 10), "is damaged or not a PyTorch state dict ("
    ),
    "FP checkpoint of another network": (
        "quantize",
        lambda path: torch.save({"model": torch.nn.Conv3d(1, 3, 3).state_dict()}, path),
        "holds the weights of another network (model.0.conv.unit0.conv.weight missing",
    ),
    "unknown dataset layout": ("quantize", None, "layout must be 'auto', 'native' or one of"),
    "unknown task": ("quantize", None, "task must be one of ('multiclass', 'multilabel'), got 'segmentation'"),
    "inference before quantize": ("inference", None, "model_efficientq_w4a8.pt does not exist: run the quantize workflow first"),
    # before the FP evaluation, which took minutes and wrote its per-case files first
    "evaluate before quantize": ("evaluate", None, "model_efficientq_w4a8.pt does not exist: run the quantize workflow first"),
    # 'false' is text, which Python takes for true: this replaced the outputs it was meant to keep
    "overwrite written in lower case": ("quantize", None, "overwrite must be True or False, got 'false'"),
    # settings the docs give as bundle settings, which the bundles used to ignore
    "no memory for calibration": ("quantize", None, "target_memory_mib must be an integer of at least 1, got 0"),
    "first layer at 9 bits": ("quantize", None, "first_layer_bits must be an integer from 2 to 8, got 9"),
    # fine-tune settings, checked before the PTQ start, which takes minutes; they used to fail after it (or end with status 0)
    "fine-tune at a negative learning rate": ("finetune", None, "learning_rate must be a positive number such as 1e-4, got -1"),
    "fine-tune logging every 0 steps": ("finetune", None, "log_every must be an integer of at least 1, got 0"),
    "fine-tune of no steps": ("finetune", None, "steps must be an integer of at least 1, got 0"),
}


@pytest.mark.parametrize("case", list(IN_PROCESS_CASES))
def test_bad_files_and_settings_are_user_input_errors_naming_them_before_anything_is_written(case, dataset, tmp_path):
    workflow, write_fp, message = IN_PROCESS_CASES[case]
    copy = copy_bundle("lits_effq", tmp_path / "lits_effq")  # no quantized checkpoint in it
    args = ["--bundle_root", str(copy), "--dataset_dir", str(dataset), "--output_dir", str(tmp_path / "out")]
    if write_fp is not None:
        write_fp(tmp_path / "model.pt")
        args += ["--fp_checkpoint", str(tmp_path / "model.pt")]
    args += {
        "unknown dataset layout": ["--layout", "nnunet"],
        "unknown task": ["--task", "segmentation"],
        "overwrite written in lower case": ["--overwrite", "false"],
        "no memory for calibration": ["--target_memory_mib", "0"],
        "first layer at 9 bits": ["--first_layer_bits", "9"],
        "fine-tune at a negative learning rate": ["--learning_rate", "-1"],
        "fine-tune logging every 0 steps": ["--log_every", "0"],
        "fine-tune of no steps": ["--steps", "0"],
    }.get(case, [])
    if workflow == "quantize":
        args += ["--quantized_path", str(tmp_path / "out" / "q.pt"), "--export_dir", ""]
    with pytest.raises(Exception) as raised:
        bundle("lits_effq", workflow, *args)
    found = find_user_error(raised.value)
    assert found is not None and message in str(found), repr(raised.value)
    assert "weights_only" not in str(found)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def test_inference_stops_before_it_runs_on_a_malformed_datalist_or_images_whose_masks_would_take_one_name_or_that_are_missing_or_unreadable(dataset, tmp_path):
    image = sorted(dataset.rglob("volume-*.nii"))[0]
    twins = []
    for patient in ("a", "b"):  # two patients' CT, each exported as ct.nii: one mask name in one folder
        (tmp_path / patient).mkdir()
        twins.append({"image": str(shutil.copy(image, tmp_path / patient / "ct.nii"))})
    cut = tmp_path / "cut.mha"  # a MetaImage cut short: its header reads, its voxels do not
    itk.imwrite(itk.imread(str(image)), str(cut))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    nan = tmp_path / "nan.nii"  # met at its case, after the masks of the cases before it were written
    source = nib.load(str(image))
    voxels = source.get_fdata(dtype=np.float32)
    voxels[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(voxels, source.affine), str(nan))
    for series, uid in (("A", "1.2.826.0.1.3680043.2.1125.1"), ("B", "1.2.826.0.1.3680043.2.1125.2")):
        write_dicom_series(image, tmp_path / "two_series", series_uid=uid, prefix=series)  # e.g. two contrast phases
    cases = {
        "would both write the mask ct_seg.nii.gz": twins,
        f"image {tmp_path / 'c' / 'ct.nii'} does not exist": [{"image": str(tmp_path / "c" / "ct.nii")}],
        f"cannot read image file(s) ['{cut}']": [twins[0], {"image": str(cut)}],
        f"image {nan} holds 1 NaN or Inf voxel(s)": [twins[0], {"image": str(nan)}],
        "holds 2 DICOM series": [twins[0], {"image": str(tmp_path / "two_series")}],
        f"inference datalist entry '{image}' is not a case: give each as {{'image': path}}": [str(image)],  # as --calibration_images takes them
        "inference datalist entry {'img'": [{"img": str(image)}],
    }
    for message, datalist in cases.items():
        out = tmp_path / "masks"
        with pytest.raises(Exception) as raised:
            bundle("lits_effq", "inference", "--datalist", repr(datalist), "--output_dir", str(out))
        found = find_user_error(raised.value)
        assert found is not None and message in str(found), repr(raised.value)
        assert not out.exists() or not any(out.iterdir())  # stopped before any mask was written


def test_a_quantize_run_killed_while_it_exports_is_finished_by_the_same_command(dataset, tmp_path, monkeypatch):
    import monai_effq.bundle as bundle_module

    copy = copy_bundle("lits_effq", tmp_path / "lits_effq")
    out, export = tmp_path / "out", tmp_path / "export"
    args = [
        "--bundle_root", str(copy), "--dataset_dir", str(dataset), "--output_dir", str(out), "--export_dir", str(export),
        "--method", "rtn", "--calibration_crop", "[32,32,32]", "--calibration_roi", "[32,32,32]",
    ]  # fmt: skip
    checkpoint = copy / "models" / "model_rtn_w4a8.pt"

    def killed(*args, **kwargs):
        raise RuntimeError("killed while exporting")

    monkeypatch.setattr(bundle_module, "export_monailabel_bundle", killed)
    with pytest.raises(Exception) as stopped:
        bundle("lits_effq", "quantize", *args)
    assert "killed while exporting" in str(stopped.value.__cause__)
    # the checkpoint and report are written, the export is not: the run is unfinished, and says so
    assert checkpoint.is_file() and (out / "quantization_report_rtn_w4a8.json").is_file() and not export.exists()
    assert journal_path(checkpoint).is_dir()
    written = checkpoint.read_bytes()
    monkeypatch.undo()
    bundle("lits_effq", "quantize", *args)  # the same command, without --overwrite
    assert (export / "models" / "model.ts").is_file() and not journal_path(checkpoint).exists()
    assert checkpoint.read_bytes() == written  # resumed from the journal: the same network
    with pytest.raises(Exception) as again:  # finished now, so a third run refuses to replace it
        bundle("lits_effq", "quantize", *args)
    assert "exists from an earlier run" in str(find_user_error(again.value))


@pytest.mark.parametrize("overrides", [("--max_epochs", "0"), ("--val_interval", "0")], ids=["no_epochs", "no_interval"])
def test_a_training_setting_that_cannot_work_stops_train_before_it_caches_data_or_writes(overrides, dataset, tmp_path):
    with pytest.raises(Exception) as raised:
        bundle("lits_effq", "train", "--dataset_dir", str(dataset), "--ckpt_dir", str(tmp_path / "models"), *overrides)
    found = find_user_error(raised.value)
    assert found is not None and f"{overrides[0][2:]} must be an integer of at least 1, got 0" in str(found), repr(raised.value)
    assert not (tmp_path / "models").exists()


def _quantize_error(dataset: Path, *args: str) -> str:
    with pytest.raises(Exception) as raised:
        bundle("lits_effq", "quantize", "--dataset_dir", str(dataset), *args)
    found = find_user_error(raised.value)
    assert found is not None, repr(raised.value)
    return str(found)


def test_an_export_dir_holding_the_users_own_files_is_refused_even_with_overwrite_and_left_as_it_was(dataset, tmp_path):
    mine = tmp_path / "thesis"
    (mine / "figures").mkdir(parents=True)
    (mine / "thesis.txt").write_text("chapter 1")
    out = tmp_path / "out"
    message = _quantize_error(
        dataset, "--output_dir", str(out), "--quantized_path", str(out / "q.pt"), "--export_dir", str(mine), "--overwrite", "True"
    )
    assert f"{mine} holds files that no monai-effq export wrote" in message
    assert sorted(p.name for p in mine.iterdir()) == ["figures", "thesis.txt"] and (mine / "thesis.txt").read_text() == "chapter 1"
    assert not out.exists()


@pytest.mark.parametrize("clash", ["export over the report", "checkpoint over the fp weights", "export over the dataset"])
def test_an_output_that_would_replace_an_input_or_another_output_is_refused_even_with_overwrite(clash, dataset, tmp_path):
    fp = tmp_path / "weights" / "model.pt"
    fp.parent.mkdir()
    shutil.copy(ROOT / "bundles" / "lits_effq" / "models" / "model.pt", fp)
    out = tmp_path / "out"
    given = {"--fp_checkpoint": fp, "--output_dir": out, "--quantized_path": out / "q.pt", "--export_dir": tmp_path / "export"}
    given.update({
        "export over the report": {"--export_dir": out},
        "checkpoint over the fp weights": {"--quantized_path": fp},
        "export over the dataset": {"--export_dir": dataset},
    }[clash])  # fmt: skip
    digest = hashlib.sha256(fp.read_bytes()).hexdigest()
    listing = sorted(p.name for p in dataset.rglob("*"))
    message = _quantize_error(dataset, *[str(v) for pair in given.items() for v in pair], "--overwrite", "True")
    expected = {
        "export over the report": f"{out} would be replaced whole by this run's export and holds {out / 'q.pt'}",
        "checkpoint over the fp weights": f"{fp} would replace {fp}, which this run reads",
        "export over the dataset": f"{dataset} would replace {dataset}, which this run reads",
    }[clash]
    assert expected in message
    assert hashlib.sha256(fp.read_bytes()).hexdigest() == digest and sorted(p.name for p in dataset.rglob("*")) == listing
    assert not out.exists() or not any(out.iterdir())


def test_inference_refuses_masks_that_would_replace_their_images_naming_the_image_not_an_earlier_run(dataset, tmp_path):
    image = Path(shutil.copy(sorted(dataset.rglob("volume-*.nii"))[0], tmp_path / "ct.nii"))
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    # without --overwrite the mask's name was first refused as "exists from an earlier run: pass --overwrite True"
    overrides = ("--datalist", repr([{"image": str(image)}]), "--output_dir", str(tmp_path), "--mask_postfix", "", "--mask_ext", ".nii")
    with pytest.raises(Exception) as raised:
        bundle("lits_effq", "inference", *overrides)
    found = find_user_error(raised.value)
    assert found is not None and f"{image} would replace {image}, which this run reads" in str(found), repr(raised.value)
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest and sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii"]


def test_evaluate_names_a_checkpoint_of_another_network_before_its_fp_pass_writes_anything(dataset, tmp_path):
    from monai_effq import EfficientQConfig, quantize, save_quantized

    other = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 1)).eval()
    result = quantize(other, torch.rand(1, 1, 8, 8, 8), EfficientQConfig(method="rtn"), progress=False)
    checkpoint = save_quantized(result, tmp_path / "other.pt")
    out = tmp_path / "out"
    with pytest.raises(Exception) as raised:
        bundle("lits_effq", "evaluate", "--dataset_dir", str(dataset), "--output_dir", str(out), "--quantized_path", str(checkpoint))
    found = find_user_error(raised.value)
    assert found is not None and f"quantized checkpoint {checkpoint} does not match this network architecture" in str(found)
    assert not out.exists() or not any(out.rglob("*"))  # no FP evaluation ran


@pytest.mark.parametrize("workflow", ["evaluate", "inference"])
def test_a_sliding_window_the_network_cannot_take_is_named_before_any_image_is_read(workflow, dataset, tmp_path):
    from monai.bundle import ConfigParser

    from monai_effq import EfficientQConfig, quantize, save_quantized

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / "lits_effq" / "configs" / "train.json"))
    network = parser.get_parsed_content("network_def").eval()
    checkpoint = save_quantized(quantize(network, torch.rand(1, 1, 32, 32, 32), EfficientQConfig(method="rtn"), progress=False), tmp_path / "q.pt")
    out = tmp_path / "out"
    with pytest.raises(Exception) as raised:
        bundle("lits_effq", workflow, "--dataset_dir", str(dataset), "--output_dir", str(out), "--quantized_path", str(checkpoint),
               "--sw_roi_size", "[20,20,20]")  # fmt: skip
    found = find_user_error(raised.value)
    assert found is not None and "sw_roi_size [20, 20, 20] does not fit the network (RuntimeError: Sizes of tensors must match" in str(found)
    assert not out.exists() or not any(out.rglob("*"))
    from monai_effq.bundle import check_window

    check_window(network, [64, 64, 48])  # the bundle's own window fits, as does one that spans an axis
    check_window(network, [-1, 96, 96])
