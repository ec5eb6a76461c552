"""The held-out check of a fine-tune: score the start and the end on fixed windows, keep the better.

A short quantization-aware fine-tune can make a network worse (a learning rate too high for the
grid, too few steps to repair a start the fixed-point formats broke, a loss that does not fall).
:class:`FinetuneCheck` makes that visible and harmless:

1. :meth:`FinetuneCheck.start` scores the network before training on held-out windows (mean loss and
   Dice per foreground class, Dice summed over every window), keeps a copy of its state and
   diagnoses what the quantizers do to the start (:func:`format_losses`: layers whose weights or
   inputs their grid rounds or clips with an error of half their size);
2. :meth:`FinetuneCheck.finish` scores the end and puts the start's state back when the end is worse
   (:func:`end_is_better`), with a warning that names the cause candidates (learning rate, steps,
   format); it also warns when the network kept is far below a reference (the FP network of an FP
   start) on the same windows.

Held-out windows (decided here, see :func:`draw_windows`): the caller's ``validation_data`` when
given (e.g. validation cases no training step sees); otherwise the first ``count`` batches of one
pass over the training data, drawn once before training. With random-crop training transforms those
are crops the training stream draws afresh (it may overlap them, it never repeats them exactly);
with a fixed list of batches they are training batches, so pass ``validation_data`` for windows
that no step trains on.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from monai_effq.ptq.attention import check_task
from monai_effq.utils.errors import UserInputError, check_integer

if TYPE_CHECKING:
    from monai_effq.qat.finetune import TrainableNetwork

__all__ = [
    "DEFAULT_CHECK_BATCHES",
    "HeldOutScore",
    "FinetuneCheck",
    "check_batch_count",
    "check_label",
    "draw_windows",
    "end_is_better",
    "format_losses",
    "score_windows",
]

logger = logging.getLogger("monai_effq")

DEFAULT_CHECK_BATCHES = 4
# A layer's weights (or inputs) count as lost to their grid when the rounding and clipping error
# reaches this share of their RMS (all rounded to zero: 1.0; a calibrated 4-bit grid: about 0.2).
_LOST_ERROR = 0.5
# A finding's inputs overrun their calibrated range when this share of them is clipped.
_CLIPPED_INPUTS = 0.01
# Findings named in a warning (the largest errors); the rest are counted.
_NAMED_FINDINGS = 5
# The kept network is reported when its held-out Dice is this far below the reference's.
REFERENCE_TOLERANCE = 0.02

Inferer = Callable[[torch.Tensor, nn.Module], torch.Tensor]


@dataclass(frozen=True)
class HeldOutScore:
    """A network's score on the held-out windows.

    Attributes:
        loss: the mean loss over the windows.
        dice: Dice per foreground class, from intersections and sizes summed over every window;
            ``nan`` for a class that no window's label holds.
        windows: how many windows were scored (over every rank when scored across ranks).
    """

    loss: float
    dice: tuple[float, ...]
    windows: int = 0

    @property
    def mean_dice(self) -> float:
        """Mean Dice over the classes some window holds (``nan`` when none does)."""
        known = [d for d in self.dice if not math.isnan(d)]
        return sum(known) / len(known) if known else float("nan")

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers for a report."""
        return {"loss": self.loss, "dice": list(self.dice), "mean_dice": self.mean_dice}

    def __str__(self) -> str:
        return f"Dice {self.mean_dice:.4f}, loss {self.loss:.4f}"


def check_batch_count(count: int) -> int:
    """``count`` when it is a valid number of held-out batches (``0`` turns the check off).

    Args:
        count: the ``check_batches`` setting.

    Returns:
        ``count``.

    Raises:
        ValueError: for anything but a non-negative integer.
    """
    return check_integer(count, "check_batches", low=0, hint=" (0 turns the held-out check off)")


