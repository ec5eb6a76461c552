"""The bundle helpers the configs call: checkpoints, preprocessing options and the written-files log."""

import logging
import re

import pytest
import torch
import torch.nn as nn

from monai_effq.bundle import existing_checkpoint, image_preprocessing, load_fp_weights, log_written, preprocessing, refuse_to_overwrite
from monai_effq.utils.errors import MissingInputError, UserInputError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 2, 3), nn.ReLU(), nn.Conv3d(2, 2, 1))


@pytest.mark.parametrize("wrap", [None, "model", "state_dict"], ids=["state_dict", "checkpoint_saver", "state_dict_entry"])
def test_fp_weights_load_from_a_state_dict_or_a_checkpoint_savers_model_entry(tmp_path, wrap):
    trained = _net()
    state = trained.state_dict()
    torch.save({wrap: state, "optimizer": {}} if wrap else state, tmp_path / "model.pt")
    fresh = nn.Sequential(nn.Conv3d(1, 2, 3), nn.ReLU(), nn.Conv3d(2, 2, 1)).train()
    loaded = load_fp_weights(fresh, tmp_path / "model.pt")
    assert loaded is fresh and not loaded.training
    for a, b in zip(loaded.state_dict().values(), state.values()):
        assert torch.equal(a, b)


def test_a_missing_fp_checkpoint_names_the_train_workflow(tmp_path):
    with pytest.raises(MissingInputError, match=r"model\.pt does not exist: run the train workflow first"):
        load_fp_weights(_net(), tmp_path / "model.pt")


@pytest.mark.parametrize("crop", ["96", [], 96])
def test_a_calibration_crop_that_is_not_a_list_of_sizes_is_refused(tmp_path, crop):
    with pytest.raises(UserInputError, match=r"calibration_crop must be a list of positive sizes such as \[96,96,96\]"):
        preprocessing("lits", tmp_path, crop=crop, with_label=False)


def test_an_unknown_dataset_is_refused_by_name():
    with pytest.raises(ValueError, match="dataset must be 'brats' or 'lits', got 'kits'"):
        image_preprocessing("kits")


def test_the_written_files_log_lists_folders_and_warns_of_a_missing_output(tmp_path, caplog):
    (tmp_path / "export" / "sub").mkdir(parents=True)
    (tmp_path / "export" / "sub" / "a.onnx").write_bytes(b"x" * 10)
    (tmp_path / "model.pt").write_bytes(b"y")
    with caplog.at_level(logging.INFO):
        found = log_written(tmp_path / "export", tmp_path / "model.pt", tmp_path / "missing.json", None, "")
    assert found == [tmp_path / "export", tmp_path / "model.pt"]
    assert "export/ (1 file," in caplog.text
    assert "expected output" in caplog.text and "missing.json is missing" in caplog.text


def test_a_damaged_fp_checkpoint_is_named_without_torchs_advice_to_unpickle_it(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"half a checkpoint" * 10)
    with pytest.raises(UserInputError, match=r"model\.pt is damaged or not a PyTorch state dict .*: train again") as err:
        load_fp_weights(_net(), tmp_path / "model.pt")
    assert "weights_only" not in str(err.value)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserInputError, match=r"list\.pt holds no state dict of tensors"):
        existing_checkpoint(tmp_path / "list.pt")


@pytest.mark.parametrize("prefix,wrapper", [("module.", "DataParallel or DistributedDataParallel"), ("_orig_mod.", "torch.compile")])
def test_an_fp_checkpoint_saved_from_a_wrapper_is_named_with_its_prefix(tmp_path, prefix, wrapper):
    torch.save({prefix + k: v for k, v in _net().state_dict().items()}, tmp_path / "model.pt")
    with pytest.raises(UserInputError, match=rf"was saved from a {wrapper} wrapper \(every weight's name starts with '{prefix}'\)"):
        load_fp_weights(_net(), tmp_path / "model.pt")


