"""Network PTQ: quantize every weight layer of a network, in forward order, as the paper does.

Phases, each a call: prepare (:func:`~monai_effq.ptq.prepare.prepare_network`, shared with
QAT: copy, one probe pass, fold BatchNorm, plan the layers; then the attention), then for each
layer capture (its input in the partly quantized network and its output in the FP network, through hooks that stop the forward pass
once they have what they need), accumulate (the layer's normal equations), solve and swap in
the fake-quant module. Only the current layer's activations are ever held.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from monai.utils import optional_import

from monai_effq.ptq.attention import ClassAttention
from monai_effq.ptq.batch_invariance import WindowByWindow
from monai_effq.ptq.checkpoint import architecture_table
from monai_effq.ptq.config import EfficientQConfig, LayerPlan
from monai_effq.ptq.graph import StopForward, hooks, set_submodule
from monai_effq.ptq.journal import QuantizationJournal
from monai_effq.ptq.mirroring import mirror_count, mirror_images, mirror_masks
from monai_effq.ptq.modules import ActivationQuantizer, QuantizedLayer, quantized_layer_class
from monai_effq.ptq.norm_inputs import quantize_norm_inputs
from monai_effq.ptq.prepare import eager_network, prepare_network, quantizable_network
from monai_effq.ptq.report import LayerReport, QuantizationReport, reset_peak_memory, source_fingerprints
from monai_effq.ptq.result import QuantizationResult, finish_report, float_weights, state_bytes
from monai_effq.ptq.skip_rounding import share_skip_roundings
from monai_effq.solver.api import LayerSolution, solve_statistics, solve_weights
from monai_effq.solver.gram import GramAccumulator, SumBounds
from monai_effq.solver.layers import LayerView, layer_view
from monai_effq.solver.methods import get_method
from monai_effq.solver.output_error import OutputError
from monai_effq.solver.validation import UNDERDETERMINED_CHOICE, is_underdetermined, solve_validated
from monai_effq.utils.distributed import all_gather_objects, all_gather_rows, all_reduce_sum, get_rank, get_world_size
from monai_effq.utils.errors import UserInputError, all_finite
from monai_effq.utils.fingerprint import fingerprint_json, fingerprint_tensors
from monai_effq.utils.precision import ieee_float32

tqdm, _has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = ["holdout_mask", "quantize"]

logger = logging.getLogger("monai_effq")

# ActivationQuantizer.calibrate fits on a fixed-stride subsample of at most this many values.
_ACT_SAMPLES: int = inspect.signature(ActivationQuantizer.calibrate).parameters["max_samples"].default


def _as_batches(calibration: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(calibration, (torch.Tensor, np.ndarray)):
        batches = [calibration]
    else:
        try:
            batches = list(calibration)
        except TypeError:
            raise TypeError(
                f"calibration must be a tensor batch or an iterable of tensor batches, got {type(calibration).__name__}."
            ) from None
    if not batches:
        raise ValueError("calibration is empty: pass at least one batch (one volume is enough).")
    out = []
    for i, b in enumerate(batches):
        if isinstance(b, dict):
            if "image" not in b:
                raise TypeError(
                    f"calibration batch {i} is a dict with keys {sorted(map(str, b))} and no 'image': pass the image "
                    "tensors, or dicts with the image under 'image' (as MONAI's transforms name it)."
                )
            b = b["image"]
        if isinstance(b, np.ndarray):  # a volume read with nibabel or SimpleITK: any byte order, strides, or a read-only map
            b = torch.from_numpy(np.array(b, dtype=np.float32))
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"calibration batch {i} is a {type(b).__name__}, expected a tensor (N, C, *spatial).")
        if b.numel() == 0:
            raise ValueError(f"calibration batch {i} is empty (shape {tuple(b.shape)}).")
        if not all_finite(b):
            raise ValueError(f"calibration batch {i} contains NaN or Inf values: clean or re-normalise the input.")
        out.append(b.detach().as_subclass(torch.Tensor).float())  # MONAI's MetaTensor would leak into buffers
    # the network is probed on the first batch only: a later one of other channels would fail deep in a layer
    for i, b in enumerate(out[1:], 1):
        if b.dim() != out[0].dim() or b.shape[1] != out[0].shape[1]:
            raise UserInputError(
                f"calibration batch {i} has shape {tuple(b.shape)} where batch 0 has {tuple(out[0].shape)}: give every batch "
                f"as (N, C, *spatial) with the same {out[0].dim() - 2} spatial axes and {out[0].shape[1]} channels (its N and "
                "spatial sizes may differ)."
            )
    return out


def _capture(network: nn.Module, module: nn.Module, batch: torch.Tensor, want: str) -> torch.Tensor:
    """The input (``want="input"``) or output of ``module`` on ``batch``, stopping the pass there."""
    box: list[torch.Tensor] = []

    def grab(_m, args, out=None):
        box.append((args[0] if want == "input" else out).detach().clone())
        raise StopForward

    handles = [
        module.register_forward_pre_hook(grab) if want == "input" else module.register_forward_hook(grab)
    ]
    with hooks(handles), torch.no_grad(), WindowByWindow():
        try:
            network(batch)
        except StopForward:
            pass
    if not box:
        raise RuntimeError("the layer was not reached by the forward pass.")
    return box[0]


def _check_ranks_agree(fp_weights: str, architecture: str, config: EfficientQConfig, task: str | None) -> None:
    """Refuse, on every rank, ranks given different FP networks, settings or tasks.

    Every rank solves every layer from the ranks' summed statistics and rank 0 writes the result: a rank
    with another checkpoint (a node whose copy differs) or other settings would corrupt the sums
    without a word. The device is left out: under NCCL each rank has its own GPU.
    """
    settings = {k: v for k, v in config.to_dict().items() if k != "device"}
    mine = {"FP weights": fp_weights, "network architecture": architecture, "config": fingerprint_json(settings), "task": str(task)}
    ranks = all_gather_objects(mine)
    for what in mine:
        other = [r for r, found in enumerate(ranks) if found[what] != ranks[0][what]]
        if other:
            raise UserInputError(
                f"the ranks were given different {what}: rank(s) {other} differ from rank 0. Every rank must quantize the "
                "same FP network with the same settings: check that every node reads the same checkpoint and config "
                "(a shared folder, or copies with the same checksum)."
            )


def holdout_mask(shape: tuple[int, ...], fraction: float, mirrored_dims: int = 0) -> torch.Tensor | None:
    """Which output voxels of a layer are held out for validation.

    With at least ``k = round(1/fraction)`` windows, every ``k``-th whole window (windows from
    across the volume). With fewer, the last ``1/k`` of every window along its longest spatial
    axis, as one slab: only the slab's face shares inputs with the fit voxels. Scattered voxels
    from within a window would share their inputs with fit neighbours and make an over-fitted
    setting look good; one window with nothing held out would let it through unchecked.

    With ``mirrored_dims``, the windows are sources each followed by their mirror images
    (:mod:`monai_effq.ptq.mirroring`): the mask is made for the sources and laid over the copies,
    so a copy of a fitted window is never held out, nor the other way round. A slab of a layer whose
    voxels are not the windows' spatial axes (an attention layer's tokens) cannot be followed through
    a flip: such a layer gets whole sources held out when there are ``k`` of them, else no hold-out.

    Args:
        shape: ``(N, *spatial)`` of the layer's output voxels (``(N, ...)`` for ``Linear``).
        fraction: share of windows (or of each window's slab axis) held out, in ``(0, 0.5]``.
        mirrored_dims: the calibration windows' number of spatial axes when they carry their mirror
            images (``EfficientQConfig.calibration_flips``); ``0`` when they do not.

    Returns:
        a boolean mask of ``shape``, or ``None`` when there are fewer than ``k`` windows and no
        spatial axis of at least ``k`` voxels.
    """
    k = max(2, round(1.0 / fraction))
    if mirrored_dims:
        n_sources = shape[0] // mirror_count(mirrored_dims)
        if len(shape) - 1 != mirrored_dims and n_sources < k:
            return None
        sources = holdout_mask((n_sources, *shape[1:]), fraction)
        return None if sources is None else mirror_masks(sources, mirrored_dims)
    mask = torch.zeros(shape, dtype=torch.bool)
    if shape[0] >= k:
        mask[k - 1 :: k] = True
        return mask
    spatial = shape[1:]
    if not spatial or max(spatial) < k:
        return None
    axis = 1 + max(range(len(spatial)), key=lambda a: (spatial[a], -a))  # the longest, the first of equals
    size = shape[axis]
    index = [slice(None)] * len(shape)
    index[axis] = slice(size - max(1, size // k), size)
    mask[tuple(index)] = True
    return mask


class _Run:
    """One quantization run: the prepared copies, the plan, and the per-layer solve.

    With a single calibration batch (batches of one shape are concatenated), layers are solved in
    windows: one FP pass captures the targets of every layer of the window (as many as fit the
    memory budget; for the first window, the scan's pass where there is one), then one pass of the
    partly quantized network solves each layer when the pass reaches it and continues with the
    quantized layer's output. Otherwise each layer gets its own FP and quantized passes, batch by
    batch, and only one batch's activations are held at a time.
    A single batch whose largest layer output would exceed ``target_memory_mib`` (the windows of
    whole volumes) is cut into interleaved chunks that fit it, so every chunk samples the whole
    volume (the first one also sets the activation ranges).

    Every pass over calibration windows runs under :class:`WindowByWindow`: each window's
    activations are the same bits whichever windows share its batch, chunk or rank.

    With a journal, layers it holds are rebuilt from it instead of solved, in the same windows and
    passes, so the layers after them see the inputs an uninterrupted run gives them; a window whose
    layers are all journaled needs no pass at all.
    """

    def __init__(
        self,
        network: nn.Module,
        batches: list[torch.Tensor],
        config: EfficientQConfig,
        journal: QuantizationJournal | None = None,
    ) -> None:
        self.config = config
        self.journal = journal
        self.device = torch.device(config.device)
        # mirror_images put each window's copies right after it, so the hold-out can follow them
        self.mirrored_dims = batches[0].dim() - 2 if config.calibration_flips else 0
        self.concatenated = len(batches) > 1 and len({tuple(b.shape[1:]) for b in batches}) == 1
        if self.concatenated:
            batches = [torch.cat(batches)]
        prepared = prepare_network(network, batches[0], config, device=self.device)
        self.fp, self.folded, self.order, self.plans = prepared.network, prepared.folded, prepared.order, prepared.plans
        for p in self.fp.parameters():
            p.requires_grad_(False)
        per_sample = prepared.output_numels
        self.rank, self.world = get_rank(), get_world_size()
        if config.norm_input_spec is not None and self.world > 1:
            # each rank would fit the norm-input ranges on its own windows, and the ranks would differ
            raise UserInputError(
                "quantize_norm_inputs is not supported across ranks yet: quantize in one process, or turn it off."
            )
        # With ranks, one batch per rank is its share of the windows, in rank order: windows are
        # numbered, chunked and held out by their place among all ranks' windows, as one process
        # holding them all would.
        shares = all_gather_objects((len(batches), batches[0].shape[0], tuple(batches[0].shape[1:])))
        if self.world > 1 and (any(n_batches > 1 for n_batches, _, _ in shares) or len({shape for _, _, shape in shares}) > 1):
            raise ValueError(
                "a rank holds calibration batches of different shapes, or the ranks' windows differ in shape "
                f"({', '.join(f'rank {r}: {tuple(shape)}' for r, (_, _, shape) in enumerate(shares))}): across ranks "
                "every window must have one shape (crop or window the volumes, e.g. QuantizationHandler(roi_size=...))."
            )
        self.shares = [int(n) for _, n, _ in shares]
        offset = sum(self.shares[: self.rank])
        total = sum(self.shares)
        self.chunks = 1
        # a window's mirror images stay together in one chunk, so each chunk's hold-out can follow them
        self.group = mirror_count(self.mirrored_dims) if self.mirrored_dims else 1
        if len(batches) == 1 and per_sample:
            cap = max(1, config.target_memory_mib * 2**20 // 4 // max(per_sample.values()) // self.group)
            self.chunks = -(-total // self.group // cap)
        # (where in its global batch each local window sits, that batch's size over all ranks)
        self.places: list[tuple[torch.Tensor, int]] = [(torch.arange(b.shape[0]), b.shape[0]) for b in batches]
        self.first_chunk = [True] + [False] * (len(batches) - 1)
        # each batch's windows numbered among all windows of all ranks, as one process numbers them
        ends = torch.tensor([b.shape[0] for b in batches]).cumsum(0).tolist()
        self.window_numbers = [torch.arange(end - b.shape[0], end) for b, end in zip(batches, ends)]
        if len(batches) == 1:
            index = torch.arange(offset, offset + batches[0].shape[0])
            kept, places, first, numbers = [], [], [], []
            source, copy_ = index // self.group, index % self.group
            for c in range(self.chunks):
                local = (self._chunk_of(index) == c).nonzero().squeeze(1)
                if local.numel():
                    kept.append(batches[0][local] if self.chunks > 1 else batches[0])
                    place = source[local] // self.chunks * self.group + copy_[local]
                    places.append((place, len(range(c, total // self.group, self.chunks)) * self.group))
                    numbers.append(index[local])
                    first.append(c == 0)
            batches, self.places, self.first_chunk, self.window_numbers = kept, places, first, numbers
        self.batches = batches
        self.numels = {k: v * max(b.shape[0] for b in batches) for k, v in per_sample.items()}
        if self.world > 1:
            logger.info(
                "rank %d of %d: calibration windows %d to %d of %d (%d chunk(s) here)",
                self.rank, self.world, offset, offset + self.shares[self.rank] - 1, total, len(batches),
            )
        self.bounds: dict[str, tuple[int, float, float]] = {}  # per layer: voxels, max |input|, max |target| (scan)
        # the layers solved from summed statistics, which need the scan's bounds
        self.summed = {p.name for p in self.plans if get_method(p.method).needs_statistics}
        self.scanned_targets: dict[str, torch.Tensor] = {}  # the first window's FP outputs, kept by the scan
        self.qnet = copy.deepcopy(self.fp)
        if config.norm_input_spec is not None:  # first, so every layer is solved from the inputs it will get
            with WindowByWindow():
                quantize_norm_inputs(self.qnet, self.batches[0].to(self.device), config.norm_input_spec)

    def _chunk_of(self, index: torch.Tensor) -> torch.Tensor:
        """The chunk of each numbered window: sources dealt round-robin, each with its mirror images."""
        return index // self.group % self.chunks

    def masks(self, body_mask: torch.Tensor | list[torch.Tensor] | None) -> torch.Tensor | list[torch.Tensor] | None:
        """The body mask arranged like the batches this run iterates over."""
        if body_mask is None:
            return None
        if isinstance(body_mask, (list, tuple)):
            if len(body_mask) > 1 and not self.concatenated:  # batches of different shapes: one mask each
                return list(body_mask)
            # one batch (QuantizationHandler's list of one) may still be cut into chunks below
            body_mask = torch.cat([torch.as_tensor(m) for m in body_mask])
        if self.chunks > 1:
            body_mask = torch.as_tensor(body_mask)
            offset = sum(self.shares[: self.rank])
            index = torch.arange(offset, offset + body_mask.shape[0])
            chunks = [(self._chunk_of(index) == c).nonzero().squeeze(1) for c in range(self.chunks)]
            return [body_mask[local] for local in chunks if local.numel()]
        return body_mask

    def scan(self) -> list[torch.Tensor]:
        """One pass of the FP network over the windows: its logits, and the bounds of every planned
        layer's data over all ranks' windows, which set the grids of the layers' exact sums.

        The bounds are maxima and totals, the same however the windows are shared among ranks, so
        one process and any number of ranks round the same window contributions to the same grids.
        Layers solved without statistics (round to nearest) have none.

        With one batch, the pass also keeps the FP outputs of the first window of layers
        (:meth:`_run_windows` would otherwise run an FP pass of its own for them before the first solve).
        """
        seen: dict[str, list[float]] = {p.name: [0, 0.0, 0.0] for p in self.plans if p.name in self.summed}  # voxels, max |x|, max |y|
        windows = self._layer_windows()  # none where every layer is skipped and only norm inputs are rounded
        keep = {p.name for p in windows[0]} if len(self.batches) == 1 and windows else set()

        def record(name: str, args: tuple, out: torch.Tensor) -> None:
            if name in seen:
                voxels = _voxel_shape(layer_view(self.fp.get_submodule(name)), out)
                seen[name][0] += int(torch.Size(voxels).numel())
                seen[name][1] = max(seen[name][1], float(args[0].detach().abs().max()))
                seen[name][2] = max(seen[name][2], float(out.detach().abs().max()))
            if name in keep and name not in self.scanned_targets:  # a copy, as _capture_outputs takes it
                self.scanned_targets[name] = out.detach().clone()

        handles = [
            self.fp.get_submodule(p.name).register_forward_hook(lambda m, a, o, n=p.name: record(n, a, o)) for p in self.plans
        ]
        logits = []
        with hooks(handles), torch.no_grad(), WindowByWindow():
            for batch in self.batches:
                logits.append(self.fp(batch.to(self.device)).cpu())
        shares = all_gather_objects(seen)
        self.bounds = {
            name: (sum(int(s[name][0]) for s in shares), max(s[name][1] for s in shares), max(s[name][2] for s in shares))
            for name in seen
        }
        return logits

    def run(self, attention: ClassAttention | None, progress: bool) -> list[LayerReport]:
        bar = tqdm(total=len(self.plans), desc="quantizing", unit="layer", disable=not progress) if _has_tqdm else None
        reports: list[LayerReport] = []

        def done(report: LayerReport) -> None:
            reports.append(report)
            if bar is not None:
                bar.update(1)
            logger.debug(
                "%s W%d A%s: mse %.3e (rtn %.3e) in %.2f s",
                report.name, report.weight_bits, report.act_bits, report.mse, report.mse_rtn, report.seconds,
            )

        if len(self.batches) == 1:
            self._run_windows(attention, done)
        else:
            for plan in self.plans:
                done(self._run_layer(plan, attention))
        if bar is not None:
            bar.close()
        return reports

    def _layer_windows(self) -> list[list[LayerPlan]]:
        """The planned layers in consecutive windows whose FP outputs on the largest batch fit
        ``target_memory_mib`` together (a layer too large for it alone gets a window of its own)."""
        budget = self.config.target_memory_mib * 2**20 // 4
        windows: list[list[LayerPlan]] = []
        used = 0
        for plan in self.plans:
            if windows and used + self.numels[plan.name] <= budget:
                windows[-1].append(plan)
                used += self.numels[plan.name]
            else:
                windows.append([plan])
                used = self.numels[plan.name]
        return windows

    def _run_windows(self, attention: ClassAttention | None, done) -> None:
        batch = self.batches[0].to(self.device)
        for index, window in enumerate(self._layer_windows()):
            scanned, self.scanned_targets = self.scanned_targets, {}
            restored = [self._restore(plan) for plan in window]
            if all(r is not None for r in restored):
                for plan, (module, report) in zip(window, restored):
                    set_submodule(self.qnet, plan.name, module)
                    done(report)
                continue
            targets = scanned if index == 0 and scanned else self._capture_outputs([p.name for p in window], batch)
            journaled = {plan.name: r for plan, r in zip(window, restored) if r is not None}
            self._solve_in_one_pass(window, targets, batch, attention, done, journaled)

    def _capture_outputs(self, names: list[str], batch: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        last = names[-1]

        def grab(_m, _a, o, n):
            if n not in out:  # a copy: later in-place ops (ReLU(inplace=True), +=) would change it
                out[n] = o.detach().clone()
            if n == last:
                raise StopForward

        handles = [self.fp.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: grab(m, a, o, n)) for n in names]
        with hooks(handles), torch.no_grad(), WindowByWindow():
            try:
                self.fp(batch)
            except StopForward:
                pass
        return out

    def _solve_in_one_pass(self, window, targets, batch, attention, done, journaled) -> None:
        """Solve the window's layers in one pass of the partly quantized network, each as the pass
        reaches it; ``journaled`` (name: module and report) are taken as they are."""
        solved: dict[str, nn.Module] = {}
        last = window[-1].name

        def on_layer(plan: LayerPlan, args: tuple) -> torch.Tensor:
            if plan.name not in solved:
                pair = (args[0], targets.pop(plan.name))
                if plan.name in journaled:
                    module, report = journaled[plan.name]
                else:
                    with invariant.paused():
                        module, report = self._solved(plan, lambda: [pair], attention)
                solved[plan.name] = module
                done(report)
            out = solved[plan.name](args[0])
            if plan.name == last:
                raise StopForward
            return out

        handles = [
            self.qnet.get_submodule(p.name).register_forward_hook(lambda m, a, o, p=p: on_layer(p, a)) for p in window
        ]
        invariant = WindowByWindow()
        with hooks(handles), torch.no_grad(), invariant:
            try:
                self.qnet(batch)
            except StopForward:
                pass
        for name, module in solved.items():
            set_submodule(self.qnet, name, module)

    def _fit_activation(self, x: torch.Tensor, plan: LayerPlan, index: int) -> ActivationQuantizer:
        """The input quantizer of a layer, fitted to its inputs on the first chunk of windows.

        One process fits to ``x``; ranks fit to the values one process would subsample from the
        first chunk (every ``stride``-th value of its windows in order), gathered from the ranks
        holding them, so every rank fits the same quantizer from the same values.
        """
        if self.world == 1:
            return ActivationQuantizer.from_spec(x, plan.act, plan.name).to(x.device)
        place, size = self.places[index]
        per_window = x.numel() // place.numel()  # a transformer's linear layers batch more rows than windows
        total = size * per_window
        stride = total // _ACT_SAMPLES + 1 if total > _ACT_SAMPLES else 1
        local = x.new_zeros(0)
        if self.first_chunk[index]:
            start = int(place[0]) * per_window  # the windows of a chunk are consecutive places
            local = x.detach().reshape(-1).float()[(-start) % stride :: stride]
        values, received = all_gather_rows(local)
        logger.debug("%s activation range: gathered %d values (%d bytes)", plan.name, values.numel(), received)
        return ActivationQuantizer.from_spec(values, plan.act, plan.name).to(x.device)

    def _run_layer(self, plan: LayerPlan, attention: ClassAttention | None) -> LayerReport:
        def pairs() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for batch in self.batches:  # one batch's activations at a time: memory stays bounded
                batch = batch.to(self.device)
                y = _capture(self.fp, self.fp.get_submodule(plan.name), batch, "output")
                x = _capture(self.qnet, self.qnet.get_submodule(plan.name), batch, "input")
                yield x, y

        module, report = self._layer(plan, pairs, attention)
        set_submodule(self.qnet, plan.name, module)
        return report

    def _restore(self, plan: LayerPlan) -> tuple[QuantizedLayer, LayerReport] | None:
        """The layer as the journal holds it, or ``None`` when it has to be solved."""
        entry = None if self.journal is None else self.journal.load(plan.name)
        if entry is None:
            return None
        fp_layer = self.fp.get_submodule(plan.name)
        module = entry.build(self.qnet.get_submodule(plan.name), quantized_layer_class(fp_layer))
        return module.to(self.device), entry.report

    def _layer(
        self,
        plan: LayerPlan,
        pairs: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
        attention: ClassAttention | None,
    ) -> tuple[QuantizedLayer, LayerReport]:
        """The layer restored from the journal, or solved from ``pairs()`` and journaled."""
        restored = self._restore(plan)
        return restored if restored is not None else self._solved(plan, pairs, attention)

    def _solved(
        self,
        plan: LayerPlan,
        pairs: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
        attention: ClassAttention | None,
    ) -> tuple[QuantizedLayer, LayerReport]:
        """The layer solved from ``pairs()``, and journaled."""
        module, report = self._solve(plan, pairs(), attention)
        if self.journal is not None:
            self.journal.record(plan.name, module, report)
        return module, report

    def _solve(
        self, plan: LayerPlan, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], attention: ClassAttention | None
    ) -> tuple[QuantizedLayer, LayerReport]:
        """Accumulate one layer's statistics from (quantized input, FP output) pairs and solve it.

        A method whose codes do not depend on the data (round to nearest) is solved first, and
        only its error figures, and round to nearest's, are measured on the pairs, by running the
        layer (:class:`~monai_effq.solver.output_error.OutputError`), instead of summing statistics.
        So is a layer that validation would keep at round to nearest outright because the windows
        give it fewer voxels than unknowns per output channel (:func:`~monai_effq.solver.validation.solve_validated`):
        the scan has counted its voxels, and its ``n × n`` sums (the largest of the network, 0.2 GB at
        ``n = 5184``) would decide nothing.
        """
        t0 = time.perf_counter()
        fp_layer = self.fp.get_submodule(plan.name)
        # the solver's messages then name the layer as the network does, not only its class
        view = dataclasses.replace(layer_view(fp_layer), name=f"{plan.name} ({type(fp_layer).__name__})")
        weight, bias = fp_layer.weight.detach(), None if fp_layer.bias is None else fp_layer.bias.detach()
        summed = get_method(plan.method).needs_statistics
        underdetermined = summed and self.config.validation_fraction > 0 and is_underdetermined(self.bounds[plan.name][0], view.in_per_group)
        if summed and not underdetermined:
            voxels, inputs, targets = self.bounds[plan.name]
            largest = 1.0 if attention is None else max(1.0, float(attention.class_weights.max()))
            bounds = SumBounds(voxels=voxels, weight=largest, inputs=inputs, targets=targets)
            # Sums over ranks are reduced once, after the last batch; a low-rank factor would need the columns.
            # The sums are exact, so one process and any number of ranks hold the same statistics.
            acc: GramAccumulator | OutputError = GramAccumulator(
                view, max_chunk_elements=self.config.max_chunk_elements, keep_factor=self.world == 1, bounds=bounds
            )
        else:
            rtn = solve_weights(view, weight, bias, plan.weight, method="rtn")
            data_free = plan.method == "rtn" or underdetermined
            sol = rtn if data_free else solve_weights(view, weight, bias, plan.weight, method=plan.method)
            if underdetermined:
                sol.info["choice"] = UNDERDETERMINED_CHOICE
            # weights equal to round to nearest's are run once, for both figures
            acc = OutputError(
                fp_layer, {"fp": (weight, bias), "quantized": (sol.weight, sol.bias), "rtn": (rtn.weight, rtn.bias)}
            )
        act_q: ActivationQuantizer | None = None
        for index, (x, y) in enumerate(pairs):
            if plan.act is not None:
                if act_q is None:  # ranges from the first batch, used for all
                    act_q = self._fit_activation(x, plan, index)
                x = act_q(x)
            if view.kind == "linear":
                x, y = _by_calibration_window(x, y, len(self.places[index][0]), plan.name)
            h = None
            if attention is not None and view.kind != "linear":
                h = attention(tuple(y.shape[2:]), index)
            if isinstance(acc, OutputError):
                acc.add_batch(x, y, h, self.window_numbers[index])
                continue
            held = None
            if self.config.validation_fraction > 0:
                place, size = self.places[index]
                if self.chunks > 1:
                    # a chunk's windows by their numbers among all of them: the run's hold-out, whatever the memory budget
                    place, size = self.window_numbers[index], sum(self.shares)
                held = holdout_mask((size, *_voxel_shape(view, y)[1:]), self.config.validation_fraction, self.mirrored_dims)
                held = None if held is None else held[place]
            acc.add_batch(x, y, h, held)  # the statistics and the solve stay on the run's device
        if isinstance(acc, OutputError):
            acc.gather(all_gather_objects)
            sol = dataclasses.replace(sol, mse=acc.mse("quantized"), mse_fp=acc.mse("fp"), mse_rtn=acc.mse("rtn"))
            voxels, effective_voxels = acc.voxels, acc.effective_voxels
        else:
            sol, voxels, effective_voxels = self._solve_statistics(plan, view, acc, weight, bias)
        del acc
        cls = quantized_layer_class(fp_layer)
        q_layer = self.qnet.get_submodule(plan.name)
        module = cls(
            q_layer, sol.codes, sol.scale, sol.zero_point, sol.grid, sol.bias, act_q, plan.weight.channel_axis
        ).to(self.device)
        report = LayerReport(
            name=plan.name,
            kind=cls.__name__,
            weight_bits=sol.grid.bits,
            act_bits=None if act_q is None else act_q.grid.bits,
            act_grid=None if act_q is None else act_q.grid.kind,
            params=fp_layer.weight.numel(),
            mse_fp=sol.mse_fp,
            mse_rtn=sol.mse_rtn,
            mse=sol.mse,
            seconds=time.perf_counter() - t0,
            solve_seconds=sol.seconds,
            iterations=sol.trace.iterations if sol.trace is not None else 0,
            voxels=voxels,
            effective_voxels=effective_voxels,
            unknowns=view.in_per_group,
            mse_holdout=sol.info.get("holdout_mse"),
            mse_holdout_rtn=sol.info.get("holdout_mse_rtn"),
            choice=sol.info.get("choice", sol.method),
        )
        return module, report

    def _solve_statistics(
        self, plan: LayerPlan, view: LayerView, acc: GramAccumulator, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[LayerSolution, int, float]:
        """The layer's solution from its summed statistics (reduced over ranks), its voxels and effective voxels."""
        if self.world > 1:
            sent = acc.reduce(all_reduce_sum)
            logger.info("%s all-reduce: %d bytes (statistics %d bytes)", plan.name, sent, acc.statistics_bytes())
        stats = acc.statistics()
        solve_args = dict(
            weight=weight, bias=bias, spec=plan.weight, method=plan.method, admm=self.config.admm, init=self.config.init
        )
        if self.config.validation_fraction > 0:
            parts = {"fit": acc.statistics("fit"), "holdout": acc.statistics("holdout")} if acc.has_holdout else {}
            sol = solve_validated(view, stats, **parts, **solve_args)
        else:
            sol = solve_statistics(view, stats, **solve_args)
        return sol, stats.voxels, stats.effective_voxels


def _by_calibration_window(
    inputs: torch.Tensor, targets: torch.Tensor, windows: int, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``Linear`` layer's inputs and targets with the calibration windows as their first axis.

    A window-attention transformer (SwinUNETR) runs its linear layers on ``(N * windows, tokens,
    features)``: its attention windows, not the calibration windows, lead. A linear layer maps each
    token on its own, so grouping the tokens by calibration window changes no output; it gives
    hold-out and window numbering the calibration windows they count.

    Args:
        inputs: the layer's input batch, features last.
        targets: its full-precision output batch, features last.
        windows: calibration windows in the batch.
        name: the layer, for the error.

    Returns:
        ``inputs`` and ``targets``, unchanged when their first axis is ``windows``, else viewed
        as ``(windows, -1, features)``.

    Raises:
        ValueError: when the first axis is not a whole multiple of ``windows``.
    """
    if inputs.shape[0] == windows:
        return inputs, targets
    if inputs.dim() < 2 or inputs.shape[0] % windows:
        raise ValueError(
            f"{name} runs on a batch of {inputs.shape[0]} rows for {windows} calibration window(s); a linear "
            "layer's first axis must be the calibration batch or a whole multiple of it (windows first). "
            f"Leave it out with EfficientQConfig(skip=[{name!r}])."
        )
    return (
        inputs.reshape(windows, -1, inputs.shape[-1]),
        targets.reshape(windows, -1, targets.shape[-1]),
    )


def _voxel_shape(view: LayerView, targets: torch.Tensor) -> tuple[int, ...]:
    """The shape of a layer's output voxels: ``(N, *spatial)``, or the leading axes for ``Linear``."""
    return tuple(targets.shape[:-1]) if view.kind == "linear" else (targets.shape[0], *targets.shape[2:])


def _calibration_fingerprint(batches: list[torch.Tensor]) -> str:
    """The fingerprint of every rank's calibration windows (or their body masks), one by one in rank
    order: the same however the windows are batched or shared among ranks."""
    windows = [fingerprint_tensors([w]) for b in batches for w in b]
    return fingerprint_json([w for share in all_gather_objects(windows) for w in share])


def _with_mirror_images(
    batches: list[torch.Tensor], body_mask: torch.Tensor | list[torch.Tensor] | None
) -> tuple[list[torch.Tensor], torch.Tensor | list[torch.Tensor] | None]:
    """The batches with every window's mirror images after it, and the body mask laid over them likewise.

    Args:
        batches: the calibration batches ``(N, C, *spatial)``.
        body_mask: ``quantize``'s body mask in any of its forms: one ``(N, *spatial)`` or
            ``(N, 1, *spatial)`` tensor over all batches, or a list with one per batch.

    Returns:
        the mirrored batches and the body mask in the same form, mirrored as the windows are.
    """

    def masks_like(mask: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        mask = torch.as_tensor(mask)
        # an (N, 1, *spatial) mask flips as the images do, an (N, *spatial) one as a mask
        return mirror_images(mask) if mask.dim() == batch.dim() else mirror_masks(mask, batch.dim() - 2)

    mirrored = [mirror_images(b) for b in batches]
    if body_mask is None:
        return mirrored, None
    if isinstance(body_mask, (list, tuple)):
        return mirrored, [masks_like(m, b) for m, b in zip(body_mask, batches, strict=True)]
    parts = torch.split(torch.as_tensor(body_mask), [b.shape[0] for b in batches])
    return mirrored, torch.cat([masks_like(m, b) for m, b in zip(parts, batches)])


# below this share of the network's parameters, weights left in floating point are a transformer's position
# tables and the like, which monai-effq leaves so on purpose: no warning
FLOAT_WEIGHT_WARNING_SHARE = 0.05


def _warn_of_float_weights(left: dict[str, tuple[int, ...]], network: nn.Module) -> None:
    """Warn when weights no quantized layer holds are a noticeable part of the network, naming the largest."""
    total = sum(p.numel() for p in network.parameters()) + sum(
        m.codes.numel() for m in network.modules() if isinstance(m, QuantizedLayer)
    )
    share = sum(math.prod(shape) for shape in left.values()) / max(total, 1)
    if share < FLOAT_WEIGHT_WARNING_SHARE:
        return
    shown = ", ".join(f"{name} ({'x'.join(map(str, shape))})" for name, shape in list(left.items())[:3])
    logger.warning(
        "%d weight tensors, %.0f%% of the network's parameters, stay in floating point because no layer monai-effq "
        "quantizes holds them: %s%s. It quantizes Conv, ConvTranspose and Linear modules; a weight applied with "
        "torch.nn.functional, or an LSTM's, is none of them: hold it in such a module to quantize it.",
        len(left), 100 * share, shown, ", ..." if len(left) > 3 else "",
    )


@ieee_float32()  # the layers' FP targets and the fold check, not TF32's approximations of them
def quantize(
    network: nn.Module,
    calibration: torch.Tensor | Iterable[torch.Tensor],
    config: EfficientQConfig | Mapping[str, Any] | None = None,
    *,
    task: str = "multiclass",
    body_mask: torch.Tensor | list[torch.Tensor] | None = None,
    progress: bool = True,
    journal: str | os.PathLike | None = None,
) -> QuantizationResult:
    """Quantize a trained network after training, layer by layer.

    When ``torch.distributed`` is initialised (``torchrun``), each rank passes its own share of the
    calibration windows (rank 0 the first ones); every rank calls ``quantize`` and gets the same
    result as one process given all the windows in rank order. Per layer, one all-reduce sums the
    statistics (no activation crosses ranks); a layer with a quantized input first gathers the
    subsample of first-chunk inputs its range is fitted to; the class-attention counts are summed
    once. Nothing is written here: the caller saves on rank 0 only.

    Args:
        network: the FP network (not modified).
        calibration: a tensor batch ``(N, C, *spatial)`` or an iterable of batches (dicts with an
            ``"image"`` key and NumPy arrays are accepted); one volume is enough.
        config: the settings, as an :class:`EfficientQConfig` or a dict of its fields (``{"weight_bits": 4}``,
            as :meth:`EfficientQConfig.from_dict` reads it); ``None``: the defaults (W4A8, first/last layer 8 bits).
        task: ``"multiclass"`` (softmax) or ``"multilabel"`` (sigmoid channels), for the attention.
        body_mask: ``(N, *spatial)`` mask of the body over all calibration volumes, for the
            attention (voxels outside get weight 1); ``"nonzero"``: the voxels where any channel is not
            zero (skull-stripped brain MRI); everything when ``None``.
        progress: show a progress bar over layers.
        journal: a folder where each finished layer is kept (:class:`QuantizationJournal`): rerun
            after a kill, the same call continues after the last finished layer and returns what an
            uninterrupted run returns; a journal of another config, FP network, calibration data,
            body mask or task is discarded (with a warning naming what changed). The caller removes it
            (:func:`~monai_effq.ptq.journal.remove_journal`) once the result is saved. ``None``
            keeps no journal. Across ranks every rank passes the same path and rank 0 keeps the
            journal. A journal resumes under another number of ranks, or in one process, with the
            same config (its device included); the result is then the one an uninterrupted run
            gives wherever the two counts give the same bits (gloo ranks and one process on one
            thread each do, as a test checks).

    Returns:
        a :class:`QuantizationResult` whose ``.network`` is in eval mode.

    Raises:
        ValueError: for bad calibration data, a bad config, a network with nothing to quantize.
        TypeError: for calibration that is not tensors.
    """
    if config is None:
        config = EfficientQConfig()
    elif isinstance(config, Mapping):
        config = EfficientQConfig.from_dict(dict(config))
    elif not isinstance(config, EfficientQConfig):
        raise UserInputError(f"config must be an EfficientQConfig or a dict of its fields, got a {type(config).__name__}.")
    t0 = time.perf_counter()
    reset_peak_memory()
    fp_bytes = state_bytes(eager_network(network))  # as given: a float16 network is quantized from a float32 copy
    network = quantizable_network(network)
    batches = _as_batches(calibration)
    if isinstance(body_mask, str):
        if body_mask != "nonzero":
            raise UserInputError(f"body_mask must be a mask, 'nonzero' or None, got {body_mask!r}.")
        body_mask = [(b != 0).any(dim=1) for b in batches]
    sources = source_fingerprints(network, config.to_dict(), _calibration_fingerprint(batches))
    # a network rebuilt with other settings (GroupNorm groups) keeps its weights' fingerprint; as a list,
    # since fingerprint_json sorts a dict's keys, and layers built in another order compute otherwise
    architecture = fingerprint_json(list(architecture_table(network).items()))
    if get_world_size() > 1:
        _check_ranks_agree(sources["fp_weights"], architecture, config, task)
    if journal is not None:
        # the fingerprints of all ranks' windows: a journal resumes under any number of ranks
        masks = [] if body_mask is None else [torch.as_tensor(m) for m in (body_mask if isinstance(body_mask, (list, tuple)) else [body_mask])]
        journal = QuantizationJournal(journal, {
            **sources,
            "architecture": architecture,
            "body_mask": _calibration_fingerprint(masks),
            "task": task,
        })
    try:
        if config.calibration_flips:
            batches, body_mask = _with_mirror_images(batches, body_mask)
        run = _Run(network, batches, config, journal)
        # the scan's logits set the attention and its bounds the exact sums: a run with neither skips it
        # (the first window's targets it would keep are then captured before the first solve)
        logits = run.scan() if config.attention or run.summed else None
        attention = None
        if config.attention:
            attention = ClassAttention(
                logits, task=task, power=config.attention_power, body_mask=run.masks(body_mask),
                reduce_counts=all_reduce_sum if run.world > 1 else None,
            )
            logger.info("class attention weights %s (voxel counts %s)", attention.class_weights.tolist(), attention.class_counts.tolist())
        del logits
        # The task travels with the result (and its checkpoint), so a fine-tune need not be told it again.
        report = QuantizationReport(method=config.method, folded_batchnorms=run.folded, sources=sources, extra={"task": task})
        planned = {p.name for p in run.plans}
        report.skipped = [n for n in run.order if n not in planned]
        report.layers = run.run(attention, progress and run.rank == 0)
        qnet = run.qnet.eval()
        if config.share_skip_rounding:
            # after every solve: the layers after a unit were fitted to its output with the skip unrounded
            shared = share_skip_roundings(qnet)
            if shared:
                logger.info("%d residual units round their input once for the first layer and the skip: %s", len(shared), ", ".join(shared))
        finish_report(report, qnet, fp_bytes, time.perf_counter() - t0)
        left = float_weights(qnet, report.skipped)
        report.float_weights = list(left)
        logger.info(report.summary())
        warning = report.underdetermined_warning()
        if warning:
            logger.warning(warning)
        _warn_of_float_weights(left, qnet)
        return QuantizationResult(network=qnet, report=report, config=config, folded=run.folded)
    finally:
        if journal is not None:  # the next run on its folder may start
            journal.close()
