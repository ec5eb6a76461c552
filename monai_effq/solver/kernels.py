"""Where the solver's Numba-compiled loops come from: the ``fast`` extra, where it is installed.

GPTQ's and the refinement's column loops (:mod:`monai_effq.solver.column_loops`) and ADMM's
projection (:mod:`monai_effq.solver.projection`) each have a twin written with NumPy or torch
operations, which runs where Numba is missing or turned off with ``MONAI_EFFQ_NUMBA=0``.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

from monai.utils import optional_import

__all__ = ["compiled", "numba_kernels"]


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
