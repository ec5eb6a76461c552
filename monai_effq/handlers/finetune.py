"""Ignite glue for quantization-aware fine-tuning: a MONAI ``SupervisedTrainer`` trains, this checks and freezes.

The trainer trains :attr:`monai_effq.qat.TrainableNetwork.network` with the bundle's own loss and
training transforms; :class:`FinetuneHandler` scores the start on held-out windows when the run
starts (:class:`~monai_effq.qat.FinetuneCheck`), records the loss and learning rate of every
iteration and, when the run completes, scores the end, keeps the better of the two (warning with
the cause candidates when training made the network worse), freezes the network back to codes
(:meth:`~monai_effq.qat.TrainableNetwork.freeze`), puts the :class:`~monai_effq.ptq.QuantizationResult`
in ``engine.state.quantization`` (where :class:`~monai_effq.handlers.QuantizationReportHandler`
finds it) and writes the checkpoint.

Under ``torchrun`` the trainer's network is a ``DistributedDataParallel`` around
``TrainableNetwork.network``: the handler then scores the held-out check on every rank's windows
together (one decision on every rank), records the loss averaged over the ranks, and only rank 0
writes the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from monai.utils import IgniteInfo, min_version, optional_import

from monai_effq.ptq.checkpoint import save_quantized
from monai_effq.qat.check import DEFAULT_CHECK_BATCHES, FinetuneCheck, Inferer, check_batch_count, draw_windows
from monai_effq.qat.finetune import TrainableNetwork, check_loss, resolve_task
from monai_effq.utils.distributed import get_rank, get_world_size

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["FinetuneHandler", "engine_loss"]


def engine_loss(output: Any) -> float:
    """The loss of a trainer iteration's output (a dict, or decollated dicts with the same loss).

    Args:
        output: ``engine.state.output`` of a MONAI trainer.

    Returns:
        the loss as a float.

    Raises:
        KeyError: when the output carries no ``"loss"``.
    """
    item = output[0] if isinstance(output, (list, tuple)) else output
    loss = item["loss"]
    return float(loss.detach()) if hasattr(loss, "detach") else float(loss)


def _trained_module(network: torch.nn.Module) -> torch.nn.Module:
    """The network a trainer trains: the module inside a ``DistributedDataParallel``, else ``network``.

    Args:
        network: the trainer's network.

    Returns:
        the module whose parameters train.
    """
    return network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network


def _ranks(engine: Engine) -> tuple[int, int]:
    """``(rank, world size)`` of a trainer whose network is a ``DistributedDataParallel``, else ``(0, 1)``."""
    if isinstance(engine.network, torch.nn.parallel.DistributedDataParallel):
        return get_rank(), get_world_size()
    return 0, 1


class FinetuneHandler:
    """Checks a :class:`TrainableNetwork` on held-out windows and freezes it when the trainer completes.

    The start is scored when the run starts and the end when it completes, with the trainer's loss
    function; the better is frozen (a worse end is dropped with a warning naming the cause
    candidates; an FP start is also compared with its FP network). The figures are in the report
    under ``extra["finetune"]["check"]``.

    Args:
        trainable: what :func:`monai_effq.qat.prepare_finetune` returned (the trainer's network
            must be ``trainable.network``, or a ``DistributedDataParallel`` around it).
        save_path: where to write the quantized checkpoint, or ``None`` (across ranks rank 0 writes it).
        settings: fine-tuning settings to keep in the report (e.g. ``{"lr": 1e-4}``).
        validation_data: held-out labelled batches (e.g. the bundle's validation loader); ``None``
            draws the first ``check_batches`` batches of the trainer's data loader once, before
            training (crops a random-crop loader draws afresh).
        check_batches: batches of the held-out data to score; ``0`` turns the check off.
        task: ``"multiclass"`` or ``"multilabel"``, for the held-out Dice; ``None`` takes the PTQ
            start's own task (``"multiclass"`` when the start is an FP network). A task that
            contradicts the PTQ start's is an error.
        inferer: ``inferer(image, network)`` for held-out data larger than the network's window
            (e.g. a ``SlidingWindowInferer``); the plain forward pass when ``None``.

    Example::

        trainable = prepare_finetune(ptq_result)
        trainer = SupervisedTrainer(..., network=trainable.network, optimizer=Adam(trainable.parameters()))
        FinetuneHandler(trainable, save_path="models/model_w4a6.pt").attach(trainer)
        trainer.run()
    """

    def __init__(
        self,
        trainable: TrainableNetwork,
        save_path: str | Path | None = None,
        settings: dict | None = None,
        validation_data: Iterable[Any] | None = None,
        check_batches: int = DEFAULT_CHECK_BATCHES,
        task: str | None = None,
        inferer: Inferer | None = None,
    ) -> None:
        if not isinstance(trainable, TrainableNetwork):
            raise TypeError(
                f"FinetuneHandler needs the TrainableNetwork from monai_effq.qat.prepare_finetune, got {type(trainable).__name__}."
            )
        check_batch_count(check_batches)
        trainable.task = resolve_task(trainable.task, task)
        self.trainable = trainable
        self.save_path = save_path
        self.settings = dict(settings or {})
        self.validation_data = validation_data
        self.check_batches = check_batches
        self.inferer = inferer
        self.check: FinetuneCheck | None = None

    def attach(self, engine: Engine) -> None:
        """Register on ``engine`` (attaching twice is harmless).

        Args:
            engine: a MONAI trainer whose network is ``trainable.network``.
        """
        self.logger = engine.logger
        for event, handler in (
            (Events.STARTED, self.start),
            (Events.ITERATION_STARTED, self.record_learning_rate),
            (Events.ITERATION_COMPLETED, self.record),
            (Events.COMPLETED, self),
        ):
            if not engine.has_event_handler(handler, event):
                engine.add_event_handler(event, handler)

    def start(self, engine: Engine) -> None:
        """Score the start on the held-out windows (drawn from the trainer's loader unless given)."""
        self._check_network(engine)
        if not self.check_batches or self.check is not None:
            return
        if self.validation_data is None:
            windows = draw_windows(engine.data_loader, self.check_batches, role="training")
        else:
            windows = draw_windows(self.validation_data, self.check_batches)
        across_ranks = _ranks(engine)[1] > 1
        self.check = FinetuneCheck(
            self.trainable, windows, engine.loss_function, self.trainable.task, self.inferer, self.trainable.reference, across_ranks
        )
        self.check.start()

    def _check_network(self, engine: Engine) -> None:
        if _trained_module(engine.network) is not self.trainable.network:
            raise RuntimeError(
                "the trainer's network is not the TrainableNetwork's: pass trainable.network (or a DistributedDataParallel "
                "around it) to the trainer."
            )

    def record_learning_rate(self, engine: Engine) -> None:
        """Keep the learning rate this iteration trains with (the held-out check's step analysis)."""
        self.trainable.learning_rates.append(float(engine.optimizer.param_groups[0]["lr"]))

    def record(self, engine: Engine) -> None:
        """Keep this iteration's loss for the report (across ranks: the mean of the ranks' losses)."""
        loss = engine_loss(engine.state.output)
        world = _ranks(engine)[1]
        if world > 1:
            total = torch.tensor([loss], dtype=torch.float64, device=next(self.trainable.network.parameters()).device)
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            loss = float(total) / world
        # every rank has the mean, so a NaN stops them all: frozen, a NaN network would be written as the result
        check_loss(loss, engine.state.iteration - 1)
        self.trainable.losses.append(loss)

    def __call__(self, engine: Engine) -> None:
        """Keep the better of start and end, freeze, hand the result to the engine and write the checkpoint."""
        self._check_network(engine)
        settings = dict(self.settings)
        if self.check is not None:
            settings["check"] = self.check.finish(self.trainable.learning_rates, self.trainable.losses)
            self.check = None
        result = self.trainable.freeze(settings)
        engine.state.quantization = result
        rank, world = _ranks(engine)
        if self.save_path is not None and rank == 0:
            path = save_quantized(result, self.save_path)
            self.logger.info(f"fine-tuned quantized checkpoint written to {path}" + (f" by rank 0 of {world}" if world > 1 else ""))
        elif self.save_path is not None:
            self.logger.info(f"rank {rank} of {world} finished the fine-tune; rank 0 writes {self.save_path}")
        self.logger.info(result.report.summary())
