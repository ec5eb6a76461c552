"""ONNX files run by OpenVINO or ONNX Runtime, as torch modules that MONAI's inferers and engines accept.

A runtime network takes a torch tensor ``(N, C, *spatial)`` and returns a torch tensor on the same
device, so it is the ``network`` of ``SlidingWindowInferer``, ``SupervisedEvaluator`` and the bundles'
workflows unchanged. It has no parameters; ``.eval()``/``.to()`` are harmless.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from monai.utils import convert_to_dst_type

from monai_effq.deploy.containers import widen_4bit_weights
from monai_effq.deploy.norms import group_norm_form_for
from monai_effq.deploy.transposed_inputs import shift_transposed_inputs
from monai_effq.deploy.tensorrt import tensorrt_network
from monai_effq.deploy.export import (
    BATCH_FIXED_BY_NETWORK_KEY,
    EXAMPLE_SPATIAL_KEY,
    EXPORT_OPTIONS_KEY,
    EXPORTER_VERSION_KEY,
    FIXED_BY_NETWORK_KEY,
    REDUCED_WEIGHT_RANGE,
    SOURCE_FINGERPRINT_KEY,
    export_onnx,
    exporter_version,
    require,
    spatial_size_label,
)
from monai_effq.ptq.checkpoint import checkpoint_fingerprint, load_quantized
from monai_effq.utils.fingerprint import DIGEST_CHARS
from monai_effq.utils.errors import MissingInputError, UserInputError, check_inference_input
from monai_effq.utils.imports import deferred_import

ort, _has_ort = deferred_import("onnxruntime")
ov, _has_ov = deferred_import("openvino")
onnx, _has_onnx = deferred_import("onnx")
numpy_helper, _ = deferred_import("onnx", name="numpy_helper")

__all__ = [
    "BUILT_RUNTIMES",
    "RUNTIMES",
    "OnnxRuntimeNetwork",
    "OpenVINONetwork",
    "cpu_has_vnni",
    "float_precision_for",
    "int8_kernels_have_vnni",
    "export_is_current",
    "export_options",
    "exported_from",
    "runtime_network",
    "widest_int8_weight",
]

logger = logging.getLogger("monai_effq")


def cpu_has_vnni() -> bool | None:
    """Whether this CPU has the VNNI dot-product instructions (``None`` when it cannot be told).

    Read from ``/proc/cpuinfo`` because no runtime says it: OpenVINO's CPU plugin appends ``INT8`` to
    ``OPTIMIZATION_CAPABILITIES`` on every CPU and ``WINOGRAD`` on every AVX-512 one (2026.4 reports
    ``BF16, WINOGRAD, FP32, INT8, BIN, EXPORT_IMPORT`` on this project's VNNI CPU; an AVX-512 CPU
    without VNNI gets the same list but ``BF16``), torch's ``get_cpu_capability()`` says ``AVX512``
    or ``AVX2`` only, and ONNX Runtime lists its CPU device without instruction sets. Both runtimes'
    int8 kernels need the answer (see ``reduce_range`` in :func:`~monai_effq.export_onnx`).

    Returns:
        ``True``/``False`` from ``/proc/cpuinfo`` on Linux, ``None`` elsewhere.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


# oneDNN's ISA caps that leave out the VNNI instructions (its dispatcher-control names)
_CAPS_WITHOUT_VNNI = frozenset({"SSE41", "AVX", "AVX2", "AVX512_CORE"})


def int8_kernels_have_vnni(runtime: str) -> bool | None:
    """Whether ``runtime``'s int8 CPU kernels will use VNNI here (``None`` when it cannot be told).

    The CPU's flags (:func:`cpu_has_vnni`), and for OpenVINO also the ISA cap its oneDNN honours
    (``ONEDNN_MAX_CPU_ISA``, formerly ``DNNL_MAX_CPU_ISA``): capped at ``AVX2`` or ``AVX512_CORE``,
    its convolutions add products in 16 bits even on a VNNI CPU. ONNX Runtime picks its kernels
    from the CPU alone.

    Args:
        runtime: ``"openvino"`` or ``"onnxruntime"``.

    Returns:
        ``True``/``False``, or ``None`` where the CPU's flags cannot be read.
    """
    has_vnni = cpu_has_vnni()
    if runtime == "openvino" and has_vnni:
        cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
        if cap.strip().upper() in _CAPS_WITHOUT_VNNI:
            return False
    return has_vnni


