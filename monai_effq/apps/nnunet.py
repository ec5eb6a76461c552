"""nnU-Net v2: quantize the fold ensemble an ``nnUNetPredictor`` runs, so its own inference runs it quantized.

nnU-Net's predictor holds one network and the weights of each fold (``list_of_parameters``); for each
fold it loads that fold's state dict into the network and predicts, then averages the folds' logits.
:func:`quantize_nnunet_predictor` quantizes every fold's weights on the same calibration windows and
puts the quantized network and the folds' quantized state dicts in their place, so that the
predictor's Python API (``predict_from_files``, ``predict_single_npy_array``: preprocessing, sliding
windows, mirroring, resampling, export) runs unchanged; the ``nnUNetv2_predict`` command builds a
predictor of its own from the model folder and runs FP (:mod:`monai_effq.apps.nnunet_cli` gives the
quantized folds two commands of their own).
:func:`nnunet_calibration_windows` preprocesses raw images as the predictor preprocesses them, and
:func:`deploy_nnunet_predictor` exports the quantized folds as int8 ONNX files and makes the predictor
run them in OpenVINO or ONNX Runtime; :func:`load_nnunet_predictor` gives a predictor folds saved earlier.

Nothing here imports nnU-Net: the predictor is read through the attributes
``initialize_from_trained_model_folder`` sets.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from monai_effq.data.calibration import calibration_windows
from monai_effq.deploy.export import export_onnx
from monai_effq.deploy.runtime import RUNTIMES, export_is_current
from monai_effq.ptq.checkpoint import result_fingerprint
from monai_effq.ptq.config import EfficientQConfig
from monai_effq.ptq.modules import ActivationQuantizer, QuantizedLayer, QuantizedNorm
from monai_effq.ptq.pipeline import quantize
from monai_effq.ptq.prepare import eager_network
from monai_effq.ptq.result import QuantizationResult
from monai_effq.utils.errors import UserInputError
from monai_effq.utils.io import check_writable

logger = logging.getLogger("monai_effq")

# slices of each case a 2d configuration calibrates on (evenly spaced): a CT's hundreds of slices, each
# cut into windows, would hold more activations than a layer-wise fit needs
MAX_SLICES = 16

__all__ = [
    "FoldEnsemble",
    "deploy_nnunet_predictor",
    "load_nnunet_predictor",
    "nnunet_calibration_windows",
    "quantize_nnunet_predictor",
]


def _initialised(predictor: Any) -> None:
    """Refuse a predictor without a network and fold weights, naming the call that gives them."""
    network = getattr(predictor, "network", None)
    folds = getattr(predictor, "list_of_parameters", None)
    if not isinstance(network, nn.Module) or not folds:
        raise UserInputError(
            f"{type(predictor).__name__} has no network or fold weights yet: call "
            "predictor.initialize_from_trained_model_folder(model_folder, use_folds=...) first."
        )


def _stage(predictor: Any) -> str:
    """``"deployed"``, ``"quantized"`` or ``"fp"``: what the predictor's network runs now."""
    if isinstance(predictor.network, FoldEnsemble):
        return "deployed"
    quantized = (QuantizedLayer, QuantizedNorm, ActivationQuantizer)  # a network may quantize norm inputs alone
    return "quantized" if any(isinstance(m, quantized) for m in predictor.network.modules()) else "fp"


