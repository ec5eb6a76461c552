"""Network PTQ: configs, fake-quant modules, the layer-by-layer pipeline and checkpoints.

Knows PyTorch modules, not MONAI engines or bundles.
"""

from monai_effq.ptq.attention import ClassAttention
from monai_effq.ptq.checkpoint import (
    checkpoint_fingerprint,
    load_quantized,
    load_quantized_result,
    result_fingerprint,
    save_quantized,
    verify_checkpoint,
)
from monai_effq.ptq.config import EfficientQConfig, LayerPlan, match_pattern
from monai_effq.ptq.footprint import ActivationFootprint, WeightFootprint, activation_footprint, weight_footprint
from monai_effq.ptq.graph import execution_order, fold_batchnorm
from monai_effq.ptq.modules import (
    ActivationQuantizer,
    QuantizedConv,
    QuantizedConvTranspose,
    QuantizedLayer,
    QuantizedLinear,
)
from monai_effq.ptq.pipeline import quantize
from monai_effq.ptq.result import QuantizationResult, quantized_size_bytes, state_bytes
from monai_effq.ptq.report import LayerReport, QuantizationReport

__all__ = [
    "ClassAttention",
    "checkpoint_fingerprint",
    "load_quantized",
    "load_quantized_result",
    "result_fingerprint",
    "save_quantized",
    "verify_checkpoint",
    "EfficientQConfig",
    "LayerPlan",
    "match_pattern",
    "ActivationFootprint",
    "WeightFootprint",
    "activation_footprint",
    "weight_footprint",
    "execution_order",
    "fold_batchnorm",
    "ActivationQuantizer",
    "QuantizedConv",
    "QuantizedConvTranspose",
    "QuantizedLayer",
    "QuantizedLinear",
    "QuantizationResult",
    "quantize",
    "quantized_size_bytes",
    "state_bytes",
    "LayerReport",
    "QuantizationReport",
]