def float_precision_for(core: Any, device: str = "CPU") -> str | None:
    """The precision OpenVINO should run the layers left in floating point in, on ``device``.

    bfloat16 where the CPU computes it natively (OpenVINO's capability query reports ``BF16``:
    AVX-512 BF16 or AMX), which is about 1.3x faster for the int8 networks here and moves outputs
    by about 1% rel-L2; f32 on other CPUs, where bf16 would be emulated. Other devices keep
    OpenVINO's own default (``None``).

    Args:
        core: an ``openvino.Core``.
        device: the OpenVINO device name.

    Returns:
        ``"bf16"``, ``"f32"`` or ``None``.
    """
    if device.split(".")[0].upper() != "CPU":
        return None
    capabilities = core.get_property(device, "OPTIMIZATION_CAPABILITIES")
    return "bf16" if "BF16" in capabilities else "f32"


def widest_int8_weight(path: str | os.PathLike) -> int:
    """Largest magnitude stored in the int8 weight tensors of an ONNX file (0 when there are none).

    Args:
        path: the ONNX file.

    Returns:
        the largest ``|v|`` over int8 initializers.
    """
    require(_has_onnx, "onnx", "widest_int8_weight")
    model = onnx.load(str(path), load_external_data=False)
    widest = 0
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.INT8 and len(init.dims) > 1:
            widest = max(widest, int(np.abs(numpy_helper.to_array(init).astype(np.int32)).max()))
    return widest


# OpenVINO's virtual devices, which name others after a colon ("AUTO:GPU,CPU")
_DEVICE_GROUPS = ("AUTO", "MULTI", "HETERO", "BATCH")


def error_text(err: BaseException, limit: int = 200) -> str:
    """The line of a runtime's error that says what is wrong.

    OpenVINO's errors open with the source line that threw them (``Exception from
    src/inference/src/cpp/core.cpp:117:``), which says nothing; the cause follows.

    Args:
        err: the runtime's exception.
        limit: the most characters kept.

    Returns:
        the first line that is not such a location, else the first line.
    """
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    said = [line for line in lines if not re.fullmatch(r"(Exception from|Check ')?.*[\\/][\w.]+\.(cpp|hpp|h):\d+:?", line)]
    return ((said or lines or [type(err).__name__])[0])[:limit]


def _check_choice(value: Any, name: str, choices: list[str], prefix: bool = False) -> str:
    """``value`` as one of ``choices`` (matched without regard to case and outer spaces), else one clear error.

    Args:
        value: what the caller gave.
        name: the option, for the message.
        choices: the values OpenVINO takes.
        prefix: match only what comes before a ``.`` or ``:`` and keep the rest (``"GPU.1"``, ``"AUTO:GPU,CPU"``).

    Returns:
        the choice as OpenVINO spells it, with the rest as given.

    Raises:
        UserInputError: naming the option and the values it takes.
    """
    text = str(value).strip()
    head, rest = re.match(r"([^.:]*)(.*)", text).groups() if prefix else (text, "")
    for choice in choices:
        if head.upper() == choice.upper():
            return choice + rest
    raise UserInputError(f"OpenVINONetwork {name}={value!r} is not one OpenVINO takes here: choose from {choices}.")


