"""monai-effq: EfficientQ post-training quantization for MONAI segmentation networks."""

__version__ = "0.1.0"

from monai_effq.ptq import (  # noqa: E402 - the version is read by checkpoint provenance
    EfficientQConfig,
    QuantizationReport,
    QuantizationResult,
    checkpoint_fingerprint,
    load_quantized,
    load_quantized_result,
    quantize,
    save_quantized,
    verify_checkpoint,
)
from monai_effq.deploy.export import export_onnx  # noqa: E402
from monai_effq.qat import finetune  # noqa: E402
from monai_effq.quant import FixedPointFormat  # noqa: E402
from monai_effq.solver import AdmmSettings, LayerSolution, solve_layer  # noqa: E402

__all__ = [
    "__version__",
    "AdmmSettings",
    "EfficientQConfig",
    "FixedPointFormat",
    "LayerSolution",
    "export_onnx",
    "QuantizationReport",
    "QuantizationResult",
    "checkpoint_fingerprint",
    "finetune",
    "load_quantized",
    "load_quantized_result",
    "quantize",
    "save_quantized",
    "solve_layer",
    "verify_checkpoint",
]
