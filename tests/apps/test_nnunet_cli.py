"""The nnU-Net commands: ``quantize`` writes each fold's checkpoint and then its description; ``predict`` runs them.

nnU-Net is not installed here: :func:`new_predictor` is replaced by a stand-in predictor with the
attributes ``initialize_from_trained_model_folder`` sets, a preprocessor that reads the NIfTI files
it is given, and a ``predict_from_files`` that runs the predictor's folds as nnU-Net's does (each
fold's weights loaded into the one network, logits averaged) on each case of the input folder.
"""

import importlib.util
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_effq.apps import nnunet_cli
from monai_effq.apps.nnunet_cli import MANIFEST, calibration_cases, main
from monai_effq.ptq import QuantizedLayer
from monai_effq.ptq.checkpoint import load_quantized_result, save_quantized
from monai_effq.utils.errors import MissingExtraError, MissingInputError, UserInputError

from ..nnunet_like import nnunet_like

FOLDS = {0: 0, 1: 1, "all": 2}  # fold: the seed of its FP weights


class _Preprocessor:
    """nnU-Net's ``DefaultPreprocessor`` as the predictor calls it, reading the case's files."""

    def __init__(self, verbose: bool = True) -> None:
        pass

    def run_case(self, files, seg_file, plans_manager, configuration_manager, dataset_json):  # noqa: ANN001, ANN201
        seg = None if seg_file is None else np.asarray(nib.load(seg_file).dataobj, dtype=np.int8)[None]
        return np.stack([nib.load(f).get_fdata(dtype=np.float32) for f in files]), seg, {}


def _with_previous_stage(data: np.ndarray, seg: np.ndarray | None) -> torch.Tensor:
    """A case as a cascade stage's network reads it: the images, then one channel per foreground label (here 1)."""
    return torch.from_numpy(data if seg is None else np.concatenate([data, (seg == 1).astype(np.float32)]))[None]


class _Predictor:
    """What ``initialize_from_trained_model_folder`` leaves, and ``predict_from_files`` run as nnU-Net runs folds."""

    previous_stage: str | None = None  # a cascade stage's previous stage

    def __init__(self, model_folder, folds, checkpoint_name, device, mirroring, step_size=0.5, progress=False) -> None:  # noqa: ANN001
        self.made_with = (str(model_folder), list(folds), checkpoint_name, str(device), mirroring, step_size)
        channels = 1 if self.previous_stage is None else 2
        self.network = nnunet_like(0, channels)
        self.list_of_parameters = [nnunet_like(FOLDS[f], channels).state_dict() for f in folds]
        self.plans_manager = "plans"
        self.configuration_manager = SimpleNamespace(
            preprocessor_class=_Preprocessor, patch_size=[16, 16, 16], previous_stage_name=self.previous_stage
        )
        self.label_manager = SimpleNamespace(foreground_labels=[1])
        self.dataset_json = {"file_ending": ".nii.gz", "channel_names": {"0": "CT"}}
        self.logits: dict[str, torch.Tensor] = {}

    def predict_from_files(self, source, output, **kwargs) -> None:  # noqa: ANN001
        self.predicted = (source, output, kwargs)
        cases = calibration_cases(source, ".nii.gz", 1, 100)  # sorted, as nnU-Net lists them, then its part
        previous = kwargs.get("folder_with_segs_from_prev_stage")
        for case in cases[kwargs.get("part_id", 0) :: kwargs.get("num_parts", 1)]:
            # nnU-Net's name for a case's segmentation (and previous-stage one): the case identifier and the file ending
            name = case[0].name[: -len("_0000.nii.gz")] + ".nii.gz"
            if not kwargs.get("overwrite", True) and (Path(output) / name).is_file():
                continue  # --continue_prediction: segmented already
            seg_file = None if previous is None else Path(previous) / name
            x = _with_previous_stage(*_Preprocessor().run_case(case, seg_file, None, None, None)[:2])
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


@pytest.fixture
def data(tmp_path) -> Path:
    """A model folder (the stand-in predictor reads nothing in it), two training images and two to segment."""
    (tmp_path / "model").mkdir()
    _images(tmp_path / "imagesTr", 2)
    _images(tmp_path / "imagesTs", 2, seed=1)
    return tmp_path