class _RuntimeNetwork(nn.Module):
    """What both runtimes share: the file check, the input check and tensor conversion."""

    runtime = ""  # the runtime's name in messages
    key = ""  # its key in RUNTIMES

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingInputError(
                f"ONNX model {self.path} does not exist: write it with monai_effq.export_onnx (or the bundle's export run)."
            )
        # the file's input shape, None on dynamic axes (set by each runtime once it has read the file)
        self.input_shape: tuple[int | None, ...] | None = None

    @property
    def in_channels(self) -> int | None:
        """The input channels the file fixes (``None`` when the axis is dynamic or the shape unknown)."""
        return self.input_shape[1] if self.input_shape is not None and len(self.input_shape) > 1 else None

    def _load_error(self, err: Exception) -> UserInputError:
        return UserInputError(
            f"{self.runtime} cannot read {self.path} ({type(err).__name__}: {error_text(err)}); "
            "the file is corrupt or not ONNX: export it again with monai_effq.export_onnx."
        )

    def _check(self, x: torch.Tensor) -> np.ndarray:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch tensor, got {type(x).__name__}.")
        if x.is_meta:
            raise UserInputError(
                f"{type(self).__name__} was given a tensor on the 'meta' device, which holds no values to run "
                f"{self.path.name} on: give it the image as a CPU tensor."
            )
        if self.input_shape is not None and x.dim() != len(self.input_shape):
            raise UserInputError(
                f"{self.path.name} takes inputs of {len(self.input_shape)} axes (N, C, *spatial), got shape "
                f"{tuple(x.shape)}: give the batch and channel axes (x[None] adds a batch axis to one image)."
            )
        if self.in_channels is not None and (x.dim() < 2 or x.shape[1] != self.in_channels):
            raise UserInputError(
                f"{self.path.name} expects {self.in_channels} input channels (N, {self.in_channels}, *spatial), "
                f"got shape {tuple(x.shape)}: check the transforms that build the image."
            )
        self._check_fixed_axes(tuple(x.shape))
        check_inference_input(x, f"the input to {self.path.name}")
        return np.ascontiguousarray(x.detach().as_subclass(torch.Tensor).float().cpu().numpy())

    def _check_fixed_axes(self, shape: tuple[int, ...]) -> None:
        """Refuse an input shape that differs from the file on an axis the file fixes."""
        fixed = self.input_shape
        if fixed is None or len(shape) != len(fixed) or all(f is None or f == s for f, s in zip(fixed, shape)):
            return
        # OpenVINO would reshape such a file to the input without a word, and the sizes its graph holds
        # would then compute wrong output (rel-L2 0.48 against 0.008 on a SegResNet's channel_stats norms)
        declared = "x".join("?" if f is None else str(f) for f in fixed)
        raise UserInputError(
            f"{self.path.name} was exported for inputs of shape {declared} (? marks a dynamic axis) and cannot run a "
            f"{'x'.join(str(s) for s in shape)} input: run it on inputs of that shape (a sliding-window inferer's "
            "roi_size as its spatial sizes), or export again with an example input of the size you run "
            "(monai_effq.export_onnx's defaults keep the batch and spatial axes dynamic)."
        )

    def _warn_if_saturating(self) -> None:
        """Warn where this CPU's int8 kernels may saturate on the file's 8-bit weights.

        Without VNNI, int8 convolutions multiply uint8 activations by int8 weights with
        ``vpmaddubsw``, which adds each pair of products in 16 bits and saturates. ONNX Runtime's
        and OpenVINO's kernels both do (OpenVINO with oneDNN capped at AVX2 moved an untrained
        SegResNet's output 0.30 rel-L2 away from the fake-quant network, against 0.03 with VNNI;
        the trained bundles moved 0.05 and 0.005 with over 99.9% of labels kept). 7-bit weights
        cannot saturate: their pairs stay below 2¹⁵. Quantized on such a grid, they are fitted to it
        rather than rounded again at export; that takes the signed (or symmetric) grid, since 7-bit
        midrise weights (the ``"auto"`` grid) are stored as int8 up to ±127, and 7-bit first and
        last layers, which default to 8 bits. On a real AVX2 CPU the brats SegResNet quantized so
        ran in OpenVINO 2.85e-2 rel-L2 from its fake-quant network, as in ONNX Runtime (2.80e-2),
        where at W8A8 OpenVINO was 3.29e-2 and ONNX Runtime 1.62e-2.
        """
        if self.path.suffix.lower() != ".onnx" or not _has_onnx or int8_kernels_have_vnni(self.key) is not False:
            return  # an OpenVINO IR file holds its weights in another format
        if widest_int8_weight(self.path) > REDUCED_WEIGHT_RANGE[1] + 1:
            warnings.warn(
                f"{self.path.name} has int8 weights beyond 7 bits and {self.runtime}'s int8 kernels on this CPU have "
                "no VNNI (the CPU lacks it, or ONEDNN_MAX_CPU_ISA leaves it out): they add pairs of products in 16 "
                "bits, which can saturate and move the output; compare it with the fake-quant network on your data, "
                "and where they differ, quantize every layer on a 7-bit grid that cannot saturate (weight_bits=7, "
                "weight_grid='signed', first_layer_bits=7, last_layer_bits=7) or export with reduce_range=True (the "
                "8-bit weights rounded again to 7 bits).",
                stacklevel=3,
            )

    def _run(self, array: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = self._check(x)
        try:
            out = self._run(array)
        except Exception as err:
            mismatch = self._size_mismatch(tuple(array.shape[2:]), err)
            if mismatch is None:
                raise
            raise UserInputError(mismatch) from err
        # a MetaTensor's image metadata carried over, as a torch network carries it: without it MONAI's Invertd and
        # SaveImaged (under any inferer but the sliding window's, which restores it) can neither invert nor name the mask
        return convert_to_dst_type(torch.from_numpy(out).to(x.device), x, dtype=torch.float32)[0]

    def _size_mismatch(self, spatial: tuple[int, ...], err: Exception) -> str | None:
        """The failure ``err`` of a run at ``spatial``, with the size the file was exported at when that differs, else ``None``.

        A network whose graph depends on its input size (SwinUNETR's window partition) keeps the
        example's window counts in its reshapes, though its axes are named dynamic; the runtimes then
        fail deep in the graph, naming a node. The file records the example's size (read only here).
        Files whose axes are fixed are refused before they run (:meth:`_check`).
        """
        exported = _metadata(self.path).get(EXAMPLE_SPATIAL_KEY) if self.path.suffix == ".onnx" and _has_onnx else None
        if not exported or exported == spatial_size_label(spatial):
            return None
        reason = error_text(err, 300) if str(err).strip() else type(err).__name__
        # the largest power of two dividing every side the file was exported on: a stride-2 U-Net's input sides
        # must be multiples of its downsampling factor, which is no larger
        sides = [int(v) for v in exported.split("x")]
        factor = min(math.gcd(*sides) & -math.gcd(*sides), 32)  # no segmentation U-Net downsamples more
        odd = min((v for v in spatial if v % factor), key=lambda v: v & -v, default=None)
        divisible = (
            f" Its side {odd} divides by {odd & -odd} at most, where every side of the export divides by {factor}: a "
            "U-Net runs only sides that are multiples of its downsampling factor (2 to the power of its stride-2 "
            "stages), so give the sliding-window inferer a roi_size whose sides are, or pad the input to them "
            "(monai.transforms.DivisiblePadd)."
            if odd is not None
            else ""
        )
        return (
            f"{self.runtime} could not run {self.path.name} on a {spatial_size_label(spatial)} input ({reason}); it was "
            f"exported on {exported}.{divisible} A network whose graph depends on its input size (window attention such "
            f"as SwinUNETR's) runs at that size only: give the sliding-window inferer roi_size {exported.replace('x', ', ')}, "
            "or export again with an example input of the size you run."
        )

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}"


