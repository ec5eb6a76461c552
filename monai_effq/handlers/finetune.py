"""Ignite glue for quantization-aware fine-tuning: a MONAI ``SupervisedTrainer`` trains, this freezes.

The trainer trains :attr:`monai_effq.qat.TrainableNetwork.network` with the bundle's own loss and
training transforms; :class:`FinetuneHandler` records the loss of every iteration and, when the
run completes, freezes the network back to codes (:meth:`~monai_effq.qat.TrainableNetwork.freeze`),
puts the :class:`~monai_effq.ptq.QuantizationResult` in ``engine.state.quantization`` (where
:class:`~monai_effq.handlers.QuantizationReportHandler` finds it) and writes the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai.utils import IgniteInfo, min_version, optional_import

from monai_effq.ptq.checkpoint import save_quantized
from monai_effq.qat.finetune import TrainableNetwork

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


class FinetuneHandler:
    """Freezes a :class:`TrainableNetwork` into a quantized result when the trainer completes.

    Args:
        trainable: what :func:`monai_effq.qat.prepare_finetune` returned (the trainer's network
            must be ``trainable.network``).
        save_path: where to write the quantized checkpoint, or ``None``.
        settings: fine-tuning settings to keep in the report (e.g. ``{"lr": 1e-4}``).

    Example::

        trainable = prepare_finetune(ptq_result)
        trainer = SupervisedTrainer(..., network=trainable.network, optimizer=Adam(trainable.parameters()))
        FinetuneHandler(trainable, save_path="models/model_w4a6.pt").attach(trainer)
        trainer.run()
    """

    def __init__(self, trainable: TrainableNetwork, save_path: str | Path | None = None, settings: dict | None = None) -> None:
        if not isinstance(trainable, TrainableNetwork):
            raise TypeError(
                f"FinetuneHandler needs the TrainableNetwork from monai_effq.qat.prepare_finetune, got {type(trainable).__name__}."
            )
        self.trainable = trainable
        self.save_path = save_path
        self.settings = dict(settings or {})

    def attach(self, engine: Engine) -> None:
        """Register on ``engine`` (attaching twice is harmless).

        Args:
            engine: a MONAI trainer whose network is ``trainable.network``.
        """
        self.logger = engine.logger
        if not engine.has_event_handler(self.record, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        if not engine.has_event_handler(self, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self)

    def record(self, engine: Engine) -> None:
        """Keep this iteration's loss for the report."""
        self.trainable.losses.append(engine_loss(engine.state.output))

    def __call__(self, engine: Engine) -> None:
        """Freeze, hand the result to the engine and write the checkpoint."""
        if engine.network is not self.trainable.network:
            raise RuntimeError("the trainer's network is not the TrainableNetwork's: pass trainable.network to the trainer.")
        result = self.trainable.freeze(self.settings)
        engine.state.quantization = result
        if self.save_path is not None:
            path = save_quantized(result, self.save_path)
            self.logger.info(f"fine-tuned quantized checkpoint written to {path}")
        self.logger.info(result.report.summary())
