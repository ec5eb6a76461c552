"""EfficientQ's self-adaptive class attention: per-voxel importance from the FP prediction.

Each predicted class ``c`` gets the weight ``(max_c n_c / n_c)^p``, ``n_c`` being its voxel count
inside the body mask, so rare classes (tumour) count as much as common ones (liver, background);
voxels outside the body get 1. A layer whose output is smaller than the prediction uses the
prediction recomputed from average-pooled logits at its own size (the paper's pyramid, matched to
any size, so sizes that do not divide evenly still get their own level).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ClassAttention", "TASKS"]

TASKS = ("multiclass", "multilabel")


class ClassAttention:
    """Voxel weights for every output size, from the full-precision logits.

    Args:
        logits: ``(N, C, *spatial)`` FP network output on the calibration data.
        task: ``"multiclass"`` (softmax/arg-max, e.g. LiTS) or ``"multilabel"`` (sigmoid
            channels, e.g. BraTS WT/TC/ET).
        power: the exponent ``p`` (the paper: 0.5).
        body_mask: ``(N, *spatial)`` or ``(N, 1, *spatial)`` boolean mask; everything when ``None``.

    Raises:
        ValueError: for an unknown task or a mask of the wrong shape.
    """

    def __init__(
        self, logits: torch.Tensor, task: str = "multiclass", power: float = 0.5, body_mask: torch.Tensor | None = None
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
        self.logits = logits.detach().float()
        self.task = task
        spatial = tuple(self.logits.shape[2:])
        if body_mask is not None:
            mask = body_mask.detach()
            if mask.dim() == self.logits.dim():
                mask = mask[:, 0]
            if tuple(mask.shape) != (self.logits.shape[0], *spatial):
                raise ValueError(
                    f"body_mask must have shape {(self.logits.shape[0], *spatial)} to match the network output, "
                    f"got {tuple(body_mask.shape)}."
                )
            self.mask = mask.bool()
        else:
            self.mask = torch.ones((self.logits.shape[0], *spatial), dtype=torch.bool)
        labels = self._labels(self.logits)
        counts = torch.bincount(labels[self.mask].reshape(-1), minlength=self._n_labels()).double()
        present = counts > 0
        weights = torch.ones_like(counts)
        weights[present] = (counts[present].max() / counts[present]).pow(power)
        self.class_weights = weights.float()
        self.class_counts = counts.long()
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    def _n_labels(self) -> int:
        c = self.logits.shape[1]
        return (1 << c) if self.task == "multilabel" else max(c, 2)

    def _labels(self, logits: torch.Tensor) -> torch.Tensor:
        if self.task == "multiclass":
            if logits.shape[1] == 1:
                return (logits[:, 0] > 0).long()
            return logits.argmax(dim=1)
        # Multi-label: each combination of positive channels is its own class (WT only, WT+TC, ...).
        bits = (logits > 0).long()
        powers = (2 ** torch.arange(logits.shape[1])).reshape(1, -1, *([1] * (logits.dim() - 2)))
        return (bits * powers).sum(dim=1)

    def __call__(self, spatial_size: tuple[int, ...]) -> torch.Tensor:
        """Voxel weights ``(N, *spatial_size)`` for a layer whose output has that size.

        Args:
            spatial_size: the layer output's spatial size.

        Returns:
            non-negative weights, 1 outside the body.
        """
        key = tuple(int(s) for s in spatial_size)
        if key not in self._cache:
            full = tuple(self.logits.shape[2:])
            if key == full:
                logits, mask = self.logits, self.mask
            else:
                pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[len(key) - 1]
                shrink = all(k <= f for k, f in zip(key, full))
                if shrink:
                    logits = pool(self.logits, key)
                else:
                    logits = F.interpolate(self.logits, size=key, mode="nearest")
                mask = F.interpolate(self.mask[:, None].float(), size=key, mode="nearest")[:, 0] > 0.5
            painted = self.class_weights[self._labels(logits)]
            self._cache[key] = torch.where(mask, painted, torch.ones_like(painted))
        return self._cache[key]