class OnnxRuntimeNetwork(_RuntimeNetwork):
    """An ONNX file run by ONNX Runtime.

    Args:
        path: the ONNX file.
        providers: execution providers (CPU by default).
        optimize: use ONNX Runtime's graph optimisations (which fuse Q/DQ into integer kernels);
            ``False`` runs the graph node by node, reproducing the fake-quant network exactly.
        threads: intra-op threads (``None``: ONNX Runtime's default).

    Raises:
        MissingInputError: (a ``FileNotFoundError``) when the file is missing.
        UserInputError: (a ``ValueError``) when it cannot be read.
        ImportError: when onnxruntime is not installed.
    """

    runtime = "ONNX Runtime"
    key = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike,
        providers: list[str] | None = None,
        optimize: bool = True,
        threads: int | None = None,
    ) -> None:
        require(_has_ort, "onnxruntime", "OnnxRuntimeNetwork")
        super().__init__(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if not optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
        # MatMulAddFusion turns a linear layer on tokens (N, T, C) into a Gemm on (N*T, C); on an
        # int8 (symmetric-grid) input, the Q/DQ pair it moves past its reshape keeps output_dtype int8
        # after the S8-to-U8 pass gave it a uint8 zero point, and the session refuses to load
        # (onnxruntime 1.32; microsoft/onnxruntime#25526). The Q/DQ MatMul still runs as an integer
        # kernel without it, and convolutions never use it.
        disabled = ["MatMulAddFusion"] if optimize else None
        providers = [providers] if isinstance(providers, str) else list(providers or ["CPUExecutionProvider"])
        unknown = [p for p in providers if p not in ort.get_available_providers()]
        if unknown:  # ONNX Runtime would print a banner and fall back to the CPU
            raise UserInputError(
                f"ONNX Runtime here has no execution provider {', '.join(map(repr, unknown))}: choose from "
                f"{ort.get_available_providers()} (a GPU provider needs the onnxruntime-gpu package and a GPU)."
            )
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=providers, disabled_optimizers=disabled
            )
        except Exception as err:  # onnxruntime raises its own exception types
            raise self._load_error(err) from err
        self.input_shape = tuple(d if isinstance(d, int) else None for d in self.session.get_inputs()[0].shape)
        self.input_name = self.session.get_inputs()[0].name
        if optimize:
            self._warn_if_saturating()

    def _run(self, array: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: array})[0]


