"""The overlays quantize, serve and evaluate bundles laid out like the model zoo's, which know nothing of monai-effq."""

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, run
from monai.transforms import LoadImage

from monai_effq import EfficientQConfig, quantize, save_quantized
from monai_effq.bundle import EXPORTED_FROM
from monai_effq.data import DatasetError
from monai_effq.data.dicom_seg import SegLabels, load_seg, read_seg_labels
from monai_effq.handlers.reference import REFERENCE_KEY
from monai_effq.overlays import OVERLAYS, agreement_metric, attach_metric_first, calibration_items, output_task, overlay_path
from monai_effq.overlays.__main__ import main
from monai_effq.ptq.modules import QuantizedLayer
from monai_effq.utils.errors import MissingInputError, UserInputError
from tests.dicom import write_dicom_series
from tests.overlays.conftest import LITS_NETWORK, handlers_style, spleen_style

TAG = "efficientq_w4a8"


def workflow(root: Path, files: list[str], run_id: str = "run", **overrides: object) -> ConfigWorkflow:
    """Build and run a workflow in this process as ``python -m monai.bundle run`` does; the workflow is returned."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wf = ConfigWorkflow(config_file=files, run_id=run_id, bundle_root=str(root), **overrides)
        wf.initialize()
        wf.run()
        wf.finalize()
    return wf


def masks(folder: Path) -> dict[str, np.ndarray]:
    """The masks a bundle wrote under ``folder`` (one subfolder per case), by case."""
    return {p.parent.name: np.asarray(nib.load(p).dataobj) for p in sorted(folder.glob("*/*.nii.gz"))}


def mean_dice(folder: Path) -> float:
    """The mean over cases of the zoo evaluation's per-case mean Dice (MetricsSaver's raw file)."""
    with open(folder / "val_mean_dice_raw.csv") as f:
        return float(np.mean([float(row["mean"]) for row in csv.DictReader(f)]))


def quantized(network: torch.nn.Module) -> bool:
    """Whether ``network`` holds monai-effq's quantized layers."""
    return any(isinstance(m, QuantizedLayer) for m in network.modules())


def test_each_overlay_has_a_file_and_the_command_prints_its_path(capsys):
    for name in OVERLAYS:
        assert overlay_path(name).is_file()
    assert main(["quantize"]) == 0 and capsys.readouterr().out.strip() == str(overlay_path("quantize"))
    assert main(["serve"]) == 1 and "choose one of quantize, inference, evaluate, openvino" in capsys.readouterr().err
    for ask in ([], ["--help"]):
        assert main(ask) == 0
        listing = capsys.readouterr().out
        assert all(f"{name}: {overlay_path(name)}" in listing for name in OVERLAYS)


def test_calibration_images_become_datalist_cases_and_bad_ones_are_named(tmp_path):
    files = []
    for name in ("a.nii.gz", "b_flair.nii.gz", "b_t1.nii.gz"):
        files.append(tmp_path / name)
        files[-1].write_bytes(b"x")
    a, flair, t1 = map(str, files)
    assert calibration_items(a, 1) == [{"image": a}] == calibration_items({"image": a}, 1)
    assert calibration_items([[flair, t1], a], 1) == [{"image": [flair, t1]}]
    assert calibration_items([{"image": a, "label": "unused"}, a], 2) == [{"image": a, "label": "unused"}, {"image": a}]
    with pytest.raises(MissingInputError, match="calibration image .*missing.nii.gz does not exist"):
        calibration_items([[flair, str(tmp_path / "missing.nii.gz")]], 1)
    with pytest.raises(UserInputError, match="--calibration_images"):
        calibration_items([], 1)
    with pytest.raises(UserInputError, match="calibration_cases is 2 but only 1"):
        calibration_items([a], 2)
    with pytest.raises(UserInputError, match="neither a path"):
        calibration_items([3], 1)


