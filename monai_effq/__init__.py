"""monai-effq: EfficientQ post-training quantization for MONAI segmentation networks."""

from monai_effq.solver import AdmmSettings, LayerSolution, solve_layer

__version__ = "0.1.0"

__all__ = ["__version__", "AdmmSettings", "LayerSolution", "solve_layer"]