class OpenVINONetwork(_RuntimeNetwork):
    """An ONNX file compiled and run by OpenVINO, for each input shape it is given.

    OpenVINO compiles a model for static shapes faster than for dynamic ones, and its CPU plugin
    (2026.4) computes some valid graphs wrongly with dynamic shapes (see ``group_norm`` in
    :func:`~monai_effq.export_onnx`), so the file is compiled once per input shape and the last
    ``max_shapes`` compilations are kept; a sliding-window inferer needs one or two. Calls from several
    threads (a server answering requests in parallel) take turns on each compiled shape.

    Args:
        path: the ONNX file.
        device: OpenVINO device (``"CPU"``, ``"GPU"``, ...).
        threads: inference threads (``None``: OpenVINO's default).
        hint: OpenVINO performance hint (``"LATENCY"`` suits one volume at a time).
        precision: precision of the layers left in floating point. ``"auto"`` (the default) asks
            :func:`float_precision_for`: bf16 on CPUs that compute it natively, f32 on others, so
            results are reproducible per CPU kind; ``"f32"`` gives the same results on every CPU.
            The precision a compiled shape really runs in is :attr:`chosen_precision`.
        max_shapes: how many compiled input shapes to keep.

    Raises:
        MissingInputError: (a ``FileNotFoundError``) when the file is missing.
        UserInputError: (a ``ValueError``) when it cannot be read, or (at the first call with a shape) compiled.
        ImportError: when openvino is not installed.
    """

    runtime = "OpenVINO"
    key = "openvino"

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "CPU",
        threads: int | None = None,
        hint: str = "LATENCY",
        precision: str = "auto",
        max_shapes: int = 4,
    ) -> None:
        require(_has_ov, "openvino", "OpenVINONetwork")
        super().__init__(path)
        self.core = ov.Core()
        devices = dict.fromkeys(d.split(".")[0] for d in self.core.available_devices)  # "GPU.0", "GPU.1": "GPU"
        self.device = _check_choice(device, "device", [*devices, *_DEVICE_GROUPS], prefix=True)
        hint = _check_choice(hint, "hint", ["LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"])
        if precision is not None:
            precision = _check_choice(precision, "precision", ["auto", "bf16", "f16", "f32"])
        device = self.device
        self.config: dict[str, Any] = {"PERFORMANCE_HINT": hint}
        if precision == "auto":
            precision = float_precision_for(self.core, device)
        if precision is not None:
            self.config["INFERENCE_PRECISION_HINT"] = precision
        self.chosen_precision: str | None = None
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self.max_shapes = max(1, int(max_shapes))
        try:
            self.model = self.core.read_model(self._model_source())
        except Exception as err:  # openvino raises RuntimeError subclasses of its own
            raise self._load_error(err) from err
        shape = self.model.inputs[0].get_partial_shape()
        if shape.rank.is_static:
            self.input_shape = tuple(d.get_length() if d.is_static else None for d in shape)
        if device.split(".")[0].upper() == "CPU":
            self._warn_if_saturating()
        self._requests: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        # one infer request per shape, which OpenVINO runs one call at a time ("Infer Request is busy"), and whose
        # output memory the next call overwrites: calls from several threads (a server's) take turns
        self._lock = threading.Lock()

    def _load_error(self, err: Exception) -> UserInputError:
        # OpenVINO's ONNX reader lists the operators it could not convert at the end of a long report
        unconverted = re.search(r"(?:Conversion is failed for|No conversion rule found for operations):\s*(.+)", str(err))
        if unconverted is None:
            return super()._load_error(err)
        return UserInputError(
            f"{self.runtime} cannot convert {unconverted.group(1).strip()} in {self.path}: the file is ONNX, but this "
            f"{self.runtime} version cannot read that operator as written; run the file with ONNX Runtime "
            "(OnnxRuntimeNetwork, --runtime onnxruntime), or export it again with this version of monai_effq.export_onnx."
        )

    def _model_source(self) -> str | bytes:
        """The file's path, or its bytes with 4-bit weights widened to int8 (OpenVINO's int8 kernels)
        and, on CPUs without AVX-512, transposed convolutions' inputs given a zero point
        (:func:`~monai_effq.deploy.transposed_inputs.shift_transposed_inputs`)."""
        if self.path.suffix.lower() != ".onnx" or not _has_onnx:
            return str(self.path)
        try:
            model = onnx.load(str(self.path))
        except Exception:  # a corrupt file: OpenVINO reads the path and says what is wrong with it
            return str(self.path)
        changed = widen_4bit_weights(model)
        if torch.backends.cpu.get_cpu_capability() != "AVX512":
            changed += shift_transposed_inputs(model)
        if not changed:
            return str(self.path)
        return model.SerializeToString()

    def request_for(self, shape: tuple[int, ...]) -> Any:
        """The infer request of the model compiled for ``shape`` (compiled on first use).

        Args:
            shape: the input shape.

        Returns:
            an OpenVINO ``InferRequest``.
        """
        if shape in self._requests:
            self._requests.move_to_end(shape)
            return self._requests[shape]
        self._check_fixed_axes(tuple(shape))
        model = self.model.clone()
        try:
            model.reshape({0: list(shape)})
            compiled = self.core.compile_model(model, self.device, self.config)
        except Exception as err:  # openvino raises RuntimeError subclasses of its own
            raise UserInputError(
                f"OpenVINO cannot compile {self.path.name} for input shape {shape} on {self.device} with {self.config} "
                f"({type(err).__name__}: {error_text(err)}): check the device and options, "
                f"and that the file accepts this shape (its input is {self.model.inputs[0].get_partial_shape()})."
            ) from err
        chosen = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if chosen != self.chosen_precision:
            logger.info("OpenVINO runs the float parts of %s in %s on %s", self.path.name, chosen, self.device)
            self.chosen_precision = chosen
        self._requests[shape] = compiled.create_infer_request()
        while len(self._requests) > self.max_shapes:
            self._requests.popitem(last=False)
        return self._requests[shape]

    def _run(self, array: np.ndarray) -> np.ndarray:
        with self._lock:
            request = self.request_for(tuple(array.shape))
            # the request reads the array in place and returns views of its own output memory: by default
            # it copied the input and all outputs on every call (6 ms of 250 at 1x4x128^3). The one copy
            # left is needed, since the next call overwrites that memory.
            request.infer({0: array}, share_inputs=True, share_outputs=True)
            return request.get_output_tensor(0).data.copy()


