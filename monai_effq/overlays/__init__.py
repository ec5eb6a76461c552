"""Config overlays that quantize, and then run, any MONAI bundle laid out like the model zoo's.

A model-zoo bundle (``configs/inference.json`` defining ``bundle_root``, ``device``,
``network_def``, ``network``, ``preprocessing``, ``postprocessing``, ``dataset`` and a sliding-window
``inferer``; FP weights in ``models/model.pt``) is quantized and served without editing it: each overlay here is
one more file on the ``--config_file`` list of ``python -m monai.bundle run``. They reuse the
bundle's own network definition, transforms and inferer, so calibration sees exactly what inference
does. ``python -m monai_effq.overlays <name>`` prints an overlay's path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from monai.handlers import MeanDice
from monai.utils import IgniteInfo, min_version, optional_import

from monai_effq.data.images import dicom_series_files
from monai_effq.handlers.quantization import missing_image_key
from monai_effq.handlers.reference import AgreementDice
from monai_effq.ptq.attention import TASKS
from monai_effq.utils.errors import MissingInputError, UserInputError, check_integer

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

logger = logging.getLogger(__name__)

__all__ = [
    "OVERLAYS",
    "PrepareImageBatch",
    "agreement_metric",
    "attach_metric_first",
    "calibration_items",
    "check_attached",
    "output_task",
    "overlay_path",
]

OVERLAYS = {
    "quantize": "quantize a bundle's FP network on its calibration images (overlays inference.json)",
    "inference": "run the bundle's inference with the quantized network (overlays inference.json)",
    "evaluate": "run the bundle's evaluation with the quantized network (overlays train.json + evaluate.json)",
    "openvino": "run the bundle's inference with the quantized network in OpenVINO, or --runtime onnxruntime (overlays inference.json)",
}


def overlay_path(name: str) -> Path:
    """The path of one of the overlays monai-effq ships.

    Args:
        name: one of :data:`OVERLAYS` (``"quantize"``, ``"inference"``, ``"evaluate"``, ``"openvino"``).

    Returns:
        the JSON file's absolute path.

    Raises:
        UserInputError: for an unknown name.
    """
    if name not in OVERLAYS:
        raise UserInputError(f"there is no overlay {name!r}: choose one of {', '.join(OVERLAYS)}.")
    return Path(__file__).resolve().parent / f"{name}.json"


def _sigmoid_on(transform: Any, key: str) -> bool | None:
    """Whether a post-processing step applies a sigmoid to ``key``: ``None`` when it is no ``Activations``
    step. A dictionary step (``Activationsd``) counts only for ``key``; an array step for its input."""
    if not (hasattr(transform, "sigmoid") and hasattr(transform, "softmax")):
        return None
    sigmoid = transform.sigmoid
    keys = getattr(transform, "keys", None)
    if keys is None:  # Activations: on whatever it is given
        return bool(sigmoid)
    per_key = dict(zip(keys, sigmoid if isinstance(sigmoid, Sequence) else [sigmoid] * len(keys)))
    return bool(per_key.get(key, False))


def _steps(transform: Any) -> list[Any]:
    """A transform's steps, looking into ``Compose`` and its kin and into plain lists."""
    if isinstance(transform, (list, tuple)):
        return [s for t in transform for s in _steps(t)]
    inner = getattr(transform, "transforms", None)
    return [s for t in inner for s in _steps(t)] if isinstance(inner, (list, tuple)) else [transform]


