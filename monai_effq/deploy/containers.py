"""Weight containers of an exported ONNX graph: int8 by default, 4-bit where the integers fit.

ONNX opset 21 lets ``DequantizeLinear`` read ``INT4``/``UINT4`` tensors (two values per byte). A
layer's integer weights go into a 4-bit container when they fit it exactly: 2- and 3-bit layers on
any grid, and 4-bit layers on the ``signed`` grid (INT4), or on the ``unsigned`` and ``asymmetric``
grids (UINT4 with a zero point per channel, or per tensor). The default 4-bit ``midrise`` grid is
stored at doubled codes (odd integers in ``[-15, 15]``, see
:func:`monai_effq.deploy.export._integer_weights`), which need five bits, so those layers stay int8.

The 4-bit containers are for storing and shipping. OpenVINO 2026.4 compiles a convolution whose
weights are 4-bit as a float convolution with weight decompression (measured: SegResNet init 16 at
128³, W4A8, 0.46 s against 0.30 s from int8 containers on an AMD EPYC with AVX-512 VNNI), so
:class:`~monai_effq.deploy.OpenVINONetwork` widens them back to 8 bits (:func:`widen_4bit_weights`)
before compiling: the same values as int8 offsets without a zero point, the int8 kernels.
"""

from __future__ import annotations

import numpy as np

from monai_effq.deploy.onnx_graph import all_names, constant_values, free_name, graph_reads
from monai_effq.utils.imports import deferred_import

onnx, _ = deferred_import("onnx")
numpy_helper, _ = deferred_import("onnx", name="numpy_helper")
ml_dtypes, _ = deferred_import("ml_dtypes")  # onnx's own dependency: numpy's 4-bit types

__all__ = ["INT4_MIN_OPSET", "WEIGHT_CONTAINERS", "pack_4bit_weights", "widen_4bit_weights"]

WEIGHT_CONTAINERS = ("int8", "int4")
INT4_MIN_OPSET = 21


def _channel_axis(node, ndim: int) -> int:  # noqa: ANN001 - onnx.NodeProto
    """The axis of a ``DequantizeLinear``'s per-channel scale and zero point in an ``ndim``-d weight."""
    return next((a.i for a in node.attribute if a.name == "axis"), 1) % ndim


def _along(node, t: np.ndarray, ndim: int) -> np.ndarray:  # noqa: ANN001 - onnx.NodeProto
    """A per-channel ``t`` shaped to broadcast against the node's ``ndim``-d weight."""
    shape = [1] * ndim
    shape[_channel_axis(node, ndim)] = -1
    return t.reshape(shape)


def _four_bit_form(node, values: np.ndarray, zero: np.ndarray, signed: bool):  # noqa: ANN001, ANN202
    """``(values, zero point, dtype)`` of a weight in a 4-bit container, or ``None`` when it needs more.

    ``scale * (v - z)`` is kept exactly: int8 offsets in ``[-8, 7]`` go to INT4 as they are; others
    whose range per channel (or per tensor) spans at most 16 levels go to UINT4 as ``v - m`` with
    zero point ``z - m``, ``m`` the smallest value (unsigned and asymmetric 4-bit grids).
    """
    if signed and zero.min() >= -8 and zero.max() <= 7 and values.min() >= -8 and values.max() <= 7:
        return values, zero, ml_dtypes.int4
    if zero.ndim == 1 and zero.size > 1:  # per channel, along the node's axis
        others = tuple(d for d in range(values.ndim) if d != _channel_axis(node, values.ndim))
        low = np.minimum(values.min(axis=others), zero)
        shifted, low_b = values - _along(node, low, values.ndim), low
    else:
        low_b = min(int(values.min()), int(zero.min()))
        shifted = values - low_b
    new_zero = zero - low_b
    if shifted.max() > 15 or new_zero.max() > 15:
        return None
    return shifted, new_zero.astype(np.int32), ml_dtypes.uint4


