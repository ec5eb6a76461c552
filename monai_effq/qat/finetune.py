"""Quantization-aware fine-tuning: the U-Net fixed-point method's training, from FP, scratch or PTQ.

Phases, each a call:

1. :func:`prepare_finetune` turns a start into a :class:`TrainableNetwork`: from a PTQ result
   (EfficientQ/GPTQ/RTN codes become the shadow weights' starting point), from an FP network (the
   method's ``retrain`` mode: BatchNorm folded, weight scales fitted, activation ranges calibrated
   on the first training batches) or from scratch (the paper's setting: parameters re-initialised,
   BatchNorm kept).
2. Training, either :func:`train_steps` (a plain loop) or a MONAI ``SupervisedTrainer`` on
   ``TrainableNetwork.network`` (the bundles' ``finetune`` workflow), between the two halves of the
   held-out check (:class:`~monai_effq.qat.check.FinetuneCheck`): the start and the end are scored
   on held-out windows and the better is kept, with a warning that names the cause candidates
   when training made the network worse.
3. :meth:`TrainableNetwork.freeze` rounds the shadow weights to codes and returns an ordinary
   :class:`~monai_effq.ptq.QuantizationResult`, so checkpoints, reports and evaluation work unchanged.

:func:`finetune` runs the three.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn
from monai.utils import optional_import

from monai_effq.ptq.config import EfficientQConfig, LayerPlan
from monai_effq.ptq.graph import BATCHNORMS, hooks, set_submodule
from monai_effq.ptq.modules import ActivationQuantizer, QuantizedLayer
from monai_effq.ptq.norm_inputs import quantize_norm_inputs
from monai_effq.ptq.prepare import available_device, prepare_network, quantizable_network
from monai_effq.ptq.result import QuantizationResult, finish_report, state_bytes
from monai_effq.ptq.report import LayerReport, QuantizationReport
from monai_effq.ptq.skip_rounding import share_skip_roundings, shared_layer_inputs
from monai_effq.qat.check import DEFAULT_CHECK_BATCHES, FinetuneCheck, check_batch_count, check_label, draw_windows
from monai_effq.qat.modules import FrozenBatchNorm, TrainableQuantizedLayer
from monai_effq.solver.layers import layer_view
from monai_effq.solver.rounding import fit_grid
from monai_effq.utils.errors import UserInputError, all_finite, check_integer, check_number

tqdm, _has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = [
    "DEFAULT_STEPS",
    "DEFAULT_LR",
    "DEFAULT_CALIBRATION_BATCHES",
    "calibration_batch",
    "TrainableNetwork",
    "prepare_finetune",
    "train_steps",
    "finetune",
    "check_loss",
    "default_loss",
    "resolve_task",
    "split_batch",
]

logger = logging.getLogger("monai_effq")

# Tuned on the demo BraTS bundle (benchmarks/qat.py): EfficientQ -> QAT at W4A6 within 5 minutes on 2 cores.
DEFAULT_STEPS = 300
DEFAULT_LR = 1e-4
# training batches an FP start calibrates its activation ranges on (calibration_batch)
DEFAULT_CALIBRATION_BATCHES = 4


def split_batch(batch: Any, index: int = 0, role: str = "training") -> tuple[torch.Tensor, torch.Tensor]:
    """Image and label of a training batch: a dict with ``"image"``/``"label"`` or an ``(x, y)`` pair.

    Args:
        batch: one item of the training data.
        index: its position, for the error message.
        role: what the batch is for (``"training"`` or ``"held-out"``), for the error message.

    Returns:
        ``(image, label)`` as plain tensors.

    Raises:
        UserInputError: when the batch carries no label, or NaN or Inf image or label values.
        TypeError: when it is neither a dict nor a pair of tensors.
    """
    if isinstance(batch, dict):
        if batch.get("label") is None:
            keys = sorted(batch)
            fix = (
                "pass the training loader, not the calibration or inference loader."
                if role == "training"
                else "pass labelled held-out batches as validation_data."
            )
            raise UserInputError(
                f"{role} batch {index} has no 'label' (keys {keys}): quantization-aware fine-tuning needs labelled data; {fix}"
            )
        x, y = batch["image"], batch["label"]
    elif isinstance(batch, (list, tuple)) and len(batch) == 2:
        x, y = batch
        if y is None:
            raise UserInputError(f"{role} batch {index} has no label: pass (image, label) pairs.")
    else:
        raise TypeError(
            f"{role} batch {index} is a {type(batch).__name__}; expected a dict with 'image' and 'label' or an (image, label) pair."
        )
    image = torch.as_tensor(x).as_subclass(torch.Tensor).float()
    # the first layer's rounding would turn a NaN into its lowest code: the loss stays finite and trains on it
    if not all_finite(image):
        raise UserInputError(
            f"{role} batch {index} holds NaN or Inf image values: fix the case or leave it out of the data "
            "(the input rounding would train on the lowest code in their place)."
        )
    label = torch.as_tensor(y).as_subclass(torch.Tensor)
    if label.is_floating_point() and not all_finite(label):
        raise UserInputError(
            f"{role} batch {index} holds NaN or Inf label values: fix the label file (or its preprocessing) or leave "
            "the case out of the data."
        )
    return image, label


def check_loss(value: float, step: int) -> None:
    """Refuse a fine-tuning loss that is NaN or Inf, with what its step says of the cause.

    Args:
        value: the step's loss.
        step: the step (0 for the first).

    Raises:
        UserInputError: at the first step, before any weight changed, naming the data or the loss; later,
            the learning rate (the images and labels are checked finite when read).
    """
    if math.isfinite(value):
        return
    if step == 0:
        raise UserInputError(
            f"the fine-tuning loss is {value} at the first step, before any weight changed, so the learning rate is not "
            "the cause: check the loss function and what it is given (the label's values for the task, the network's "
            "output on the first batch)."
        )
    raise UserInputError(f"the fine-tuning loss is {value} at step {step}: lower the learning rate.")


def default_loss(task: str) -> nn.Module:
    """MONAI's Dice + cross-entropy loss for the task.

    Args:
        task: ``"multiclass"`` (softmax, integer label map) or ``"multilabel"`` (sigmoid channels).

    Returns:
        the loss module.

    Raises:
        ValueError: for another task.
    """
    from monai.losses import DiceCELoss

    if task == "multiclass":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    if task == "multilabel":
        return DiceCELoss(sigmoid=True)
    raise UserInputError(f"task must be 'multiclass' or 'multilabel', got {task!r}.")


class TrainableNetwork:
    """A network in its quantization-aware training form, and what it takes to freeze it back.

    Built by :func:`prepare_finetune`; train :attr:`network` with any loop, then call :meth:`freeze`.

    Args:
        network: the network with :class:`TrainableQuantizedLayer` modules.
        config: the quantization config.
        start: ``"ptq"``, ``"fp"`` or ``"scratch"``.
        base_report: the PTQ report when starting from a PTQ result.
        folded: BatchNorms folded before training.
        fp_bytes: bytes of the FP network's parameters and buffers.
        order: the quantized layers' names in execution order (the report's order).
        task: the task a PTQ start was quantized for, or ``None`` when unknown.
        reference: the FP network of an FP start (not modified; the held-out check compares with
            it), or ``None``.
        skipped: the layers an FP start leaves in floating point (a PTQ start's report lists its own).
    """

    def __init__(
        self,
        network: nn.Module,
        config: EfficientQConfig,
        start: str,
        base_report: QuantizationReport | None,
        folded: list[str],
        fp_bytes: int,
        order: list[str],
        task: str | None = None,
        reference: nn.Module | None = None,
        skipped: list[str] | None = None,
    ) -> None:
        self.network = network
        self.order = list(order)
        self.skipped = list(skipped or [])
        self.config = config
        self.start = start
        self.base_report = base_report
        self.folded = folded
        self.fp_bytes = fp_bytes
        self.task = task
        self.reference = reference
        self.losses: list[float] = []
        self.learning_rates: list[float] = []
        self.created = time.perf_counter()

    def layers(self) -> dict[str, TrainableQuantizedLayer]:
        """The trainable quantized layers by dotted name, in registration order."""
        return {n: m for n, m in self.network.named_modules() if isinstance(m, TrainableQuantizedLayer)}

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter that trains: shadow weights, biases, norm and activation parameters."""
        return [p for p in self.network.parameters() if p.requires_grad]

    def freeze(self, extra: dict[str, Any] | None = None) -> QuantizationResult:
        """Round every shadow weight to codes and return the ordinary quantized result.

        Args:
            extra: settings and figures of the training to keep in the report (under ``"finetune"``).

        Returns:
            a :class:`QuantizationResult` (eval mode), loadable by :func:`monai_effq.load_quantized`.
        """
        net = copy.deepcopy(self.network).eval()
        for name, module in list(net.named_modules()):
            if isinstance(module, TrainableQuantizedLayer):
                set_submodule(net, name, module.to_quantized())
            elif isinstance(module, FrozenBatchNorm):
                set_submodule(net, name, module.norm)
        for p in net.parameters():
            p.requires_grad_(False)
        base = self.base_report
        by_name = {r.name: r for r in base.layers} if base is not None else {}
        # a unit's first layer whose input rounding the unit took over (share_skip_rounding) still reads that grid
        shared = shared_layer_inputs(net)
        layers = []
        for name in self.order:
            module = net.get_submodule(name)
            aq = module.input_quantizer if module.input_quantizer is not None else shared.get(name)
            # The layer errors, calibration counts and solver choice are the PTQ solve's (before training); training
            # optimises the loss.
            ptq = by_name.get(name) or LayerReport(
                name=name, kind="", weight_bits=0, act_bits=None, act_grid=None, params=0,
                mse_fp=math.nan, mse_rtn=math.nan, mse=math.nan, seconds=0.0, solve_seconds=0.0,
            )  # fmt: skip
            layers.append(
                dataclasses.replace(
                    ptq,
                    kind=type(module).__name__,
                    weight_bits=module.grid.bits,
                    act_bits=None if aq is None else aq.grid.bits,
                    act_grid=None if aq is None else aq.grid.kind,
                    params=module.codes.numel(),
                )
            )
        # a fine-tune of a fine-tuned result is the same method, and keeps the earlier rounds' figures
        method = self.start if base is None else base.method
        method = method if method.endswith("+qat") else f"{method}+qat"
        info = {"start": self.start, "steps": len(self.losses), **(extra or {})}
        earlier = dict(base.extra.get("finetune") or {}) if base is not None else {}
        if earlier:
            info["earlier"] = [*earlier.pop("earlier", []), earlier]
        if self.losses:
            k = max(1, min(10, len(self.losses) // 4))
            info["loss_first"] = sum(self.losses[:k]) / k
            info["loss_last"] = sum(self.losses[-k:]) / k
            info["losses"] = list(self.losses)
        report = QuantizationReport(
            layers=layers,
            method=method,
            folded_batchnorms=list(self.folded),
            skipped=list(base.skipped) if base is not None else list(self.skipped),
            # the task travels with the result, so a later fine-tune of it need not be told again
            extra={**(base.extra if base is not None else {}), **({"task": self.task} if self.task else {}), "finetune": info},
            # the FP weights, config and calibration the PTQ start was made from (what training adds is in extra)
            sources=dict(base.sources) if base is not None else {},
        )
        wall = (base.wall_seconds if base is not None else 0.0) + time.perf_counter() - self.created
        finish_report(report, net, self.fp_bytes, wall)
        return QuantizationResult(network=net, report=report, config=self.config, folded=list(self.folded))


def _is_batch(sample: Any) -> bool:
    """Whether ``sample`` is one batch (a tensor, a batch dict or an ``(image, label)`` pair), not a loader.

    A pair is two items, the first a tensor, as training batches are read (:func:`split_batch`); a
    list of more tensors is a list of image batches.
    """
    if isinstance(sample, (torch.Tensor, dict)):
        return True
    return isinstance(sample, (list, tuple)) and len(sample) == 2 and isinstance(sample[0], torch.Tensor)


def _two_image_batches(sample: Any) -> bool:
    """Whether two tensors are two image batches rather than an ``(image, label)`` pair: the second holds
    values that are not whole numbers, which no label map holds (a list of more tensors is image batches)."""
    if not (isinstance(sample, (list, tuple)) and len(sample) == 2 and all(isinstance(t, torch.Tensor) for t in sample)):
        return False
    second = sample[1].detach()
    return second.is_floating_point() and not torch.equal(second, second.round())


def _image_of(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        image = batch
    elif isinstance(batch, dict):
        if "image" not in batch:
            raise ValueError(f"the sample batch has no 'image' (keys {sorted(map(str, batch))}): pass the image batch.")
        image = torch.as_tensor(batch["image"])
    else:
        image = batch[0]
    return image.detach().as_subclass(torch.Tensor).float()


def calibration_batch(sample: Any, batches: int = DEFAULT_CALIBRATION_BATCHES) -> torch.Tensor:
    """The images an FP start calibrates its activation ranges on, as one batch.

    A loader (or a list of image batches) gives those of its first ``batches`` batches that have
    the first one's shape, joined along the batch axis: the ranges of one random crop (an almost
    empty one, say) would clip every other window for the whole fine-tune. They run in one pass, so
    they must fit in memory together: training crops do (a pass without gradients over a few holds
    fewer activations than a training step's backward over one); give whole volumes one at a time
    (``batches=1``) or as their sliding windows (:func:`monai_effq.data.calibration_windows`).

    Args:
        sample: a batch (a tensor, a batch dict or an ``(image, label)`` pair), a list of image batches,
            or a loader of batches. Two tensors are a pair unless the second holds values that are not
            whole numbers (then they are two image batches).
        batches: how many batches of a loader to take (at least 1).

    Returns:
        the image batch (float32, detached).

    Raises:
        ValueError: for a loader that yields no batch.
    """
    if _is_batch(sample) and not _two_image_batches(sample):
        return _image_of(sample)
    images: list[torch.Tensor] = []
    try:
        loader = iter(sample)
    except TypeError:
        loader = iter(())
    # no more batches than asked for are read: a loader of whole volumes loads each
    for i, batch in enumerate(itertools.islice(loader, batches)):
        if not _is_batch(batch):
            raise ValueError(
                f"sample batch {i} is a {type(batch).__name__}: expected a tensor, a batch dict or an (image, label) pair."
            )
        image = _image_of(batch)
        if not images or image.shape[1:] == images[0].shape[1:]:
            images.append(image)
    if not images:
        raise ValueError(
            "prepare_finetune needs a sample batch (a tensor, a batch dict or a non-empty loader) to fold "
            "BatchNorm and calibrate the activation ranges."
        )
    return torch.cat(images)


def _freeze_batchnorms(network: nn.Module) -> None:
    for name, module in list(network.named_modules()):
        if isinstance(module, BATCHNORMS) and module.track_running_stats:
            set_submodule(network, name, FrozenBatchNorm(module))


def _from_result(result: QuantizationResult) -> TrainableNetwork:
    net = copy.deepcopy(result.network)
    for name, module in list(net.named_modules()):
        if isinstance(module, QuantizedLayer):
            set_submodule(net, name, TrainableQuantizedLayer.from_quantized(module))
    for p in net.parameters():
        p.requires_grad_(True)
    _freeze_batchnorms(net)
    order = [r.name for r in result.report.layers]
    task = result.report.extra.get("task")
    return TrainableNetwork(net, result.config, "ptq", result.report, list(result.folded), result.report.fp_bytes, order, task)


def _from_network(network: nn.Module, sample: torch.Tensor, config: EfficientQConfig, from_scratch: bool) -> TrainableNetwork:
    network = quantizable_network(network)
    fp_bytes = state_bytes(network)
    # From scratch the BatchNorms have nothing to fold yet: they keep training as BatchNorms.
    device = next((p.device for p in network.parameters()), torch.device("cpu"))
    prepared = prepare_network(network, sample, config, device=device, from_scratch=from_scratch)
    net, folded, plans = prepared.network, prepared.folded, prepared.plans
    sample = sample.to(device)
    if config.norm_input_spec is not None:  # first, as quantize does: the layers calibrate on the inputs they will get
        quantize_norm_inputs(net, sample, config.norm_input_spec)
    quantizers: dict[str, ActivationQuantizer] = {}

    def calibrate(plan: LayerPlan, x: torch.Tensor) -> None:
        if plan.act is not None and plan.name not in quantizers:
            quantizers[plan.name] = ActivationQuantizer.from_spec(x, plan.act, plan.name)

    handles = [
        net.get_submodule(p.name).register_forward_pre_hook(lambda m, a, p=p: calibrate(p, a[0])) for p in plans
    ]
    with hooks(handles), torch.no_grad():
        net(sample)
    for plan in plans:
        layer = net.get_submodule(plan.name)
        fit = fit_grid(layer_view(layer).weight_matrix(layer.weight).float(), plan.weight)
        module = TrainableQuantizedLayer(
            layer, layer.weight, layer.bias, fit.grid, fit.scale, fit.zero_point, quantizers.get(plan.name),
            channel_axis=plan.weight.channel_axis,
        )
        set_submodule(net, plan.name, module)
    if config.share_skip_rounding:  # before training, so that it trains with the rounding quantize would share
        share_skip_roundings(net)
    for p in net.parameters():
        p.requires_grad_(True)
    if not from_scratch:
        _freeze_batchnorms(net)
    start = "scratch" if from_scratch else "fp"
    reference = None if from_scratch else network
    planned = {p.name for p in plans}
    return TrainableNetwork(
        net, config, start, None, folded, fp_bytes, [p.name for p in plans], reference=reference,
        skipped=[n for n in prepared.order if n not in planned],
    )


def prepare_finetune(
    source: QuantizationResult | nn.Module,
    sample: Any = None,
    config: EfficientQConfig | dict | None = None,
    *,
    from_scratch: bool = False,
    calibration_batches: int = DEFAULT_CALIBRATION_BATCHES,
) -> TrainableNetwork:
    """Phase 1: the trainable form of a PTQ result or of an FP network.

    Args:
        source: a :class:`QuantizationResult` (start from its codes; its config is used and
            ``config`` must be ``None`` or equal) or an FP network (not modified).
        sample: for an FP network, a batch (tensor, batch dict or ``(image, label)`` pair) or a
            loader of them, to fold BatchNorm, find the layers and calibrate the activation ranges
            (on a loader's first ``calibration_batches`` batches, :func:`calibration_batch`);
            ignored for a PTQ result.
        config: bits, grids and fixed-point settings for an FP start; :class:`EfficientQConfig`
            defaults when ``None``.
        from_scratch: re-initialise the FP network's parameters first (the paper's setting).
        calibration_batches: batches of a loader ``sample`` to calibrate on (at least 1).

    Returns:
        the :class:`TrainableNetwork`.

    Raises:
        TypeError: when ``source`` is neither.
        ValueError: for a missing sample or a config that contradicts the PTQ result.
    """
    if isinstance(config, dict):
        config = EfficientQConfig.from_dict(config)
    if isinstance(source, QuantizationResult):
        if from_scratch:
            raise ValueError("from_scratch=True needs an FP network, not a PTQ result: pass the FP network.")
        if config is not None and config != source.config:
            raise ValueError(
                "a PTQ result is fine-tuned with the config it was quantized with; pass config=None "
                "(or quantize again with the new config first)."
            )
        return _from_result(source)
    if not isinstance(source, nn.Module):
        raise TypeError(
            f"finetune starts from a QuantizationResult or an FP nn.Module, got {type(source).__name__}."
        )
    config = config or EfficientQConfig()
    calibration_batches = check_integer(calibration_batches, "calibration_batches", low=1)
    return _from_network(source, calibration_batch(sample, calibration_batches), config, from_scratch)


def _check_steps(steps: int) -> int:
    return check_integer(steps, "steps", low=1, hint=" (optimizer steps of the fine-tune)")


def train_steps(
    trainable: TrainableNetwork,
    train_data: Iterable[Any],
    loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    steps: int,
    scheduler: Any = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> list[float]:
    """Phase 2 as a plain loop: ``steps`` optimizer steps, cycling over ``train_data``.

    Args:
        trainable: the prepared network (its losses are appended to ``trainable.losses``).
        train_data: batches (dicts with ``image``/``label`` or ``(image, label)`` pairs).
        loss_function: ``loss(logits, label)``.
        optimizer: over ``trainable.parameters()``.
        steps: optimizer steps.
        scheduler: an LR scheduler stepped after every step, or ``None``.
        device: where the batches go.
        progress: show a progress bar.

    Returns:
        the loss of every step.

    Raises:
        ValueError: for ``steps <= 0``, empty data, batches without labels or a non-finite loss.
    """
    steps = _check_steps(steps)
    net = trainable.network.train()
    losses: list[float] = []
    bar = tqdm(total=steps, desc="fine-tuning", unit="step", disable=not progress) if _has_tqdm else None
    batches = _cycle(train_data)
    for step in range(steps):
        x, y = split_batch(next(batches), step)
        logits = net(x.to(device))
        y = y.to(device)
        if trainable.task is not None:  # a caller's own loop with its own loss may take any label
            check_label(logits, y, trainable.task, f"training batch {step}")
        loss = loss_function(logits, y)
        value = float(loss.detach())
        check_loss(value, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainable.learning_rates.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(value)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if bar is not None:
        bar.close()
    net.eval()
    trainable.losses.extend(losses)
    return losses


def _cycle(data: Iterable[Any]):
    """Batches of ``data`` over and over (re-iterating, so a shuffling loader reshuffles)."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise UserInputError("the training data yielded no batch: pass a non-empty training loader.")


def resolve_task(known: str | None, task: str | None) -> str:
    """The task of a fine-tune: the start's own (a PTQ result's), else the one given, else ``"multiclass"``.

    Args:
        known: the task the start was quantized for (``TrainableNetwork.task``), or ``None``.
        task: the task the caller gave, or ``None``.

    Returns:
        ``"multiclass"`` or ``"multilabel"``.

    Raises:
        ValueError: for an unknown task, or one that contradicts the start's (its class attention
            was computed for its own task, and the other task's loss would train its outputs for
            another activation).
    """
    if task is None:
        return known or "multiclass"
    if task not in ("multiclass", "multilabel"):
        raise UserInputError(f"task must be 'multiclass' or 'multilabel', got {task!r}.")
    if known is not None and task != known:
        raise ValueError(
            f"the PTQ result was quantized for task {known!r}, not {task!r}: drop task= (the fine-tune takes the "
            f"result's task) or quantize again with task={task!r}."
        )
    return task


def finetune(
    source: QuantizationResult | nn.Module,
    train_data: Iterable[Any],
    config: EfficientQConfig | dict | None = None,
    *,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    task: str | None = None,
    from_scratch: bool = False,
    weight_decay: float = 0.0,
    cosine: bool = True,
    validation_data: Iterable[Any] | None = None,
    check_batches: int = DEFAULT_CHECK_BATCHES,
    calibration_data: Any = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> QuantizationResult:
    """Quantization-aware fine-tuning with straight-through gradients, to an ordinary quantized result.

    Never silently worse: the start and the end are scored on held-out windows (mean loss and Dice,
    :mod:`monai_effq.qat.check`); when the end is worse the start is returned, with a warning that
    names the cause candidates (learning rate, steps, format, the training loss's course). An FP
    start is also compared with the FP network, with a warning when the result ends more than 0.02
    Dice below it. The figures are in ``report.extra["finetune"]["check"]``.

    Args:
        source: a PTQ :class:`QuantizationResult` (EfficientQ/GPTQ/RTN initialisation) or an FP
            network (the method's retrain mode; not modified).
        train_data: labelled batches: dicts with ``"image"`` and ``"label"`` or ``(image, label)``
            pairs (a MONAI ``DataLoader`` over the training transforms).
        config: bits, grids and fixed-point settings for an FP start (``None`` with a PTQ result).
        steps: optimizer steps (batches), cycling over ``train_data``.
        lr: Adam's learning rate.
        loss_function: ``loss(logits, label)``; MONAI's ``DiceCELoss`` for the task when ``None``.
        task: ``"multiclass"`` or ``"multilabel"``, for the default loss and the held-out Dice;
            ``None`` takes a PTQ result's own task (``"multiclass"`` for an FP start). A task that
            contradicts the PTQ result's is an error.
        from_scratch: re-initialise the FP network first (the paper's setting; needs many steps).
        weight_decay: Adam's weight decay.
        cosine: anneal the learning rate to zero over ``steps`` (as the paper).
        validation_data: held-out labelled batches the network takes whole (e.g. crops of
            validation cases); ``None`` draws the first ``check_batches`` batches of
            ``train_data`` once, before training (windows a random-crop loader draws afresh; with
            a fixed list of batches they are training batches).
        check_batches: batches of ``validation_data`` (or of ``train_data``) the check scores;
            ``0`` turns the check off.
        calibration_data: for an FP start, what folds BatchNorm and calibrates the activation
            ranges: a batch (a tensor, a batch dict or an ``(image, label)`` pair, e.g. a volume's
            sliding windows, :func:`monai_effq.data.calibration_windows`) or a loader, of which the
            first :data:`DEFAULT_CALIBRATION_BATCHES` batches are taken and run as one
            (:func:`calibration_batch`); ``None`` takes those of ``train_data``. Ignored for a PTQ
            result (calibrated already).
        device: where training runs.
        progress: show a progress bar.

    Returns:
        a :class:`QuantizationResult`: ``save_quantized``, ``load_quantized``, the report and
        evaluation work as for PTQ; ``report.extra["finetune"]`` holds the settings, losses and
        the held-out check (``kept`` is ``"end"`` or ``"start"``).

    Raises:
        ValueError: for ``steps <= 0``, ``lr <= 0``, a negative ``check_batches``, empty or
            unlabelled data, or a task that contradicts the PTQ result's.
        TypeError: for a ``source`` that is neither a result nor a network.
    """
    steps = _check_steps(steps)
    device = available_device(device)
    lr = check_number(lr, "lr", 0, above=True)
    weight_decay = check_number(weight_decay, "weight_decay", 0, hint=" (0 turns it off)")
    check_batches = check_batch_count(check_batches)
    if isinstance(train_data, Iterator):  # the held-out check and every epoch past the first would find it spent
        raise UserInputError(
            f"train_data is a one-pass iterator ({type(train_data).__name__}): pass a list of batches or a DataLoader, "
            "which the fine-tune reads more than once."
        )
    sample = calibration_data
    if not isinstance(source, QuantizationResult) and sample is None:
        # the first training batches, not the first one alone (see calibration_batch); checked as training batches
        sample = list(itertools.islice(train_data, DEFAULT_CALIBRATION_BATCHES))
        if not sample:
            raise UserInputError("the training data yielded no batch: pass a non-empty training loader.")
        for i, batch in enumerate(sample):
            split_batch(batch, i)
    trainable = prepare_finetune(source, sample, config, from_scratch=from_scratch)
    task = trainable.task = resolve_task(trainable.task, task)
    trainable.network.to(device)
    loss_function = loss_function or default_loss(task)
    check = None
    if check_batches:
        if validation_data is None:
            windows = draw_windows(train_data, check_batches, role="training")
        else:
            windows = draw_windows(validation_data, check_batches)
        check = FinetuneCheck(trainable, windows, loss_function, task, reference=trainable.reference)
        check.start()
    optimizer = torch.optim.Adam(trainable.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps) if cosine else None
    t0 = time.perf_counter()
    train_steps(trainable, train_data, loss_function, optimizer, steps, scheduler, device, progress)
    seconds = time.perf_counter() - t0
    logger.info("fine-tuned %d steps in %.1f s (loss %.4f -> %.4f)", steps, seconds, trainable.losses[0], trainable.losses[-1])
    settings = {"lr": lr, "weight_decay": weight_decay, "cosine": cosine, "task": task, "train_seconds": seconds}
    if check is not None:
        settings["check"] = check.finish(trainable.learning_rates, trainable.losses)
    return trainable.freeze(settings)
