"""Export a quantized network as an ONNX QDQ graph whose weights are the solver's integer codes.

Each :class:`~monai_effq.ptq.modules.QuantizedLayer` becomes ``DequantizeLinear(int8 codes)`` feeding
the layer's own operator, with ``QuantizeLinear``/``DequantizeLinear`` on its input carrying the
calibrated activation range; everything else (norms, activations, resampling, layers kept in FP)
is exported as PyTorch exports it. OpenVINO and ONNX Runtime fuse these patterns into integer
kernels, and with graph optimisations off the graph computes exactly what the fake-quant network
computes.

Phases: :func:`export_form` (a plain copy of the network whose quantized layers are written with
quantize/dequantize operators), the export itself, then :func:`compact_names`. The export goes
through torch's current exporter (``torch.onnx.export(..., dynamo=True)``, ``torch.export`` and
onnxscript): the form dequantizes integer weight buffers with the ``quantized_decomposed``
operators, so the graph stores the integers as they are. The TorchScript exporter (deprecated since
torch 2.9) remains where a measured reason does: opsets below 18, which the new exporter does not
write, TensorRT's build (:mod:`monai_effq.deploy.tensorrt`, MONAI's ``trt_compile`` exports with
it), and networks ``torch.export`` cannot capture (Python branches on a tensor's value, as DiNTS
has), which are traced with their spatial axes fixed; there the form uses PyTorch's fake-quantize
operators and :func:`fold_weight_quantization`
applies the weights' ``QuantizeLinear`` nodes offline, followed by :func:`drop_initializer_identities`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.metadata
import io
import itertools
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from monai.utils import optional_import

from monai_effq.deploy.onnx_graph import all_names, constant_values, free_name, graph_reads, rename_reads
from monai_effq.deploy.concat_rounding import round_concat_inputs
from monai_effq.deploy.containers import INT4_MIN_OPSET, WEIGHT_CONTAINERS, pack_4bit_weights
from monai_effq.deploy.empty_scatters import drop_empty_scatters
from monai_effq.deploy.norms import (
    GROUP_NORM_FORMS,
    ONNX_TRANSLATIONS,
    ChannelStatsGroupNorm,
    ChannelStatsGroupNormOp,
    channel_stats_norms,
)
from monai_effq.ptq.checkpoint import result_fingerprint
from monai_effq.ptq.graph import forward_graph, graph_readers, hooks, set_submodule
from monai_effq.ptq.modules import (
    SHARED_INPUT_QUANTIZER,
    ActivationQuantizer,
    QuantizedLayer,
    QuantizedNorm,
    functional_forward,
    shared_input_quantizer,
)
from monai_effq.ptq.result import QuantizationResult
from monai_effq.quant.grid import UniformGrid, channel_view, dequantize, grid_codes
from monai_effq.utils.errors import MissingExtraError, UserInputError, check_integer
from monai_effq.utils.imports import deferred_import
from monai_effq.utils.io import atomic_write, check_output_file

# registers torch.ops.quantized_decomposed, the Q/DQ operators torch.export and its ONNX exporter know
optional_import("torch.ao.quantization.fx._decomposed")
_DECOMPOSED = torch.ops.quantized_decomposed

onnx, _has_onnx = deferred_import("onnx")
numpy_helper, _ = deferred_import("onnx", name="numpy_helper")
version_converter, _ = deferred_import("onnx.version_converter")
# what torch.onnx.export(dynamo=True) raises when torch.export cannot capture the network (data-dependent
# control flow), as against a failure to translate a captured graph; its public base class where it moved
TorchExportError, _has_export_error = optional_import("torch.onnx._internal.exporter._errors", name="TorchExportError")
if not _has_export_error:  # a torch without it: no fallback, torch's own error reaches the user

    class TorchExportError(Exception):  # type: ignore[no-redef]
        """Never raised."""


# torch.export's failure on Python control flow over a tensor's value, which fixing axes cannot help
DataDependentError, _has_data_dependent = optional_import(
    "torch.fx.experimental.symbolic_shapes", name="GuardOnDataDependentSymNode"
)
_, _has_onnxscript = deferred_import("onnxscript")  # torch's current ONNX exporter translates with it

__all__ = [
    "BATCH_FIXED_BY_NETWORK_KEY",
    "DEPLOY_EXTRA",
    "DYNAMO_MIN_OPSET",
    "EXAMPLE_SPATIAL_KEY",
    "FIXED_BY_NETWORK_KEY",
    "EXPORTERS",
    "EXPORT_OPTIONS_KEY",
    "EXPORTER_VERSION_KEY",
    "QdqLayer",
    "QdqNorm",
    "SOURCE_FINGERPRINT_KEY",
    "compact_names",
    "count_integer_weights",
    "drop_initializer_identities",
    "export_form",
    "export_onnx",
    "exporter_version",
    "fold_weight_quantization",
    "layers_off_the_output",
    "require",
    "source_digest",
    "spatial_size_label",
]

logger = logging.getLogger("monai_effq")

DEPLOY_EXTRA = "pip install 'monai-effq[deploy]'"

# the newest opset PyTorch's TorchScript exporter writes; later ones go through onnx.version_converter
TORCHSCRIPT_MAX_OPSET = 20
# the oldest opset torch's current (torch.export) exporter writes
DYNAMO_MIN_OPSET = 18
# "dynamo": torch.onnx.export(..., dynamo=True); "torchscript": the legacy exporter
EXPORTERS = ("dynamo", "torchscript")

# metadata_props key recording the options a file was exported with, so a stale form is re-exported
EXPORT_OPTIONS_KEY = "monai_effq.export_options"
# metadata_props key recording the fingerprint of the quantized checkpoint a file was exported from,
# so a file exported from another checkpoint is re-exported whatever the files' modification times
SOURCE_FINGERPRINT_KEY = "monai_effq.checkpoint_fingerprint"
# metadata_props key recording the spatial size of the example input ("96x96x96"): a network whose
# graph depends on its input size (SwinUNETR's window partition) runs at that size only, and the
# runtimes name it when another size fails
EXAMPLE_SPATIAL_KEY = "monai_effq.example_spatial_size"
# metadata_props key recording what wrote a file (exporter_version): a file of another monai-effq, source or torch
# is exported again rather than reused, so that what a later export changes takes effect
EXPORTER_VERSION_KEY = "monai_effq.version"
# the subpackages whose source decides the graph a quantized network exports to
_GRAPH_SOURCES = ("deploy", "ptq", "quant")
# metadata_props key present when the network's graph forced fixed spatial axes on a file asked to keep them
# dynamic (UNETR, a traced DiNTS), so that runtime_network does not export it again in the hope of dynamic ones
FIXED_BY_NETWORK_KEY = "monai_effq.spatial_axes_fixed_by_network"
# the same for a batch axis asked to be dynamic that the network's graph fixed, so that a file is not exported
# again and again in the hope of a dynamic one
BATCH_FIXED_BY_NETWORK_KEY = "monai_effq.batch_axis_fixed_by_network"


def source_digest(package: str | os.PathLike, subpackages: Sequence[str]) -> str:
    """A digest of the Python source of some subpackages of a package: their files' paths and bytes.

    Args:
        package: the package's folder.
        subpackages: the subfolders whose ``*.py`` files count.

    Returns:
        12 hex digits.
    """
    package = Path(package)
    digest = hashlib.sha256()
    for path in sorted(p for sub in subpackages for p in (package / sub).rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def exporter_version() -> str:
    """What :data:`EXPORTER_VERSION_KEY` records: monai-effq's version, a digest of the source that builds the graph,
    and the torch and onnxscript versions that translate it.

    The version alone would not do: an install from the repository keeps one version number across many
    changes, and a fix to the export (or a torch upgrade) must reach the files exported before it, which
    :func:`~monai_effq.deploy.runtime.export_is_current` would otherwise take as current. Read once per
    process (the source files and package metadata do not change under a running export).

    Returns:
        e.g. ``"0.1.0+src.3f2a9c1b7d40 torch 2.13.0 onnxscript 0.5.4"``.
    """
    from monai_effq import __version__  # at call time: the package imports this module while it initialises

    try:
        onnxscript = importlib.metadata.version("onnxscript")
    except importlib.metadata.PackageNotFoundError:
        onnxscript = "none"
    source = source_digest(Path(__file__).resolve().parents[1], _GRAPH_SOURCES)
    # torch's release without its build's label (+cpu, +cu121): a file exported on a GPU machine is the one a CPU
    # machine of the same release would write
    torch_release = str(torch.__version__).split("+")[0]
    return f"{__version__}+src.{source} torch {torch_release} onnxscript {onnxscript}"


def spatial_size_label(spatial: Sequence[int]) -> str:
    """A spatial size as the export records it under :data:`EXAMPLE_SPATIAL_KEY` (``"96x96x96"``)."""
    return "x".join(str(int(v)) for v in spatial)


# ONNX Runtime's u8s8 kernels on CPUs without VNNI add pairs of products in 16 bits: 255*63*2 fits,
# so reduce_range re-rounds wider int8 weights onto the 7-bit signed grid, -64..63.
REDUCED_WEIGHT_GRID = UniformGrid(7, "signed")
REDUCED_WEIGHT_RANGE = (
    REDUCED_WEIGHT_GRID.qmin - int(REDUCED_WEIGHT_GRID.fixed_zero_point),
    REDUCED_WEIGHT_GRID.qmax - int(REDUCED_WEIGHT_GRID.fixed_zero_point),
)


def require(available: object, package: str, what: str) -> None:
    """Raise a one-line error naming the extra to install when an optional package is missing.

    Args:
        available: whether the package imported (a bool, or the flag of ``deferred_import``, which
            imports it when tested).
        package: its import name.
        what: what needs it.

    Raises:
        MissingExtraError: (an ``ImportError``) when ``available`` is false.
    """
    if not available:
        raise MissingExtraError(f"{what} needs the '{package}' package, which is not installed: {DEPLOY_EXTRA}")


def _integer_weights(module: QuantizedLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer weights (native layout), scales and zero points of one layer in an 8-bit container.

    ``scale * (codes - zero_point)`` is rewritten as ``scale' * (v - z')`` with integer ``v`` in int8
    (``z' = 0``) or, for asymmetric grids whose offsets do not fit, uint8 with an integer ``z'``.
    The midrise grid's half-integer zero point is absorbed by doubling the codes and halving the
    scale, which is exact in floating point.
    """
    codes = module.codes.long()
    scale = module.scale.detach().float().clone()
    zero = module.zero_point.detach().float().clone()
    half = bool(torch.any(zero != torch.round(zero)))
    if half:
        codes, zero, scale = 2 * codes, 2 * zero, scale / 2
    zero = torch.round(zero).long()
    offsets = codes - channel_view(zero, codes, module.channel_axis, module.groups)
    if offsets.min() >= -128 and offsets.max() <= 127:
        return offsets.to(torch.int8), scale, torch.zeros_like(zero)
    if not half and codes.min() >= 0 and codes.max() <= 255:
        return codes.to(torch.uint8), scale, zero
    raise ValueError(
        f"the {module.grid.bits}-bit {module.grid.kind} weights of {type(module.layer).__name__} do not fit an "
        "8-bit container: quantize again (EfficientQConfig puts 8-bit layers on the 'symmetric' grid; "
        "an explicit 8-bit 'midrise' override needs 9-bit integers)."
    )


