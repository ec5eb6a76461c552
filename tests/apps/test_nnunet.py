"""nnU-Net's predictor runs its fold ensemble quantized: each fold's weights quantized, loaded as it loads folds.

The predictor is read through the attributes ``initialize_from_trained_model_folder`` sets, so these
tests stand it in with those attributes and nnU-Net-style networks (nnU-Net itself is not installed).
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from monai_effq import EfficientQConfig, quantize
from monai_effq.apps import deploy_nnunet_predictor, load_nnunet_predictor, nnunet_calibration_windows, quantize_nnunet_predictor
from monai_effq.ptq import QuantizedLayer
from monai_effq.utils.errors import OutputWriteError, UserInputError

from ..nnunet_like import nnunet_like

CONFIG = EfficientQConfig(weight_bits=4, act_bits=8)


def _predictor(network: nn.Module, folds: list[nn.Module]) -> SimpleNamespace:
    """What ``initialize_from_trained_model_folder`` leaves: one network, each fold's state dict."""
    return SimpleNamespace(network=network, list_of_parameters=[{k: v.clone() for k, v in f.state_dict().items()} for f in folds])


def _windows(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(seed))


def _as_the_predictor_runs(predictor: SimpleNamespace, fold: int, x: torch.Tensor) -> torch.Tensor:
    predictor.network.load_state_dict(predictor.list_of_parameters[fold])
    with torch.no_grad():
        return predictor.network(x)


def test_each_fold_loaded_as_the_predictor_loads_it_computes_its_own_quantized_network():
    folds = [nnunet_like(seed) for seed in (0, 1)]
    predictor = _predictor(nnunet_like(0), folds)
    x = _windows()
    results = quantize_nnunet_predictor(predictor, x, CONFIG, progress=False)

    assert len(results) == 2 and all(isinstance(b.conv, QuantizedLayer) for b in predictor.network[:2])
    y = _windows(2)
    with torch.no_grad():
        alone = [quantize(fold, x, CONFIG, progress=False).network(y) for fold in folds]
    # in the predictor's order, then back to the first: loading one fold leaves the others' weights as they were
    for fold in (0, 1, 0, 1):
        assert torch.equal(_as_the_predictor_runs(predictor, fold, y), alone[fold])
    assert not torch.equal(alone[0], alone[1])
    with torch.no_grad():  # and the results, which the user saves and deploys, as quantized
        assert all(torch.equal(r.network(y), alone[i]) for i, r in enumerate(results))
    with pytest.raises(UserInputError, match="already quantized: initialise it again"):
        quantize_nnunet_predictor(predictor, x, CONFIG, progress=False)


def test_a_network_compiled_by_nnunet_is_quantized_as_its_original_module(caplog):
    predictor = _predictor(torch.compile(nnunet_like(0)), [nnunet_like(0)])
    quantize_nnunet_predictor(predictor, _windows(), CONFIG, progress=False)
    assert isinstance(predictor.network, nn.Sequential)  # runs eagerly, as load_state_dict expects
    assert "compiled" in caplog.text


def test_an_uninitialised_predictor_is_refused_with_the_call_that_initialises_it():
    with pytest.raises(UserInputError, match="initialize_from_trained_model_folder"):
        quantize_nnunet_predictor(SimpleNamespace(network=None, list_of_parameters=None), _windows(), progress=False)


def test_fold_weights_of_another_network_are_refused_naming_the_fold():
    other = nn.Sequential(nn.Conv3d(1, 4, 3)).eval()
    predictor = _predictor(nnunet_like(0), [nnunet_like(0), other])
    with pytest.raises(UserInputError, match="fold 1's weights do not fit"):
        quantize_nnunet_predictor(predictor, _windows(), CONFIG, progress=False)


def test_folds_whose_quantized_grids_differ_are_refused_naming_the_layer_and_the_setting():
    # the second convolution's input: non-negative in one fold (the unsigned grid), signed in the other
    def fold(sign: float) -> nn.Module:
        net = nn.Sequential(nn.Conv3d(1, 2, 1), nn.Conv3d(2, 2, 1), nn.Conv3d(2, 2, 1)).eval()
        with torch.no_grad():
            net[0].weight.fill_(sign)
            net[0].bias.fill_(0.0)
        return net

    predictor = _predictor(fold(1.0), [fold(1.0), fold(-1.0)])
    x = _windows().abs()
    with pytest.raises(UserInputError, match=r"fold 1's quantized network differs from fold 0's at module 1\.input_quantizer .*act_grid"):
        quantize_nnunet_predictor(predictor, x, CONFIG, progress=False)
    # with the grid set, both folds fit one network
    quantize_nnunet_predictor(predictor, x, EfficientQConfig(weight_bits=4, act_bits=8, act_grid="asymmetric"), progress=False)