def nnunet_calibration_windows(
    predictor: Any,
    image_files: Sequence[Sequence[str | os.PathLike]],
    overlap: float = 0.0,
    previous_stage_segmentations: Sequence[str | os.PathLike] | None = None,
) -> torch.Tensor:
    """Calibration windows from raw images, preprocessed as the predictor preprocesses the images it segments.

    Each case is resampled to the configuration's spacing and normalised by the configuration's own
    preprocessor (its ``run_case``, with the plans' reader), then cut into windows of the
    configuration's patch size, the windows the predictor's sliding window runs. For a 2d
    configuration, whose predictor runs each slice, up to :data:`MAX_SLICES` evenly spaced slices of
    each case are cut. A cascade stage's network also reads the previous stage's segmentation of the
    case: the preprocessor resamples it with the images, and one channel per foreground label (in the
    label manager's order) follows the image channels, as the predictor stacks them.

    Args:
        predictor: an initialised ``nnunetv2.inference.predict_from_raw_data.nnUNetPredictor``.
        image_files: one list of files per case, one file per input channel, in nnU-Net's order
            (``[["case_000_0000.nii.gz", "case_000_0001.nii.gz"], ...]``); one case is enough.
        overlap: overlap of neighbouring windows, as :func:`~monai_effq.data.calibration_windows`.
        previous_stage_segmentations: for a cascade stage (``3d_cascade_fullres``), the previous
            stage's segmentation file of each case (what ``nnUNetv2_predict`` of that stage wrote:
            ``case_000.nii.gz``), one per case; ``None`` for any other configuration.

    Returns:
        the ``(windows, channels, *patch_size)`` batch.

    Raises:
        UserInputError: when the predictor is not initialised, no case is given, a case names no
            file or a file is missing, or a cascade stage is not given one previous-stage segmentation
            per case (or another configuration is given some).
    """
    _initialised(predictor)
    if isinstance(image_files, (str, os.PathLike)) or not image_files:
        raise UserInputError("image_files must be a list of cases, each a list of its channel files: [['case_0000.nii.gz'], ...].")
    cases = []
    for case in image_files:
        files = [case] if isinstance(case, (str, os.PathLike)) else list(case)
        if not files:
            raise UserInputError("a case of image_files names no file: give each case its channel files.")
        missing = [str(f) for f in files if not os.path.isfile(f)]
        if missing:
            raise UserInputError(f"calibration image {missing[0]} does not exist: give the raw images of training cases.")
        cases.append([str(f) for f in files])
    configuration = predictor.configuration_manager
    segmentations = _previous_stage_segmentations(getattr(configuration, "previous_stage_name", None), previous_stage_segmentations, len(cases))
    patch = [int(s) for s in configuration.patch_size]
    preprocessor = configuration.preprocessor_class(verbose=False)
    volumes = []
    for files, previous in zip(cases, segmentations):
        data, seg, _ = preprocessor.run_case(files, previous, predictor.plans_manager, configuration, predictor.dataset_json)
        volume = torch.from_numpy(data).float()
        if previous is not None:
            labels = torch.from_numpy(seg[0])
            volume = torch.cat([volume, torch.stack([labels == label for label in predictor.label_manager.foreground_labels]).float()])
        if volume.dim() == len(patch) + 2:  # a 2d configuration: the predictor runs the volume slice by slice
            taken = torch.linspace(0, volume.shape[1] - 1, min(MAX_SLICES, volume.shape[1])).round().long().unique()
            volumes += list(volume[:, taken].unbind(1))
        else:
            volumes.append(volume)
    return calibration_windows(volumes, patch, overlap)


def _previous_stage_segmentations(
    previous_stage: str | None, files: Sequence[str | os.PathLike] | None, cases: int
) -> list[str | None]:
    """Per case, its previous-stage segmentation file for ``run_case`` (``None`` outside a cascade), checked."""
    if not previous_stage:
        if files:
            raise UserInputError(
                "previous_stage_segmentations are read by a cascade stage only, and this configuration is not one: leave them out."
            )
        return [None] * cases
    files = files if files is None or isinstance(files, (str, os.PathLike)) else list(files)
    if files is None or isinstance(files, (str, os.PathLike)) or len(files) != cases:
        given = "none" if files is None else f"{1 if isinstance(files, (str, os.PathLike)) else len(files)}"
        raise UserInputError(
            f"this configuration is a cascade stage after {previous_stage!r}: its network also reads that stage's "
            f"segmentation of each case, so give previous_stage_segmentations, one file per case ({cases} cases, {given} "
            f"given): the {previous_stage!r} predictions of the calibration cases."
        )
    missing = [str(f) for f in files if not os.path.isfile(f)]
    if missing:
        raise UserInputError(f"previous-stage segmentation {missing[0]} does not exist: predict the calibration cases with the {previous_stage!r} stage first.")
    return [str(f) for f in files]


