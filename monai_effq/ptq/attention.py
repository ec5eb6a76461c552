"""EfficientQ's self-adaptive class attention: per-voxel importance from the FP prediction.

Each predicted class ``c`` gets the weight ``(max_c n_c / n_c)^p``, ``n_c`` being its voxel count
inside the body mask, so rare classes (tumour) count as much as common ones (liver, background);
voxels outside the body get 1. A layer whose output is smaller than the prediction uses the
prediction recomputed from average-pooled logits at its own size (the paper's pyramid, matched to
any size, so sizes that do not divide evenly still get their own level).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from monai_effq.utils.errors import UserInputError

__all__ = ["ClassAttention", "TASKS", "check_task"]

TASKS = ("multiclass", "multilabel")


def check_task(task: str) -> str:
    """A segmentation task name, checked.

    Args:
        task: ``"multiclass"`` (softmax over the channels) or ``"multilabel"`` (a sigmoid per channel).

    Returns:
        ``task``.

    Raises:
        UserInputError: for any other name.
    """
    if task not in TASKS:
        raise UserInputError(f"task must be one of {TASKS}, got {task!r}.")
    return task


class ClassAttention:
    """Voxel weights for every output size, from the full-precision logits.

    Args:
        logits: ``(N, C, *spatial)`` FP network output on the calibration data (a list: one per batch).
        task: ``"multiclass"`` (softmax/arg-max, e.g. LiTS) or ``"multilabel"`` (sigmoid
            channels, e.g. BraTS WT/TC/ET).
        power: the exponent ``p`` (the paper: 0.5).
        body_mask: ``(N, *spatial)`` or ``(N, 1, *spatial)`` boolean mask (a list: one per batch);
            everything when ``None``.
        reduce_counts: sums the float64 class counts in place with those of the rest of the
            calibration data held elsewhere (e.g. ``[counts]`` all-reduced over ranks), so the
            class weights are those of all of it; ``None`` when ``logits`` are all of it.

    Raises:
        ValueError: for an unknown task, a mask of the wrong shape, or masks that select no voxel (of all
            the calibration data, ``reduce_counts`` included).
    """

    def __init__(
        self,
        logits: torch.Tensor | list[torch.Tensor],
        task: str = "multiclass",
        power: float = 0.5,
        body_mask: torch.Tensor | list[torch.Tensor] | None = None,
        reduce_counts: Callable[[list[torch.Tensor]], object] | None = None,
    ) -> None:
        self.task = check_task(task)
        self.logits = [t.detach().float() for t in (logits if isinstance(logits, (list, tuple)) else [logits])]
        flat = next((t for t in self.logits if t.dim() < 3), None)
        if flat is not None:  # a classifier's (N, classes): no voxels to weight (pooling them failed in torch)
            raise UserInputError(
                f"class attention weights the voxels of a segmentation output (N, C, *spatial) by their class, but the "
                f"network returns shape {tuple(flat.shape)}: quantize it with attention=False."
            )
        if body_mask is None:
            masks: list[torch.Tensor | None] = [None] * len(self.logits)
        elif isinstance(body_mask, (list, tuple)):
            masks = list(body_mask)
        else:
            masks = list(torch.split(body_mask, [t.shape[0] for t in self.logits])) if len(self.logits) > 1 else [body_mask]
        self.masks = [self._check_mask(m, t) for m, t in zip(masks, self.logits)]
        counts = torch.zeros(self._n_labels(), dtype=torch.float64)
        for t, m in zip(self.logits, self.masks):
            counts += torch.bincount(self._labels(t)[m].reshape(-1), minlength=self._n_labels()).double()
        if reduce_counts is not None:
            reduce_counts([counts])  # whole numbers far below 2^53: the float64 sum is exact in any order
        if not counts.any():
            # the class weights would divide by zero counts; an all-background crop (air outside the body) does this
            raise UserInputError(
                "body_mask selects no voxel of the calibration data: calibrate on a crop or volume that holds the "
                "body (body_mask='nonzero' keeps voxels where the image is not zero), or pass body_mask=None."
            )
        present = counts > 0
        weights = torch.ones_like(counts)
        weights[present] = (counts[present].max() / counts[present]).pow(power)
        self.class_weights = weights.float()
        self.class_counts = counts.long()
        self._cache: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

    @staticmethod
    def _check_mask(mask: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        expected = (logits.shape[0], *logits.shape[2:])
        if mask is None:
            return torch.ones(expected, dtype=torch.bool)
        m = mask.detach()
        if m.dim() == logits.dim():
            if m.shape[1] != 1:  # a mask per image channel (image != 0 of four contrasts) is not one body
                raise UserInputError(
                    f"body_mask has {m.shape[1]} channels; give one mask per window, shaped {expected} or with one channel "
                    "(for several image channels, e.g. (image != 0).any(dim=1))."
                )
            m = m[:, 0]
        if tuple(m.shape) != expected:
            raise ValueError(
                f"body_mask must have shape {expected} to match the network output, got {tuple(mask.shape)}."
            )
        if m.is_floating_point():
            # .bool() would take a NaN, or a probability map's every non-zero voxel, as body; a mask of 0 and 255 or an
            # organ map of whole numbers, as MONAI's loader gives them in float32, is a mask
            other = m[~torch.isfinite(m) | (m != m.round())]
            if other.numel():
                raise UserInputError(
                    f"body_mask holds {other.numel()} value(s) that are not whole numbers (such as "
                    f"{other.flatten()[0].item():g}): give a mask (non-zero: body); threshold a probability map first "
                    "(e.g. mask > 0.5)."
                )
        return m.bool()

    def _n_labels(self) -> int:
        c = self.logits[0].shape[1]
        return (1 << c) if self.task == "multilabel" else max(c, 2)

    def _labels(self, logits: torch.Tensor) -> torch.Tensor:
        if self.task == "multiclass":
            if logits.shape[1] == 1:
                return (logits[:, 0] > 0).long()
            # the first index of the largest value, as argmax gives it (ties and NaN alike); torch's
            # argmax across a strided channel axis took 270 ms on a (12, 3, 48³) batch, max 7 ms
            return logits.max(dim=1).indices
        # Multi-label: each combination of positive channels is its own class (WT only, WT+TC, ...).
        bits = (logits > 0).long()
        powers = (2 ** torch.arange(logits.shape[1])).reshape(1, -1, *([1] * (logits.dim() - 2)))
        return (bits * powers).sum(dim=1)

    def __call__(self, spatial_size: tuple[int, ...], batch: int = 0) -> torch.Tensor:
        """Voxel weights ``(N, *spatial_size)`` for a layer whose output has that size.

        Args:
            spatial_size: the layer output's spatial size.
            batch: which calibration batch.

        Returns:
            non-negative weights, 1 outside the body.
        """
        key = (batch, tuple(int(s) for s in spatial_size))
        if key not in self._cache:
            size = key[1]
            logits, mask = self.logits[batch], self.masks[batch]
            full = tuple(logits.shape[2:])
            if size != full:
                if all(k <= f for k, f in zip(size, full)):
                    pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[len(size) - 1]
                    logits = pool(logits, size)
                else:
                    logits = F.interpolate(logits, size=size, mode="nearest")
                # each coarse voxel's body from the first fine voxel of its block, not pooled as the prediction is: the
                # pooled mask (a block mostly body counts as body) was measured and cost FP agreement (docs/results.md)
                mask = F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
            painted = self.class_weights[self._labels(logits)]
            self._cache[key] = torch.where(mask, painted, torch.ones_like(painted))
        return self._cache[key]
