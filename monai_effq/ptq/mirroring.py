"""Calibration windows with their mirror images: more distinct layer inputs from one small crop.

One calibration crop leaves many layers with fewer voxels than unknowns per output channel; those keep
round-to-nearest, and the rest fit statistics of a few thousand voxels. The mirror images of a
window (flipped along every subset of its spatial axes: 8 copies in 3D) give each convolution inputs
its weights have not seen in that order, and the FP network's outputs on them are exact targets, so
the layer-wise fits get eight times the data at the cost of eight times the passes.

A window's copies follow it (window ``w`` becomes windows ``w * F`` to ``w * F + F - 1``), so ranks and
chunks share them as one process does, and :func:`mirror_masks` lays a hold-out mask made for the
source windows over the copies: a held-out slab stays on the same anatomy in every copy, which the
layer-wise validation needs (a copy of a fitted window would otherwise validate the fit). A mask over
other axes than the windows' (an attention layer's tokens, in window-partition order) cannot be
mapped; :func:`~monai_effq.ptq.pipeline.holdout_mask` then holds out whole sources or nothing.
"""

from __future__ import annotations

import itertools

import torch

__all__ = ["mirror_axes", "mirror_count", "mirror_images", "mirror_masks"]


def mirror_axes(spatial_dims: int) -> list[tuple[int, ...]]:
    """The spatial axes each copy is flipped along, the window itself (no axis) first.

    Args:
        spatial_dims: the number of spatial axes.

    Returns:
        every subset of ``range(spatial_dims)``, by size, then in order: ``[(), (0,), (1,), ..., (0, 1, 2)]``.
    """
    axes = range(spatial_dims)
    return [c for r in range(spatial_dims + 1) for c in itertools.combinations(axes, r)]


def mirror_count(spatial_dims: int) -> int:
    """How many windows each source window becomes.

    Args:
        spatial_dims: the number of spatial axes.

    Returns:
        ``2 ** spatial_dims``, the window itself included.
    """
    return 2**spatial_dims


def mirror_images(batch: torch.Tensor) -> torch.Tensor:
    """Each ``(C, *spatial)`` window of a batch followed by its mirror images.

    Args:
        batch: ``(N, C, *spatial)`` windows.

    Returns:
        ``(N * F, C, *spatial)`` with ``F = 2 ** len(spatial)``: window ``w``'s copies at ``w * F + i``,
        copy ``i`` flipped along the spatial axes ``mirror_axes(len(spatial))[i]``.
    """
    copies = [batch.flip([2 + a for a in axes]) if axes else batch for axes in mirror_axes(batch.dim() - 2)]
    return torch.stack(copies, dim=1).flatten(0, 1)


def mirror_masks(masks: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """A mask per source window laid over its copies, flipped as each copy's window is.

    Args:
        masks: ``(N, *axes)`` per-window masks (a body mask, or the hold-out of a layer's output
            voxels). With ``spatial_dims`` axes they are flipped as the windows are; a mask of other
            axes (a linear layer's tokens) cannot be mapped and each copy gets the source's as it is,
            which is right only for masks that hold out whole windows.
        spatial_dims: the windows' number of spatial axes.

    Returns:
        ``(N * F, *axes)`` with ``F = 2 ** spatial_dims``.
    """
    mapped = masks.dim() - 1 == spatial_dims
    copies = [masks.flip([1 + a for a in axes]) if axes and mapped else masks for axes in mirror_axes(spatial_dims)]
    return torch.stack(copies, dim=1).flatten(0, 1)