def _quantize(root: Path, *extra: str, folds: tuple[str, ...] = ("0", "1")) -> int:
    paths = ["-m", str(root / "model"), "-i", str(root / "imagesTr"), "-o", str(root / "q")]
    return main(["quantize", *paths, "-f", *folds, "--method", "rtn", *extra])


def _predict(root: Path, *extra: str, out: str = "pred") -> int:
    return main(["predict", "-q", str(root / "q"), "-i", str(root / "imagesTs"), "-o", str(root / out), *extra])


def _saved_folds(folder: Path, folds: tuple) -> list[torch.nn.Module]:
    return [load_quantized_result(folder / f"fold_{f}.pt", nnunet_like(0)).network for f in folds]


def test_quantize_writes_each_folds_checkpoint_and_predict_runs_them_in_nnunets_predictor(data, predictors):
    assert _quantize(data, "--weight_bits", "3") == 0
    manifest = json.loads((data / "q" / MANIFEST).read_text())
    assert manifest["folds"] == [0, 1] and manifest["checkpoints"] == ["fold_0.pt", "fold_1.pt"]
    assert manifest["config"]["weight_bits"] == 3 and manifest["config"]["method"] == "rtn"
    assert manifest["calibration"] == [[str((data / "imagesTr" / "case_000_0000.nii.gz").resolve())]]  # --cases 1: the first case

    assert _predict(data) == 0
    predictor = predictors[-1]
    assert predictor.made_with == (str(data / "model"), [0, 1], "checkpoint_final.pth", "cpu", True, 0.5)
    assert predictor.predicted == (str(data / "imagesTs"), str(data / "pred"), {
        "save_probabilities": False, "overwrite": True, "num_processes_preprocessing": 3, "num_processes_segmentation_export": 3,
        "num_parts": 1, "part_id": 0, "folder_with_segs_from_prev_stage": None,
    })
    assert isinstance(predictor.network[0].conv, QuantizedLayer)
    # each case's logits are the mean of the two saved quantized folds
    folds = _saved_folds(data / "q", (0, 1))
    for name, logits in predictor.logits.items():
        x = torch.from_numpy(nib.load(data / "imagesTs" / name).get_fdata(dtype=np.float32))[None, None]
        with torch.no_grad():
            assert torch.allclose(logits, (folds[0](x) + folds[1](x)) / 2, atol=1e-6)
            fp = (nnunet_like(0)(x) + nnunet_like(1)(x)) / 2
        assert not torch.allclose(logits, fp, atol=1e-3)  # 3-bit weights: not the FP ensemble
    assert len(predictor.logits) == 2

    # nnUNetv2_predict's flags, passed on as it passes them
    flags = ("--continue_prediction", "--save_probabilities", "-npp", "2", "-nps", "1", "--disable_tta", "-step_size", "0.25")
    assert _predict(data, *flags) == 0
    assert predictors[-1].predicted[2] == {
        "save_probabilities": True, "overwrite": False, "num_processes_preprocessing": 2, "num_processes_segmentation_export": 1,
        "num_parts": 1, "part_id": 0, "folder_with_segs_from_prev_stage": None,
    }
    assert predictors[-1].made_with[4:] == (False, 0.25)
    # one command per part, as nnUNetv2_predict splits the cases over GPUs or machines: together they segment each case once
    parts = []
    for part in ("0", "1"):
        assert _predict(data, "-num_parts", "2", "-part_id", part) == 0
        parts.append(predictors[-1].logits)
    assert [sorted(p) for p in parts] == [["case_000_0000.nii.gz"], ["case_001_0000.nii.gz"]]
    assert all(torch.equal(logits, predictor.logits[name]) for p in parts for name, logits in p.items())