def test_an_fp_checkpoint_of_the_network_a_bundle_wraps_names_the_part_and_the_override(tmp_path):
    torch.save(_net().state_dict(), tmp_path / "model.pt")
    wrapped = nn.Sequential(_net(), nn.Softmax(1))  # a bundle's network: torch.nn.Sequential(@network_def, Softmax)
    with pytest.raises(UserInputError, match=r"holds the weights of '0', a part of the network .* --network \"\$@network_def\.to\(@device\)\""):
        existing_checkpoint(tmp_path / "model.pt", wrapped)


def test_an_fp_checkpoint_of_another_network_is_named_with_the_weights_that_differ(tmp_path):
    other = nn.Sequential(nn.Conv3d(1, 3, 3), nn.ReLU(), nn.Conv3d(3, 2, 1))
    torch.save({"model": other.state_dict()}, tmp_path / "model.pt")
    with pytest.raises(UserInputError, match=r"holds the weights of another network \(0\.weight \[3, 1, 3, 3, 3\] where the network has \[2, 1, 3, 3, 3\]"):
        existing_checkpoint(tmp_path / "model.pt", _net())
    assert existing_checkpoint(tmp_path / "model.pt") == str(tmp_path / "model.pt")  # without the network: only loadable


def test_an_output_folder_that_cannot_be_written_is_named_before_the_workflow_runs(tmp_path, monkeypatch):
    import os

    import monai_effq.bundle as bundle_module

    locked = tmp_path / "eval"
    locked.mkdir()
    monkeypatch.setattr(bundle_module.os, "access", lambda path, mode: os.fspath(path) != os.fspath(locked))
    # a report inside it, and a folder still to be made under it, are both refused, naming the folder
    for output in (locked / "quantization_report.json", locked / "seg" / "rtn_w4a8"):
        with pytest.raises(UserInputError, match=f"cannot write {output}: the folder {locked} is not writable"):
            refuse_to_overwrite(False, tmp_path / "model.pt", output)
    refuse_to_overwrite(False, tmp_path / "model.pt", tmp_path / "other" / "report.json")  # writable: no error


def test_training_into_a_folder_below_a_file_is_refused_before_it_runs(tmp_path):
    from monai_effq.bundle import refuse_to_replace_shipped

    (tmp_path / "runs").write_text("a file")
    with pytest.raises(UserInputError, match=f"cannot write {tmp_path / 'runs' / 'ckpt' / 'model.pt'}: {tmp_path / 'runs'} is a file"):
        refuse_to_replace_shipped(False, tmp_path / "runs" / "ckpt" / "model.pt", tmp_path)


def test_more_calibration_cases_than_the_training_split_holds_are_calibrated_on_with_a_warning(tmp_path, caplog):
    from monai_effq.bundle import calibration_datalist
    from monai_effq.data import make_lits_demo

    make_lits_demo(tmp_path, n_cases=3, shape=(32, 32, 32), seed=0)
    with caplog.at_level(logging.WARNING, logger="monai_effq.bundle"):
        chosen = calibration_datalist(tmp_path, "lits", case=0, cases=99)
    assert 0 < len(chosen) < 99
    assert f"asks for more than the {len(chosen)} training cases left: calibrating on those {len(chosen)}" in caplog.text


def test_a_whole_pickled_network_is_named_and_not_unpickled(tmp_path):
    torch.save(_net(), tmp_path / "model.pt")  # torch.save(model): loading it would run code from the file
    with pytest.raises(UserInputError, match=r"holds a pickled torch.nn.modules.container.Sequential object, not a state dict: save"):
        load_fp_weights(_net(), tmp_path / "model.pt")


def test_preprocessing_reads_a_brats_2023_folder_with_its_convention_under_native_as_the_datalist_does(tmp_path):
    from monai_effq.data import load_datalist, make_brats_demo

    from .brats2023 import as_brats2023

    release_2020 = make_brats_demo(tmp_path / "2020", n_cases=1, shape=(32, 32, 32))
    release_2023 = as_brats2023(release_2020, tmp_path / "2023")
    (release_2023 / "dataset.json").write_text('{"training": []}')  # auto would read this list, native the release
    labels = {}
    for name, root in (("2020", release_2020), ("2023", release_2023)):
        case = load_datalist(root, layout="native", dataset="brats")[0]
        labels[name] = preprocessing("brats", root, layout="native")(case)["label"].as_tensor()
    assert labels["2020"].any() and torch.equal(labels["2023"], labels["2020"])


