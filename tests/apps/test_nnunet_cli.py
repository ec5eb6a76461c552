"""The nnU-Net commands: ``quantize`` writes each fold's checkpoint and then its description; ``predict`` runs them.

nnU-Net is not installed here: :func:`new_predictor` is replaced by a stand-in predictor with the
attributes ``initialize_from_trained_model_folder`` sets, a preprocessor that reads the NIfTI files
it is given, and a ``predict_from_files`` that runs the predictor's folds as nnU-Net's does (each
fold's weights loaded into the one network, logits averaged) on each case of the input folder.
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_effq.apps import nnunet_cli
from monai_effq.apps.nnunet_cli import MANIFEST, calibration_cases, main
from monai_effq.ptq import QuantizedLayer
from monai_effq.ptq.checkpoint import load_quantized_result
from monai_effq.utils.errors import MissingExtraError, MissingInputError, UserInputError

from ..nnunet_like import nnunet_like

FOLDS = {0: 0, 1: 1}  # fold: the seed of its FP weights


class _Preprocessor:
    """nnU-Net's ``DefaultPreprocessor`` as the predictor calls it, reading the case's files."""

    def __init__(self, verbose: bool = True) -> None:
        pass

    def run_case(self, files, seg_file, plans_manager, configuration_manager, dataset_json):  # noqa: ANN001, ANN201
        return np.stack([nib.load(f).get_fdata(dtype=np.float32) for f in files]), None, {}


class _Predictor:
    """What ``initialize_from_trained_model_folder`` leaves, and ``predict_from_files`` run as nnU-Net runs folds."""

    def __init__(self, model_folder, folds, checkpoint_name, device, mirroring) -> None:  # noqa: ANN001
        self.made_with = (str(model_folder), list(folds), checkpoint_name, device, mirroring)
        self.network = nnunet_like(0)
        self.list_of_parameters = [nnunet_like(FOLDS[f]).state_dict() for f in folds]
        self.plans_manager = "plans"
        self.configuration_manager = SimpleNamespace(preprocessor_class=_Preprocessor, patch_size=[16, 16, 16], previous_stage_name=None)
        self.dataset_json = {"file_ending": ".nii.gz", "channel_names": {"0": "CT"}}
        self.logits: dict[str, torch.Tensor] = {}

    def predict_from_files(self, source, output, **kwargs) -> None:  # noqa: ANN001
        self.predicted = (source, output, kwargs)
        for case in calibration_cases(source, ".nii.gz", 1, 100):
            x = torch.from_numpy(_Preprocessor().run_case(case, None, None, None, None)[0])[None]
            runs = []
            for params in self.list_of_parameters:
                self.network.load_state_dict(params)
                with torch.no_grad():
                    runs.append(self.network(x))
            self.logits[case[0].name] = torch.stack(runs).mean(0)


@pytest.fixture
def predictors(monkeypatch) -> list[_Predictor]:
    """Every predictor the commands build, in order."""
    made = []

    def new_predictor(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        made.append(_Predictor(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(nnunet_cli, "new_predictor", new_predictor)
    return made


def _images(folder: Path, cases: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(cases):
        nib.save(nib.Nifti1Image(rng.standard_normal((16, 16, 16)).astype(np.float32), np.eye(4)), folder / f"case_{i:03d}_0000.nii.gz")
    return folder


def _quantize(tmp_path: Path, *extra: str) -> int:
    return main(["quantize", "-m", str(tmp_path / "model"), "-i", str(tmp_path / "imagesTr"), "-o", str(tmp_path / "q"), "-f", "0", "1",
                 "--method", "rtn", *extra])


def test_quantize_writes_each_folds_checkpoint_and_predict_runs_them_in_nnunets_predictor(tmp_path, predictors):
    _images(tmp_path / "imagesTr", 2)
    _images(tmp_path / "imagesTs", 2, seed=1)
    assert _quantize(tmp_path, "--weight_bits", "3") == 0
    manifest = json.loads((tmp_path / "q" / MANIFEST).read_text())
    assert manifest["folds"] == [0, 1] and manifest["checkpoints"] == ["fold_0.pt", "fold_1.pt"]
    assert manifest["config"]["weight_bits"] == 3 and manifest["config"]["method"] == "rtn"
    assert manifest["calibration"] == [[str((tmp_path / "imagesTr" / "case_000_0000.nii.gz").resolve())]]  # --cases 1: the first case

    assert main(["predict", "-q", str(tmp_path / "q"), "-i", str(tmp_path / "imagesTs"), "-o", str(tmp_path / "pred")]) == 0
    predictor = predictors[-1]
    assert predictor.made_with == (str((tmp_path / "model").resolve()), [0, 1], "checkpoint_final.pth", "cpu", True)
    assert predictor.predicted[:2] == (str(tmp_path / "imagesTs"), str(tmp_path / "pred"))
    assert isinstance(predictor.network[0].conv, QuantizedLayer)
    # each case's logits are the mean of the two saved quantized folds
    folds = [load_quantized_result(tmp_path / "q" / f"fold_{f}.pt", nnunet_like(0)).network for f in (0, 1)]
    for name, logits in predictor.logits.items():
        x = torch.from_numpy(nib.load(tmp_path / "imagesTs" / name).get_fdata(dtype=np.float32))[None, None]
        with torch.no_grad():
            assert torch.allclose(logits, (folds[0](x) + folds[1](x)) / 2, atol=1e-6)
            fp = (nnunet_like(0)(x) + nnunet_like(1)(x)) / 2
        assert not torch.allclose(logits, fp, atol=1e-3)  # 3-bit weights: not the FP ensemble
    assert len(predictor.logits) == 2


def test_predict_in_onnx_runtime_gives_the_fake_quant_folds_logits(tmp_path, predictors):
    pytest.importorskip("onnxruntime")
    _images(tmp_path / "imagesTr", 1)
    _images(tmp_path / "imagesTs", 1, seed=1)
    assert _quantize(tmp_path) == 0
    runs = {}
    for runtime in ("torch", "onnxruntime"):
        command = ["predict", "-q", str(tmp_path / "q"), "-i", str(tmp_path / "imagesTs"), "-o", str(tmp_path / runtime)]
        assert main([*command, "--runtime", runtime]) == 0
        runs[runtime] = predictors[-1].logits["case_000_0000.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "q" / "onnx_onnxruntime").iterdir()) == ["fold_0.onnx", "fold_1.onnx"]
    assert (runs["torch"].argmax(1) == runs["onnxruntime"].argmax(1)).float().mean() > 0.99


def test_bad_input_ends_each_command_with_one_line_and_status_1(tmp_path, predictors, capsys):
    _images(tmp_path / "imagesTs", 1)
    assert main(["predict", "-q", str(tmp_path / "q"), "-i", str(tmp_path / "imagesTs"), "-o", str(tmp_path / "pred")]) == 1
    assert f"{MANIFEST} does not exist" in capsys.readouterr().err

    assert _quantize(tmp_path) == 1  # no calibration folder
    assert "calibration image folder" in capsys.readouterr().err and not (tmp_path / "q").exists()

    _images(tmp_path / "imagesTr", 1)
    assert _quantize(tmp_path, "--weight_bits", "9") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "weight_bits" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1

    assert _quantize(tmp_path) == 0
    assert _quantize(tmp_path) == 1  # a finished folder is not replaced without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert _quantize(tmp_path, "--overwrite") == 0

    (tmp_path / "q" / MANIFEST).write_text("{not json")
    assert main(["predict", "-q", str(tmp_path / "q"), "-i", str(tmp_path / "imagesTs"), "-o", str(tmp_path / "pred")]) == 1
    assert "quantize into a new folder" in capsys.readouterr().err


def test_calibration_cases_are_the_first_cases_with_every_channel_and_a_missing_channel_is_named(tmp_path):
    for name in ("b_0000.nii.gz", "b_0001.nii.gz", "a_0000.nii.gz", "a_0001.nii.gz", "c_0000.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert calibration_cases(tmp_path, ".nii.gz", 2, 2) == [[tmp_path / "a_0000.nii.gz", tmp_path / "a_0001.nii.gz"],
                                                             [tmp_path / "b_0000.nii.gz", tmp_path / "b_0001.nii.gz"]]
    with pytest.raises(UserInputError, match=r"case c .* lacks channel 1 \(c_0001.nii.gz\)"):
        calibration_cases(tmp_path, ".nii.gz", 2, 3)
    with pytest.raises(UserInputError, match=r"no image named <case>_<channel:04d>.nrrd"):
        calibration_cases(tmp_path, ".nrrd", 1, 1)


def test_a_model_folder_without_a_folds_checkpoint_is_named_and_without_nnunetv2_the_package_is(tmp_path, monkeypatch):
    for name in ("plans.json", "dataset.json", "fold_0/checkpoint_final.pth"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("{}")
    with pytest.raises(MissingInputError, match=r"fold_1/checkpoint_final.pth does not exist.*-f only folds that were trained"):
        nnunet_cli.new_predictor(tmp_path, [0, 1], "checkpoint_final.pth", "cpu", True)
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # as if not installed
    with pytest.raises(MissingExtraError, match="pip install nnunetv2"):
        nnunet_cli.new_predictor(tmp_path, [0], "checkpoint_final.pth", "cpu", True)