def test_a_cascade_stage_calibrates_and_predicts_on_the_previous_stages_predictions(data, predictors, monkeypatch, capsys):
    rng = np.random.default_rng(5)
    for folder in ("lowresTr", "lowresTs"):  # the previous stage's predictions of imagesTr and imagesTs
        (data / folder).mkdir()
        for case in ("case_000", "case_001"):
            nib.save(nib.Nifti1Image((rng.random((16, 16, 16)) > 0.5).astype(np.uint8), np.eye(4)), data / folder / f"{case}.nii.gz")
    assert _quantize(data, "-prev_stage_predictions", str(data / "lowresTr")) == 1  # not a cascade: nothing reads them
    assert "read by a cascade stage only" in capsys.readouterr().err

    monkeypatch.setattr(_Predictor, "previous_stage", "3d_lowres")
    assert _quantize(data) == 1
    assert "cascade stage after '3d_lowres': give quantize -prev_stage_predictions" in capsys.readouterr().err
    assert _quantize(data, "-prev_stage_predictions", str(data / "lowresTr")) == 0  # a 2-channel network: 1-channel windows would fail
    manifest = json.loads((data / "q" / MANIFEST).read_text())
    assert manifest["calibration_previous_stage"] == [str(data / "lowresTr" / "case_000.nii.gz")]
    assert _predict(data) == 1
    assert "give predict -prev_stage_predictions" in capsys.readouterr().err
    assert _predict(data, "-prev_stage_predictions", str(data / "nowhere")) == 1
    assert "predict the images with the '3d_lowres' stage first" in capsys.readouterr().err
    (data / "lowresTs" / "case_001.nii.gz").rename(data / "case_001.nii.gz")
    started = len(predictors)
    assert _predict(data, "-prev_stage_predictions", str(data / "lowresTs")) == 1  # found before nnU-Net's workers start
    err = capsys.readouterr().err
    assert "lowresTs/case_001.nii.gz does not exist (1 case(s) of" in err and len(err.strip().splitlines()) == 1
    assert not hasattr(predictors[-1], "predicted") and len(predictors) == started + 1
    assert _predict(data, "-prev_stage_predictions", str(data / "lowresTs"), "-num_parts", "2", "-part_id", "0") == 0  # not its part
    (data / "pred").mkdir(exist_ok=True)
    (data / "pred" / "case_001.nii.gz").write_bytes(b"")  # segmented already: --continue_prediction skips it, as nnU-Net does
    assert _predict(data, "-prev_stage_predictions", str(data / "lowresTs"), "--continue_prediction") == 0
    (data / "case_001.nii.gz").rename(data / "lowresTs" / "case_001.nii.gz")
    assert _predict(data, "-prev_stage_predictions", str(data / "lowresTs")) == 0
    assert predictors[-1].predicted[2]["folder_with_segs_from_prev_stage"] == str(data / "lowresTs")
    folds = [load_quantized_result(data / "q" / f"fold_{f}.pt", nnunet_like(0, 2)).network for f in (0, 1)]
    for name, logits in predictors[-1].logits.items():
        x = _with_previous_stage(*_Preprocessor().run_case([data / "imagesTs" / name], data / "lowresTs" / name.replace("_0000", ""), *[None] * 3)[:2])
        with torch.no_grad():
            assert torch.allclose(logits, (folds[0](x) + folds[1](x)) / 2, atol=1e-6)


def test_relative_paths_and_fold_all_are_read_back_from_another_folder(data, predictors, monkeypatch):
    monkeypatch.chdir(data)
    assert main(["quantize", "-m", "model", "-i", "imagesTr", "-o", "q", "-f", "all", "--method", "rtn"]) == 0
    manifest = json.loads((data / "q" / MANIFEST).read_text())
    assert manifest["folds"] == ["all"] and manifest["model_folder"] == str(data / "model")
    (data / "elsewhere").mkdir()
    monkeypatch.chdir(data / "elsewhere")
    assert main(["predict", "-q", "../q", "-i", "../imagesTs", "-o", "pred"]) == 0
    assert predictors[-1].made_with[:2] == (str(data / "model"), ["all"])
    if importlib.util.find_spec("onnxruntime") is not None:  # the file is named after its fold
        assert main(["predict", "-q", "../q", "-i", "../imagesTs", "-o", "ort", "--runtime", "onnxruntime"]) == 0
        assert [p.name for p in (data / "q" / "onnx_onnxruntime").iterdir()] == ["fold_all.onnx"]
    (only,) = _saved_folds(data / "q", ("all",))
    with torch.no_grad():
        x = torch.from_numpy(nib.load(data / "imagesTs" / "case_000_0000.nii.gz").get_fdata(dtype=np.float32))[None, None]
        assert torch.allclose(predictors[-1].logits["case_000_0000.nii.gz"], only(x), atol=1e-6)


