"""Full float32 arithmetic on CUDA GPUs for the steps whose results are compared, not just used.

PyTorch runs float32 convolutions on CUDA GPUs in TF32 by default (a 10-bit mantissa, about 5e-4
relative error per product): fine for training and inference, but PTQ compares outputs. On an H200
the LiTS UNet's quantized network came out larger than on a CPU by exactly its 13 BatchNorms' state:
most likely the BatchNorm folding check (output unchanged to 1e-4 of its largest magnitude) failed
under TF32 and the folds were undone. The layers' FP targets, which the solver fits, carry TF32's
error as well. CPUs compute float32 in float32 unless a user opts into lower precision, which this
also turns off inside the block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["ieee_float32"]


def _precision_settings() -> list[tuple[object, str, object]]:
    """``(namespace, attribute, full-precision value)`` of each switch this torch has."""
    # torch 2.9 replaced the allow_tf32 flags by fp32_precision; mixing the two APIs is an error there
    new = [
        (torch.backends.cudnn.conv, "fp32_precision", "ieee"),
        (torch.backends.cuda.matmul, "fp32_precision", "ieee"),
        (getattr(torch.backends.mkldnn, "conv", None), "fp32_precision", "ieee"),
        (getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", "ieee"),
    ] if hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision") else []
    if new:
        return [(space, name, value) for space, name, value in new if space is not None and hasattr(space, name)]
    return [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """Compute float32 convolutions and matrix products in full float32 inside the block (no TF32 or
    bf16 shortcuts, on CUDA or CPU), then restore the caller's settings.

    Usable as a decorator: ``@ieee_float32()``.
    """
    settings = _precision_settings()
    before = [getattr(space, name) for space, name, _ in settings]
    try:
        for space, name, value in settings:
            setattr(space, name, value)
        yield
    finally:
        for (space, name, _), value in zip(settings, before):
            setattr(space, name, value)