def end_is_better(start: HeldOutScore, end: HeldOutScore) -> bool:
    """Whether to keep the end of a fine-tune rather than its start.

    The mean Dice decides; an equal Dice (or none, when no window holds a foreground class) leaves
    it to the loss. A tie keeps the end.

    Args:
        start: the score before training.
        end: the score after training.

    Returns:
        ``True`` to keep the end.
    """
    a, b = start.mean_dice, end.mean_dice
    if not (math.isnan(a) or math.isnan(b)) and a != b:
        return b > a
    return end.loss <= start.loss


def draw_windows(data: Iterable[Any], count: int, role: str = "held-out") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` batches of one pass over ``data``, as ``(image, label)`` pairs.

    Args:
        data: labelled batches (dicts with ``"image"``/``"label"`` or ``(image, label)`` pairs).
        count: batches to take; fewer when one pass holds fewer.
        role: ``"held-out"`` for held-out data given as such, ``"training"`` where the windows come from the
            training data (named in the error messages).

    Returns:
        the windows, detached plain tensors.

    Raises:
        UserInputError: when ``data`` yields no batch, or a batch without a label or with non-finite images.
    """
    from monai_effq.qat.finetune import split_batch

    windows = []
    for i, batch in enumerate(data):
        if i >= count:
            break
        x, y = split_batch(batch, i, role)
        windows.append((x.detach(), y.detach()))
    if not windows:
        if role == "training":
            raise UserInputError("the training data yielded no batch: pass a non-empty training loader.")
        raise UserInputError("the held-out data yielded no batch: pass a non-empty loader (or check_batches=0 to skip the check).")
    return windows


def check_label(logits: torch.Tensor, label: torch.Tensor, task: str, what: str) -> None:
    """Refuse a label the network's output cannot be scored against, before a loss does with an index error.

    Args:
        logits: the network's output ``(B, C, *spatial)``.
        label: the batch's label: one channel of class indices ``0..C-1`` (multiclass) or ``C`` channels
            (multilabel).
        task: ``"multiclass"`` or ``"multilabel"``.
        what: the batch, for the message (``"training batch 3"``).

    Raises:
        UserInputError: naming the batch, what is wrong and the fix.
    """
    channels = logits.shape[1]
    if label.dim() == logits.dim() and label.shape[2:] != logits.shape[2:]:
        raise UserInputError(
            f"{what}: its label is {tuple(label.shape)} where the network's output is {tuple(logits.shape)}: give "
            "image and label the same spatial size (crop or resample them together in the transforms)."
        )
    if task == "multilabel":
        if label.dim() != logits.dim() or label.shape[1] != channels:
            raise UserInputError(
                f"{what}: a multilabel label has one channel per output channel ({channels}), got shape "
                f"{tuple(label.shape)}: pass task='multiclass' for a label of class indices."
            )
        return
    if label.dim() != logits.dim() or label.shape[1] != 1:
        raise UserInputError(
            f"{what}: a multiclass label is one channel of class indices, got shape {tuple(label.shape)}: pass "
            "task='multilabel' for sigmoid channels, or give the label as (B, 1, *spatial) class indices."
        )
    low, high = torch.aminmax(label.detach().reshape(-1).double())
    whole = not label.is_floating_point() or torch.equal(label, label.round())
    if float(low) < 0 or float(high) > channels - 1 or not whole:
        raise UserInputError(
            f"{what}: its label holds values from {float(low):.9g} to {float(high):.9g}, where the network's "
            f"{channels} output channels take whole class indices 0 to {channels - 1}: check the label files "
            "(or their preprocessing) and the network's out_channels."
        )


def _masks(logits: torch.Tensor, label: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true foreground masks ``(B, classes, *spatial)``."""
    if task == "multilabel":
        return logits > 0, label > 0.5
    classes = torch.arange(1, logits.shape[1], device=logits.device).view(1, -1, *([1] * (logits.dim() - 2)))
    pred = logits.max(dim=1, keepdim=True).indices  # argmax's labels, faster across the channel axis (ptq/attention.py)
    return pred == classes, label.long() == classes


def score_windows(
    network: nn.Module,
    windows: list[tuple[torch.Tensor, torch.Tensor]],
    loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    task: str,
    inferer: Inferer | None = None,
    across_ranks: bool = False,
) -> HeldOutScore:
    """Score ``network`` (in eval mode, without gradients, on its own device) on the windows.

    Args:
        network: the network.
        windows: ``(image, label)`` pairs.
        loss_function: ``loss(logits, label)``.
        task: ``"multiclass"`` (arg-max over the channels, integer label map) or ``"multilabel"``
            (a channel is foreground where its logit is positive).
        inferer: ``inferer(image, network)`` (e.g. a MONAI ``SlidingWindowInferer`` for whole
            volumes); the plain forward pass when ``None``.
        across_ranks: score the windows of every rank of the ``torch.distributed`` process group
            together (every rank must call this): the losses and the Dice counts are summed over the
            ranks, so every rank gets the same score, that of all their windows.

    Returns:
        the :class:`HeldOutScore`.

    Raises:
        ValueError: for an unknown task.
    """
    check_task(task)
    device = _device(network)
    was_training = network.training
    network.eval()
    losses, inter, sizes, truth = [], 0.0, 0.0, 0.0
    with torch.no_grad():
        for i, (x, y) in enumerate(windows):
            x, y = x.to(device), y.to(device)
            logits = inferer(x, network) if inferer is not None else network(x)
            logits = torch.as_tensor(logits).as_subclass(torch.Tensor)
            check_label(logits, y, task, f"held-out window {i}")
            losses.append(float(loss_function(logits, y)))
            pred, true = _masks(logits, y, task)
            dims = [0, *range(2, pred.dim())]
            inter = inter + (pred & true).sum(dims).double()
            sizes = sizes + (pred.sum(dims) + true.sum(dims)).double()
            truth = truth + true.sum(dims).double()
    network.train(was_training)
    loss_sum, count = sum(losses), len(losses)
    if across_ranks:
        loss_sum, count, inter, sizes, truth = _sum_over_ranks(loss_sum, count, inter, sizes, truth, device)
    dice = torch.where(truth > 0, 2 * inter / torch.as_tensor(sizes).clamp_min(1), torch.nan)
    return HeldOutScore(loss=loss_sum / count, dice=tuple(float(d) for d in dice), windows=count)


def _sum_over_ranks(
    loss_sum: float, count: int, inter: torch.Tensor, sizes: torch.Tensor, truth: torch.Tensor, device: torch.device
) -> tuple[float, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The held-out sums of every rank, with one float64 all-reduce (on ``device``: NCCL reduces CUDA tensors)."""
    import torch.distributed as dist

    classes = inter.numel()
    flat = torch.cat([torch.tensor([loss_sum, count], dtype=torch.float64), inter.cpu(), sizes.cpu(), truth.cpu()]).to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu()
    parts = flat[2:].split(classes)
    return float(flat[0]), int(flat[1]), parts[0], parts[1], parts[2]


def _device(network: nn.Module) -> torch.device:
    return next((p.device for p in network.parameters()), torch.device("cpu"))


def format_losses(
    trainable: TrainableNetwork, windows: list[tuple[torch.Tensor, torch.Tensor]], inferer: Inferer | None = None
) -> list[str]:
    """What the quantizers take from the network: layers whose weights or inputs their grid loses.

    A layer is named when the error of its weights (or of its inputs, on the windows) on their grid,
    rounding and clipping, is at least half their root mean square: an explicit fixed-point format
    whose step is coarse for the layer rounds everything to a few levels (or to zero), one whose
    range is narrow clips. Calibrated grids of 3 bits or more stay well below (about 0.2 at 4 bits).

    Args:
        trainable: the network in its training form.
        windows: images to run (the labels are not used).
        inferer: ``inferer(image, network)``, or ``None`` for the plain forward pass.

    Returns:
        one sentence per finding, the largest rounding errors first, empty when the grids fit.
    """
    return [finding.text for finding in _lost_tensors(trainable, windows, inferer)]


@dataclass(frozen=True)
class _Finding:
    """A layer's weights or inputs that their grid loses (:func:`format_losses`)."""

    error: float  # the rounding and clipping error, relative to their RMS
    what: str  # "weights" or "inputs"
    clipped: float  # the fraction clipped
    text: str


def _lost_tensors(
    trainable: TrainableNetwork, windows: list[tuple[torch.Tensor, torch.Tensor]], inferer: Inferer | None = None
) -> list[_Finding]:
    """:func:`format_losses`' findings, the largest errors first."""
    found: list[_Finding] = []
    inputs: dict[str, list[float]] = {}
    handles = []
    for name, layer in trainable.layers().items():
        w = layer.weight.detach()
        q = layer.quantized_weight().detach()
        grid = f"{layer.grid.kind} {layer.grid.bits}-bit weights, step {float(layer.scale.float().median()):.3g}, largest |w| {float(w.abs().max()):.3g}"
        clip = float(((w - q).abs() > layer.weight_step() / 2 * (1 + 1e-6)).float().mean())
        found.extend(_finding(name, "weights", float((q - w).norm() / w.norm().clamp_min(1e-30)), clip, grid))
        if layer.input_quantizer is not None:
            handles.append(layer.register_forward_pre_hook(lambda m, a, n=name: _count_input(m.input_quantizer, a[0], inputs.setdefault(n, [0.0] * 4))))
    device = _device(trainable.network)
    was_training = trainable.network.training
    trainable.network.eval()
    try:
        with torch.no_grad():
            for x, _ in windows:
                x = x.to(device)
                inferer(x, trainable.network) if inferer is not None else trainable.network(x)
    finally:
        for h in handles:
            h.remove()
        trainable.network.train(was_training)
    for name, (total, clipped, error, energy) in inputs.items():
        aq = trainable.network.get_submodule(name).input_quantizer
        grid = f"{aq.grid.kind} {aq.grid.bits}-bit inputs, step {float(aq.scale):.3g}"
        found.extend(_finding(name, "inputs", math.sqrt(error / max(energy, 1e-30)), clipped / max(total, 1.0), grid))
    return sorted(found, key=lambda f: -f.error)


def _finding(name: str, what: str, error: float, clip: float, grid: str) -> list[_Finding]:
    """A layer's finding for :func:`format_losses`, or none."""
    if error < _LOST_ERROR:
        return []
    return [_Finding(error, what, clip, f"{name} ({what}: rounding error {error:.0%} of their RMS, {clip:.0%} clipped; {grid})")]


def _count_input(quantizer: nn.Module, x: torch.Tensor, counts: list[float]) -> None:
    """Add a batch's input count, clipped inputs, squared rounding error and squared inputs to ``counts``."""
    q = quantizer(x)
    scale = float(quantizer.scale)
    low = (quantizer.qmin - float(quantizer.zero_point)) * scale
    high = (quantizer.qmax - float(quantizer.zero_point)) * scale
    counts[0] += x.numel()
    counts[1] += float(((x < low - scale / 2) | (x > high + scale / 2)).sum())
    counts[2] += float((q - x).double().pow(2).sum())
    counts[3] += float(x.double().pow(2).sum())


class FinetuneCheck:
    """Scores a fine-tune's start and end on held-out windows and keeps the better.

    Args:
        trainable: the network being fine-tuned (its state is put back to the start when the end is worse).
        windows: held-out ``(image, label)`` pairs (:func:`draw_windows`).
        loss_function: ``loss(logits, label)``, the training loss.
        task: ``"multiclass"`` or ``"multilabel"``, for the Dice.
        inferer: ``inferer(image, network)``, or ``None`` for the plain forward pass.
        reference: a network to compare the kept one with (the FP network of an FP start), or ``None``.
        across_ranks: the fine-tune runs on every rank of a ``torch.distributed`` process group (a
            ``DistributedDataParallel`` trainer), each with windows of its own: start and end are
            scored on all ranks' windows together (:func:`score_windows`), so every rank takes the
            same decision and keeps the same network. The layer findings are this rank's windows'.
    """

    def __init__(
        self,
        trainable: TrainableNetwork,
        windows: list[tuple[torch.Tensor, torch.Tensor]],
        loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        task: str,
        inferer: Inferer | None = None,
        reference: nn.Module | None = None,
        across_ranks: bool = False,
    ) -> None:
        self.trainable = trainable
        self.across_ranks = across_ranks
        self.windows = windows
        self.loss_function = loss_function
        self.task = task
        self.inferer = inferer
        self.reference = reference
        self.start_score: HeldOutScore | None = None
        self.reference_score: HeldOutScore | None = None
        self.findings: list[str] = []
        self._clipped_inputs = False  # a finding's inputs overrun their calibrated range
        self._start_state: dict[str, torch.Tensor] | None = None

    def _score(self, network: nn.Module) -> HeldOutScore:
        return score_windows(network, self.windows, self.loss_function, self.task, self.inferer, self.across_ranks)

    def start(self) -> HeldOutScore:
        """Score the start, keep its state and diagnose its quantizers (call before training).

        Returns:
            the start's score.
        """
        self._start_state = copy.deepcopy(self.trainable.network.state_dict())
        self.start_score = self._score(self.trainable.network)
        if self.reference is not None:
            self.reference_score = self._score(self.reference)
        lost = _lost_tensors(self.trainable, self.windows, self.inferer)
        self.findings = [finding.text for finding in lost]
        self._clipped_inputs = any(f.what == "inputs" and f.clipped >= _CLIPPED_INPUTS for f in lost)
        reference = "" if self.reference_score is None else f" (reference {self.reference_score})"
        logger.info("fine-tune starts at held-out %s on %d windows%s", self.start_score, self.start_score.windows, reference)
        return self.start_score

    def finish(self, learning_rates: list[float], losses: list[float]) -> dict[str, Any]:
        """Score the end; put the start back when it was better; warn with the cause candidates.

        Args:
            learning_rates: the learning rate of every optimizer step taken.
            losses: the training loss of every step.

        Returns:
            the check's figures for the report: ``start``, ``end``, ``reference`` (or ``None``),
            ``kept`` (``"end"`` or ``"start"``), ``windows``, ``causes`` and ``findings`` (every
            layer :func:`format_losses` named).

        Raises:
            RuntimeError: when :meth:`start` was not called.
        """
        if self.start_score is None or self._start_state is None:
            raise RuntimeError("FinetuneCheck.finish needs FinetuneCheck.start before training: call it first.")
        end = self._score(self.trainable.network)
        keep_end = end_is_better(self.start_score, end)
        if not keep_end:
            self.trainable.network.load_state_dict(self._start_state)
        kept = end if keep_end else self.start_score
        causes = self.causes(learning_rates, losses, worse=not keep_end, end=end)
        if not keep_end:
            logger.warning(
                "the fine-tune made the network worse on the %d held-out windows (start %s, end %s): the start is "
                "kept. Cause candidates: %s",
                end.windows, self.start_score, end, "; ".join(causes),
            )
        elif self.reference_score is not None and kept.mean_dice < self.reference_score.mean_dice - REFERENCE_TOLERANCE:
            logger.warning(
                "the fine-tuned network ends at held-out %s, %.3f below the reference's %s (start %s). Cause "
                "candidates: %s",
                kept, self.reference_score.mean_dice - kept.mean_dice, self.reference_score, self.start_score, "; ".join(causes),
            )
        else:
            logger.info("fine-tune ends at held-out %s (start %s): the end is kept", end, self.start_score)
        self._start_state = None
        return {
            "windows": end.windows,
            "start": self.start_score.as_dict(),
            "end": end.as_dict(),
            "reference": None if self.reference_score is None else self.reference_score.as_dict(),
            "kept": "end" if keep_end else "start",
            "causes": causes,
            "findings": list(self.findings),
        }

    def causes(
        self, learning_rates: list[float], losses: list[float], worse: bool = True, end: HeldOutScore | None = None
    ) -> list[str]:
        """The cause candidates of a poor fine-tune: learning rate, steps, format, the loss's course.

        Args:
            learning_rates: the learning rate of every step.
            losses: the training loss of every step.
            worse: whether the end scored worse than the start (a training loss that fell is then a
                candidate too: the training windows did not represent the held-out ones, or, when
                the held-out loss fell as well, the loss does not follow Dice).
            end: the end's held-out score, or ``None``.

        Returns:
            one sentence per candidate.
        """
        causes = []
        steps = len(learning_rates)
        scales = [float(m.scale.float().median()) for m in self.trainable.layers().values()]
        step = sorted(scales)[len(scales) // 2] if scales else float("nan")
        reach = sum(learning_rates)
        if learning_rates and max(learning_rates) > step:
            causes.append(
                f"learning rate: {max(learning_rates):.3g} is larger than the median weight step {step:.3g}, so one "
                "Adam step (about the learning rate per weight) can move a weight across several grid levels: lower it"
            )
        few_steps = bool(learning_rates) and reach < step / 2
        if few_steps:
            causes.append(
                f"steps: in {steps} steps (learning rates summing to {reach:.3g}) Adam moves a weight by about "
                f"{reach:.3g}, less than half the median weight step {step:.3g}, so few codes can change: more "
                "steps or a higher learning rate"
            )
        if len(losses) >= 2:
            k = max(1, min(10, len(losses) // 4))
            first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
            if last >= first:
                # with too few steps to change codes, a flat loss says nothing about the learning rate
                if not few_steps:
                    causes.append(f"training loss: it did not fall ({first:.4f} -> {last:.4f}): lower the learning rate")
            elif worse and end is not None and self.start_score is not None and end.loss < self.start_score.loss:
                # the held-out loss followed the training loss: the windows agree, the loss and Dice do not
                causes.append(
                    f"loss and Dice: the training loss fell ({first:.4f} -> {last:.4f}) and so did the held-out loss "
                    f"({self.start_score.loss:.4f} -> {end.loss:.4f}), but not the held-out Dice "
                    f"({self.start_score.mean_dice:.4f} -> {end.mean_dice:.4f}): the loss gains where Dice does not "
                    "(background, or a class with few voxels in these windows): score more windows (check_batches, "
                    "validation_data) or train with a loss that weighs Dice more"
                )
            elif worse:
                causes.append(
                    f"training loss: it fell ({first:.4f} -> {last:.4f}) but the held-out score did not follow: the "
                    "training windows do not represent the held-out ones"
                )
        if self.findings:
            named, more = self.findings[:_NAMED_FINDINGS], len(self.findings) - _NAMED_FINDINGS
            config = self.trainable.config
            explicit = config.weight_format is not None or config.act_format is not None or any(
                "weight_format" in o or "act_format" in o for o in config.overrides.values()
            )
            if explicit:
                advice = (
                    "choose formats that fit these layers (power_of_two=True picks f per tensor from its range) or give "
                    "the fine-tune enough steps to rebuild them"
                )
            elif self._clipped_inputs:
                # fitted ranges that clip the held-out windows were fitted to other data
                source = (
                    "the PTQ calibration volume: quantize again on a volume like these windows"
                    if self.trainable.start == "ptq"
                    else "the start's calibration batches (calibration_data=, else the first training batches): pass "
                    "calibration_data= a volume like these windows"
                )
                advice = f"their input ranges were calibrated on {source}, or give these layers more bits with an override"
            else:
                advice = "give these layers more bits with an override, or the fine-tune enough steps to rebuild them"
            causes.append(
                f"format: the start's grids lose {len(self.findings)} of its quantized layers' weights or inputs, "
                + ", ".join(named)
                + (f" and {more} more (report extra.finetune.check.findings)" if more > 0 else "")
                + f": {advice}"
            )
            formats = config.weight_format is not None or any("weight_format" in o for o in config.overrides.values())
            if formats and self.trainable.folded:
                causes.append(
                    f"BatchNorm folding: {len(self.trainable.folded)} BatchNorms were folded into weights with a fixed "
                    "format, which scales each filter by gamma/sigma off the format's step; fold_batchnorm=False keeps "
                    "them beside the fixed-point weights"
                )
        if not causes:
            causes.append("none found: try more held-out windows, another learning rate or more steps")
        return causes