def test_a_moved_model_folder_is_named_and_predict_m_gives_its_new_place(data, predictors, capsys):
    assert _quantize(data) == 0
    (data / "model").rename(data / "moved")
    assert _predict(data) == 1
    assert "give predict -m the folder it was moved to" in capsys.readouterr().err
    assert _predict(data, "-m", str(data / "moved")) == 0
    assert predictors[-1].made_with[0] == str(data / "moved")


def test_predict_in_onnx_runtime_gives_the_fake_quant_folds_logits(data, predictors):
    pytest.importorskip("onnxruntime")
    assert _quantize(data) == 0
    runs = {}
    for runtime in ("torch", "onnxruntime"):
        assert _predict(data, "--runtime", runtime, "--onnx_dir", str(data / "onnx"), out=runtime) == 0
        runs[runtime] = predictors[-1].logits["case_000_0000.nii.gz"]
    files = sorted((data / "onnx").iterdir())
    assert [p.name for p in files] == ["fold_0.onnx", "fold_1.onnx"]
    assert (runs["torch"].argmax(1) == runs["onnxruntime"].argmax(1)).float().mean() > 0.99
    # a second run runs the files it exported (each export replaces its file: a new inode)
    written = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in files]
    assert _predict(data, "--runtime", "onnxruntime", "--onnx_dir", str(data / "onnx"), out="again") == 0
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in files] == written
    assert torch.equal(predictors[-1].logits["case_000_0000.nii.gz"], runs["onnxruntime"])


def test_a_quantize_that_fails_while_it_saves_leaves_a_folder_predict_refuses(data, predictors, monkeypatch, capsys):
    assert _quantize(data) == 0
    saved = []

    def full_disk(result, path):  # noqa: ANN001, ANN202
        if saved:
            raise OSError(28, "No space left on device")
        saved.append(path)
        return save_quantized(result, path)

    monkeypatch.setattr(nnunet_cli, "save_quantized", full_disk)
    with pytest.raises(OSError):
        _quantize(data, "--overwrite", "--weight_bits", "3")
    assert _predict(data) == 1  # fold 0 is the new run's, fold 1 the old run's: not one finished folder
    assert f"{MANIFEST} does not exist" in capsys.readouterr().err


def test_bad_input_ends_each_command_with_one_line_and_status_1(tmp_path, predictors, capsys):
    def one_line() -> str:
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        return err

    (tmp_path / "model").mkdir()
    _images(tmp_path / "imagesTs", 1)
    assert _predict(tmp_path) == 1
    assert f"{MANIFEST} does not exist" in one_line()

    assert _quantize(tmp_path) == 1  # no calibration folder
    assert "calibration image folder" in one_line() and not (tmp_path / "q").exists()

    _images(tmp_path / "imagesTr", 1)
    assert _quantize(tmp_path, "--weight_bits", "9") == 1
    assert "weight_bits" in one_line()
    assert _quantize(tmp_path, "--device", "gpu") == 1
    assert "device must be a torch device name" in one_line()
    if not torch.cuda.is_available():
        assert _quantize(tmp_path, "--device", "cuda") == 1
        assert "no CUDA GPU" in one_line()
    (tmp_path / "afile").write_text("")
    started = len(predictors)
    assert main(["quantize", "-m", str(tmp_path / "model"), "-i", str(tmp_path / "imagesTr"), "-o", str(tmp_path / "afile")]) == 1
    assert "is a file, not a folder" in one_line() and len(predictors) == started  # refused before nnU-Net was started
    for bad in (["-f", "abc"], ["--cases", "0"], ["--no_such_flag"]):
        with pytest.raises(SystemExit) as stop:
            _quantize(tmp_path, *bad)
        assert stop.value.code == 1 and "--help" in one_line()
    # a fold given twice would be quantized twice and then refused by the deployment, after quantize said it was done
    assert _quantize(tmp_path, folds=("0", "1", "0")) == 1
    assert "-f names fold 0 more than once" in one_line() and len(predictors) == started and not (tmp_path / "q").exists()

    assert _quantize(tmp_path, "--disable_progress_bar") == 0
    assert capsys.readouterr().err == ""  # no progress bar
    assert _quantize(tmp_path) == 1  # a finished folder is not replaced without --overwrite
    assert "--overwrite" in one_line()
    assert _quantize(tmp_path, "--overwrite", "--disable_progress_bar") == 0
    assert _predict(tmp_path, "--device", "gpu") == 1
    assert "--device must be a torch device name" in one_line()
    started = len(predictors)
    assert _predict(tmp_path, "-num_parts", "2", "-part_id", "2") == 1
    assert "-part_id 2 is not one of the 2 parts (0 to 1)" in one_line() and len(predictors) == started
    for bad in (["-num_parts", "0"], ["-step_size", "0"], ["-step_size", "1.5"], ["-step_size", "-0.5"]):
        with pytest.raises(SystemExit) as stop:
            _predict(tmp_path, *bad)
        assert stop.value.code == 1 and "--help" in one_line()
    assert _predict(tmp_path, "--runtime", "onnxruntime", "--onnx_dir", str(tmp_path / "afile")) == 1
    assert "--onnx_dir" in one_line() and len(predictors) == started  # before nnU-Net loads the folds
    assert _predict(tmp_path, "-f", "0", "3") == 1
    assert "-f 3 is not a fold of" in one_line() and len(predictors) == started

    (tmp_path / "q" / MANIFEST).write_text("{not json")
    assert _predict(tmp_path) == 1
    assert "quantize into a new folder" in one_line()


