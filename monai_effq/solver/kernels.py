"""Where the solver's Numba-compiled loops come from: the ``fast`` extra, where it is installed.

GPTQ's and the refinement's column loops (:mod:`monai_effq.solver.column_loops`) and ADMM's
projection (:mod:`monai_effq.solver.projection`) each have a twin written with NumPy or torch
operations, which runs where Numba is missing or turned off with ``MONAI_EFFQ_NUMBA=0``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from types import ModuleType

from monai.utils import optional_import

__all__ = ["choose_kernels", "compiled", "numba_kernels"]


@functools.cache
def numba_kernels() -> ModuleType | None:
    """The Numba-compiled loops, or ``None`` without Numba (or with ``MONAI_EFFQ_NUMBA=0``).

    Returns:
        the module :mod:`monai_effq.solver._numba_kernels`, or ``None``.
    """
    if os.environ.get("MONAI_EFFQ_NUMBA", "1") == "0":
        return None
    # imported on first use: Numba and its cached kernels cost 0.1-0.3 s to load, which a command that never rounds need not pay
    kernels, has_kernels = optional_import("monai_effq.solver._numba_kernels")
    return kernels if has_kernels else None


def compiled() -> bool:
    """Whether the solver's loops run compiled by Numba (installed, and not turned off by ``MONAI_EFFQ_NUMBA=0``).

    Returns:
        ``True`` where :func:`numba_kernels` finds the compiled loops.
    """
    return numba_kernels() is not None


def choose_kernels(use_compiled: bool | None, fits: Callable[[], bool], name: str, refusal: str) -> ModuleType | None:
    """The compiled loops for one call: where asked for (``True``) or available (``None``), and the
    inputs are what the loops were written for.

    Args:
        use_compiled: the compiled loops (``True``), their NumPy/torch twin (``False``) or whichever applies (``None``).
        fits: whether the call's inputs are what the compiled loops take (asked only where they are available).
        name: what the loops are, for the errors.
        refusal: the error for inputs the compiled loops do not take, when they were asked for.

    Returns:
        :func:`numba_kernels`, or ``None`` for the twin.

    Raises:
        RuntimeError: compiled loops asked for where Numba is missing or turned off.
        ValueError: compiled loops asked for with inputs they do not take.
    """
    loops = numba_kernels() if use_compiled is not False else None
    if use_compiled and loops is None:
        raise RuntimeError(f"{name} cannot run without Numba: pip install 'monai-effq[fast]' (and leave MONAI_EFFQ_NUMBA unset).")
    if loops is None:
        return None
    if not fits():
        if use_compiled:
            raise ValueError(refusal)
        return None
    return loops
