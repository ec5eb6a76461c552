"""Whole-volume calibration: every sliding window of every calibration volume, as one batch.

The paper's "one calibration sample" is one whole preprocessed volume. A network that infers with
sliding windows sees a volume as its windows, so calibration takes the same windows (the grid
MONAI's ``SlidingWindowInferer`` visits) and the quantizer streams them in chunks that fit its
memory budget.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.data.utils import dense_patch_slices, get_valid_patch_size

from monai_effq.utils.errors import all_finite

__all__ = ["calibration_windows"]


def calibration_windows(
    volumes: torch.Tensor | Sequence[torch.Tensor], roi_size: Sequence[int], overlap: float = 0.0
) -> torch.Tensor:
    """Cut volumes into the windows a sliding-window inferer would visit, stacked as one batch.

    Args:
        volumes: one ``(C, *spatial)`` volume, a ``(N, C, *spatial)`` batch, or a list of ``(C, *spatial)``
            volumes (sizes may differ).
        roi_size: the window size (the bundle's inference ROI).
        overlap: fraction of overlap between neighbouring windows, as ``SlidingWindowInferer``'s.

    Returns:
        a ``(windows, C, *roi_size)`` float tensor; volumes smaller than the ROI are zero-padded at
        the far end of each axis (where the inferer pads too, it pads symmetrically; the difference is
        immaterial for calibration statistics).

    Raises:
        ValueError: for volumes whose rank or channel count differs from the others or from ``roi_size``,
            an overlap outside ``[0, 1)``, or non-finite values.
    """
    if isinstance(volumes, torch.Tensor):
        volumes = list(volumes) if volumes.dim() == len(roi_size) + 2 else [volumes]
    if not volumes:
        raise ValueError("calibration_windows needs at least one volume.")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}.")
    roi = tuple(int(r) for r in roi_size)
    channels = volumes[0].shape[0]
    windows = []
    for i, vol in enumerate(volumes):
        vol = torch.as_tensor(vol).as_subclass(torch.Tensor).float()
        if vol.dim() != len(roi) + 1 or vol.shape[0] != channels:
            raise ValueError(
                f"calibration volume {i} has shape {tuple(vol.shape)}; expected (C={channels}, *spatial) with "
                f"{len(roi)} spatial axes to match roi_size {roi}."
            )
        if not all_finite(vol):
            raise ValueError(f"calibration volume {i} contains NaN or Inf values: clean or re-normalise it.")
        pad = [max(r - s, 0) for s, r in zip(vol.shape[1:], roi)]
        if any(pad):
            vol = F.pad(vol, [v for p in reversed(pad) for v in (0, p)])
        size = tuple(vol.shape[1:])
        window = get_valid_patch_size(size, roi)
        # the step SlidingWindowInferer takes: a whole window where it spans the axis, else roi * (1 - overlap)
        interval = [w if w == n else max(int(w * (1 - overlap)), 1) for n, w in zip(size, window)]
        for sl in dense_patch_slices(size, window, interval):
            windows.append(vol[(slice(None), *sl)])
    return torch.stack(windows).contiguous()
