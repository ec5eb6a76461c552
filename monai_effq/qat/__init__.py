"""Quantization-aware fine-tuning (the U-Net fixed-point method's training) on top of the PTQ modules.

Knows PyTorch modules and the PTQ result; MONAI engines use it through :mod:`monai_effq.handlers`.
"""

from monai_effq.qat.check import DEFAULT_CHECK_BATCHES, FinetuneCheck, HeldOutScore, end_is_better, score_windows
from monai_effq.qat.finetune import (
    DEFAULT_CALIBRATION_BATCHES,
    DEFAULT_LR,
    DEFAULT_STEPS,
    TrainableNetwork,
    calibration_batch,
    default_loss,
    finetune,
    prepare_finetune,
    resolve_task,
    split_batch,
    train_steps,
)
from monai_effq.qat.modules import FrozenBatchNorm, TrainableQuantizedLayer, straight_through

__all__ = [
    "DEFAULT_CHECK_BATCHES",
    "FinetuneCheck",
    "HeldOutScore",
    "end_is_better",
    "score_windows",
    "resolve_task",
    "DEFAULT_CALIBRATION_BATCHES",
    "DEFAULT_LR",
    "DEFAULT_STEPS",
    "TrainableNetwork",
    "calibration_batch",
    "default_loss",
    "finetune",
    "prepare_finetune",
    "split_batch",
    "train_steps",
    "FrozenBatchNorm",
    "TrainableQuantizedLayer",
    "straight_through",
]
