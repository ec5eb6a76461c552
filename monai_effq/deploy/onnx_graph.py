"""What an exported ONNX graph holds without running it, shared by the export's later phases."""

from __future__ import annotations

import numpy as np
from monai.utils import optional_import

onnx, _ = optional_import("onnx")
numpy_helper, _ = optional_import("onnx", name="numpy_helper")

__all__ = ["constant_values"]


def constant_values(graph) -> dict[str, np.ndarray]:  # noqa: ANN001 - onnx.GraphProto
    """Values known without running the graph: initializers, ``Constant`` outputs and their casts.

    Args:
        graph: an ONNX graph.

    Returns:
        tensor name → its value.
    """
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:  # nodes are in topological order
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
        elif node.op_type == "Cast" and node.input[0] in values:
            to = next(a.i for a in node.attribute if a.name == "to")
            values[node.output[0]] = values[node.input[0]].astype(onnx.helper.tensor_dtype_to_np_dtype(to))
    return values