def _structure(network: nn.Module) -> dict[str, tuple]:
    """What one network must share with another to run its state dict, by name: each module's kind and grid
    (which a state dict does not carry), each tensor's shape and type."""
    modules = {f"module {name or '(the network)'}": (type(m).__name__, getattr(m, "grid", None)) for name, m in network.named_modules()}
    return modules | {f"tensor {k}": (tuple(v.shape), v.dtype) for k, v in network.state_dict().items()}


def quantize_nnunet_predictor(
    predictor: Any,
    calibration: torch.Tensor | Sequence[torch.Tensor],
    config: EfficientQConfig | None = None,
    *,
    progress: bool = True,
) -> list[QuantizationResult]:
    """Quantize every fold of an ``nnUNetPredictor`` on the same calibration windows, in place.

    Each fold's weights are loaded into a copy of the predictor's network and quantized with
    :func:`~monai_effq.quantize`; the predictor then holds the quantized network and each fold's
    quantized state dict (copies, so that loading one fold does not change another), and its
    predictions average the quantized folds as they averaged the FP ones. A network compiled by
    ``nnUNet_compile`` is quantized (and then runs) as its original module.

    Args:
        predictor: an initialised ``nnUNetPredictor`` (``initialize_from_trained_model_folder``).
        calibration: preprocessed ``(N, C, *spatial)`` windows (:func:`nnunet_calibration_windows`) or
            anything :func:`~monai_effq.quantize` takes.
        config: the quantization settings (:class:`~monai_effq.EfficientQConfig` defaults when ``None``).
        progress: show a progress bar per fold.

    Returns:
        one :class:`~monai_effq.QuantizationResult` per fold, in the predictor's fold order (save them
        with :func:`~monai_effq.save_quantized`; :func:`load_nnunet_predictor` gives them to a predictor
        again without calibrating).

    Raises:
        UserInputError: when the predictor is not initialised or already quantized, a fold's weights
            do not fit its network, or the folds' quantized networks differ in a grid (such as
            ``act_grid="auto"`` choosing another grid for one fold), which one network cannot hold.
    """
    _initialised(predictor)
    stage = _stage(predictor)
    if stage != "fp":
        raise UserInputError(
            f"this predictor is already {stage}: initialise it again from the model folder "
            "(initialize_from_trained_model_folder) to quantize its FP folds."
        )
    base = eager_network(predictor.network)
    results = []
    for i, weights in enumerate(predictor.list_of_parameters):
        network = copy.deepcopy(base)
        try:
            network.load_state_dict(weights)
        except RuntimeError as e:
            raise UserInputError(
                f"fold {i}'s weights do not fit the predictor's network ({str(e).splitlines()[0]}): initialise the "
                "predictor from the model folder these folds were trained in."
            ) from None
        logger.info("quantizing fold %d of %d", i + 1, len(predictor.list_of_parameters))
        results.append(quantize(network.eval(), calibration, config, progress=progress))
    _install(predictor, results)
    return results


def _results(results: Any) -> list[QuantizationResult]:
    """``results`` as a list of :class:`QuantizationResult`, or a :class:`UserInputError` naming what it is."""
    if not isinstance(results, Sequence) or not results or not all(isinstance(r, QuantizationResult) for r in results):
        raise UserInputError(
            f"results must be a list of QuantizationResult, one per fold (what quantize_nnunet_predictor returns, or "
            f"load_quantized_result of each saved fold), got {type(results).__name__}."
        )
    return list(results)