@pytest.mark.parametrize(
    "best_metric, best_epoch, chosen, said",
    [(0.81, 40, 1.0, "0.8100 at epoch 40"), (-1, -1, 0.0, "no validation ran"), (float("nan"), 1, 0.0, "scored NaN at epoch 1")],
    ids=["validation_ran", "no_validation", "nan_first_score"],
)
def test_training_leaves_the_best_validated_weights_as_model_pt_and_the_final_ones_where_none_were_validated(
    tmp_path, caplog, best_metric, best_epoch, chosen, said
):
    from types import SimpleNamespace

    from monai_effq.bundle import keep_best_checkpoint

    # a best checkpoint lies there (an earlier run's, or a NaN-scored one): only this run's usable record counts
    torch.save({"model": {"w": torch.ones(1)}}, tmp_path / "model_best.pt")
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "model_final.pt")
    state = SimpleNamespace(best_metric=best_metric, best_metric_epoch=best_epoch)
    with caplog.at_level(logging.INFO, logger="monai_effq.bundle"):
        written = keep_best_checkpoint(tmp_path, SimpleNamespace(state=state))
    assert written == tmp_path / "model.pt"
    assert torch.load(written)["model"]["w"].item() == chosen
    assert said in caplog.text
    # a best that is not this run's usable best is not left to be offered as the trained weights
    kept = ["model_best.pt"] if chosen == 1.0 else []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.pt", "model_final.pt", *kept])


def test_a_training_run_that_saved_no_final_checkpoint_says_to_train_again(tmp_path):
    from types import SimpleNamespace

    from monai_effq.bundle import keep_best_checkpoint

    with pytest.raises(MissingInputError, match=r"model_final\.pt is missing: training did not finish"):
        keep_best_checkpoint(tmp_path, SimpleNamespace(state=SimpleNamespace(best_metric=-1, best_metric_epoch=-1)))
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize(
    "settings, message",
    [
        ((0, 50, 3e-3, 2), "max_epochs must be an integer of at least 1, got 0"),
        ((150, 0, 3e-3, 2), "val_interval must be an integer of at least 1, got 0"),
        ((150, "50", 3e-3, 2), "val_interval must be an integer of at least 1, got '50'"),
        ((150, 50, -1.0, 2), "learning_rate must be a positive number such as 1e-4, got -1.0"),
        ((150, 50, 3e-3, 0), "batch_size must be an integer of at least 1, got 0"),
    ],
    ids=["no_epochs", "no_interval", "interval_as_text", "negative_step", "empty_batch"],
)
def test_a_training_setting_that_cannot_work_is_named_before_training(settings, message):
    from monai_effq.bundle import check_train_settings

    with pytest.raises(UserInputError, match=re.escape(message)):
        check_train_settings(*settings)
    check_train_settings(150, 50, 3e-3, 2)


def _volume(path, shape):
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), str(path))
    return str(path)


def test_calibration_images_of_other_channels_than_the_network_takes_are_refused_naming_the_case(tmp_path):
    from monai_effq.bundle import calibration_datalist
    from monai_effq.data import DatasetError

    two_phases = _volume(tmp_path / "ct_two_phases.nii.gz", (16, 16, 16, 2))
    with pytest.raises(DatasetError, match=r"calibration case 0 \(.*ct_two_phases\.nii\.gz\) holds 2 image channel\(s\), but the network takes 1"):
        calibration_datalist(tmp_path, "lits", images=[two_phases])
    assert calibration_datalist(tmp_path, "lits", images=[two_phases], channels=2)[0]["image"] == two_phases  # a network of two phases
    contrasts = [_volume(tmp_path / f"{c}.nii.gz", (16, 16, 16)) for c in ("flair", "t1", "t2")]
    with pytest.raises(DatasetError, match=r"calibration case 1 \(.*flair\.nii\.gz: 1, .*t2\.nii\.gz: 1\) holds 3 .* network takes 4"):
        calibration_datalist(tmp_path, "brats", cases=2, images=[contrasts + contrasts[:1], contrasts])
    assert calibration_datalist(tmp_path, "brats", images=[contrasts], channels=3)  # a network of those three contrasts