def test_predict_f_runs_the_chosen_quantized_folds_alone(data, predictors):
    assert _quantize(data) == 0
    assert _predict(data, "-f", "1") == 0
    assert predictors[-1].made_with[1] == [1]
    (fold_1,) = _saved_folds(data / "q", (1,))
    for name, logits in predictors[-1].logits.items():
        x = torch.from_numpy(nib.load(data / "imagesTs" / name).get_fdata(dtype=np.float32))[None, None]
        with torch.no_grad():
            assert torch.allclose(logits, fold_1(x), atol=1e-6)


def test_a_dataset_json_naming_modality_instead_of_channel_names_is_read_as_nnunet_reads_it(data, monkeypatch):
    class OlderDatasetJson(_Predictor):
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            super().__init__(*args, **kwargs)
            self.dataset_json = {"file_ending": ".nii.gz", "modality": {"0": "CT"}}

    monkeypatch.setattr(nnunet_cli, "new_predictor", OlderDatasetJson)
    assert _quantize(data) == 0
    assert nnunet_cli.input_channels({"channel_names": {"0": "T1", "1": "T2"}}) == 2
    with pytest.raises(UserInputError, match="neither 'channel_names' nor 'modality'"):
        nnunet_cli.input_channels({"file_ending": ".nii.gz"})


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_fold_checkpoint_ends_quantize_with_one_line_naming_it(tmp_path, monkeypatch, capsys, damage):
    # nnU-Net's predictor as far as it reads the fold checkpoints: torch.load of each (an nnunetv2 stand-in)
    class Predictor:
        def __init__(self, **kwargs) -> None:  # noqa: ANN003
            pass

        def initialize_from_trained_model_folder(self, folder, use_folds, checkpoint_name) -> None:  # noqa: ANN001
            for fold in use_folds:
                torch.load(Path(folder) / f"fold_{fold}" / checkpoint_name, map_location="cpu", weights_only=False)

    module = SimpleNamespace(nnUNetPredictor=Predictor)
    for name, value in (("nnunetv2", SimpleNamespace()), ("nnunetv2.inference", SimpleNamespace()),
                        ("nnunetv2.inference.predict_from_raw_data", module)):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, value)
    model = tmp_path / "model"
    for name in ("plans.json", "dataset.json"):
        (model / name).parent.mkdir(exist_ok=True)
        (model / name).write_text("{}")
    for fold in (0, 1):
        (model / f"fold_{fold}").mkdir()
        torch.save({"network_weights": nnunet_like(fold).state_dict()}, model / f"fold_{fold}" / "checkpoint_final.pth")
    whole = (model / "fold_1" / "checkpoint_final.pth").read_bytes()
    (model / "fold_1" / "checkpoint_final.pth").write_bytes(b"" if damage == "empty" else whole[: len(whole) // 2])
    _images(tmp_path / "imagesTr", 1)
    assert _quantize(tmp_path) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: nnU-Net could not load fold(s) [0, 1]") and len(err.strip().splitlines()) == 1, err
    assert "checkpoint_final.pth may be damaged" in err and not (tmp_path / "q").exists()


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


def test_the_installed_effq_nnunet_command_is_this_main():
    (script,) = entry_points(group="console_scripts", name="effq-nnunet")
    assert script.load() is main