@pytest.mark.parametrize("first", [True, False])
def test_a_metric_attached_first_to_a_built_evaluator_is_in_the_bundles_epoch_log(first):
    import logging

    from ignite.engine import Engine
    from monai.handlers import StatsHandler

    engine = Engine(lambda e, batch: {"pred": [torch.ones(1, 2, 2)], REFERENCE_KEY: [torch.ones(1, 2, 2)]})
    StatsHandler(name="bundle_stats", iteration_log=False).attach(engine)  # the bundle's, attached when it was built
    lines: list[str] = []
    recorder = logging.Handler()
    recorder.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("bundle_stats").addHandler(recorder)
    metric = agreement_metric()
    if first:
        attach_metric_first(metric, engine, "fp_agreement")
    else:  # what the overlay did before: computed after the log line was written
        metric.attach(engine, "fp_agreement")
    engine.run([0], max_epochs=1)
    assert engine.state.metrics["fp_agreement"] == 1.0
    assert any("fp_agreement: 1" in line for line in lines) == first, lines


def test_a_dicom_series_folder_calibrates_and_a_folder_of_two_series_is_refused(tmp_path, demo_data):
    volume = sorted(demo_data["lits"].rglob("volume-*.nii*"))[0]
    write_dicom_series(volume, tmp_path / "series")
    assert calibration_items(str(tmp_path / "series"), 1) == [{"image": str(tmp_path / "series")}]
    write_dicom_series(volume, tmp_path / "series", series_uid="1.2.826.0.1.3680043.2.1125.2", prefix="B")
    with pytest.raises(DatasetError, match="series holds 2 DICOM series"):
        calibration_items(str(tmp_path / "series"), 1)


@pytest.mark.parametrize(
    "activation, given, expected",
    [
        ({"softmax": True}, "auto", "multiclass"),
        ({"sigmoid": True}, "auto", "multilabel"),
        ({"sigmoid": True}, "multiclass", "multiclass"),
        (None, "auto", "multiclass"),  # a bundle without postprocessing, given --postprocessing None
    ],
)
def test_the_quantize_overlay_takes_the_task_from_the_bundles_postprocessing_unless_given(tmp_path, demo_data, activation, given, expected):
    from monai.bundle import ConfigParser

    from monai_effq.handlers import QuantizationHandler

    root = spleen_style(tmp_path / "bundle", demo_data["lits"])
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / "inference.json"), str(overlay_path("quantize"))])
    parser["bundle_root"], parser["task"] = str(root), given
    if activation is None:
        parser["postprocessing"] = None
    else:  # brats_mri_segmentation's: a sigmoid
        parser["postprocessing#transforms#0"] = {"_target_": "Activationsd", "keys": "pred", **activation}
    parser["calibration_flips"] = given == "auto"  # the other settings of our bundles pass through as well
    (handler,) = [h for h in parser.get_parsed_content("calibrate#handlers") if isinstance(h, QuantizationHandler)]
    assert handler.task == expected and handler.config.calibration_flips is (given == "auto")


def test_an_unknown_task_is_refused_naming_the_choices_and_only_the_predictions_sigmoid_counts():
    from monai.transforms import Activations, Activationsd, AsDiscreted, Compose

    with pytest.raises(UserInputError, match="task must be 'auto', 'multiclass' or 'multilabel', got 'binary'"):
        output_task("binary", None)
    assert output_task("auto", None) == "multiclass"  # nothing to read: the arg-max attention, as before
    on_label = Compose([Activationsd(keys=["pred", "label"], sigmoid=[False, True]), AsDiscreted("pred", argmax=True)])
    assert output_task("auto", on_label) == "multiclass"
    assert output_task("auto", [Activationsd(keys=["label", "pred"], sigmoid=[False, True])]) == "multilabel"  # a list of steps
    assert output_task("auto", Compose([Compose([Activations(sigmoid=True)])])) == "multilabel"  # nested, array form


def test_agreement_with_fp_counts_the_background_channel_as_the_bundles_own_dice_does():
    from monai.handlers import MeanDice

    softmax = {"val_mean_dice": MeanDice(include_background=False)}  # a one-hot output with a background channel
    sigmoid = {"val_mean_dice": MeanDice(include_background=True)}  # TC/WT/ET: no background channel
    assert not agreement_metric(softmax).metric_fn.include_background
    assert agreement_metric(sigmoid).metric_fn.include_background
    assert agreement_metric(None).metric_fn.include_background  # no Dice to follow: every channel counts