class _Preprocessor:
    """nnU-Net's ``DefaultPreprocessor`` as the predictor calls it: ``run_case`` gives ``(data, seg, properties)``."""

    calls: list = []

    def __init__(self, verbose: bool = True) -> None:
        pass

    def run_case(self, files, seg_file, plans_manager, configuration_manager, dataset_json):  # noqa: ANN001, ANN201
        self.calls.append((files, seg_file, plans_manager, configuration_manager, dataset_json))
        # a previous stage's segmentation comes back resampled with the images, (1, *spatial): labels 0-2 along the first axis
        seg = None if seg_file is None else (np.arange(20)[None, :, None, None] % 3 * np.ones((1, 20, 16, 12))).astype(np.int8)
        return np.ones((len(files), 20, 16, 12), dtype=np.float32), seg, {}


def _calibration_predictor(patch_size: list[int], previous_stage: str | None = None) -> SimpleNamespace:
    configuration = SimpleNamespace(preprocessor_class=_Preprocessor, patch_size=patch_size, previous_stage_name=previous_stage)
    return SimpleNamespace(
        network=nnunet_like(0), list_of_parameters=[{}], plans_manager="plans", configuration_manager=configuration, dataset_json={"d": 1},
        label_manager=SimpleNamespace(foreground_labels=[2, 1]),
    )


def test_calibration_windows_are_preprocessed_by_the_predictor_and_cut_at_its_patch_size(tmp_path):
    files = [tmp_path / f"case_000_000{c}.nii.gz" for c in range(2)]
    for f in files:
        f.write_bytes(b"")
    predictor = _calibration_predictor([16, 16, 16])
    windows = nnunet_calibration_windows(predictor, [files])
    assert tuple(windows.shape) == (2, 2, 16, 16, 16)  # the 20-voxel axis in two windows
    assert _Preprocessor.calls[-1] == ([str(f) for f in files], None, "plans", predictor.configuration_manager, {"d": 1})
    # a 2d configuration runs slices: up to 16 of the 20, each in one 16x12 window
    assert tuple(nnunet_calibration_windows(_calibration_predictor([16, 12]), [files]).shape) == (16, 2, 16, 12)
    with pytest.raises(UserInputError, match="case_000_0009.nii.gz does not exist"):
        nnunet_calibration_windows(predictor, [[tmp_path / "case_000_0009.nii.gz"]])
    with pytest.raises(UserInputError, match="a list of cases"):
        nnunet_calibration_windows(predictor, str(files[0]))
    with pytest.raises(UserInputError, match="cascade stage after '3d_lowres'.*give previous_stage_segmentations, one file per case "
                       r"\(1 cases, none given\): the '3d_lowres' predictions"):
        nnunet_calibration_windows(_calibration_predictor([16, 16, 16], "3d_lowres"), [files])


