"""A quantized network built into a TensorRT int8 engine through MONAI's ``trt_compile``.

TensorRT's explicit quantization reads the same Q/DQ graph the ONNX export writes, with two rules
of its own: every ``QuantizeLinear``/``DequantizeLinear`` is int8 and its zero point is 0. Weights
already are (their offsets are stored as int8 with zero point 0). Activations are uint8 with a
calibrated zero point unless the network was quantized with ``EfficientQConfig(act_grid="symmetric")``,
which puts every input on the symmetric signed grid; :func:`tensorrt_violations` names what breaks
the rules and :func:`tensorrt_network` refuses such a network instead of letting TensorRT fail or
silently run it in floating point.

Needs a CUDA GPU and the ``tensorrt`` and ``polygraphy`` packages, which MONAI's ``trt_compile``
uses; without them MONAI returns the torch module unchanged, so :func:`tensorrt_network` raises
instead. The engine is built for the shape of the first input it sees (a sliding window's roi) and
cached beside ``base_path`` (``<base_path>.plan``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from monai.utils import convert_to_dst_type, optional_import

from monai_effq.deploy.export import QdqLayer, QdqNorm, _network_of, export_form, require
from monai_effq.deploy.onnx_graph import constant_values
from monai_effq.ptq.modules import QuantizedLayer
from monai_effq.ptq.result import QuantizationResult
from monai_effq.utils.imports import deferred_import

onnx, _has_onnx = deferred_import("onnx")
trt_compile, _has_trt_compile = optional_import("monai.networks", name="trt_compile")
_, _has_tensorrt = optional_import("tensorrt")
_, _has_polygraphy = optional_import("polygraphy")

__all__ = ["TensorRTNetwork", "tensorrt_network", "tensorrt_violations"]

_QDQ = ("QuantizeLinear", "DequantizeLinear")


def tensorrt_violations(model: Any) -> list[str]:
    """What in an exported ONNX graph TensorRT's explicit int8 quantization does not accept.

    Args:
        model: an ONNX ``ModelProto`` or the path of an ``.onnx`` file.

    Returns:
        one line per offending Q/DQ node (empty when TensorRT can build it).
    """
    require(_has_onnx, "onnx", "tensorrt_violations")
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    values = constant_values(model.graph)
    problems = []
    for node in model.graph.node:
        if node.op_type not in _QDQ:
            continue
        if len(node.input) < 3 or not node.input[2]:
            if node.op_type == "QuantizeLinear":
                problems.append(f"{node.op_type} {node.name}: no zero point, so UINT8 (TensorRT quantizes to INT8 only)")
                continue
            if node.input[0] not in values:
                continue  # dequantizes a computed tensor: the QuantizeLinear that made it is checked
            integer = values[node.input[0]]  # a DequantizeLinear of a stored tensor has that tensor's type
        elif node.input[2] not in values:
            problems.append(f"{node.op_type} {node.name}: a computed zero point (TensorRT needs a constant 0)")
            continue
        else:
            integer = values[node.input[2]]
        if integer.dtype != np.int8:
            kind = onnx.TensorProto.DataType.Name(onnx.helper.np_dtype_to_tensor_dtype(integer.dtype))
            problems.append(f"{node.op_type} {node.name}: {kind} (TensorRT quantizes to INT8 only)")
        elif len(node.input) > 2 and node.input[2] and integer.any():
            problems.append(f"{node.op_type} {node.name}: non-zero zero point (TensorRT's int8 is symmetric)")
    return problems


def _layer_violations(form: nn.Module) -> list[str]:
    """The layers and norms of an export form whose weights or input quantizer have no symmetric int8 form."""
    names = {}
    for name, module in form.named_modules():
        if isinstance(module, QdqLayer):
            why = []
            if not module.signed or bool(torch.as_tensor(module.weight_zero_point).ne(0).any()):
                why.append("weights on an asymmetric uint8 grid")
            if module.act is not None and not module.act.signed:
                why.append("input on an unsigned/asymmetric grid")
            if why:
                names[name] = " and ".join(why)
        elif isinstance(module, QdqNorm) and not module.act.signed:
            names[name] = "norm input on an unsigned/asymmetric grid"
    return [f"{name}: {why}" for name, why in names.items()]


class TensorRTNetwork(nn.Module):
    """A TensorRT engine (built by MONAI's ``trt_compile``) as a torch module that follows its input's device.

    The engine runs on CUDA; inputs on another device are moved there and the output is moved back,
    so the network drops into ``SlidingWindowInferer(sw_device="cuda", device="cpu")`` and the
    bundles' evaluators like the other runtime networks.

    Args:
        compiled: the module ``trt_compile`` returned (the export form, on CUDA).
    """

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device
        with torch.no_grad():
            out = self.compiled(x.detach().as_subclass(torch.Tensor).float().cuda())
        # a MetaTensor's metadata carried over, as by the ONNX runtimes (see _RuntimeNetwork.forward)
        return convert_to_dst_type(out.float().to(device), x, dtype=torch.float32)[0]


def tensorrt_network(
    model: QuantizationResult | nn.Module,
    base_path: str | os.PathLike,
    precision: str = "fp16",
    **trt_args: Any,
) -> TensorRTNetwork:
    """Build a quantized network into a TensorRT engine with explicit int8 quantization.

    Args:
        model: a :class:`~monai_effq.QuantizationResult` or a network holding quantized layers,
            quantized with ``EfficientQConfig(act_grid="symmetric")``.
        base_path: where ``trt_compile`` caches the engine (``<base_path>.plan``); its folder must exist.
        precision: TensorRT precision of the layers left in floating point (``"fp16"``, ``"fp32"``,
            ``"tf32"``, ``"bf16"``); the Q/DQ layers run in int8 whatever it is.
        trt_args: more arguments of MONAI's ``TrtCompiler``. The engine has static shapes by
            default, built for the first input: a ``SlidingWindowInferer`` with ``sw_batch_size``
            above 1 needs ``dynamic_batchsize=[1, sw_batch_size, sw_batch_size]`` (its last batch
            can be smaller); ``timestamp`` rebuilds a cached engine whose file is older than it
            (a modification time: :func:`~monai_effq.deploy.runtime_network` names the engine after
            its checkpoint's fingerprint instead, which a copied-in checkpoint cannot fool).

    Returns:
        the engine as a :class:`TensorRTNetwork`.

    Raises:
        ValueError: when a quantized layer has no symmetric int8 form (naming the layers), or the
            network has no quantized layers.
        RuntimeError: without a CUDA GPU, or when ``tensorrt``/``polygraphy`` are not installed.
    """
    network = _network_of(model)
    if not any(isinstance(m, QuantizedLayer) for m in network.modules()):
        raise ValueError("the network has no quantized layers: quantize it first (monai_effq.quantize).")
    form, _ = export_form(network, exporter="torchscript")  # trt_compile exports with the TorchScript exporter
    problems = _layer_violations(form)
    if problems:
        raise ValueError(
            f"TensorRT's int8 is symmetric, and {len(problems)} layers are not ({'; '.join(problems[:4])}"
            f"{' ...' if len(problems) > 4 else ''}): quantize with EfficientQConfig(act_grid='symmetric') and a "
            "signed, symmetric or midrise weight grid."
        )
    missing = [name for name, ok in (("tensorrt", _has_tensorrt), ("polygraphy", _has_polygraphy)) if not ok]
    if not _has_trt_compile:
        missing.append("monai>=1.4 (monai.networks.trt_compile)")
    if missing or not torch.cuda.is_available():
        raise RuntimeError(
            "tensorrt_network needs a CUDA GPU and the tensorrt and polygraphy packages "
            f"({'missing: ' + ', '.join(missing) if missing else 'no CUDA device'}); on CPU use OpenVINONetwork."
        )
    Path(base_path).parent.mkdir(parents=True, exist_ok=True)
    export_args = {"dynamo": False, **trt_args.pop("export_args", {})}  # the TorchScript exporter writes Q/DQ
    args = {"method": "onnx", "precision": precision, **trt_args, "export_args": export_args}
    return TensorRTNetwork(trt_compile(form.cuda().eval(), str(base_path), args=args))
