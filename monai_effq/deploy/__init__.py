"""Integer deployment: ONNX QDQ export of a quantized network and the runtimes that run it from MONAI.

Needs the ``deploy`` extra (``pip install 'monai-effq[deploy]'``: onnx, onnxruntime, openvino).
"""

from monai_effq.deploy.export import QdqLayer, export_form, export_onnx, fold_weight_quantization
from monai_effq.deploy.norms import ChannelStatsGroupNorm
from monai_effq.deploy.runtime import (
    RUNTIME_GROUP_NORM,
    RUNTIMES,
    OnnxRuntimeNetwork,
    OpenVINONetwork,
    cpu_has_vnni,
    export_options,
    runtime_network,
    widest_int8_weight,
)

__all__ = [
    "ChannelStatsGroupNorm",
    "QdqLayer",
    "export_form",
    "export_onnx",
    "fold_weight_quantization",
    "RUNTIMES",
    "RUNTIME_GROUP_NORM",
    "OnnxRuntimeNetwork",
    "OpenVINONetwork",
    "cpu_has_vnni",
    "export_options",
    "runtime_network",
    "widest_int8_weight",
]
