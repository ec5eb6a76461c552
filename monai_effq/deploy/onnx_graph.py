"""What an exported ONNX graph holds without running it, shared by the export's later phases."""

from __future__ import annotations

import numpy as np

from monai_effq.utils.imports import deferred_import

onnx, _ = deferred_import("onnx")
numpy_helper, _ = deferred_import("onnx", name="numpy_helper")

__all__ = ["all_names", "constant_values", "free_name", "graph_reads", "rename_reads", "subgraphs"]


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


def subgraphs(graph):  # noqa: ANN001, ANN201 - onnx.GraphProto, an iterator of them
    """The graphs nested in ``graph``'s nodes (``If`` branches, ``Loop`` and ``Scan`` bodies), at any depth.

    Args:
        graph: an ONNX graph.

    Yields:
        each nested graph, outer ones first.
    """
    for node in graph.node:
        for attr in node.attribute:
            for sub in (attr.g,) if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield sub
                yield from subgraphs(sub)


def graph_reads(graph) -> set[str]:  # noqa: ANN001 - onnx.GraphProto
    """Every tensor name a node of ``graph`` or of a graph nested in it reads.

    A nested graph reads tensors of the graphs around it by name, so a pass that drops what
    nothing reads must count those reads too.

    Args:
        graph: an ONNX graph.

    Returns:
        the names read.
    """
    return {name for g in (graph, *subgraphs(graph)) for node in g.node for name in node.input if name}


def rename_reads(graph, rename: dict[str, str]) -> None:  # noqa: ANN001 - onnx.GraphProto
    """Point every read of a renamed tensor, in ``graph`` and in the graphs nested in it, at its new name.

    Args:
        graph: an ONNX graph, changed in place.
        rename: old tensor name → new one.
    """
    for g in (graph, *subgraphs(graph)):
        for node in g.node:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]


def all_names(graph) -> set[str]:  # noqa: ANN001 - onnx.GraphProto
    """Every tensor name ``graph`` and the graphs nested in it define or read.

    Args:
        graph: an ONNX graph.

    Returns:
        the names.
    """
    names = set()
    for g in (graph, *subgraphs(graph)):
        names.update(v.name for v in (*g.input, *g.output))
        names.update(i.name for i in g.initializer)
        names.update(name for node in g.node for name in (*node.input, *node.output))
    return names


def free_name(stem: str, taken: set[str]) -> str:
    """``stem``, or ``stem_1``, ``stem_2``, ... : the first not in ``taken``, which it is then added to.

    Args:
        stem: the name wanted.
        taken: names in use (:func:`all_names`); changed.

    Returns:
        the name.
    """
    name, k = stem, 0
    while name in taken:
        k += 1
        name = f"{stem}_{k}"
    taken.add(name)
    return name
