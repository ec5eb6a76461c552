"""Quantization inside other frameworks' own inference: nnU-Net v2's predictor."""

from monai_effq.apps.nnunet import (
    FoldEnsemble,
    deploy_nnunet_predictor,
    load_nnunet_predictor,
    nnunet_calibration_windows,
    quantize_nnunet_predictor,
)

__all__ = [
    "FoldEnsemble",
    "deploy_nnunet_predictor",
    "load_nnunet_predictor",
    "nnunet_calibration_windows",
    "quantize_nnunet_predictor",
]