def test_a_cascade_stage_calibrates_on_the_images_and_one_channel_per_label_of_the_previous_stage(tmp_path):
    files = [tmp_path / "case_000_0000.nii.gz"]
    previous = tmp_path / "lowres" / "case_000.nii.gz"
    for f in (*files, previous):
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(b"")
    cascade = _calibration_predictor([16, 16, 16], "3d_lowres")
    windows = nnunet_calibration_windows(cascade, [files], previous_stage_segmentations=[previous])
    assert _Preprocessor.calls[-1][:2] == ([str(files[0])], str(previous))  # resampled with the images by the preprocessor
    assert tuple(windows.shape) == (2, 3, 16, 16, 16)  # the image, then labels 2 and 1 in the label manager's order
    labels = torch.arange(20) % 3
    for w, start in zip(windows, (0, 4)):  # the 20-voxel axis in two windows, the second from voxel 4
        assert torch.equal(w[0, ..., :12], torch.ones(16, 16, 12))  # the 12-voxel axis padded to the patch
        for channel, label in ((1, 2), (2, 1)):
            assert torch.equal(w[channel][:, 0, 0], (labels[start : start + 16] == label).float())
    with pytest.raises(UserInputError, match=r"one file per case \(1 cases, 2 given\)"):
        nnunet_calibration_windows(cascade, [files], previous_stage_segmentations=[previous, previous])
    with pytest.raises(UserInputError, match="lowres/case_001.nii.gz does not exist: predict the calibration cases with the '3d_lowres' stage first"):
        nnunet_calibration_windows(cascade, [files], previous_stage_segmentations=[tmp_path / "lowres" / "case_001.nii.gz"])
    with pytest.raises(UserInputError, match="read by a cascade stage only, and this configuration is not one"):
        nnunet_calibration_windows(_calibration_predictor([16, 16, 16]), [files], previous_stage_segmentations=[previous])


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_deployed_folds_run_in_the_runtime_as_the_mean_of_the_quantized_folds(tmp_path, runtime):
    pytest.importorskip("onnxruntime" if runtime == "onnxruntime" else "openvino")
    folds = [nnunet_like(seed) for seed in (0, 1)]
    predictor = _predictor(nnunet_like(0), folds)
    predictor.configuration_manager = SimpleNamespace(patch_size=[16, 16, 16])
    options = {"precision": "f32"} if runtime == "openvino" else {}
    with pytest.raises(UserInputError, match="runs FP folds: quantize it with quantize_nnunet_predictor, or load saved quantized folds with load_nnunet_predictor, first"):
        deploy_nnunet_predictor(predictor, [], tmp_path / "onnx", runtime)
    results = quantize_nnunet_predictor(predictor, _windows(), CONFIG, progress=False)
    y = _windows(2)
    _as_the_predictor_runs(predictor, 1, y)  # a prediction first, as the README's order has it
    with pytest.raises(UserInputError, match=r"results \(1 quantized folds\) are not the 2 folds this predictor holds"):
        deploy_nnunet_predictor(predictor, results[:1], tmp_path / "onnx", runtime)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OutputWriteError, match="a_file: it is a file; give a folder"):
        deploy_nnunet_predictor(predictor, results, tmp_path / "a_file", runtime)
    paths = deploy_nnunet_predictor(predictor, results, tmp_path / "onnx", runtime, **options)

    assert [p.name for p in paths] == ["fold_0.onnx", "fold_1.onnx"] and predictor.list_of_parameters == [{}]
    with torch.no_grad():
        each = [r.network(y) for r in results]
        for fold, expected in zip(predictor.network.folds, each):  # each file is its own fold
            assert float((fold(y) - expected).norm() / expected.norm()) < 0.02
        expected = sum(each) / 2
        got = _as_the_predictor_runs(predictor, 0, y)  # the predictor loads its one (empty) fold first
    assert float((got - expected).norm() / expected.norm()) < 0.02
    assert float((got.argmax(1) == expected.argmax(1)).float().mean()) > 0.99
    with pytest.raises(UserInputError, match="already deployed"):
        deploy_nnunet_predictor(predictor, results, tmp_path / "again", runtime)
    with pytest.raises(UserInputError, match="already deployed"):
        quantize_nnunet_predictor(predictor, _windows(), CONFIG, progress=False)


def test_a_deployment_takes_its_input_channels_from_the_first_layer_also_when_that_layer_stays_fp(tmp_path):
    pytest.importorskip("onnxruntime")
    predictor = _predictor(nnunet_like(0), [nnunet_like(0)])
    predictor.configuration_manager = SimpleNamespace(patch_size=[16, 16, 16])
    config = EfficientQConfig(weight_bits=4, act_bits=8, skip=["0.conv"])
    results = quantize_nnunet_predictor(predictor, _windows(), config, progress=False)
    deploy_nnunet_predictor(predictor, results, tmp_path, "onnxruntime")
    assert tuple(predictor.network(_windows(2)).shape) == (2, 2, 16, 16, 16)


def test_results_of_another_predictor_are_not_deployed(tmp_path):
    mine, other = (_predictor(nnunet_like(0), [nnunet_like(seed)]) for seed in (0, 1))
    quantize_nnunet_predictor(mine, _windows(), CONFIG, progress=False)
    theirs = quantize_nnunet_predictor(other, _windows(), CONFIG, progress=False)
    mine.configuration_manager = SimpleNamespace(patch_size=[16, 16, 16])
    with pytest.raises(UserInputError, match="are not the 1 folds this predictor holds"):
        deploy_nnunet_predictor(mine, theirs, tmp_path, "onnxruntime")


