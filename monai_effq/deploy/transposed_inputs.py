"""A transposed convolution's int8 input written as uint8 with zero point 128, for CPUs without AVX-512.

An 8-bit transposed convolution reads its input on the symmetric grid (``act_grid="auto"``), so
OpenVINO computes it in int8: on AVX-512 and AMX CPUs that is faster than its float path (the LiTS
bundle's UNet at 96³: 22.6 against 29.7 ms with oneDNN capped at AVX-512 VNNI, 24.8 against 40.4 ms
with AMX). Capped at AVX2, OpenVINO's int8 transposed convolution took 52.6 ms against 15.7 ms for
its float one, and the network 81.6 against 44.4 ms. The same values written as uint8 with zero
point 128 (``s (q + 128 - 128)``, exact) make OpenVINO choose the float path there, as for NNCF's
graph. On a real AVX2 CPU (an AMD EPYC without AVX-512) OpenVINO 2026.4 ran the transposed
convolutions of both forms with its f32 kernel (``brgconv_avx2_f32``), and the UNet took 87.8 against
92.6 ms (medians of 11 interleaved runs): the rewrite costs nothing there.
"""

from __future__ import annotations

import numpy as np

from monai_effq.utils.imports import deferred_import

onnx, _ = deferred_import("onnx")
numpy_helper, _ = deferred_import("onnx", name="numpy_helper")

__all__ = ["shift_transposed_inputs"]


def shift_transposed_inputs(model) -> int:  # noqa: ANN001 - onnx.ModelProto
    """Rewrite each int8, zero-point-0 Q/DQ pair that a ``ConvTranspose`` reads (directly or through a
    ``Concat``) as uint8 with zero point 128.

    Args:
        model: an ONNX model; changed in place.

    Returns:
        how many Q/DQ pairs were rewritten.
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {i.name: i for i in graph.initializer}
    readers = []
    for node in graph.node:
        if node.op_type != "ConvTranspose" or node.input[0] not in producer:
            continue
        source = producer[node.input[0]]
        readers.extend([producer.get(i) for i in source.input] if source.op_type == "Concat" else [source])
    shifted_zero = "transposed_input_zero_point_u8"
    rewritten = 0
    for dq in readers:
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3 or dq.input[2] not in initializers:
            continue
        q = producer.get(dq.input[0])
        zero = numpy_helper.to_array(initializers[dq.input[2]])
        if q is None or q.op_type != "QuantizeLinear" or zero.dtype != np.int8 or zero.size != 1 or zero.any():
            continue
        if shifted_zero not in initializers:
            initializers[shifted_zero] = numpy_helper.from_array(np.array(128, np.uint8), shifted_zero)
            graph.initializer.append(initializers[shifted_zero])
        q.input[2] = dq.input[2] = shifted_zero
        rewritten += 1
    return rewritten