def output_task(task: str, postprocessing: Any, key: str = "pred") -> str:
    """The class-attention task for a bundle: ``task``, or with ``"auto"`` the one its post-processing implies.

    A bundle whose post-processing applies a sigmoid to its prediction (``Activationsd(keys="pred",
    sigmoid=True)``, as ``brats_mri_segmentation``'s does) predicts overlapping labels, one channel
    each: ``"multilabel"``. Otherwise (a softmax or an arg-max) it is ``"multiclass"``. A sigmoid
    written another way (a ``Lambdad``) is not seen: pass ``--task multilabel`` then.

    Args:
        task: ``"auto"``, ``"multiclass"`` or ``"multilabel"`` (the overlay's ``--task``; an explicit one is kept).
        postprocessing: the bundle's ``postprocessing`` transform (or a list of steps), or ``None``.
        key: the prediction's key in the engine's output.

    Returns:
        ``"multiclass"`` or ``"multilabel"``.

    Raises:
        UserInputError: for another ``task``.
    """
    if task != "auto":
        if task not in TASKS:
            raise UserInputError(f"task must be 'auto', 'multiclass' or 'multilabel', got {task!r}.")
        return task
    sigmoid = any(_sigmoid_on(step, key) for step in _steps(postprocessing))
    chosen = "multilabel" if sigmoid else "multiclass"
    logger.info(
        "task %s: the bundle's postprocessing %s (--task multiclass or multilabel sets it)",
        chosen, f"applies a sigmoid to {key!r}" if sigmoid else f"applies no sigmoid to {key!r}",
    )
    return chosen


def _files(image: Any) -> list[str]:
    """The file names of one case's image entry (a path, or the paths of its channels)."""
    return [image] if isinstance(image, str) else [f for f in image if isinstance(f, str)]


def calibration_items(images: Any, cases: int, image_key: str = "image") -> list[dict[str, Any]]:
    """The calibration cases, as the bundle's ``preprocessing`` reads them.

    Args:
        images: ``--calibration_images``: one case, or a list of cases; a case is an image path, a
            list of paths (the channels of one multi-modal case, e.g. BraTS' four MRI sequences) or a
            datalist dict; a path may be a folder holding one DICOM series. By default the bundle's own ``dataset#data``.
        cases: ``--calibration_cases``, how many of them calibrate (the paper: one).
        image_key: the key the bundle's transforms read the image from.

    Returns:
        the first ``cases`` entries as datalist dicts (``{image_key: path_or_paths, ...}``).

    Raises:
        UserInputError: when there is no calibration image or fewer than ``cases``, or an entry is
            malformed.
        MissingInputError: naming an image file that does not exist.
        DatasetError: naming a folder that does not hold exactly one DICOM series.
    """
    cases = check_integer(cases, "calibration_cases", low=1)
    if isinstance(images, (str, Path, Mapping)):  # one case given on its own
        images = [images]
    if not isinstance(images, Sequence) or not images:
        raise UserInputError(
            "there is no calibration image: the bundle's dataset (dataset#data) is empty or missing. Pass one with "
            "--calibration_images \"['/path/to/image.nii.gz']\" or point --dataset_dir at the bundle's data."
        )
    if len(images) < cases:
        raise UserInputError(
            f"calibration_cases is {cases} but only {len(images)} calibration image(s) were given: pass more with "
            "--calibration_images or lower --calibration_cases."
        )
    items = []
    for entry in list(images)[:cases]:
        if isinstance(entry, Mapping):
            item = dict(entry)
        elif isinstance(entry, (str, Path)) or (isinstance(entry, Sequence) and all(isinstance(f, (str, Path)) for f in entry)):
            item = {image_key: str(entry) if isinstance(entry, (str, Path)) else [str(f) for f in entry]}
        else:
            raise UserInputError(
                f"calibration image {entry!r} is neither a path, a list of paths nor a datalist dict: pass "
                "--calibration_images \"['/path/to/image.nii.gz']\"."
            )
        # a case without the key may be one the bundle's transforms build the image of (renalStructures_CECT_
        # segmentation concatenates its artery, vein and excretory phases into "image"): the batch is checked then
        for file in _files(item.get(image_key, [])):
            if not Path(file).exists():
                raise MissingInputError(
                    f"calibration image {Path(file).resolve()} does not exist: correct --calibration_images "
                    "(or the bundle's --dataset_dir)."
                )
            if Path(file).is_dir():  # read as a DICOM series by the bundle's loader, which would take only its first
                dicom_series_files(file)
        items.append(item)
    return items