def _install(predictor: Any, results: list[QuantizationResult]) -> None:
    """Give the predictor a copy of the folds' quantized network and each fold's state dict, after checking that
    one network can hold them all."""
    first = _structure(results[0].network)
    for i, result in enumerate(results[1:], start=1):
        other = _structure(result.network)
        if other != first:
            where = next(k for k in [*first, *other] if first.get(k) != other.get(k))
            raise UserInputError(
                f"fold {i}'s quantized network differs from fold 0's at {where} (fold {i}: {other.get(where, 'nothing')}, "
                f"fold 0: {first.get(where, 'nothing')}), so one network cannot run both. Set what differs in the config, "
                "such as act_grid='asymmetric' or weight_grid, so that every fold gets the same."
            )
    # a network of its own: the predictor loads each fold into it, which must not change the results
    predictor.network = copy.deepcopy(results[0].network)
    predictor.list_of_parameters = [{k: v.detach().clone() for k, v in r.network.state_dict().items()} for r in results]


def load_nnunet_predictor(predictor: Any, results: Sequence[QuantizationResult]) -> None:
    """Give an initialised predictor its folds quantized earlier, without calibrating again.

    Args:
        predictor: an ``nnUNetPredictor`` initialised from the model folder the folds were quantized from.
        results: one :class:`~monai_effq.QuantizationResult` per fold, in the predictor's fold order
            (:func:`~monai_effq.load_quantized_result` of each file :func:`~monai_effq.save_quantized` wrote).

    Raises:
        UserInputError: when the predictor is not initialised or not FP, the count differs from its
            folds, or one network cannot hold all the results.
    """
    _initialised(predictor)
    results = _results(results)
    stage = _stage(predictor)
    if stage != "fp":
        raise UserInputError(f"this predictor is already {stage}: initialise it again from the model folder to load quantized folds.")
    if len(results) != len(predictor.list_of_parameters):
        raise UserInputError(
            f"results holds {len(results)} quantized fold(s) and the predictor {len(predictor.list_of_parameters)}: load one "
            "file per fold, in the order of use_folds."
        )
    _install(predictor, results)


def _holds(fold: dict[str, torch.Tensor], network: nn.Module) -> bool:
    """Whether a fold's state dict is ``network``'s state, tensor for tensor."""
    state = network.state_dict()
    return fold.keys() == state.keys() and all(
        fold[k].dtype == v.dtype and torch.equal(fold[k], v.to(fold[k].device)) for k, v in state.items()
    )


