"""What the benchmarks print beside their figures: the CPU and the vector flags that decide kernel choice."""

from __future__ import annotations

import os
import platform

__all__ = ["column_loops_summary", "cpu_summary", "openvino_kernels"]


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
    from collections import Counter

    heavy = ("Convolution", "Reduce", "MVN", "Interpolate", "Subgraph", "Eltwise")
    kernels: Counter = Counter()
    for op in compiled_model.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str)
        if layer in heavy and "primitiveType" in info:
            kernels[(layer, info["primitiveType"].astype(str))] += 1
    return ", ".join(f"{layer}: {kernel} x{n}" for (layer, kernel), n in sorted(kernels.items()))