class PrepareImageBatch(PrepareBatch):
    """The calibration evaluator's ``prepare_batch``: the image under the bundle's own key, and no label.

    MONAI's default reads ``"image"``; a bundle whose transforms key the image otherwise (``"img"``,
    as many MONAI tutorials do) is calibrated with ``--image_key img``.

    Args:
        image_key: the key the bundle's transforms read the image from.
    """

    def __init__(self, image_key: str = "image") -> None:
        self.image_key = image_key

    def __call__(
        self, batchdata: dict[str, torch.Tensor], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, None]:
        """The batch's image on ``device`` (``kwargs`` go to ``Tensor.to``), and ``None`` for the label.

        Raises:
            UserInputError: when the batch holds no image under the key, naming the keys it holds.
        """
        if not isinstance(batchdata, Mapping) or self.image_key not in batchdata:
            if not isinstance(batchdata, Mapping):
                raise UserInputError(
                    f"the calibration batch is a {type(batchdata).__name__}, not a dict of the bundle's transformed keys: "
                    "calibrate through the bundle's preprocessing, which gives dicts as the model zoo's do."
                )
            raise missing_image_key(batchdata, self.image_key)
        return batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs), None


def attach_metric_first(metric: Any, engine: Any, name: str) -> None:
    """Attach an ignite metric to a built engine so that its value is ready for the engine's own epoch handlers.

    An overlay attaches its metric once the bundle's evaluator exists, after the bundle's
    ``StatsHandler`` and ``MetricsSaver``; attached in the usual way, it would be computed after they
    had logged and saved the epoch's metrics (a ``MetricsSaver`` that lists its metrics by name
    leaves it out anyway). Attaching twice attaches once. Its epoch-completed step
    is moved ahead of them instead (ignite has no public way to insert a handler before others).

    Args:
        metric: an ignite ``Metric`` (e.g. :func:`agreement_metric`'s ``MeanDice``).
        engine: the bundle's evaluator.
        name: the key of the metric in ``engine.state.metrics``.
    """
    if not engine.has_event_handler(metric.completed, Events.EPOCH_COMPLETED):
        metric.attach(engine, name)
    handlers = getattr(engine, "_event_handlers", {}).get(Events.EPOCH_COMPLETED, [])
    ours = [h for h in handlers if getattr(h[0], "__self__", None) is metric]
    if not ours:  # another ignite, which keeps its handlers otherwise
        logger.warning("%s is computed after the bundle's own epoch handlers: it will not be in their epoch log", name)
        return
    handlers[:] = ours + [h for h in handlers if not any(h is o for o in ours)]


def check_attached(engine: Any, handler: Any, where: str) -> None:
    """Stop before the run when the overlay's handler is not on the bundle's evaluator.

    MONAI's ``+`` merge creates ``where`` when the bundle has no such key, and an evaluator whose
    ``val_handlers`` do not read ``@<where>`` never sees it: the run would then write the FP
    network's results under the quantized model's name.

    Args:
        engine: the bundle's evaluator (``evaluator`` or ``validate#evaluator``).
        handler: the overlay's ``QuantizedCheckpointLoader`` or ``RuntimeNetworkLoader``.
        where: the config key the overlay appended ``handler`` to.

    Raises:
        UserInputError: naming the key the evaluator's handlers should read.
    """
    if not engine.has_event_handler(handler, Events.STARTED):
        raise UserInputError(
            f"the bundle's evaluator does not run the handlers listed in {where}, so the quantized network would never "
            f"replace the FP one: make the evaluator's val_handlers \"@{where}\", as the model zoo's bundles do."
        )


def agreement_metric(key_metric: Mapping[str, Any] | None = None) -> AgreementDice:
    """The Dice of the evaluated network's labels against the FP network's (``reference_pred``), counting the
    background channel as the bundle's own Dice does.

    A zoo bundle's one-hot softmax output has a background channel that its ``MeanDice`` leaves out
    (``include_background: false``); a sigmoid multi-label one (BraTS' TC/WT/ET) has none and keeps every
    channel. Agreement measured with the other choice would be dominated by background voxels, or
    would drop a class.

    Args:
        key_metric: the bundle's ``validate#key_metric`` (its name and metric); the background setting
            of its ``MeanDice``, if it is one, is kept; otherwise every channel counts.

    Returns:
        an :class:`~monai_effq.handlers.AgreementDice` over ``pred`` and ``reference_pred``, to attach to the
        evaluator as ``fp_agreement``.
    """
    include_background = True
    for metric in (key_metric or {}).values():
        if isinstance(metric, MeanDice):
            include_background = bool(metric.metric_fn.include_background)
    return AgreementDice(include_background=include_background)