class FoldEnsemble(nn.Module):
    """The mean logits of several fold networks: one network with an empty state dict for nnU-Net's predictor.

    The predictor averages its folds' logits, one fold at a time; the windows' Gaussian weighting is
    linear, so averaging each window's logits gives the same prediction (to float rounding) while the
    predictor loads one (empty) fold.

    Args:
        folds: the fold networks (runtime networks, which hold no torch state).
    """

    def __init__(self, folds: Sequence[nn.Module]) -> None:
        super().__init__()
        self.folds = nn.ModuleList(folds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.folds[0](x)
        for fold in self.folds[1:]:
            total = total + fold(x)
        return total / len(self.folds)


# the export options deploy_nnunet_predictor writes its files with (export_onnx's defaults), which a file it reuses must
# have: both change what the file computes (the weight container only how its integers are stored)
_DEPLOY_EXPORT = {"group_norm": "onnx", "reduce_range": False}


def deploy_nnunet_predictor(
    predictor: Any,
    results: Sequence[QuantizationResult],
    folder: str | os.PathLike,
    runtime: str = "openvino",
    fold_names: Sequence[int | str] | None = None,
    **options: Any,
) -> list[Path]:
    """Export each quantized fold as an int8 ONNX file and make the predictor run the folds in ``runtime``.

    The files are exported at the configuration's patch size (the only window size the predictor's
    sliding window runs, as nnU-Net pads smaller images to it), with the batch axis dynamic. A file
    that this monai-effq version already exported from the same quantized fold at that size, with these
    export settings, is run as it is (:func:`~monai_effq.deploy.export_is_current`): deploying saved
    folds again, as every ``effq-nnunet predict`` does, costs no export. The predictor then holds a :class:`FoldEnsemble`
    of the runtime networks and one empty fold.

    Args:
        predictor: the predictor :func:`quantize_nnunet_predictor` quantized (or
            :func:`load_nnunet_predictor` loaded).
        results: its quantized folds, one per fold (what either of them was given or returned).
        folder: where the files go (created when missing).
        runtime: ``"openvino"`` or ``"onnxruntime"``.
        fold_names: the folds' names as nnU-Net gives them (``[0, 1]``, ``["all"]``), one per result,
            for the file names; ``None``: their positions.
        options: passed to the runtime network (e.g. ``threads``, ``precision`` for OpenVINO).

    Returns:
        the ONNX files, one per fold (``fold_<name>.onnx``).

    Raises:
        UserInputError: for an unknown runtime, a predictor not quantized or already deployed,
            results that are not the folds the predictor holds, or not one fold name per result.
        OutputWriteError: when ``folder`` is a file, or cannot be made or written.
    """
    _initialised(predictor)
    if runtime not in RUNTIMES:
        raise UserInputError(f"runtime must be one of {sorted(RUNTIMES)}, got {runtime!r}.")
    stage = _stage(predictor)
    if stage != "quantized":
        raise UserInputError(
            "this predictor is already deployed: initialise it again, then quantize it or load its saved quantized folds "
            "(load_nnunet_predictor), to deploy again." if stage == "deployed" else "this predictor runs FP folds: quantize "
            "it with quantize_nnunet_predictor, or load saved quantized folds with load_nnunet_predictor, first."
        )
    results = _results(results)
    if isinstance(fold_names, (str, bytes)):
        raise UserInputError(f"fold_names must be a list of fold names ([{fold_names!r}] for one fold), got the string {fold_names!r}.")
    names = [str(n) for n in (range(len(results)) if fold_names is None else list(fold_names))]
    if len(names) != len(results) or len(set(names)) != len(names):
        raise UserInputError(f"fold_names {names} must name each of the {len(results)} quantized folds once.")
    held = predictor.list_of_parameters
    if len(results) != len(held) or not all(_holds(fold, r.network) for r, fold in zip(results, held)):
        raise UserInputError(
            f"results ({len(results)} quantized folds) are not the {len(held)} folds this predictor holds: pass what "
            "quantize_nnunet_predictor returned for this predictor."
        )
    # the first layer's input channels, quantized or not (a skipped first layer stays a plain Conv)
    channels = next((m.in_channels for m in results[0].network.modules() if isinstance(getattr(m, "in_channels", None), int)), None)
    if channels is None:
        raise UserInputError("results hold no convolution: pass what quantize_nnunet_predictor returned.")
    example = torch.zeros(1, channels, *[int(s) for s in predictor.configuration_manager.patch_size])
    folder = check_writable(folder, folder=True)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, result in zip(names, results):
        path, fingerprint = folder / f"fold_{name}.onnx", result_fingerprint(result)
        if export_is_current(path, fingerprint, example.shape, fixed_window=True, options=_DEPLOY_EXPORT):
            logger.info("%s is the export of this fold: run as it is", path)
        else:
            export_onnx(result, path, example, dynamic_spatial=False, dynamic_batch=True, source_fingerprint=fingerprint, **_DEPLOY_EXPORT)
        paths.append(path)
    predictor.network = FoldEnsemble([RUNTIMES[runtime](path, **options) for path in paths])
    predictor.list_of_parameters = [{}]
    return paths