@pytest.mark.slow
def test_a_spleen_style_bundle_is_quantized_by_the_shell_command_then_served_traced_evaluated_and_run_in_openvino_and_onnxruntime(
    tmp_path, demo_data
):
    root = spleen_style(tmp_path / "bundle", demo_data["lits"])
    calibration = demo_data["lits"] / "volume-0.nii"
    command = (
        "python -m monai.bundle run quantize --config_file "
        "\"['configs/inference.json','$(python -m monai_effq.overlays quantize)']\" "
        f"--calibration_images \"['{calibration}']\""
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    res = subprocess.run(["bash", "-c", command], cwd=root, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (root / "models" / f"model_{TAG}.pt").is_file()
    assert (root / "eval" / f"quantization_report_{TAG}.json").is_file()

    configs = [str(root / "configs" / "inference.json")]
    fp = workflow(root, configs)
    served = workflow(root, configs + [str(overlay_path("inference"))])
    assert not quantized(fp.parser.get_parsed_content("evaluator").network)
    assert quantized(served.parser.get_parsed_content("evaluator").network)
    fp_masks, q_masks = masks(root / "eval"), masks(root / "eval" / TAG)
    assert sorted(q_masks) == sorted(fp_masks) == ["volume-8", "volume-9"]
    for case, mask in q_masks.items():
        assert mask.shape == fp_masks[case].shape and set(np.unique(mask)) <= {0, 1, 2}
        assert (mask == fp_masks[case]).mean() > 0.98

    # a case as the archive holds it, a DICOM series, its mask also written back as a DICOM SEG whose
    # segments the bundle's metadata names (liver, tumor): the SEG reads back as the bundle's own NIfTI mask
    series = tmp_path / "2.000000-VENOUS-81"
    write_dicom_series(demo_data["lits"] / "volume-8.nii", series)
    dicom = {"datalist": [str(series)], "preprocessing#transforms#0#reader": "ITKReader", "output_dir": str(tmp_path / "dicom")}
    workflow(root, configs + [str(overlay_path("inference"))], mask_format="dicom_seg", **dicom)
    seg = load_seg(tmp_path / "dicom" / f"{series.name}_seg.dcm")
    assert [seg.get_segment_description(n).segmented_property_type.meaning for n in (1, 2)] == ["Liver", "Neoplasm"]
    image = LoadImage(reader="ITKReader", image_only=True)(str(series))
    labels = read_seg_labels(seg.filename, series, image.affine.numpy(), image.shape, SegLabels(("liver", "tumor"), (1, 2)))
    (nifti,) = masks(tmp_path / "dicom").values()
    assert np.array_equal(labels, nifti) and labels.any()

    # the MONAI Label export: the trace alone, no model.pt, nothing of monai-effq in its config
    served_root = root / "export" / f"bundle_{TAG}"
    exported_config = (served_root / "configs" / "inference.json").read_text()
    assert (served_root / "models" / "model.ts").is_file() and not (served_root / "models" / "model.pt").exists()
    assert "checkpointloader" not in exported_config and "monai_effq" not in exported_config
    workflow(served_root, [str(served_root / "configs" / "inference.json")], output_dir=str(tmp_path / "traced"))
    for case, mask in masks(tmp_path / "traced").items():
        assert (mask == q_masks[case]).mean() > 0.999

    evaluation = [str(root / "configs" / name) for name in ("train.json", "evaluate.json")]
    workflow(root, evaluation)
    evaluated = workflow(root, evaluation + [str(overlay_path("evaluate"))])
    evaluator = evaluated.parser.get_parsed_content("validate#evaluator")
    assert quantized(evaluator.network)
    fp_dice, q_dice = mean_dice(root / "eval"), mean_dice(root / "eval" / TAG)
    assert fp_dice > 0.5 and q_dice > fp_dice - 0.03, (fp_dice, q_dice)
    # agreement with the FP network's labels, through the bundle's own post-processing (it inverts and
    # one-hots the label too), without its background channel, as the bundle's Dice
    agreement = evaluator.state.metrics["fp_agreement"]
    assert 0.9 < agreement <= 1.0, agreement
    from ignite.engine import Events  # computed before the bundle's StatsHandler logs the epoch

    first = evaluator._event_handlers[Events.EPOCH_COMPLETED][0][0]
    assert first.__self__ is evaluated.parser.get_parsed_content("fp_agreement")
    assert not evaluated.parser.get_parsed_content("fp_agreement").metric_fn.include_background

    # the same inference in the integer runtimes (the deploy extra, which the test set-up installs)
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    for runtime, network_class in (("openvino", "OpenVINONetwork"), ("onnxruntime", "OnnxRuntimeNetwork")):
        deployed = workflow(root, configs + [str(overlay_path("openvino"))], runtime=runtime)
        assert type(deployed.parser.get_parsed_content("evaluator").network).__name__ == network_class
        runtime_masks = masks(root / "eval" / f"{TAG}_{runtime}")
        assert sorted(runtime_masks) == sorted(q_masks)
        assert all((runtime_masks[case] == q_masks[case]).mean() > 0.99 for case in q_masks), runtime
    assert (root / "models" / f"model_{TAG}.onnx").is_file()


@pytest.mark.slow
def test_a_bundle_whose_handlers_load_the_checkpoint_is_quantized_from_its_own_datalist_and_served(tmp_path, demo_data):
    root = handlers_style(tmp_path / "bundle", demo_data["brats"])
    inference = str(root / "configs" / "inference.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run("quantize", config_file=[inference, str(overlay_path("quantize"))], bundle_root=str(root), task="multilabel", body_mask="nonzero")
    assert (root / "models" / f"model_{TAG}.pt").is_file()
    fp = workflow(root, [inference], run_id="evaluating")
    served = workflow(root, [inference, str(overlay_path("inference"))], run_id="evaluating")
    assert not quantized(fp.parser.get_parsed_content("evaluator").network)
    assert quantized(served.parser.get_parsed_content("evaluator").network)
    fp_masks, q_masks = masks(root / "eval"), masks(root / "eval" / TAG)
    assert len(q_masks) == 2 and sorted(q_masks) == sorted(fp_masks)
    for case, mask in q_masks.items():
        assert set(np.unique(mask)) <= {0, 1, 2, 4} and (mask == fp_masks[case]).mean() > 0.98

    served_root = root / "export" / f"bundle_{TAG}"
    assert "CheckpointLoader" not in (served_root / "configs" / "inference.json").read_text()
    workflow(served_root, [str(served_root / "configs" / "inference.json")], run_id="evaluating", output_dir=str(tmp_path / "traced"))
    traced = masks(tmp_path / "traced")
    assert sorted(traced) == sorted(q_masks) and all((traced[c] == q_masks[c]).mean() > 0.999 for c in traced)

    with pytest.raises(RuntimeError) as refused:  # a second run would replace the checkpoint
        workflow(root, [inference, str(overlay_path("quantize"))], run_id="quantize")
    said = "".join(map(str, _chain(refused.value)))
    assert "exists from an earlier run (and 2 more of this run's outputs): pass --overwrite True" in said, said  # model, report, export
    # the overlay's own settings, not our bundles' --ckpt_dir / --output_dir, which it does not read
    assert "--quantized_path moves the checkpoint, --report_dir the report, --export_dir the export" in said, said

    # a rerun that replaces the checkpoint without exporting it removes the export that would serve the earlier network
    checkpoint = root / "models" / f"model_{TAG}.pt"
    record = json.loads((served_root / "configs" / "metadata.json").read_text())[EXPORTED_FROM]
    assert not Path(record).is_absolute() and (served_root / record).resolve() == checkpoint.resolve()  # moves with the bundle
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run("quantize", config_file=[inference, str(overlay_path("quantize"))], bundle_root=str(root), task="multilabel", body_mask="nonzero",
            overwrite=True, export_dir="")
    assert checkpoint.is_file() and not served_root.exists()


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the errors it was raised from (MONAI wraps a config entry's error in its own)."""
    out = [error]
    while out[-1].__cause__ is not None:
        out.append(out[-1].__cause__)
    return out


def test_serving_before_quantizing_says_to_run_quantize_first(tmp_path, demo_data):
    root = handlers_style(tmp_path / "bundle", demo_data["brats"])
    with pytest.raises(RuntimeError) as missing:
        workflow(root, [str(root / "configs" / "inference.json"), str(overlay_path("inference"))], run_id="evaluating")
    assert any(isinstance(e, MissingInputError) and "run the quantize workflow first" in str(e) for e in _chain(missing.value))


def test_evaluating_while_a_killed_quantize_run_waits_to_resume_says_to_rerun_it(tmp_path, demo_data):
    root = spleen_style(tmp_path / "bundle", demo_data["lits"])
    (root / "models" / f"model_{TAG}.pt").write_bytes(b"")  # an earlier run's checkpoint: the loader checks only that it exists
    (root / "models" / f"model_{TAG}.pt.journal").mkdir()
    evaluation = [str(root / "configs" / name) for name in ("train.json", "evaluate.json")] + [str(overlay_path("evaluate"))]
    with pytest.raises(RuntimeError) as refused:
        workflow(root, evaluation)
    assert any(isinstance(e, UserInputError) and "rerun the same quantize command" in str(e) for e in _chain(refused.value))
    assert not (root / "eval").exists()  # refused before the FP pass wrote anything


def test_quantizing_a_bundle_with_no_images_ends_with_one_line_naming_the_setting(tmp_path, demo_data):
    root = spleen_style(tmp_path / "bundle", demo_data["lits"])
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "quantize",
        "--config_file", str([str(root / "configs" / "inference.json"), str(overlay_path("quantize"))]),
        "--bundle_root", str(root), "--dataset_dir", str(tmp_path / "empty"),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: there is no calibration image") and "--calibration_images" in last
    assert not (root / "models" / f"model_{TAG}.pt").exists()


def test_serving_refuses_a_bundle_whose_evaluator_would_never_run_the_quantized_network(tmp_path, demo_data):
    root = spleen_style(tmp_path / "bundle", demo_data["lits"])
    config = json.loads((root / "configs" / "inference.json").read_text())
    config["evaluator"]["val_handlers"] = [{"_target_": "StatsHandler", "iteration_log": False}]  # not "@handlers"
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    # a whole quantized checkpoint of the bundle's network (its FP weights are checked once they are loaded)
    config = EfficientQConfig(method="rtn", attention=False)
    network = ConfigParser({"network_def": LITS_NETWORK}).get_parsed_content("network_def").eval()
    save_quantized(quantize(network, torch.rand(1, 1, 32, 32, 32), config, progress=False), root / "models" / f"model_{TAG}.pt")
    for overlay in ("inference", "openvino"):
        with pytest.raises(RuntimeError) as refused:
            workflow(root, [str(root / "configs" / "inference.json"), str(overlay_path(overlay))])
        assert any(isinstance(e, UserInputError) and 'val_handlers "@handlers"' in str(e) for e in _chain(refused.value))
    assert not (root / "eval").exists()


def test_quantize_refuses_before_it_starts_a_bundle_whose_export_would_still_load_model_pt(tmp_path, demo_data):
    root = spleen_style(tmp_path / "bundle", demo_data["lits"])
    config = json.loads((root / "configs" / "inference.json").read_text())
    config["initialize"] = ["$@network.load_state_dict(torch.load(@bundle_root + '/models/model.pt'))"]
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError) as refused:
        workflow(root, [str(root / "configs" / "inference.json"), str(overlay_path("quantize"))], run_id="quantize")
    assert any("loads FP weights in initialize" in str(e) and '--export_dir ""' in str(e) for e in _chain(refused.value))
    assert not (root / "models" / f"model_{TAG}.pt").exists()


def test_a_bundle_that_keys_its_image_img_is_quantized_with_image_key_and_named_without_it(tmp_path, demo_data):
    root = spleen_style(tmp_path / "bundle", demo_data["lits"])
    config = root / "configs" / "inference.json"
    config.write_text(config.read_text().replace('"image"', '"img"').replace("'image'", "'img'"))  # as many MONAI tutorials key it
    files = [str(config), str(overlay_path("quantize"))]
    with pytest.raises(RuntimeError) as refused:
        workflow(root, files, run_id="quantize", method="rtn", export_dir="")
    assert any(isinstance(e, UserInputError) and "--image_key img" in str(e) for e in _chain(refused.value))
    workflow(root, files, run_id="quantize", method="rtn", export_dir="", image_key="img")
    assert (root / "models" / "model_rtn_w4a8.pt").is_file()


def test_a_bundle_whose_inferer_spans_an_axis_and_whose_checkpoint_path_has_a_key_is_quantized_exported_and_run(tmp_path, demo_data):
    roi_size = [64, 64, -1]  # one size for every axis (64) is traced as trace_shape's test shows
    root = spleen_style(tmp_path / "bundle", demo_data["lits"])
    inference = str(root / "configs" / "inference.json")
    config = json.loads(Path(inference).read_text())  # as swin_unetr_btcv_segmentation loads its weights
    config["checkpoint"], config["load_pretrain"] = "$@bundle_root + '/models/model.pt'", True
    config["checkpointloader"]["load_path"] = "$@checkpoint"
    config["initialize"] = ["$monai.utils.set_determinism(seed=123)", "$@checkpointloader(@evaluator) if @load_pretrain else None"]
    Path(inference).write_text(json.dumps(config))
    calibration = [str(demo_data["lits"] / "volume-0.nii")]
    quantized = workflow(
        root, [inference, str(overlay_path("quantize"))], run_id="quantize", method="rtn", calibration_images=calibration,
        **{"inferer#roi_size": roi_size},
    )
    (windows,) = [h for h in quantized.parser.get_parsed_content("calibrate#handlers") if hasattr(h, "roi_size")]
    assert windows.roi_size == (64, 64, -1)
    served_root = root / "export" / "bundle_rtn_w4a8"
    assert (served_root / "models" / "model.ts").is_file()
    assert "checkpoint" not in json.loads((served_root / "configs" / "inference.json").read_text())  # read by the loader alone
    workflow(served_root, [str(served_root / "configs" / "inference.json")], output_dir=str(tmp_path / "traced"), **{"inferer#roi_size": roi_size})
    pytest.importorskip("onnxruntime")
    workflow(root, [inference, str(overlay_path("openvino"))], runtime="onnxruntime", method="rtn", **{"inferer#roi_size": roi_size})
    traced, deployed = masks(tmp_path / "traced"), masks(root / "eval" / "rtn_w4a8_onnxruntime")
    assert sorted(traced) == sorted(deployed) == ["volume-8", "volume-9"]
    assert all((traced[c] == deployed[c]).mean() > 0.99 for c in traced)


def test_a_bundle_written_in_yaml_is_quantized_and_exported_with_its_config_served_as_json(tmp_path, demo_data):
    import yaml

    root = spleen_style(tmp_path / "bundle", demo_data["lits"])
    source = root / "configs" / "inference.json"
    (root / "configs" / "inference.yaml").write_text(yaml.safe_dump(json.loads(source.read_text())))  # as pancreas_ct_dints_segmentation's
    source.unlink()
    calibration = [str(demo_data["lits"] / "volume-0.nii")]
    workflow(root, [str(root / "configs" / "inference.yaml"), str(overlay_path("quantize"))], run_id="quantize", method="rtn", calibration_images=calibration)
    served_root = root / "export" / "bundle_rtn_w4a8"
    served = json.loads((served_root / "configs" / "inference.json").read_text())
    assert served["network"].startswith("$torch.jit.load(") and "checkpointloader" not in served
    # the MKL mode the trace was checked equal in, set before anything runs
    assert served["initialize"][0] == "$os.environ.setdefault('MKL_CBWR', 'AUTO,STRICT')" and "$import os" in served["imports"]


def test_a_case_whose_transforms_build_its_image_calibrates_as_it_is():
    case = {"artery": "a.nii.gz", "vein": "v.nii.gz"}  # renalStructures_CECT_segmentation joins its phases into "image"
    assert calibration_items([case], 1) == [case]
    from monai_effq.overlays import PrepareImageBatch

    image = torch.ones(1, 3, 4, 4, 4)
    assert PrepareImageBatch()({"image": image, "artery": image[:, :1]})[0] is image