RUNTIMES = {cls.key: cls for cls in (OpenVINONetwork, OnnxRuntimeNetwork)}
# runtimes that build from the quantized checkpoint through MONAI's trt_compile, not from the ONNX file
BUILT_RUNTIMES = ("tensorrt",)

def _header(path: str | os.PathLike) -> tuple[dict[str, str], list]:
    """An ONNX file's metadata_props and its input's dims, from one read (both empty when it is missing or unreadable)."""
    require(_has_onnx, "onnx", "reading ONNX metadata")
    if not Path(path).is_file():
        return {}, []
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a corrupt file has no metadata; it is exported again or reported by the runtime
        return {}, []
    dims = list(model.graph.input[0].type.tensor_type.shape.dim) if model.graph.input else []
    return {p.key: p.value for p in model.metadata_props}, dims


def _metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata_props of an ONNX file (empty when it is missing or unreadable)."""
    return _header(path)[0]


def _spatial_axes_fixed(dims: list) -> bool:
    """Whether an input's dims (:func:`_header`) fix every spatial axis."""
    return len(dims) > 2 and all(d.HasField("dim_value") for d in dims[2:])


def _batch_axis_dynamic(dims: list) -> bool:
    """Whether an input's dims (:func:`_header`) take any batch size."""
    return len(dims) > 0 and not dims[0].HasField("dim_value")


def export_options(path: str | os.PathLike) -> str | None:
    """The export options recorded in an ONNX file by :func:`~monai_effq.export_onnx` (``None`` if none).

    Args:
        path: the ONNX file.

    Returns:
        e.g. ``"group_norm=onnx;reduce_range=False;weight_container=int8"``.
    """
    return _metadata(path).get(EXPORT_OPTIONS_KEY)


