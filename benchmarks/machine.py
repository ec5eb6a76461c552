"""What the benchmarks print beside their figures: the CPU and the vector flags that decide kernel choice,
the kernels OpenVINO compiled, and where its time goes."""

from __future__ import annotations

import os
import platform
import time
from collections import Counter

__all__ = ["COUNTER_KINDS", "column_loops_summary", "cpu_summary", "openvino_counters", "openvino_kernels"]


def cpu_summary() -> str:
    """The CPU model, its core count and the vector flags that decide kernel choice."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    shown = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8") if f in flags]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(shown) or 'none of avx2/avx512/amx'}"


def column_loops_summary() -> str:
    """Which loops GPTQ, the refinement and ADMM's projection run: Numba-compiled (the ``fast`` extra) or NumPy/torch."""
    from monai_effq.solver.kernels import compiled

    if compiled():
        return "solver loops (GPTQ, refinement, ADMM projection) compiled by Numba"
    return "solver loops in NumPy/torch (no Numba: pip install 'monai-effq[fast]')"


def openvino_kernels(compiled_model) -> str:
    """The kernels OpenVINO compiled for the heavy layer types (``layer: kernel xcount``), e.g.
    ``Convolution: brgconv_avx512_amx_I8 x32``: what an ISA cap or a precision choice really changed."""
    heavy = ("Convolution", "Reduce", "MVN", "Interpolate", "Subgraph", "Eltwise")
    kernels: Counter = Counter()
    for op in compiled_model.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str)
        if layer in heavy and "primitiveType" in info:
            kernels[(layer, info["primitiveType"].astype(str))] += 1
    return ", ".join(f"{layer}: {kernel} x{n}" for (layer, kernel), n in sorted(kernels.items()))


# the kinds openvino_counters sums the executed nodes into, in the order the benchmarks print them
COUNTER_KINDS = ("int8 conv", "float conv", "norm statistics", "elementwise", "reorders", "resampling", "other")


_CONVOLUTIONS = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData", "Deconvolution")
# OpenVINO's CPU plugin names a lone elementwise node by its operation, fused ones "Subgraph" or "Eltwise"
_ELEMENTWISE = (
    "Subgraph", "Eltwise", "Add", "Subtract", "Multiply", "Divide", "Maximum", "Minimum", "SquaredDifference", "Power",
    "Sqrt", "Exp", "Abs", "Relu", "LeakyRelu", "PRelu", "Clamp", "Sigmoid", "Tanh", "Swish", "Gelu", "Elu", "Erf",
    "FakeQuantize", "Convert",
)


def _counter_kind(layer: str, kernel: str) -> str:
    if layer in _CONVOLUTIONS:
        # int8 kernels end in I8/i8/u8 (jit_avx2_I8, brgconv_avx512_amx_I8), float ones in f32/bf16
        return "int8 conv" if kernel.lower().endswith(("_i8", "_u8")) else "float conv"
    if layer == "MVN" or layer.startswith("Reduce"):
        return "norm statistics"
    if layer in _ELEMENTWISE:
        return "elementwise"
    return {"Reorder": "reorders", "Interpolate": "resampling"}.get(layer, "other")


def openvino_counters(compiled_model, inputs, rounds: int = 3) -> tuple[dict[str, float], float]:
    """OpenVINO's own per-node time, summed by kind (``COUNTER_KINDS``), in milliseconds: where a
    compiled graph spends its time, which wall time alone cannot say.

    Args:
        compiled_model: an ``ov.CompiledModel`` compiled with ``{"PERF_COUNT": True}``.
        inputs: what its infer request takes (``{0: array}``).
        rounds: requests run; the one whose counters sum least is reported, as the least disturbed.

    Returns:
        the milliseconds per kind (every kind present, 0.0 where none ran) and that request's wall time in seconds.
    """
    request = compiled_model.create_infer_request()
    best: tuple[float, dict[str, float], float] | None = None
    for _ in range(max(1, rounds)):
        start = time.perf_counter()
        request.infer(inputs)
        wall = time.perf_counter() - start
        kinds = dict.fromkeys(COUNTER_KINDS, 0.0)
        for node in request.profiling_info:
            if node.status == node.Status.EXECUTED:
                kinds[_counter_kind(node.node_type, node.exec_type)] += node.real_time.total_seconds() * 1e3
        total = sum(kinds.values())
        if best is None or total < best[0]:
            best = (total, kinds, wall)
    return best[1], best[2]