def _reduced_weights(values: torch.Tensor, factor: float) -> torch.Tensor:
    """int8 weights ``values`` rounded to the nearest multiples of ``factor``, as ``REDUCED_WEIGHT_GRID`` integers."""
    zero = REDUCED_WEIGHT_GRID.fixed_zero_point
    return (grid_codes(values.float(), factor, zero, REDUCED_WEIGHT_GRID) - zero).to(torch.int8)


class QdqLayer(nn.Module):
    """The export form of a :class:`~monai_effq.ptq.modules.QuantizedLayer`.

    For torch's current exporter (``exporter="dynamo"``) it holds the integer weights as an int8 or
    uint8 buffer and dequantizes them with ``quantized_decomposed.dequantize_per_*``, which the
    exporter writes as ``DequantizeLinear`` of that integer initializer. For the TorchScript exporter
    it holds the integer-valued float weights and applies ``torch.fake_quantize_per_*_affine``,
    which that exporter writes as ``QuantizeLinear``/``DequantizeLinear`` pairs (folded afterwards,
    :func:`fold_weight_quantization`). Both compute the same function.

    Args:
        module: the quantized layer.
        reduce_range: re-round weights that exceed 7 bits into ``[-64, 63]`` (for ONNX Runtime on
            CPUs without VNNI; this changes the layer's output, so it is warned about).
        exporter: ``"dynamo"`` or ``"torchscript"``, the exporter the form is written for.
    """

    def __init__(self, module: QuantizedLayer, reduce_range: bool = False, exporter: str = "dynamo") -> None:
        super().__init__()
        if exporter not in EXPORTERS:
            raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}.")
        self.exporter = exporter
        self.layer = copy.deepcopy(module.layer)
        values, scale, zero = _integer_weights(module)
        self.axis = module.channel_axis
        self.reduced = False
        if reduce_range and values.dtype == torch.int8:
            lo, hi = REDUCED_WEIGHT_RANGE
            if values.min() < lo or values.max() > hi:
                factor = float(np.ceil(max(values.min().item() / lo, values.max().item() / hi)))
                values = _reduced_weights(values, factor)
                scale = scale * factor
                self.reduced = True
        self.signed = values.dtype == torch.int8
        self.per_channel = scale.numel() > 1
        if self.per_channel and self.axis != 0 and module.groups > 1:
            raise ValueError("a grouped transposed convolution with per-channel scales cannot be exported as QDQ.")
        if exporter == "dynamo":
            self.register_buffer("weight_codes", values)
        else:
            self.register_buffer("weight", dequantize(values, scale, zero.float(), axis=self.axis))
        if self.per_channel:
            self.register_buffer("weight_scale", scale.reshape(-1).float())
            self.register_buffer("weight_zero_point", zero.reshape(-1).to(torch.int64 if exporter == "dynamo" else torch.int32))
        else:  # plain numbers: torch.export cannot read a tensor's value into an operator's argument
            self.weight_scale, self.weight_zero_point = float(scale), int(zero)
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        self.act = _ActivationSpec.from_quantizer(module.input_quantizer, exporter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        qmin, qmax = (-128, 127) if self.signed else (0, 255)
        if self.exporter == "dynamo":
            dtype = torch.int8 if self.signed else torch.uint8
            if self.per_channel:
                w = _DECOMPOSED.dequantize_per_channel(
                    self.weight_codes, self.weight_scale, self.weight_zero_point, self.axis, qmin, qmax, dtype
                )
            else:
                w = _DECOMPOSED.dequantize_per_tensor(self.weight_codes, self.weight_scale, self.weight_zero_point, qmin, qmax, dtype)
        elif self.per_channel:
            w = torch.fake_quantize_per_channel_affine(
                self.weight, self.weight_scale, self.weight_zero_point, self.axis, qmin, qmax
            )
        else:
            w = torch.fake_quantize_per_tensor_affine(self.weight, self.weight_scale, self.weight_zero_point, qmin, qmax)
        return functional_forward(self.layer, x, w, self.bias)


class _ActivationSpec(nn.Module):
    """An activation quantizer as an 8-bit Q/DQ pair, clipped first when it uses part of the container.

    Signed and symmetric grids become int8 with zero point 0 (the form TensorRT requires), and so
    does an asymmetric grid whose codes minus its zero point fit int8 (every grid of up to 7 bits):
    OpenVINO computes a transposed convolution in int8 only when its input has no zero point.
    Other unsigned and asymmetric grids become uint8 with their zero point.
    """

    def __init__(
        self, scale: float, zero_point: int, clip: tuple[float, float] | None, signed: bool = False, exporter: str = "dynamo"
    ) -> None:
        super().__init__()
        self.scale, self.zero_point, self.clip, self.signed, self.exporter = scale, zero_point, clip, signed, exporter

    @classmethod
    def from_quantizer(cls, quantizer: ActivationQuantizer | None, exporter: str = "dynamo") -> _ActivationSpec | None:
        if quantizer is None:
            return None
        zero = float(quantizer.zero_point)
        if zero != round(zero):
            raise ValueError(f"activation grid {quantizer.grid.kind} has no 8-bit form (zero point {zero}).")
        offsets = (quantizer.qmin - zero, quantizer.qmax - zero)
        signed = quantizer.grid.is_signed or (quantizer.grid.kind == "asymmetric" and offsets[0] >= -128 and offsets[1] <= 127)
        lo, hi = offsets if signed else (quantizer.qmin, quantizer.qmax)
        container = (-128, 127) if signed else (0, 255)
        if lo < container[0] or hi > container[1]:
            raise ValueError(f"activation grid {quantizer.grid.kind} does not fit an 8-bit container ({lo}..{hi}).")
        scale = float(quantizer.scale)
        zero_point = 0 if signed else int(zero)
        clip = None
        if (lo, hi) != container:
            clip = ((lo - zero_point) * scale, (hi - zero_point) * scale)
        return cls(scale, zero_point, clip, signed, exporter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clip is not None:
            x = torch.clamp(x, *self.clip)
        qmin, qmax = (-128, 127) if self.signed else (0, 255)
        if self.exporter == "dynamo":
            dtype = torch.int8 if self.signed else torch.uint8
            q = _DECOMPOSED.quantize_per_tensor(x, self.scale, self.zero_point, qmin, qmax, dtype)
            return _DECOMPOSED.dequantize_per_tensor(q, self.scale, self.zero_point, qmin, qmax, dtype)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, qmin, qmax)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, zero_point={self.zero_point}, clip={self.clip}, signed={self.signed}"


class QdqNorm(nn.Module):
    """The export form of a :class:`~monai_effq.ptq.modules.QuantizedNorm`: a Q/DQ pair, then the norm.

    Args:
        module: the norm with a quantized input.
        exporter: the exporter the form is for (see :class:`QdqLayer`).
    """

    def __init__(self, module: QuantizedNorm, exporter: str = "dynamo") -> None:
        super().__init__()
        self.act = _ActivationSpec.from_quantizer(module.input_quantizer, exporter)
        self.norm = copy.deepcopy(module.norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(x))


def export_form(
    network: nn.Module, reduce_range: bool = False, group_norm: str = "onnx", exporter: str = "dynamo"
) -> tuple[nn.Module, list[str]]:
    """A copy of ``network`` with every quantized layer replaced by its :class:`QdqLayer`,
    every norm with a quantized input by its :class:`QdqNorm` and every block's shared input
    quantizer (:func:`~monai_effq.ptq.modules.quantize_shared_input`) by its Q/DQ pair.

    Args:
        network: a network holding :class:`~monai_effq.ptq.modules.QuantizedLayer` modules.
        reduce_range: see :class:`QdqLayer`.
        group_norm: ``"onnx"`` keeps group/instance norms as PyTorch exports them;
            ``"channel_stats"`` writes them as :class:`~monai_effq.deploy.norms.ChannelStatsGroupNorm`
            (as :class:`~monai_effq.deploy.norms.ChannelStatsGroupNormOp` for the ``"dynamo"`` exporter).
        exporter: the exporter the form is for (see :class:`QdqLayer`).

    Returns:
        the copy (eval mode) and the names of the layers whose weights were re-rounded to 7 bits.
    """
    form = copy.deepcopy(network).eval()
    reduced = []
    for name, module in list(form.named_modules()):
        if isinstance(module, QuantizedLayer):
            if module.channel_axis != 0 and module.groups > 1 and module.scale.numel() > 1:
                # ONNX's DequantizeLinear has one axis of scales, and a grouped transposed weight's output channels span two
                raise UserInputError(
                    f"layer {name} is a grouped transposed convolution with per-channel scales, which ONNX cannot dequantize "
                    "on one axis: quantize it per tensor (overrides={'" + name + "': {'per_channel': False}}) to export it."
                )
            qdq = QdqLayer(module, reduce_range, exporter)
            set_submodule(form, name, qdq)
            if qdq.reduced:
                reduced.append(name)
        elif isinstance(module, QuantizedNorm):
            set_submodule(form, name, QdqNorm(module, exporter))
        shared = shared_input_quantizer(module)
        if shared is not None:  # the block's pre-hook calls whatever the child now is
            module.add_module(SHARED_INPUT_QUANTIZER, _ActivationSpec.from_quantizer(shared, exporter))
    if group_norm == "channel_stats":
        # one operator per norm for torch's current exporter, which writes it through ONNX_TRANSLATIONS
        channel_stats_norms(form, ChannelStatsGroupNormOp if exporter == "dynamo" else ChannelStatsGroupNorm)
    return form, reduced


def drop_initializer_identities(model) -> int:  # noqa: ANN001 - onnx.ModelProto
    """Point the consumers of ``Identity(initializer)`` nodes at the initializer itself.

    The exporter writes such nodes where several buffers hold equal values (it stores one copy);
    ONNX Runtime's graph optimiser can drop them and leave their consumers dangling.

    Args:
        model: an ONNX model, changed in place.

    Returns:
        the number of nodes removed.
    """
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    outputs = {v.name for v in graph.output}
    alias = {
        n.output[0]: n.input[0]
        for n in graph.node
        if n.op_type == "Identity" and n.input[0] in initializers and n.output[0] not in outputs
    }
    if not alias:
        return 0
    rename_reads(graph, alias)
    for node in [n for n in graph.node if n.op_type == "Identity" and n.output[0] in alias]:
        graph.node.remove(node)
    return len(alias)


def compact_names(model) -> None:  # noqa: ANN001 - onnx.ModelProto
    """Give intermediate tensors and nodes short names (the exporter's scoped names can take a
    tenth of a small int8 model's file); graph inputs, outputs and initializers keep theirs, and so
    do the tensors inside nested graphs (``If`` branches), whose reads of outer tensors follow."""
    graph = model.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {i.name for i in graph.initializer}
    taken = all_names(graph)
    short = (name for name in (f"t{k}" for k in itertools.count()) if name not in taken)
    rename: dict[str, str] = {}
    for k, node in enumerate(graph.node):
        node.name = f"n{k}"
        for i, name in enumerate(node.output):
            if name and name not in keep:
                if name not in rename:
                    rename[name] = next(short)
                node.output[i] = rename[name]
    rename_reads(graph, rename)
    for info in list(graph.value_info):
        if info.name in rename:
            info.name = rename[info.name]


def fold_weight_quantization(model) -> int:  # noqa: ANN001 - onnx.ModelProto
    """Apply every ``QuantizeLinear`` whose input is a stored float tensor, storing its integers.

    Args:
        model: an ONNX model, changed in place.

    Returns:
        the number of weights folded.
    """
    # the TorchScript exporter stores equal weights once and reads the copies through Identity nodes
    drop_initializer_identities(model)
    graph = model.graph
    consts = constant_values(graph)
    initializers = {i.name: i for i in graph.initializer}
    taken = set(all_names(graph))
    drop, stored = [], {}
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in initializers:
            continue
        x = consts[node.input[0]].astype(np.float32)
        scale = consts[node.input[1]].astype(np.float32)
        zero = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zero_b = scale.reshape(shape), zero.reshape(shape)
        else:
            zero_b = zero
        info = np.iinfo(zero.dtype)
        q = np.clip(np.rint(x / scale) + zero_b.astype(np.int32), info.min, info.max).astype(zero.dtype)
        name = free_name(node.input[0] + "_quantized", taken)
        graph.initializer.append(numpy_helper.from_array(q, name))
        stored[node.output[0]] = name
        drop.append(node)
    rename_reads(graph, stored)
    for node in drop:
        graph.node.remove(node)
    used = graph_reads(graph)
    for init in list(graph.initializer):
        if init.name not in used and init.name in initializers:
            graph.initializer.remove(init)
    return len(drop)


# operators that pass a weight on unchanged in value, between its dequantization and the layer that reads it
_LAYOUT_OPS = frozenset({"Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})


def count_integer_weights(model) -> int:  # noqa: ANN001 - onnx.ModelProto
    """The number of layers that read a dequantized integer weight (int8/uint8 initializers of two or more axes).

    An exporter stores equal tensors once and merges equal ``DequantizeLinear`` nodes (two layers whose codes,
    scales and zero points agree, such as two all-zero layers), so one dequantized weight may serve several
    layers: each of its readers counts.

    Args:
        model: an ONNX model.

    Returns:
        how many node inputs read such a weight (through layout operators, which are not counted).
    """
    integer = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    graph = model.graph
    weights = {i.name for i in graph.initializer if i.data_type in integer and len(i.dims) > 1}
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights}
    count = 0
    for node in graph.node:  # topological order: a layout operator's output is known before its readers
        reads = sum(name in dequantized for name in node.input)
        if node.op_type in _LAYOUT_OPS and reads:
            dequantized.add(node.output[0])
        elif node.op_type != "DequantizeLinear":
            count += reads
    return count


def _axes_names(rank: int, batch: bool, spatial: bool) -> dict[int, str]:
    """The names of the dynamic axes of an ``(N, C, *spatial)`` input: the batch axis, the spatial axes, or both."""
    names = {0: "batch"} if batch else {}
    if spatial:
        names.update({d: f"spatial{d - 2}" for d in range(2, rank)})
    return names


def _export_with_torch_export(form: nn.Module, x: torch.Tensor, opset: int, axes: dict[int, str]):  # noqa: ANN202
    """The export form through ``torch.onnx.export(..., dynamo=True)``, as a ``ModelProto`` with ``axes`` dynamic."""
    dims = {d: torch.export.Dim.DYNAMIC for d in axes}
    # notes about torchvision operators a segmentation network never uses; a note on symbols torch.export
    # cannot trace back to code when it cannot capture the network (export_onnx says why in one line); and
    # onnx_ir's line per deduplicated initializer (dozens per network under a bundle's INFO logging); and the
    # tracebacks torch.export logs of an operator that fails on its fake tensors (200 lines for an input of the
    # wrong channels, which export_onnx then names in one line; the exception keeps the traceback)
    silenced = {
        "torch.onnx._internal.exporter._registration": logging.ERROR,
        "torch.fx.experimental.symbolic_shapes": logging.ERROR,
        "onnx_ir": logging.WARNING,
        "torch._subclasses.fake_tensor": logging.CRITICAL,
        "torch.export._trace": logging.CRITICAL,
    }
    quiet = [logging.getLogger(n) for n in silenced]
    levels = [q.level for q in quiet]
    for q, level in zip(quiet, silenced.values()):
        q.setLevel(level)
    printed = io.StringIO()
    try:
        # torch.export prints a partly traced graph to stderr when it cannot capture a network
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stderr(printed):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                form,
                (x,),
                dynamo=True,
                opset_version=opset,
                input_names=["image"],
                output_names=["pred"],
                dynamic_shapes=(dims,) if dims else None,
                custom_translation_table=ONNX_TRANSLATIONS,
                verbose=False,
            )
    except TorchExportError:
        logger.debug("torch.export printed: %s", printed.getvalue())
        raise
    except Exception as error:
        _refuse_a_misfit(form, x, error)
        sys.stderr.write(printed.getvalue())  # any other failure: what torch printed may say why
        raise
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    if printed.getvalue():
        logger.debug("torch.onnx.export printed: %s", printed.getvalue())
    proto = program.model_proto
    # the exporter annotates every node with its Python stack and module path (a fifth of the file)
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.graph.value_info[:]
    for value in (*proto.graph.input, *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, name in axes.items():
            if axis < len(dims):  # a classifier's (N, classes) output has no spatial axes to name
                dims[axis].dim_param = name
    return proto


def _export_with_fewest_fixed_axes(form: nn.Module, x: torch.Tensor, opset: int, axes: dict[int, str]):  # noqa: ANN202
    """:func:`_export_with_torch_export` with ``axes`` dynamic; else with the spatial axes fixed; else all fixed.

    Returns:
        the ``ModelProto`` (``None`` when torch.export captured none of them), the axes it keeps
        dynamic, and the first failure's reason in one line (``""`` when the first try worked).
    """
    tries = [axes]
    if any(axis >= 2 for axis in axes):
        tries.append({axis: name for axis, name in axes.items() if axis < 2})
    if tries[-1]:
        tries.append({})
    reason = ""
    for dynamic in tries:
        try:
            return _export_with_torch_export(form, x, opset, dynamic), dynamic, reason
        except TorchExportError as e:
            reason = reason or _one_line(e.__cause__ or e)
            if _has_data_dependent and isinstance(e.__cause__, DataDependentError):
                break  # a branch on a tensor's value fails whatever the axes
    return None, axes, reason


def _shape_label(example_input: torch.Tensor, axes: dict[int, str]) -> str:
    """The input shape a file runs, ``?`` on its dynamic ``axes`` (``"?x1x32x32x32"``)."""
    return "x".join("?" if axis in axes else str(size) for axis, size in enumerate(example_input.shape))


def _one_line(error: BaseException) -> str:
    """An exception's message in one line: its first line, with the first item when that line introduces a list."""
    lines = [line.strip(" -") for line in str(error).splitlines() if line.strip(" -")]
    if not lines:
        return type(error).__name__
    line = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return line.rstrip(". ")  # it sits inside the caller's sentence


def _export_with_torchscript(form: nn.Module, x: torch.Tensor, opset: int, axes: dict[int, str]):  # noqa: ANN202
    """The export form through the TorchScript exporter, as a ``ModelProto`` with ``axes`` dynamic (at most opset 20)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        try:
            torch.onnx.export(
                form,
                (x,),
                buffer,
                dynamo=False,
                opset_version=min(opset, TORCHSCRIPT_MAX_OPSET),
                input_names=["image"],
                output_names=["pred"],
                dynamic_axes={"image": axes, "pred": axes} if axes else None,
            )
        except Exception as error:
            _refuse_a_misfit(form, x, error)
            raise
    return onnx.load_from_string(buffer.getvalue())


def _refuse_a_misfit(form: nn.Module, x: torch.Tensor, error: BaseException | None = None, setting: str = "example_input") -> None:
    """After a failed export: a :class:`UserInputError` when the network's own forward fails on ``x`` too.

    Run only once an export has failed (a forward pass at a real window's size costs seconds): an input of
    the wrong rank, channels or size fails at its first misfit layer, and a network that does run on it
    leaves the export's failure to be reported (or the next exporter tried) as it is.

    Args:
        form: the export form of the network.
        x: the example input.
        error: the export's failure, chained to the error raised.
        setting: what the caller named the input by (``export_torchscript``'s ``input_shape``).

    Raises:
        UserInputError: naming the input's shape and the layer's complaint, when the forward fails.
    """
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            form(x)
    except RuntimeError as misfit:
        if "memory" in str(misfit).lower():  # too large for this machine is not a misfit
            return
        raise UserInputError(
            f"{setting} of shape {tuple(x.shape)} does not fit the network ({_one_line(misfit)}): give it as "
            "(N, C, *spatial), with the channels the network takes and a spatial size it runs (each side a multiple of "
            "its downsampling factor)."
        ) from error


def layers_off_the_output(network: nn.Module, example_input: torch.Tensor) -> list[str]:
    """The quantized layers that run but whose outputs the network's output does not depend on.

    MONAI's ``DynUNet(deep_supervision=True)`` runs its supervision heads in eval mode too and drops
    their outputs; the exporters prune such layers. Found from autograd's graph of one forward pass
    in eval mode (:func:`~monai_effq.ptq.graph.forward_graph`, inference memory); only run when an
    exported graph holds fewer integer weights than expected.

    Args:
        network: the fake-quant network (each module's train/eval mode is restored afterwards).
        example_input: an input it accepts.

    Returns:
        their dotted names, in the order they first ran; empty when there is no autograd graph to
        read (an integer output such as an argmax, an operation autograd refuses), as nothing can
        then be told.
    """
    produced: dict[str, list] = {}

    def record(name: str, output: Any) -> None:  # returns None: a forward hook's result replaces the output
        produced.setdefault(name, []).append(output.grad_fn if isinstance(output, torch.Tensor) else None)

    handles = [
        module.register_forward_hook(lambda m, a, o, n=name: record(n, o))
        for name, module in network.named_modules()
        if isinstance(module, QuantizedLayer)
    ]
    device = next((p.device for p in network.parameters()), example_input.device)
    modes = {m: m.training for m in network.modules()}
    try:
        with hooks(handles):
            output = forward_graph(network.eval(), example_input.to(device))
    finally:
        for module, training in modes.items():
            module.train(training)
    if output is None:
        return []
    reached = graph_readers(output)
    # an output without a graph node (not derived from the input) cannot be told apart: it counts as used
    return [n for n, nodes in produced.items() if all(g is not None and g not in reached for g in nodes)]


def _network_of(model: QuantizationResult | nn.Module) -> nn.Module:
    if isinstance(model, QuantizationResult):
        return model.network
    if isinstance(model, nn.Module):
        return model
    raise TypeError(f"expected a QuantizationResult or an nn.Module, got {type(model).__name__}.")


def export_onnx(
    model: QuantizationResult | nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor | Sequence[int],
    *,
    opset: int | None = None,
    reduce_range: bool = False,
    dynamic_spatial: bool = True,
    dynamic_batch: bool | None = None,
    require_quantized: bool = True,
    group_norm: str = "onnx",
    weight_container: str = "auto",
    source_fingerprint: str | None = None,
) -> Path:
    """Write a quantized network as an ONNX QDQ graph with integer weights, atomically.

    Args:
        model: a :class:`~monai_effq.QuantizationResult` or a network holding quantized layers
            (e.g. from :func:`~monai_effq.load_quantized`).
        path: the ``.onnx`` file to write.
        example_input: an input tensor ``(N, C, *spatial)`` or its shape; batch and spatial axes are
            exported as dynamic by default, so sliding windows of any size run.
        opset: ONNX opset (13 or later: per-channel Q/DQ; 21 or later for 4-bit containers; ``None``:
            21). Opsets from 18 are written by torch's current exporter (``dynamo=True``); 13 to 17
            by the TorchScript exporter, which torch has deprecated.
        reduce_range: re-round 8-bit weights into 7 bits for ONNX Runtime on CPUs without VNNI
            (changes those layers' outputs; warned about per layer).
        dynamic_spatial: export the spatial axes as dynamic. Fixed spatial axes export about twice as
            fast (torch's exporter reasons about every dynamic size symbolically: with the batch axis
            alone dynamic, the brats_effq SegResNet exports 1.9x faster on a 2-core AMD EPYC,
            ``benchmarks/export.py``) and suit a file that always runs at one window size, as
            :func:`~monai_effq.deploy.runtime_network` writes it; the runtime networks refuse
            other sizes for such a file (OpenVINO would reshape it and compute wrong output). A
            network whose graph fixes its input size (UNETR) or that torch.export cannot capture
            (DiNTS, then traced) gets fixed spatial axes all the same, with a warning, and
            :data:`FIXED_BY_NETWORK_KEY` in the file's metadata.
        dynamic_batch: export the batch axis as dynamic (``None``: as ``dynamic_spatial``).
        require_quantized: refuse a network without quantized layers (set ``False`` to export an
            FP baseline through the same path).
        group_norm: how group and instance norms are written: ``"onnx"`` (PyTorch's
            ``Reshape → InstanceNormalization`` form) or ``"channel_stats"``
            (:mod:`monai_effq.deploy.norms`), which lets OpenVINO keep its channel-blocked int8
            layout (1.35-1.6x faster on SegResNet whose norms fill whole channel blocks; see
            :func:`~monai_effq.deploy.norms.group_norm_form_for`). ONNX Runtime runs both equally.
            Compile either with static input shapes in OpenVINO, as
            :class:`~monai_effq.deploy.OpenVINONetwork` does: OpenVINO 2026.4's CPU plugin computes
            group-norm networks with bias-free int8 convolutions wrongly for dynamic shapes
            (measured: rel-L2 0.4 in the ``"onnx"`` form with per-channel weights, 0.99 in the
            ``"channel_stats"`` form).
        weight_container: ``"int8"`` stores every quantized weight in int8/uint8; ``"int4"`` stores
            those whose integers fit in 4 bits as ``INT4``/``UINT4`` (opset 21,
            :mod:`monai_effq.deploy.containers`: 2- and 3-bit layers, 4-bit layers off the midrise
            grid) and the rest in int8. Runtimes widen them to int8 when they compile. ``"auto"``
            (the default): ``"int4"`` when a layer has 4-bit or narrower weights and ``opset``
            allows it, else ``"int8"``; the file records the option as resolved (what
            :func:`export_is_current` compares), not which weights it could pack.
        source_fingerprint: the fingerprint of the quantized checkpoint the network was loaded from
            (:func:`~monai_effq.ptq.checkpoint.checkpoint_fingerprint`), recorded in the file's metadata
            under :data:`SOURCE_FINGERPRINT_KEY` so that :func:`~monai_effq.deploy.runtime_network`
            can tell whether the file is stale. ``None``: the fingerprint of ``model`` when it is a
            :class:`~monai_effq.QuantizationResult`, else nothing is recorded.

    Returns:
        the written path.

    Raises:
        ValueError: for a network without quantized layers, a bad example input, an opset below 13
            (21 for 4-bit containers), or an unknown ``group_norm`` or ``weight_container``.
        ImportError: when the ``onnx`` package (the ``deploy`` extra) is missing.
    """
    require(_has_onnx, "onnx", "export_onnx")
    check_output_file(path)  # before the export's minutes, not at its final move
    network = _network_of(model)
    if opset is None or opset >= DYNAMO_MIN_OPSET:
        require(_has_onnxscript, "onnxscript", "export_onnx (torch's ONNX exporter)")
    if weight_container not in ("auto", *WEIGHT_CONTAINERS):
        raise ValueError(f"weight_container must be one of {('auto', *WEIGHT_CONTAINERS)}, got {weight_container!r}.")
    if weight_container == "auto":
        narrow = any(isinstance(m, QuantizedLayer) and m.grid.bits <= 4 for m in network.modules())
        weight_container = "int4" if narrow and (opset is None or opset >= INT4_MIN_OPSET) else "int8"
    if opset is None:
        opset = INT4_MIN_OPSET
    if opset < 13:
        raise ValueError(f"opset must be 13 or later (per-channel QuantizeLinear), got {opset}.")
    if weight_container == "int4" and opset < INT4_MIN_OPSET:
        raise ValueError(f"weight_container='int4' needs opset {INT4_MIN_OPSET} or later, got {opset}.")
    if group_norm not in GROUP_NORM_FORMS:
        raise ValueError(f"group_norm must be one of {GROUP_NORM_FORMS}, got {group_norm!r}.")
    if not isinstance(example_input, torch.Tensor):
        example_input = torch.zeros(tuple(check_integer(s, "each example_input size", low=1) for s in example_input))
    example_input = example_input.detach().as_subclass(torch.Tensor).float()
    if example_input.dim() < 3 or example_input.numel() == 0:
        raise UserInputError(f"example_input must be (N, C, *spatial) with no empty axis, got shape {tuple(example_input.shape)}.")
    n_quantized = sum(isinstance(m, QuantizedLayer) for m in network.modules())
    if require_quantized and n_quantized == 0:
        raise ValueError(
            "the network has no quantized layers: quantize it first (monai_effq.quantize) or load a quantized "
            "checkpoint (monai_effq.load_quantized); pass require_quantized=False to export it in FP."
        )
    # torch's current exporter writes opset 18 and later; older opsets take the TorchScript exporter
    exporter = "dynamo" if opset >= DYNAMO_MIN_OPSET else "torchscript"
    form, reduced = export_form(network, reduce_range, group_norm, exporter)
    if reduced:
        warnings.warn(
            f"reduce_range re-rounded the 8-bit weights of {len(reduced)} layers to 7 bits ({', '.join(reduced[:5])}"
            f"{' ...' if len(reduced) > 5 else ''}): their outputs now differ from the fake-quant network.",
            stacklevel=2,
        )
    form = form.to(example_input.device)
    axes = _axes_names(example_input.dim(), dynamic_spatial if dynamic_batch is None else dynamic_batch, dynamic_spatial)
    batch_asked = 0 in axes
    if exporter == "dynamo":
        proto, captured, reason = _export_with_fewest_fixed_axes(form, example_input, opset, axes)
        if proto is None:
            _refuse_a_misfit(form, example_input)  # an input that does not fit fails any capture: no trace either
            # a trace records the sizes it computes with as constants, so its spatial axes are fixed
            axes = {axis: name for axis, name in axes.items() if axis < 2}
            warnings.warn(
                f"torch.export cannot capture this network ({reason}), so it is traced with PyTorch's TorchScript "
                f"exporter instead, which records the branches the example input takes; the file runs inputs of "
                f"shape {_shape_label(example_input, axes)} only (? marks a dynamic axis).",
                stacklevel=2,
            )
            exporter = "torchscript"
            form = export_form(network, reduce_range, group_norm, exporter)[0].to(example_input.device)
        else:
            folded = count_integer_weights(proto)
            if captured != axes:
                axes = captured
                warnings.warn(
                    f"the network's graph fixes the size of its input ({reason}; UNETR's position embeddings do), so "
                    f"the file runs inputs of shape {_shape_label(example_input, axes)} only (? marks a dynamic axis).",
                    stacklevel=2,
                )
    if exporter == "torchscript":
        proto = _export_with_torchscript(form, example_input, opset, axes)
        folded = fold_weight_quantization(proto)
        drop_initializer_identities(proto)
        if opset > TORCHSCRIPT_MAX_OPSET:
            proto = version_converter.convert_version(proto, opset)
    round_concat_inputs(proto)
    drop_empty_scatters(proto)
    if weight_container == "int4":
        packed, kept = pack_4bit_weights(proto)
        logger.info("4-bit containers for %d weights; %d stay int8 (%s)", len(packed), len(kept), ", ".join(kept[:5]))
    compact_names(proto)
    if source_fingerprint is None and isinstance(model, QuantizationResult):
        source_fingerprint = result_fingerprint(model)
    props = {
        EXPORT_OPTIONS_KEY: f"group_norm={group_norm};reduce_range={reduce_range};weight_container={weight_container}",
        EXAMPLE_SPATIAL_KEY: spatial_size_label(example_input.shape[2:]),
        EXPORTER_VERSION_KEY: exporter_version(),
    }
    if source_fingerprint is not None:
        props[SOURCE_FINGERPRINT_KEY] = source_fingerprint
    if dynamic_spatial and not any(axis >= 2 for axis in axes):
        props[FIXED_BY_NETWORK_KEY] = "1"
    if batch_asked and 0 not in axes:
        props[BATCH_FIXED_BY_NETWORK_KEY] = "1"
    onnx.helper.set_model_props(proto, props)
    if folded != n_quantized:
        unused = layers_off_the_output(network, example_input)
        if folded != n_quantized - len(unused):
            raise RuntimeError(f"expected {n_quantized - len(unused)} integer weight tensors in the exported graph, found {folded}.")
        logger.info(
            "the network's output does not depend on %d quantized layer(s) (%s), so the file leaves them out",
            len(unused), ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else ""),
        )
    onnx.checker.check_model(proto)
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    logger.info("exported %d quantized layers to %s (%.2f MiB)", folded, path, path.stat().st_size / 2**20)
    return path
