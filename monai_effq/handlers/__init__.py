"""MONAI/ignite glue: handlers that run quantization, load quantized checkpoints, run them in a runtime, compare them
with the FP network, measure in millimetres, write masks as DICOM and write reports and checkpoints whole."""

from monai_effq.handlers.checkpoint import AtomicCheckpointSaver, AtomicDiskSaver
from monai_effq.handlers.deploy import RuntimeNetworkLoader, input_channels, trace_shape
from monai_effq.handlers.masks import DICOM_MASK_FORMATS, DicomMaskSaver, output_channels
from monai_effq.handlers.finetune import FinetuneHandler, engine_loss
from monai_effq.handlers.metrics import AtomicMetricsSaver, HausdorffDistanceMm, voxel_spacing
from monai_effq.handlers.quantization import QuantizationHandler, QuantizedCheckpointLoader, batch_images
from monai_effq.handlers.reference import REFERENCE_KEY, AgreementDice, ReferencePrediction
from monai_effq.handlers.report import (
    QuantizationReportHandler,
    format_table,
    plot_finetune_loss,
    plot_dice,
    plot_layer_errors,
    write_comparison,
)

__all__ = [
    "AtomicCheckpointSaver",
    "AtomicDiskSaver",
    "DICOM_MASK_FORMATS",
    "DicomMaskSaver",
    "output_channels",
    "FinetuneHandler",
    "engine_loss",
    "QuantizationHandler",
    "QuantizedCheckpointLoader",
    "RuntimeNetworkLoader",
    "input_channels",
    "trace_shape",
    "AtomicMetricsSaver",
    "HausdorffDistanceMm",
    "voxel_spacing",
    "batch_images",
    "AgreementDice",
    "ReferencePrediction",
    "REFERENCE_KEY",
    "QuantizationReportHandler",
    "format_table",
    "plot_finetune_loss",
    "plot_dice",
    "plot_layer_errors",
    "write_comparison",
]