def test_inference_images_of_other_channels_than_the_network_takes_are_refused_before_any_is_decoded(tmp_path):
    from monai_effq.bundle import check_inference_inputs
    from monai_effq.data import DatasetError

    ct = _volume(tmp_path / "ct.nii.gz", (16, 16, 16))
    check_inference_inputs([{"image": ct}], tmp_path / "seg", channels=1)
    with pytest.raises(DatasetError, match=r"inference case 0 \(.*ct\.nii\.gz\) holds 1 image channel\(s\), but the network takes 4"):
        check_inference_inputs([{"image": ct}], tmp_path / "seg", channels=4)
    check_inference_inputs([{"image": ct}], tmp_path / "seg")  # channels unknown: not checked


def test_a_vector_nrrd_counts_its_pixel_components_as_channels_as_monai_loads_it(tmp_path):
    import numpy as np

    from monai_effq.bundle import calibration_datalist, check_inference_inputs, image_preprocessing
    from monai_effq.data import DatasetError

    itk = pytest.importorskip("itk")
    four = str(tmp_path / "contrasts.nrrd")  # BraTS' four contrasts as one vector image, as 3D Slicer saves them
    itk.imwrite(itk.image_from_array(np.random.default_rng(0).random((16, 16, 16, 4), dtype=np.float32), is_vector=True), four)
    assert image_preprocessing("brats")({"image": four})["image"].shape[0] == 4
    assert calibration_datalist(tmp_path, "brats", images=[four], channels=4)[0]["image"] == four
    check_inference_inputs([{"image": four}], tmp_path / "seg", channels=4)
    with pytest.raises(DatasetError, match=r"inference case 0 \(.*contrasts\.nrrd\) holds 4 image channel\(s\), but the network takes 1"):
        check_inference_inputs([{"image": four}], tmp_path / "seg", channels=1)


def test_the_monailabel_export_tells_weights_loaded_by_hand_from_a_file_that_merely_ends_like_model_pt():
    from monai_effq.bundle import _without_fp_loading

    zoo = {"handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/best_model.pth'"}], "best": "best_model.pth"}
    assert _without_fp_loading(zoo) == {"handlers": [], "best": "best_model.pth"}  # the zoo's loader, taken out
    by_hand = {"initialize": ["$@network.load_state_dict(torch.load(@bundle_root + '/models/fp_weights.ckpt'))"]}
    with pytest.raises(UserInputError, match=r"loads FP weights in initialize \(models/model.pt, or torch.load"):
        _without_fp_loading(by_hand)  # the exported bundle has no fp_weights.ckpt to load


def test_only_the_default_export_of_the_checkpoint_a_run_replaces_without_exporting_is_stale(tmp_path):
    import json

    from monai_effq.bundle import EXPORTED_FROM, refuse_to_overwrite, remove_stale_export, stale_export
    from monai_effq.utils.errors import OutputExistsError

    checkpoint, default = tmp_path / "models" / "model_rtn_w4a8.pt", tmp_path / "export" / "b_rtn_w4a8"
    (default / "configs").mkdir(parents=True)
    (default / "configs" / "metadata.json").write_text(json.dumps({EXPORTED_FROM: str(checkpoint)}))
    assert stale_export(str(default), default, checkpoint) is None  # this run exports there again
    assert stale_export("", default, checkpoint) == stale_export(tmp_path / "elsewhere", default, checkpoint) == str(default)
    assert stale_export("", default, tmp_path / "other_ckpt_dir" / "model_rtn_w4a8.pt") is None  # another checkpoint's export
    with pytest.raises(OutputExistsError, match=f"{default} was exported from the checkpoint this run replaces"):
        refuse_to_overwrite(False, checkpoint, stale=stale_export("", default, checkpoint))
    refuse_to_overwrite(True, checkpoint, stale=stale_export("", default, checkpoint))  # --overwrite True removes it later
    assert remove_stale_export(str(default), default, checkpoint) is None and default.is_dir()
    assert remove_stale_export("", default, checkpoint) == default and not default.exists()
    assert list((tmp_path / "export").iterdir()) == []  # nothing left aside
    assert remove_stale_export("", default, checkpoint) is None  # gone: nothing to do


