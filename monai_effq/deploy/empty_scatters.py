"""``ScatterND`` nodes that write nothing, taken out of an exported ONNX graph.

SwinUNETR builds its attention mask by assigning window numbers to slices of a zero tensor
(``mask[:, a:b, c:d, e:f] = n``). Where a window is as large as the feature map along an axis the
shift there is 0, one of those slices is empty, and torch's exporter writes its assignment as a
``ScatterND`` whose ``updates`` is an empty initializer: it writes nothing. OpenVINO 2026.4 reads an
empty initializer as a rank-0 tensor and then refuses the whole file (``Conversion is failed for:
ScatterND``); with 64x32x64 windows the SwinUNETR export could not be read at all. ONNX Runtime runs
it. Such a node's output is its ``data`` input, so an ``Identity`` replaces it.
"""

from __future__ import annotations

from monai_effq.deploy.onnx_graph import constant_values

__all__ = ["drop_empty_scatters"]


def drop_empty_scatters(model) -> int:  # noqa: ANN001 - onnx.ModelProto
    """Replace every ``ScatterND`` whose ``updates`` is a known empty tensor by an ``Identity`` of its data.

    Args:
        model: the ONNX model, changed in place.

    Returns:
        how many ``ScatterND`` nodes were replaced.
    """
    if not any(node.op_type == "ScatterND" for node in model.graph.node):
        return 0  # most networks: no need to read every weight into NumPy
    known = constant_values(model.graph)
    dropped = 0
    for node in model.graph.node:
        if node.op_type == "ScatterND" and node.input[2] in known and known[node.input[2]].size == 0:
            node.op_type = "Identity"
            del node.input[1:]
            del node.attribute[:]
            dropped += 1
    return dropped