def exported_from(path: str | os.PathLike) -> str | None:
    """The fingerprint of the quantized checkpoint an ONNX file was exported from (``None`` if not recorded).

    Args:
        path: the ONNX file.

    Returns:
        what :func:`~monai_effq.ptq.checkpoint.checkpoint_fingerprint` gave for that checkpoint.
    """
    return _metadata(path).get(SOURCE_FINGERPRINT_KEY)


def _parse_options(text: str | None) -> dict[str, str]:
    """``"a=1;b=2"`` as a dict (empty for ``None``)."""
    return dict(item.split("=", 1) for item in (text or "").split(";") if "=" in item)


def _engine_base(onnx_path: Path, fingerprint: str) -> Path:
    """The base path of the TensorRT engine of a checkpoint: named after its fingerprint, beside ``onnx_path``.

    MONAI's ``trt_compile`` rebuilds a cached engine only when a ``timestamp`` is newer than the
    engine file, so a copied-in checkpoint with an older time would keep an old engine; an engine named
    after the checkpoint's content is found exactly when it was built from it. Engines of other
    checkpoints (and an unnamed one from before) are removed.
    """
    base = onnx_path.with_name(f"{onnx_path.stem}.{fingerprint}")
    cached = re.compile(rf"{re.escape(onnx_path.stem)}(\.[0-9a-f]{{{DIGEST_CHARS}}})?\.plan")
    for plan in onnx_path.parent.glob(f"{onnx_path.stem}*.plan"):
        if cached.fullmatch(plan.name) and plan.name != f"{base.name}.plan":
            plan.unlink(missing_ok=True)
    return base


def export_is_current(
    onnx_path: str | os.PathLike,
    fingerprint: str,
    example_shape: Sequence[int] | None = None,
    fixed_window: bool = True,
    options: Mapping[str, Any] | None = None,
) -> bool:
    """Whether an ONNX file can be run as the export of a quantized network instead of exporting it again.

    It can when this exporter wrote it (:func:`~monai_effq.deploy.export.exporter_version`: this release, source
    and torch), from the quantized network of ``fingerprint`` (the
    checkpoint fingerprint :func:`~monai_effq.export_onnx` records), on ``example_shape``'s spatial size
    (a window-attention graph runs at that size only), with a dynamic batch axis (unless the network's
    graph fixed it), with spatial axes that
    run every input size unless ``fixed_window`` (axes that the network's own graph fixes, such as
    UNETR's spatial ones, are fixed however it is exported), and with the export ``options`` given (e.g. ``{"group_norm": "onnx"}``);
    the options not given are taken as the file records them.

    Args:
        onnx_path: the ONNX file (missing or unreadable: not current).
        fingerprint: the fingerprint of the quantized checkpoint or result it should come from
            (:func:`~monai_effq.ptq.checkpoint.checkpoint_fingerprint`, :func:`~monai_effq.ptq.checkpoint.result_fingerprint`).
        example_shape: the input shape ``(N, C, *spatial)`` it would be exported with (``None``: any).
        fixed_window: every input has ``example_shape``'s spatial size.
        options: :func:`~monai_effq.export_onnx` options the file must have been exported with
            (``group_norm``, ``reduce_range``, ``weight_container``), by name; ``None``: any.

    Returns:
        ``True`` when the file runs what exporting again would write.
    """
    metadata, dims = _header(onnx_path)  # one read: a fold file of a real nnU-Net is tens of MB
    if metadata.get(SOURCE_FINGERPRINT_KEY) != fingerprint or metadata.get(EXPORTER_VERSION_KEY) != exporter_version():
        return False
    size = None if example_shape is None else spatial_size_label(list(example_shape)[2:])
    if size is not None and metadata.get(EXAMPLE_SPATIAL_KEY, size) != size:
        return False
    if not fixed_window and _spatial_axes_fixed(dims) and FIXED_BY_NETWORK_KEY not in metadata:
        return False
    if not _batch_axis_dynamic(dims) and BATCH_FIXED_BY_NETWORK_KEY not in metadata:
        return False
    recorded = _parse_options(metadata.get(EXPORT_OPTIONS_KEY))
    return all(recorded.get(name) == str(value) for name, value in (options or {}).items())


