"""Ignite handlers that run EfficientQ inside MONAI engines (shaped like MONAI's ``TrtHandler``).

The handlers hand off to library calls (:func:`monai_effq.quantize`, :func:`monai_effq.save_quantized`,
:func:`monai_effq.load_quantized`) and know nothing of the solver's internals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from monai.utils import IgniteInfo, min_version, optional_import

from monai_effq.data.calibration import calibration_windows, check_roi_size, window_size
from monai_effq.ptq.attention import check_task
from monai_effq.ptq.checkpoint import load_quantized, save_quantized
from monai_effq.ptq.config import EfficientQConfig
from monai_effq.ptq.graph import probe_network
from monai_effq.ptq.journal import journal_path, remove_journal
from monai_effq.ptq.pipeline import quantize
from monai_effq.ptq.prepare import available_device
from monai_effq.utils.distributed import all_gather_objects, get_rank, get_world_size, is_rank_zero
from monai_effq.utils.errors import MissingInputError, UserInputError, check_flag, check_integer, check_spread

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = [
    "QuantizationHandler",
    "QuantizedCheckpointLoader",
    "batch_images",
    "missing_image_key",
    "check_calibration_volume",
    "require_quantized_checkpoint",
]


def batch_images(batch: Any, key: str = "image") -> torch.Tensor:
    """The image tensor of an engine batch, collated (``dict``) or decollated (``list`` of dicts).

    Args:
        batch: ``engine.state.batch``.
        key: the image key.

    Returns:
        a plain ``(N, C, *spatial)`` tensor.

    Raises:
        KeyError: for an empty list.
        UserInputError: when the batch has no ``key`` (:func:`missing_image_key`).
    """
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise KeyError(f"empty batch: no {key!r} to collect.")
        if isinstance(batch[0], Mapping) and key not in batch[0]:
            raise missing_image_key(batch[0], key)
        items = [b[key] for b in batch]
        images = torch.stack([torch.as_tensor(i).as_subclass(torch.Tensor) for i in items])
    else:
        if isinstance(batch, Mapping) and key not in batch:
            raise missing_image_key(batch, key)
        images = batch[key]
    return torch.as_tensor(images).detach().as_subclass(torch.Tensor).float().cpu()


def missing_image_key(batch: Mapping[str, Any], key: str) -> UserInputError:
    """The error for a calibration batch without ``key``, naming its keys and the first that holds an image.

    Args:
        batch: the batch (a dict of the bundle's transformed keys).
        key: the image key looked for.

    Returns:
        the error, to raise.
    """
    images = [str(k) for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() >= 4]
    example = f", e.g. --image_key {images[0]}" if images else ""
    return UserInputError(
        f"the calibration batch has no {key!r} (it holds {sorted(map(str, batch))}): name the key the bundle's "
        f"transforms put the image under with --image_key{example}."
    )


def _source_name(batch: Any, key: str, index: int) -> str:
    """The file a batch's image came from (MONAI's ``filename_or_obj`` metadata), else its number."""
    item = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
    image = item.get(key) if isinstance(item, dict) else None
    source = getattr(image, "meta", {}).get("filename_or_obj") if image is not None else None
    if isinstance(source, (list, tuple)):
        source = source[0] if source else None
    return f"calibration volume {source}" if source else f"calibration volume {index}"


def check_calibration_volume(images: torch.Tensor, name: str) -> None:
    """A calibration volume must be finite and not constant (else the quantized network is useless or NaN).

    Args:
        images: the preprocessed ``(N, C, *spatial)`` batch.
        name: what to call it in the message (its file).

    Raises:
        UserInputError: naming the volume and what is wrong with it.
    """
    check_spread(
        images,
        f"{name} (after preprocessing)",
        "fix or replace the file, or calibrate on another case (--calibration_case, or --calibration_images)",
        "an empty or blank image calibrates nothing; check the file, or calibrate on another case (--calibration_case, "
        "or --calibration_images)",
    )


class QuantizationHandler:
    """Collects calibration batches while an evaluator runs, then quantizes its network.

    Attach it to an evaluator that iterates over the calibration loader (whose transforms do the
    cropping). When the run completes the handler calls :func:`monai_effq.quantize`, puts the
    quantized network into ``engine.network``, keeps the result in ``engine.state.quantization``
    and, if ``save_path`` is set, writes the quantized checkpoint. With ``save_path``, finished layers
    are journaled in ``<save_path>.journal/`` until the checkpoint is written (or, with
    ``keep_journal``, until the workflow removes it once its other outputs are written too), so the
    same command rerun after a kill continues after the last finished layer.

    Under ``torchrun`` (``torch.distributed`` initialised) each rank's evaluator iterates over its own
    share of the calibration cases; every rank quantizes (the statistics are summed across ranks)
    and gets the same network, and only rank 0 writes the checkpoint and keeps the journal (the other
    ranks resume from what rank 0 sends them).

    Args:
        config: an :class:`EfficientQConfig` or its dict form; defaults when ``None``.
        task: ``"multiclass"`` or ``"multilabel"`` (for the class attention).
        save_path: where to write the quantized checkpoint, or ``None``.
        max_batches: calibration batches to collect (the paper: one volume).
        image_key: the image key of the batches.
        roi_size: cut each collected volume into the windows a sliding-window inferer of this ROI
            visits (:func:`monai_effq.data.calibration_windows`), so whole volumes calibrate at
            bounded memory; one size for every axis or one per axis, ``-1`` spanning the axis, as
            ``SlidingWindowInferer`` takes it; ``None`` keeps the batches as they are (crops).
        body_mask: ``"nonzero"`` (voxels where any channel is non-zero: brain MRI) or ``None``
            (everything: CT).
        progress: show the per-layer progress bar.
        keep_journal: leave the journal after writing the checkpoint, for a workflow that writes more
            outputs (a report, an export) and removes it (:func:`~monai_effq.ptq.journal.remove_journal`)
            after the last: a kill before then leaves the run unfinished, and the rerun resumes it.

    Example::

        QuantizationHandler({"weight_bits": 4}, task="multilabel", save_path="models/model_w4a8.pt").attach(evaluator)
        evaluator.run()
    """

    def __init__(
        self,
        config: EfficientQConfig | dict | None = None,
        task: str = "multiclass",
        save_path: str | Path | None = None,
        max_batches: int = 1,
        image_key: str = "image",
        body_mask: str | None = None,
        progress: bool = True,
        roi_size: Sequence[int] | int | None = None,
        keep_journal: bool = False,
    ) -> None:
        if config is not None and not isinstance(config, (dict, EfficientQConfig)):
            raise UserInputError(
                f"config must be an EfficientQConfig or a dict of its settings, got {config!r}: e.g. "
                "{'weight_bits': 4, 'act_bits': 8}."
            )
        self.config = EfficientQConfig.from_dict(config) if isinstance(config, dict) else config or EfficientQConfig()
        available_device(self.config.device)  # before the evaluator loads any data
        if body_mask not in (None, "nonzero"):
            raise UserInputError(f"body_mask must be 'nonzero' or None, got {body_mask!r}.")
        self.task = check_task(task)  # before the evaluator loads any data
        self.save_path = save_path
        self.max_batches = check_integer(max_batches, "max_batches (calibration_cases)", low=1)
        self.image_key = image_key
        self.body_mask = body_mask
        self.progress = progress
        self.keep_journal = check_flag(keep_journal, "keep_journal")
        self.roi_size = None if roi_size is None else check_roi_size(roi_size)
        self.batches: list[torch.Tensor] = []
        # the network this handler swapped in: a later run of the engine evaluates it, not quantize it again
        self.quantized: nn.Module | None = None

    def attach(self, engine: Engine) -> None:
        """Register on ``engine`` (attaching twice is harmless).

        Args:
            engine: an ignite engine with a ``network`` attribute (a MONAI evaluator).
        """
        self.logger = engine.logger
        loader = getattr(engine, "data_loader", None)
        if loader is not None and hasattr(loader, "__len__") and len(loader) == 0:
            # MONAI's evaluator skips an empty loader with a log line: nothing would be quantized
            raise UserInputError(
                "the calibration data loader is empty, so nothing would be quantized: check the calibration "
                "cases (--calibration_case, --calibration_cases) and the dataset folder."
            )
        if not engine.has_event_handler(self.check, Events.GET_BATCH_COMPLETED):
            engine.add_event_handler(Events.GET_BATCH_COMPLETED, self.check)
        if not engine.has_event_handler(self.collect, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        if not engine.has_event_handler(self, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self)

    def check(self, engine: Engine) -> None:
        """Before the evaluator runs the network on a calibration batch: refuse a NaN or constant volume
        and, on the first batch, a window the network cannot run (e.g. smaller than its downsampling)."""
        if len(self.batches) >= self.max_batches or self._quantized(engine):
            return
        images = batch_images(engine.state.batch, self.image_key)
        check_calibration_volume(images, _source_name(engine.state.batch, self.image_key, len(self.batches)))
        if not self.batches:
            window = images[:1] if self.roi_size is None else self._windows(images[:1])[:1]
            network = engine.network
            device = next(iter(network.parameters()), torch.empty(0)).device
            training = network.training
            network.eval()  # a pass in training mode would move BatchNorm statistics
            try:
                probe_network(network, window.to(device))  # names the shape the network refuses
            finally:
                network.train(training)

    def _windows(self, images: torch.Tensor) -> torch.Tensor:
        """The windows of ``roi_size`` that a sliding-window inferer visits in a batch of volumes."""
        return calibration_windows(images, window_size(self.roi_size, images.shape[2:]))

    def collect(self, engine: Engine) -> None:
        """Keep this iteration's images (as windows with ``roi_size``) until ``max_batches`` are held."""
        if len(self.batches) < self.max_batches and not self._quantized(engine):
            images = batch_images(engine.state.batch, self.image_key)
            self.batches.append(images if self.roi_size is None else self._windows(images))
            if get_world_size() > 1:
                self.logger.info(
                    f"rank {get_rank()}: {_source_name(engine.state.batch, self.image_key, len(self.batches) - 1)}, "
                    f"{self.batches[-1].shape[0]} window(s)"
                )

    def _quantized(self, engine: Engine) -> bool:
        """Whether ``engine`` runs the network this handler quantized (a later run of it, e.g. by a ValidationHandler)."""
        return self.quantized is not None and engine.network is self.quantized

    def __call__(self, engine: Engine) -> None:
        """Quantize ``engine.network`` on the collected batches and swap the result in."""
        if self._quantized(engine):
            return
        if not self.batches:
            raise UserInputError("no calibration batch was collected: the calibration data loader is empty.")
        held = sum(all_gather_objects(len(self.batches)))  # under torchrun each rank holds its share
        if held < self.max_batches:
            self.logger.warning(
                f"max_batches (calibration_cases) is {self.max_batches}, but the evaluator's data gave {held} "
                f"calibration batch(es): quantizing on those {held}; give it more cases for what was asked."
            )
        mask = [(b != 0).any(dim=1) for b in self.batches] if self.body_mask == "nonzero" else None
        journal = None if self.save_path is None else journal_path(self.save_path)
        result = quantize(
            engine.network, self.batches, self.config, task=self.task, body_mask=mask, progress=self.progress, journal=journal
        )
        engine.network = self.quantized = result.network
        engine.state.quantization = result
        if self.save_path is not None and is_rank_zero():
            path = save_quantized(result, self.save_path)
            if not self.keep_journal:
                remove_journal(journal)
            self.logger.info(f"quantized checkpoint written to {path}")
        self.logger.info(result.report.summary())
        self.batches = []


