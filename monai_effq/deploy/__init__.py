"""Deployment: ONNX QDQ export and the runtimes that run it from MONAI; TorchScript export for servers.

ONNX and its runtimes need the ``deploy`` extra (``pip install 'monai-effq[deploy]'``: onnx, onnxruntime,
openvino); TorchScript needs torch alone;
TensorRT (:mod:`monai_effq.deploy.tensorrt`) needs a CUDA GPU with tensorrt and polygraphy.
"""

from monai_effq.deploy.export import QdqLayer, export_form, export_onnx, fold_weight_quantization
from monai_effq.deploy.norms import ChannelStatsGroupNorm, ChannelStatsGroupNormOp, group_norm_form_for
from monai_effq.deploy.runtime import (
    RUNTIMES,
    OnnxRuntimeNetwork,
    OpenVINONetwork,
    cpu_has_vnni,
    export_is_current,
    export_options,
    exported_from,
    float_precision_for,
    int8_kernels_have_vnni,
    runtime_network,
    widest_int8_weight,
)
from monai_effq.deploy.tensorrt import TensorRTNetwork, tensorrt_network, tensorrt_violations
from monai_effq.deploy.torchscript import export_torchscript

__all__ = [
    "ChannelStatsGroupNorm",
    "ChannelStatsGroupNormOp",
    "QdqLayer",
    "export_form",
    "export_onnx",
    "export_torchscript",
    "fold_weight_quantization",
    "RUNTIMES",
    "OnnxRuntimeNetwork",
    "OpenVINONetwork",
    "cpu_has_vnni",
    "export_is_current",
    "export_options",
    "exported_from",
    "float_precision_for",
    "group_norm_form_for",
    "int8_kernels_have_vnni",
    "runtime_network",
    "widest_int8_weight",
    "TensorRTNetwork",
    "tensorrt_network",
    "tensorrt_violations",
]