def runtime_network(
    runtime: str,
    onnx_path: str | os.PathLike,
    quantized_path: str | os.PathLike | None = None,
    network: nn.Module | None = None,
    example_shape: Sequence[int] | None = None,
    fixed_window: bool = True,
    **options: Any,
) -> nn.Module:
    """The runtime network of a quantized checkpoint, exporting its ONNX first when missing or stale.

    Bundles call this so that one command goes from ``model_w4a8.pt`` to an OpenVINO network; the
    ONNX file is written beside the checkpoint and re-exported whenever it was exported from another
    checkpoint than this one (compared by the fingerprint of the checkpoint's content, which the export
    records: a checkpoint copied in with an older modification time is still told apart) or, for
    OpenVINO, the file records another group-norm form than the one OpenVINO runs fastest for
    this network (:func:`~monai_effq.deploy.norms.group_norm_form_for`), or the file was exported on
    another spatial size than ``example_shape``'s (a window-attention network such as SwinUNETR runs at
    its example's size only), or by another monai-effq release, or with a fixed batch axis that the
    network did not force (:func:`export_is_current`). ONNX Runtime runs any form. A file that stands
    keeps the other export options it was written with (``reduce_range``, ``weight_container``); one
    exported again gets the defaults.

    ``"tensorrt"`` builds the checkpoint into a TensorRT engine instead
    (:func:`~monai_effq.deploy.tensorrt.tensorrt_network`, cached beside ``onnx_path`` as
    ``<stem>.<checkpoint fingerprint>.plan``; needs a CUDA GPU and a checkpoint quantized with
    ``act_grid="symmetric"``).

    Args:
        runtime: ``"openvino"``, ``"onnxruntime"`` or ``"tensorrt"``.
        onnx_path: the ONNX file to run (and to write).
        quantized_path: the quantized checkpoint it is exported from (``None``: run ``onnx_path`` as is).
        network: a fresh FP network of the checkpoint's architecture (needed with ``quantized_path``).
        example_shape: an input shape ``(N, C, *spatial)`` for the export, the inferer's window.
        fixed_window: every input has ``example_shape``'s spatial size (a sliding-window inferer's
            ``roi_size``): export the spatial axes fixed and the batch axis dynamic, about twice as
            fast as with symbolic sizes (``benchmarks/export.py``); a file whose spatial axes are
            fixed then runs at that size only. ``False``: keep them dynamic (whole volumes of any
            size), exporting again a file whose spatial axes are fixed.
        options: passed to the runtime network.

    Returns:
        an :class:`OpenVINONetwork`, :class:`OnnxRuntimeNetwork` or
        :class:`~monai_effq.deploy.tensorrt.TensorRTNetwork`.

    Raises:
        ValueError: for an unknown runtime, a missing argument or a damaged checkpoint.
        MissingInputError: (a ``FileNotFoundError``) when the checkpoint is missing.
    """
    if runtime not in RUNTIMES and runtime not in BUILT_RUNTIMES:
        raise UserInputError(f"runtime must be one of {sorted(RUNTIMES) + list(BUILT_RUNTIMES)}, got {runtime!r}.")
    onnx_path = Path(onnx_path)
    source = None if quantized_path is None else Path(quantized_path)
    if source is not None and not source.is_file():
        raise MissingInputError(f"quantized checkpoint {source} does not exist: run the bundle's quantize workflow first.")
    fingerprint = None if source is None else checkpoint_fingerprint(source)
    if runtime == "tensorrt":
        if source is None or network is None:
            raise ValueError("runtime 'tensorrt' builds from the quantized checkpoint: pass quantized_path and network.")
        return tensorrt_network(load_quantized(source, network), _engine_base(onnx_path, fingerprint), **options)
    if source is not None:
        # only OpenVINO's speed depends on the group-norm form; other options a user exported with stay
        group_norm = (
            group_norm_form_for(runtime, network, options.get("precision", "auto"))
            if runtime == "openvino" and network is not None
            else None
        )
        if not export_is_current(onnx_path, fingerprint, example_shape, fixed_window, None if group_norm is None else {"group_norm": group_norm}):
            if network is None or example_shape is None:
                raise ValueError("exporting a quantized checkpoint needs the FP `network` and an `example_shape`.")
            # a window's file is exported again for another window anyway, and torch's exporter writes it
            # about twice as fast with its spatial axes fixed (benchmarks/export.py)
            export_onnx(
                load_quantized(source, network),
                onnx_path,
                list(example_shape),
                dynamic_spatial=not fixed_window,
                dynamic_batch=True,
                group_norm=group_norm or "onnx",
                source_fingerprint=fingerprint,
            )
    return RUNTIMES[runtime](onnx_path, **options)
