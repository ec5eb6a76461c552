"""The output error of fixed weights, measured by running the layer on its calibration windows.

:class:`~monai_effq.solver.gram.GramAccumulator` gives the error of any weights, at ``O(n²)`` per
output voxel for ``n`` inputs per output. A method whose weights do not depend on the data (round
to nearest) needs the error of a few weight sets only, its own, round to nearest's (the same for it)
and the full-precision one, which the layer itself computes at ``O(n·m)`` per voxel: on the demo
bundles' 3x3x3 convolutions about ``n/m``, 27 times, less work.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from monai_effq.solver.layers import layer_view

__all__ = ["OutputError"]


class OutputError:
    """The h-weighted output MSE ``Σ h ||W x + b - y||² / (Σ h · c_out)`` of fixed candidate weights,
    the figure :meth:`~monai_effq.solver.gram.LayerStatistics.weighted_mse` gives from the sums.

    Each window's sums are kept apart under its number among all calibration windows and added in
    that order, after :meth:`gather` has collected every rank's: the figures are the same bits
    however the windows were batched, chunked or shared among ranks.

    Candidates with the same weight and bias are run once and share the figure, so a caller can
    name every figure it reports (the solution's, round to nearest's) without an extra pass where
    two are one.

    Args:
        layer: the layer (a ``Conv*``, ``ConvTranspose*`` or ``Linear`` module; not modified).
        candidates: per name, a native weight and a bias (``None``: none) to measure.
    """

    def __init__(self, layer: nn.Module, candidates: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        self.view = layer_view(layer)
        self.names = list(candidates)
        self._layers: list[nn.Module] = []
        self._layer_of: dict[str, int] = {}  # candidate name -> its layer among the distinct ones
        for name, (weight, bias) in candidates.items():
            weight = weight.detach().float()
            bias = None if bias is None else bias.detach().float()
            same = [i for i, m in enumerate(self._layers) if _holds(m, weight, bias)]
            if not same:
                module = copy.deepcopy(layer)
                module.weight = nn.Parameter(weight.clone(), requires_grad=False)
                module.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)
                self._layers.append(module.float())
            self._layer_of[name] = same[0] if same else len(self._layers) - 1
        # window number -> (voxels, Σ h, Σ h², one Σ h ||e||² per distinct candidate)
        self._windows: dict[int, tuple[int, float, float, list[float]]] = {}
        self._sums: tuple[int, float, float, list[float]] | None = None  # the windows' totals, once read

    def add_batch(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        voxel_weights: torch.Tensor | None = None,
        windows: Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        """Add a batch of the layer's inputs and full-precision outputs.

        Args:
            inputs: the layer's input batch (as the quantized network computes it).
            targets: the full-precision network's output of this layer.
            voxel_weights: non-negative importance per output voxel, ``(N, *spatial)`` or
                ``(N, 1, *spatial)`` for convolutions, the leading shape for ``Linear``.
            windows: the number of each window of the batch among all calibration windows
                (default: the next numbers after those already added).

        Raises:
            ValueError: on shape mismatches, non-finite values, negative weights or a window added twice.
        """
        self.view.check_shapes(inputs, targets)
        self.view.check_finite(inputs, targets)
        n = inputs.shape[0]
        if windows is None:
            start = max(self._windows, default=-1) + 1
            windows = range(start, start + n)
        numbers = [int(w) for w in windows]
        if len(numbers) != n:
            raise ValueError(f"{self.view.name}: {len(numbers)} window numbers for a batch of {n} windows.")
        h = None if voxel_weights is None else self.view.check_voxel_weights(voxel_weights, targets)
        layers = self._layers[0].weight.device
        self._sums = None
        for b, number in enumerate(numbers):
            if number in self._windows:
                raise ValueError(f"{self.view.name}: calibration window {number} was added twice.")
            x = inputs[b : b + 1].detach().float().to(layers)
            y = targets[b : b + 1].detach().float().to(layers)
            # one voxel's weight, broadcast over its channels (the last axis of a Linear's output)
            hw = torch.ones((), device=layers) if h is None else h[b : b + 1].to(layers)
            hw = hw.unsqueeze(-1) if self.view.kind == "linear" else hw.unsqueeze(1) if hw.dim() else hw
            voxels = y.numel() // self.view.out_channels
            h_sum = float(hw.sum(dtype=torch.float64)) * (voxels if h is None else 1)
            h2_sum = float(hw.pow(2).sum(dtype=torch.float64)) * (voxels if h is None else 1)
            with torch.no_grad():
                errors = [float(((module(x) - y).pow(2) * hw).sum(dtype=torch.float64)) for module in self._layers]
            self._windows[number] = (voxels, h_sum, h2_sum, errors)

    def gather(self, all_gather: Callable[[object], list[object]]) -> None:
        """Collect every rank's windows (a few numbers per window; no activation crosses ranks).

        Args:
            all_gather: returns every rank's value of a picklable object, in rank order.
        """
        merged: dict[int, tuple[int, float, float, list[float]]] = {}
        for share in all_gather(self._windows):
            merged.update(share)
        self._windows = merged
        self._sums = None

    def _totals(self) -> tuple[int, float, float, list[float]]:
        """The windows' sums added in window order, computed on the first read after a change."""
        if self._sums is None:
            self._sums = self._add_windows()
        return self._sums

    def _add_windows(self) -> tuple[int, float, float, list[float]]:
        voxels, h_sum, h2_sum = 0, 0.0, 0.0
        errors = [0.0] * len(self._layers)
        for number in sorted(self._windows):
            v, hs, h2, errs = self._windows[number]
            voxels, h_sum, h2_sum = voxels + v, h_sum + hs, h2_sum + h2
            errors = [e + d for e, d in zip(errors, errs)]
        return voxels, h_sum, h2_sum, errors

    @property
    def voxels(self) -> int:
        """Output voxels seen."""
        return self._totals()[0]

    @property
    def effective_voxels(self) -> float:
        """``(Σ h)² / Σ h²``: equals :attr:`voxels` without voxel weights."""
        _, h_sum, h2_sum, _ = self._totals()
        return h_sum * h_sum / h2_sum if h2_sum > 0 else 0.0

    def mse(self, name: str) -> float:
        """The h-weighted output MSE of the candidate ``name``.

        Args:
            name: one of the candidates' names.

        Returns:
            the candidate's weighted MSE.

        Raises:
            ValueError: for a name that is not a candidate, or when no window with weight was added.
        """
        if name not in self._layer_of:
            raise ValueError(f"{name!r} is not a candidate of {self.view.name}; pass one of {sorted(self._layer_of)}.")
        _, h_sum, _, errors = self._totals()
        if h_sum <= 0:
            raise ValueError(f"no calibration window with weight was added for {self.view.name}.")
        return errors[self._layer_of[name]] / (h_sum * self.view.out_channels)


def _holds(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``module`` has this weight and bias, bit for bit."""
    if (module.bias is None) != (bias is None) or module.weight.device != weight.device:
        return False
    return torch.equal(module.weight, weight) and (bias is None or torch.equal(module.bias, bias))
