"""monai-effq: EfficientQ post-training quantization for MONAI segmentation networks."""

import os

__version__ = "0.1.0"

# MKL's strict conditional numerical reproducibility makes its matrix products the same bits on any
# number of threads (without it, on Intel CPUs, a 64 x 1728 x 1728 product differed between one and
# two threads and so did EfficientQ's codes; AMD CPUs were already invariant). MKL reads it at its
# first call, so it holds when this package is imported before any matrix product (set MKL_CBWR in
# the environment otherwise). Its cost on that CPU: the W-step's products none measurable, the Gram
# sums' long thin ones 10-20% (32 x 41000 x 32: 0.46 against 0.39 ms), a 32->32 layer's solve 6-12%.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

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
