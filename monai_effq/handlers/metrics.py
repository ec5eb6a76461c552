"""Metric handlers: distances in the images' physical units (millimetres, read from each case's geometry), and
metric reports written whole."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.handlers import HausdorffDistance, MetricsSaver
from monai.utils import IgniteInfo, min_version, optional_import

from monai_effq.utils.io import atomic_files

idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["AtomicMetricsSaver", "HausdorffDistanceMm", "voxel_spacing"]


def _spacing(affine: torch.Tensor, spatial_dims: int) -> list[float]:
    return [float(s) for s in affine_to_spacing(affine, r=spatial_dims)]


def voxel_spacing(image: torch.Tensor) -> list[float] | None:
    """The voxel size along each spatial axis of one channel-first case, from its affine.

    Args:
        image: one case, ``(C, *spatial)``; a :class:`~monai.data.MetaTensor` carries its affine.

    Returns:
        the spacing in the affine's units (millimetres for NIfTI, DICOM and ITK images), or ``None``
        for a plain tensor, which has no geometry.

    Raises:
        ValueError: for a batch (one affine per case): pass its cases one by one.
    """
    if not isinstance(image, MetaTensor):
        return None
    if image.affine.dim() != 2:
        raise ValueError(f"voxel_spacing takes one (C, *spatial) case, got a batch of {image.affine.shape[0]} affines.")
    return _spacing(image.affine, image.dim() - 1)


def _cases(batch: torch.Tensor | Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, list[float] | None]]:
    """Each case of a batched ``(N, C, *spatial)`` tensor or of a list of ``(C, *spatial)`` cases, batched
    alone, with its voxel spacing (ignite hands a metric ``(1, C, *spatial)`` items with one 4x4 affine)."""
    if not isinstance(batch, torch.Tensor):
        return [(case[None], voxel_spacing(case)) for case in batch]
    if not isinstance(batch, MetaTensor):
        return [(case, None) for case in batch.split(1)]
    affines, spatial = batch.affine, batch.dim() - 2
    return [
        (batch.as_tensor()[i : i + 1], _spacing(affines[i] if affines.dim() == 3 else affines, spatial)) for i in range(len(batch))
    ]


class HausdorffDistanceMm(HausdorffDistance):
    """MONAI's ``HausdorffDistance`` handler with distances in millimetres rather than voxels.

    MONAI's handler passes no voxel spacing to its metric, which then measures in voxels: on a CT of
    0.7 x 0.7 x 5 mm voxels one voxel along z is 5 mm, in x 0.7 mm. This one computes each case
    with the spacing of its prediction's affine (the grid the prediction and label share after
    preprocessing), or of its label's where the prediction is a plain tensor, so a value is a distance
    on the patient. Cases where neither has an affine are measured in voxels, as MONAI's handler
    measures them. The arguments are those of ``monai.handlers.HausdorffDistance``.
    """

    def update(self, output: Sequence[Any]) -> None:
        """Add the distances of each case of ``output``.

        Args:
            output: ``[y_pred, y]``: batched tensors or lists of channel-first cases, one-hot and binarized,
                as ``monai.handlers.from_engine(["pred", "label"])`` gives them.

        Raises:
            ValueError: when ``output`` does not hold exactly a prediction and a label.
        """
        if len(output) != 2:
            raise ValueError(f"output must have length 2 (y_pred, y), got {len(output)}.")
        y_pred, y = output
        preds, labels = _cases(y_pred), _cases(y)
        if len(preds) != len(labels):
            raise ValueError(f"got {len(preds)} predictions and {len(labels)} labels in one batch.")
        for (pred, spacing), (label, label_spacing) in zip(preds, labels):
            # one case at a time: the metric takes one spacing for all the cases of a call; a prediction
            # without an affine (a plain tensor) is on its label's grid
            self.metric_fn(pred, label, spacing=spacing if spacing is not None else label_spacing)


class AtomicMetricsSaver(MetricsSaver):
    """MONAI's ``MetricsSaver`` whose report files each appear whole or not at all.

    MONAI's handler opens ``<metric>_raw.csv``, ``<metric>_summary.csv`` and ``metrics.csv`` in
    ``save_dir`` and writes them line by line: a run stopped mid-way leaves a table that reads as
    complete but lacks cases. This one has MONAI write them into a staging folder inside ``save_dir``
    and moves each finished file into place, leaving the folder's other files (masks saved beside the
    table) alone. The arguments and files are those of ``monai.handlers.MetricsSaver``.
    """

    def __call__(self, engine: Engine) -> None:
        """Write the reports of the epoch that ``engine`` completed.

        Args:
            engine: Ignite Engine, it can be a trainer, validator or evaluator.
        """
        if idist.get_rank() != self.save_rank:  # only the saving rank writes; the others join MONAI's gather
            super().__call__(engine)
            return
        folder = self.save_dir
        with atomic_files(folder) as staging:
            self.save_dir = str(staging)
            try:
                super().__call__(engine)
            finally:
                self.save_dir = folder
