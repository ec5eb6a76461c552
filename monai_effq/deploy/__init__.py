"""Integer deployment: ONNX QDQ export of a quantized network and the runtimes that run it from MONAI.

Needs the ``deploy`` extra (``pip install 'monai-effq[deploy]'``: onnx, onnxruntime, openvino);
TensorRT (:mod:`monai_effq.deploy.tensorrt`) needs a CUDA GPU with tensorrt and polygraphy.
"""

from monai_effq.deploy.export import QdqLayer, export_form, export_onnx, fold_weight_quantization
from monai_effq.deploy.norms import ChannelStatsGroupNorm, group_norm_form_for
from monai_effq.deploy.runtime import (
    RUNTIMES,
    OnnxRuntimeNetwork,
    OpenVINONetwork,
    cpu_has_vnni,
    export_options,
    runtime_network,
    widest_int8_weight,
)
from monai_effq.deploy.tensorrt import TensorRTNetwork, tensorrt_network, tensorrt_violations

__all__ = [
    "ChannelStatsGroupNorm",
    "QdqLayer",
    "export_form",
    "export_onnx",
    "fold_weight_quantization",
    "RUNTIMES",
    "OnnxRuntimeNetwork",
    "OpenVINONetwork",
    "cpu_has_vnni",
    "export_options",
    "group_norm_form_for",
    "runtime_network",
    "widest_int8_weight",
    "TensorRTNetwork",
    "tensorrt_network",
    "tensorrt_violations",
]