def test_saved_folds_are_loaded_into_a_fresh_predictor_and_deployed_without_calibrating(tmp_path):
    pytest.importorskip("onnxruntime")
    from monai_effq import load_quantized_result, save_quantized

    folds = [nnunet_like(seed) for seed in (0, 1)]
    results = quantize_nnunet_predictor(_predictor(nnunet_like(0), folds), _windows(), CONFIG, progress=False)
    paths = [save_quantized(r, tmp_path / f"fold_{i}.pt") for i, r in enumerate(results)]

    fresh = _predictor(nnunet_like(0), folds)
    fresh.configuration_manager = SimpleNamespace(patch_size=[16, 16, 16])
    with pytest.raises(UserInputError, match="results holds 1 quantized fold.* and the predictor 2"):
        load_nnunet_predictor(fresh, [load_quantized_result(paths[0], nnunet_like(0))])
    with pytest.raises(UserInputError, match="results must be a list of QuantizationResult.*got NoneType"):
        load_nnunet_predictor(fresh, None)
    loaded = [load_quantized_result(p, nnunet_like(0)) for p in paths]
    load_nnunet_predictor(fresh, loaded)
    y = _windows(2)
    with torch.no_grad():
        for fold, result in enumerate(results):
            assert torch.equal(_as_the_predictor_runs(fresh, fold, y), result.network(y))
    deploy_nnunet_predictor(fresh, loaded, tmp_path / "onnx", "onnxruntime")
    assert len(fresh.network.folds) == 2


def test_deploying_the_same_folds_again_runs_their_files_and_a_file_made_otherwise_is_exported_again(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import monai_effq.apps.nnunet as app

    folds = [nnunet_like(seed) for seed in (0, 1)]
    exported = []
    export = app.export_onnx
    monkeypatch.setattr(app, "export_onnx", lambda result, path, *a, **k: exported.append(path.name) or export(result, path, *a, **k))

    def deployed(results, **names):
        predictor = _predictor(nnunet_like(0), folds)
        predictor.configuration_manager = SimpleNamespace(patch_size=[16, 16, 16])
        load_nnunet_predictor(predictor, results)
        return deploy_nnunet_predictor(predictor, results, tmp_path, "onnxruntime", **names), predictor

    w4 = quantize_nnunet_predictor(_predictor(nnunet_like(0), folds), _windows(), CONFIG, progress=False)
    w2 = quantize_nnunet_predictor(_predictor(nnunet_like(0), folds), _windows(), EfficientQConfig(weight_bits=2), progress=False)
    y = _windows(2)
    for exports in (2, 0):
        before = len(exported)
        paths, predictor = deployed(w4)
        assert len(exported) - before == exports and [p.name for p in paths] == ["fold_0.onnx", "fold_1.onnx"]
    # fold 0's file made from another fold or with other settings (another patch size: tests/deploy/test_runtime.py): exported again, alone
    for result, settings in ((w2[0], {}), (w4[0], {"reduce_range": True}), (w4[0], {"dynamic_batch": False})):
        export(result, tmp_path / "fold_0.onnx", (1, 1, 16, 16, 16), dynamic_spatial=False, **{"dynamic_batch": True, **settings})
        before = len(exported)
        _, predictor = deployed(w4)
        assert exported[before:] == ["fold_0.onnx"], settings
        with torch.no_grad():  # each file runs its own fold
            for fold, result in zip(predictor.network.folds, w4):
                expected = result.network(y)
                assert float((fold(y) - expected).norm() / expected.norm()) < 0.02
    monkeypatch.setattr("monai_effq.deploy.runtime.exporter_version", lambda: "99.0")  # an upgraded monai-effq reads them
    before = len(exported)
    deployed(w4)
    assert exported[before:] == ["fold_0.onnx", "fold_1.onnx"]
    with pytest.raises(UserInputError, match=r"fold_names \['a', 'a'\] must name each of the 2 quantized folds once"):
        deployed(w2, fold_names=["a", "a"])
    with pytest.raises(UserInputError, match=r"fold_names must be a list of fold names \(\['all'\] for one fold\)"):
        deployed(w2, fold_names="all")


def test_a_predictor_whose_only_quantizers_are_at_norm_inputs_counts_as_quantized():
    config = EfficientQConfig(weight_bits=4, act_bits=8, method="rtn", skip=["*"], quantize_norm_inputs=True, attention=False)
    predictor = _predictor(nnunet_like(0), [nnunet_like(0)])
    quantize_nnunet_predictor(predictor, _windows(), config, progress=False)
    with pytest.raises(UserInputError, match="already quantized"):
        quantize_nnunet_predictor(predictor, _windows(), config, progress=False)


def test_a_structure_mismatch_names_the_entry_whichever_fold_has_it():
    from monai_effq.apps.nnunet import _install

    extra = nnunet_like(0)
    extra.register_buffer("calibrated", torch.ones(1))
    for networks, fold_1 in (([extra, nnunet_like(1)], "nothing"), ([nnunet_like(1), extra], r"\(\(1,\), torch\.float32\)")):
        with pytest.raises(UserInputError, match=rf"differs from fold 0's at tensor calibrated \(fold 1: {fold_1}"):
            _install(SimpleNamespace(), [SimpleNamespace(network=n) for n in networks])
