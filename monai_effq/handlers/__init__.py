"""MONAI/ignite glue: handlers that run quantization, load quantized checkpoints and write reports."""

from monai_effq.handlers.quantization import QuantizationHandler, QuantizedCheckpointLoader, batch_images
from monai_effq.handlers.report import (
    QuantizationReportHandler,
    format_table,
    plot_dice,
    plot_layer_errors,
    write_comparison,
)

__all__ = [
    "QuantizationHandler",
    "QuantizedCheckpointLoader",
    "batch_images",
    "QuantizationReportHandler",
    "format_table",
    "plot_dice",
    "plot_layer_errors",
    "write_comparison",
]