def pack_4bit_weights(model) -> tuple[list[str], list[str]]:  # noqa: ANN001 - onnx.ModelProto
    """Store in ``INT4``/``UINT4`` every integer weight of a ``DequantizeLinear`` whose values fit 4 bits.

    Args:
        model: an ONNX model at opset 21 or later whose weights are stored as int8/uint8 initializers
            (:func:`~monai_effq.deploy.export.fold_weight_quantization`); changed in place.

    Returns:
        the names of the weights now stored in 4 bits, and of those that stay 8-bit.

    Raises:
        ValueError: when the model's opset is below 21.
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < INT4_MIN_OPSET:
        raise ValueError(f"4-bit weight containers need ONNX opset {INT4_MIN_OPSET} or later, the model has {opset}.")
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    consts = constant_values(graph)
    packed, kept = [], []
    # an exporter stores equal tensors once, so one integer weight may serve several DequantizeLinear nodes (two
    # layers with equal codes and other scales): each reading converts once, under names of its own
    converted: dict[tuple[str, str, int], tuple[str, str] | None] = {}  # None: stays 8-bit
    taken = set(all_names(graph))
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
            continue
        weight = initializers[node.input[0]]
        if len(weight.dims) < 2 or weight.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            continue
        has_zero = len(node.input) > 2 and bool(node.input[2])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        key = (weight.name, node.input[2] if has_zero else "", axis)
        if key not in converted:
            values = numpy_helper.to_array(weight).astype(np.int32)
            zero = consts[node.input[2]].astype(np.int32) if has_zero else np.zeros((), np.int32)
            packed_values = _four_bit_form(node, values, zero, weight.data_type == onnx.TensorProto.INT8)
            if packed_values is None:
                converted[key] = None
                kept.append(weight.name)
            else:
                values, zero, dtype = packed_values
                name4 = free_name(weight.name.removesuffix("_quantized") + "_4bit", taken)
                zero_name = free_name(name4 + "_zero_point", taken)
                # from_array packs two values per byte into raw_data, so the file holds half the bytes
                graph.initializer.append(numpy_helper.from_array(values.astype(dtype), name4))
                graph.initializer.append(numpy_helper.from_array(zero.astype(dtype), zero_name))
                converted[key] = (name4, zero_name)
                packed.append(weight.name)
        if converted[key] is None:
            continue
        name4, zero_name = converted[key]
        node.input[0] = name4
        if len(node.input) > 2:
            node.input[2] = zero_name
        else:
            node.input.append(zero_name)
    used = graph_reads(graph)
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(node)
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
    return packed, kept


def widen_4bit_weights(model) -> int:  # noqa: ANN001 - onnx.ModelProto
    """Store every ``INT4``/``UINT4`` weight of a ``DequantizeLinear`` as ``INT8`` with zero point 0.

    ``scale * (v - z)`` is kept exactly as ``scale * ((v - z) - 0)``: 4-bit offsets fit int8. No
    weight zero point is left because OpenVINO 2026.4 computes a transposed convolution whose
    weights have one wrongly when its input is uint8 (rel-L2 0.81 against the same graph's
    ONNX Runtime output in a test), and an int8 weight without one is what its kernels take anyway.

    Args:
        model: an ONNX model; changed in place.

    Returns:
        how many weights were widened.
    """
    four_bit = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    # read before any is rewritten: a weight or zero point may serve more than one node
    original = {i.name: numpy_helper.to_array(i).astype(np.int16) for i in graph.initializer if i.data_type in four_bit}
    widened = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in original:
            continue
        weight = initializers[node.input[0]]
        values = original[weight.name]
        has_zero = len(node.input) > 2 and bool(node.input[2])
        if has_zero and node.input[2] not in original:
            continue  # a zero point given some other way: left for OpenVINO to read as it is
        if has_zero:
            zero_init = initializers[node.input[2]]
            zero = original[zero_init.name]
            values = values - (_along(node, zero, values.ndim) if zero.ndim == 1 and zero.size > 1 else zero)
            zero_init.CopyFrom(numpy_helper.from_array(np.zeros(zero_init.dims, np.int8), zero_init.name))
        weight.CopyFrom(numpy_helper.from_array(values.astype(np.int8), weight.name))
        widened += 1
    return widened