def require_quantized_checkpoint(path: str | Path) -> None:
    """Refuse a quantized checkpoint that is not there, when a workflow is built rather than when it runs.

    Args:
        path: where the quantize workflow writes the checkpoint.

    Raises:
        MissingInputError: naming the file and the workflow that writes it.
    """
    if not Path(path).is_file():
        raise MissingInputError(
            f"quantized checkpoint {Path(path).resolve()} does not exist: run the quantize workflow first "
            "(with the same --weight_bits and --act_bits) or set --quantized_path."
        )


class QuantizedCheckpointLoader:
    """Replaces an engine's FP network by the quantized one stored in a checkpoint, when it starts.

    Args:
        load_path: a file written by :func:`monai_effq.save_quantized`.
        map_location: device for the quantized network, e.g. ``"cpu"``.
    """

    def __init__(self, load_path: str | Path, map_location: str | torch.device | None = None) -> None:
        require_quantized_checkpoint(load_path)
        self.load_path = load_path
        # a device this machine lacks is named now, not by torch's assertion when the engine starts
        self.map_location = None if map_location is None else available_device(map_location)
        self.loaded: nn.Module | None = None

    def attach(self, engine: Engine) -> None:
        """Register on ``engine`` (attaching twice is harmless)."""
        self.logger = engine.logger
        if not engine.has_event_handler(self, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        """Swap the network in (once: a later run of the engine keeps the network it loaded)."""
        if self.loaded is not None and engine.network is self.loaded:
            return  # STARTED fires on every run, and a ValidationHandler runs its evaluator every validation epoch
        net = load_quantized(self.load_path, engine.network)
        if self.map_location is not None:
            net = net.to(self.map_location)
        engine.network = self.loaded = net
        self.logger.info(f"quantized network loaded from {self.load_path}")
