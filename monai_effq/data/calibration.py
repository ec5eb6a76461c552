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
from monai.utils import ensure_tuple_rep, fall_back_tuple

from monai_effq.utils.errors import UserInputError, all_finite, check_integer

__all__ = ["WHOLE_AXIS", "calibration_windows", "check_roi_size", "window_size"]

# a window size that spans its axis, as MONAI's SlidingWindowInferer reads a non-positive one
WHOLE_AXIS = -1


def check_roi_size(roi_size: Sequence[int] | int, name: str = "roi_size") -> int | tuple[int, ...]:
    """A sliding-window ROI as MONAI's ``SlidingWindowInferer`` takes it, checked.

    Args:
        roi_size: one size for every axis, or one per axis; :data:`WHOLE_AXIS` (``-1``) spans the
            axis (the zoo's ``[96, 96, -1]``). Zero and other negative sizes, which MONAI also reads as
            the whole axis, are refused as the typos they usually are.
        name: the setting's name in messages.

    Returns:
        the size, or the sizes as a tuple.

    Raises:
        UserInputError: for anything else, naming the setting.
    """
    if isinstance(roi_size, str) or not isinstance(roi_size, (Sequence, int)) or isinstance(roi_size, bool):
        raise UserInputError(
            f"{name} must be a window size or a list of them such as [96,96,96] (-1 spans the axis), got {roi_size!r}."
        )
    sizes = [roi_size] if isinstance(roi_size, int) else list(roi_size)
    checked = []
    for size in sizes:
        size = check_integer(size, f"each {name}")
        if size < 1 and size != WHOLE_AXIS:
            raise UserInputError(f"each {name} must be a positive window size or -1 (the whole axis), got {size}.")
        checked.append(size)
    if not checked:
        raise UserInputError(f"{name} must name at least one window size, got {roi_size!r}.")
    return checked[0] if isinstance(roi_size, int) else tuple(checked)


def window_size(roi_size: Sequence[int] | int, spatial_shape: Sequence[int]) -> tuple[int, ...]:
    """The window ``roi_size`` gives on a volume of ``spatial_shape``, as ``SlidingWindowInferer`` reads it.

    Args:
        roi_size: one size for every axis, or one per axis; a non-positive size spans its axis.
        spatial_shape: the volume's spatial sizes.

    Returns:
        one window size per axis.

    Raises:
        UserInputError: for a ROI of another number of axes than the volume's.
    """
    if not isinstance(roi_size, int) and len(roi_size) != len(spatial_shape):
        raise UserInputError(
            f"roi_size {list(roi_size)} has {len(roi_size)} sizes, but the volumes have {len(spatial_shape)} spatial axes "
            f"({list(spatial_shape)}): give one size per axis, or one for all (the bundles' --calibration_roi)."
        )
    return tuple(int(s) for s in fall_back_tuple(ensure_tuple_rep(roi_size, len(spatial_shape)), tuple(spatial_shape)))


def calibration_windows(
    volumes: torch.Tensor | Sequence[torch.Tensor], roi_size: Sequence[int], overlap: float = 0.0
) -> torch.Tensor:
    """Cut volumes into the windows a sliding-window inferer would visit, stacked as one batch.

    Args:
        volumes: one ``(C, *spatial)`` volume, a ``(N, C, *spatial)`` batch, or a list of ``(C, *spatial)``
            volumes (sizes may differ).
        roi_size: the window size (the bundle's inference ROI), one per spatial axis; a
            non-positive size spans the axis of each volume, as ``SlidingWindowInferer`` reads it.
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
    given = tuple(int(r) for r in roi_size)
    channels = volumes[0].shape[0]
    windows = []
    for i, vol in enumerate(volumes):
        vol = torch.as_tensor(vol).as_subclass(torch.Tensor).float()
        if vol.dim() != len(given) + 1 or vol.shape[0] != channels:
            raise ValueError(
                f"calibration volume {i} has shape {tuple(vol.shape)}; expected (C={channels}, *spatial) with "
                f"{len(given)} spatial axes to match roi_size {given}."
            )
        roi = window_size(given, vol.shape[1:])
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
    if len({w.shape for w in windows}) > 1:  # a whole-axis size on volumes of other sizes along it
        raise ValueError(
            f"roi_size {given} spans an axis along which the calibration volumes differ in size, so their windows "
            "cannot be stacked: pass them one at a time, or give that axis a window size."
        )
    return torch.stack(windows).contiguous()