def test_an_export_knows_its_checkpoint_after_the_bundle_folder_is_moved_whole(tmp_path):
    import json
    import shutil
    from pathlib import Path

    from monai_effq.bundle import EXPORTED_FROM, _source_record, stale_export

    here = tmp_path / "bundle"
    checkpoint, default = here / "models" / "model_rtn_w4a8.pt", here / "export" / "b_rtn_w4a8"
    (default / "configs").mkdir(parents=True)
    (default / "configs" / "metadata.json").write_text(json.dumps({EXPORTED_FROM: _source_record(checkpoint, default)}))
    assert json.loads((default / "configs" / "metadata.json").read_text())[EXPORTED_FROM] == "../../models/model_rtn_w4a8.pt"
    (tmp_path / "other_disk").mkdir()
    moved = Path(shutil.move(here, tmp_path / "other_disk" / "bundle"))
    # the absolute path of the first place was compared: the export stayed, serving the replaced network
    assert stale_export("", moved / "export" / "b_rtn_w4a8", moved / "models" / "model_rtn_w4a8.pt") == str(moved / "export" / "b_rtn_w4a8")


def test_the_finetune_workflows_fp_start_calibrates_on_its_first_calibration_case_alone(tmp_path):
    from monai_effq.bundle import finetune_start

    torch.save(_net().state_dict(), tmp_path / "model.pt")
    first, louder = torch.rand(1, 1, 8, 8, 8), 100 * torch.rand(1, 1, 8, 8, 8)  # whole volumes, one per batch
    trainable = finetune_start("fp", _net(), tmp_path / "model.pt", None, {"weight_bits": 8, "act_bits": 8}, [{"image": first}, {"image": louder}])
    alone = finetune_start("fp", _net(), tmp_path / "model.pt", None, {"weight_bits": 8, "act_bits": 8}, [{"image": first}])
    scales = [float(layer.input_quantizer.scale) for t in (trainable, alone) for layer in t.layers().values() if layer.input_quantizer is not None]
    assert scales and scales[: len(scales) // 2] == scales[len(scales) // 2 :]


def test_a_checkpoint_of_a_part_with_weighted_modules_beside_it_is_another_networks_not_a_wrappers(tmp_path):
    encoder_and_head = nn.Sequential(_net(), nn.Conv3d(2, 2, 1))  # a pretrained encoder's checkpoint is not the network's
    torch.save(encoder_and_head[0].state_dict(), tmp_path / "model.pt")
    with pytest.raises(UserInputError, match="holds the weights of another network"):
        existing_checkpoint(tmp_path / "model.pt", encoder_and_head)


def test_too_few_calibration_cases_for_the_ranks_names_every_way_to_more_cases(monkeypatch):
    from monai_effq import bundle
    from monai_effq.bundle import calibration_share

    monkeypatch.setattr(bundle, "get_world_size", lambda: 2)
    # --calibration_cases 3 from --calibration_case 7 of 8 training cases leaves one: more cases alone would not help
    with pytest.raises(UserInputError, match=r"1 calibration case\(s\) cannot be shared by 2 ranks: .*--calibration_cases 2.*a lower one"):
        calibration_share([{"image": "case7.nii.gz"}])
