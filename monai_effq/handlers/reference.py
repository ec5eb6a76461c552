"""Label-free agreement with the FP network: its prediction beside the evaluated network's, for MONAI metrics."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from monai.engines.utils import IterationEvents, engine_apply_transform
from monai.engines.workflow import Workflow
from monai.handlers import IgniteMetricHandler, from_engine
from monai.inferers import Inferer, SimpleInferer
from monai.metrics import DiceMetric
from monai.transforms import Compose, Decollated, SaveImage, SaveImaged
from monai.utils import CommonKeys, IgniteInfo, min_version, optional_import

from monai_effq.utils.errors import UserInputError

if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["AgreementDice", "ReferencePrediction", "REFERENCE_KEY"]

# where each output item keeps the reference network's prediction
REFERENCE_KEY = "reference_pred"


def _without_writers(transform: Callable) -> Callable:
    """``transform`` without the steps that write images: the reference's labels are compared, not saved
    (a bundle's post-processing may save its predictions, and the reference's would be written under the
    same names)."""
    if type(transform) is not Compose:  # OneOf, SomeOf ... choose among their steps: leave them whole
        return transform
    trimmed = copy.copy(transform)
    trimmed.transforms = [_without_writers(t) for t in transform.transforms if not isinstance(t, (SaveImage, SaveImaged))]
    return trimmed


class ReferencePrediction:
    """Runs a reference network (the FP one) on every batch an evaluator infers and keeps its
    post-processed prediction beside the evaluated network's ``"pred"``.

    A stock MONAI metric then measures how closely the evaluated network (quantized, or deployed in a
    runtime) reproduces the reference, with no ground truth: ``MeanDice(output_transform=
    from_engine(["pred", "reference_pred"]))``. PTQ fits the FP network, so this is the figure that
    says what quantization changed; Dice against the truth mixes that with the FP network's own errors,
    which a quantized network can land on either side of. It also works on cases without labels.

    The reference runs when the evaluator's forward pass completes, and its output is post-processed
    the way the engine post-processes its own: each case's batch and output items together, with the
    reference output as ``"pred"``, so a bundle's own post-processing works unchanged, also where it
    inverts or one-hots the label beside the prediction (steps that save images are left out). Its
    prediction joins the engine's items after the engine's own decollation and post-processing (this
    handler attaches later, to the same event), before the metrics, which update when the iteration
    completes.

    Args:
        network: the reference network, e.g. a bundle's FP ``@network`` (the quantized checkpoint loader
            swaps a copy into its engine and leaves this one FP).
        inferer: how to run it; the evaluator's inferer (e.g. ``SlidingWindowInferer``).
        postprocessing: the evaluator's own post-processing (activation, inversion, threshold or arg-max,
            one-hot), applied as the engine applies it; ``None`` keeps the raw output.
        output_key: the key of the reference prediction in each output item.
        image_key: the key of the input image in the engine's output.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        inferer: Inferer | None = None,
        postprocessing: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        output_key: str = REFERENCE_KEY,
        image_key: str = CommonKeys.IMAGE,
    ) -> None:
        self.network = network
        self.inferer = inferer or SimpleInferer()
        self.postprocessing = None if postprocessing is None else _without_writers(postprocessing)
        self.output_key = output_key
        self.image_key = image_key
        self._pending: list[Any] | None = None

    def attach(self, engine: Engine) -> None:
        """Register on ``engine`` (attaching twice is harmless).

        Raises:
            ValueError: for a MONAI evaluator made with ``decollate=False``: the reference is post-processed
                case by case, as such an evaluator does not (its batch-wise post-processing, applied to one
                case, failed inside a transform).
        """
        if isinstance(engine, Workflow) and not _decollates(engine):
            raise ValueError(_NEEDS_DECOLLATED)
        if not engine.has_event_handler(self.predict, IterationEvents.FORWARD_COMPLETED):
            engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self.predict)
        if not engine.has_event_handler(self, IterationEvents.MODEL_COMPLETED):
            engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self)

    def predict(self, engine: Engine) -> None:
        """Run the reference on the iteration's batch and post-process its output, case by case."""
        output, batch = engine.state.output, engine.state.batch
        if not isinstance(output, dict) or self.image_key not in output:
            raise ValueError(
                f"ReferencePrediction needs the evaluator's output as a dict with the input under {self.image_key!r} "
                f"(a MONAI SupervisedEvaluator's), got {type(output).__name__}."
            )
        images = output[self.image_key]
        device = next(iter(self.network.parameters()), torch.as_tensor(images)).device
        self.network.eval()
        with torch.no_grad():
            preds = self.inferer(images.to(device), self.network)
        split = Decollated(keys=None, detach=True)  # as the engine decollates its own
        outputs = split({**output, CommonKeys.PRED: preds.to(images.device)})
        batches = split(batch) if isinstance(batch, dict) else [{} for _ in outputs]
        pending = []
        for b, o in zip(batches, outputs):
            if self.postprocessing is not None:
                _, o = engine_apply_transform(b, o, self.postprocessing)
            pending.append(o[CommonKeys.PRED])
        self._pending = pending

    def __call__(self, engine: Engine) -> None:
        """Add the reference prediction to each of the iteration's output items."""
        items, pending, self._pending = engine.state.output, self._pending, None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise ValueError(_NEEDS_DECOLLATED)
        if pending is None or len(pending) != len(items):
            raise RuntimeError(
                "ReferencePrediction has no reference prediction for this iteration: attach it with "
                "ReferencePrediction.attach (or list it in the evaluator's handlers) so it runs after the forward pass."
            )
        for item, pred in zip(items, pending):
            _check_post_processed_alike(item.get(CommonKeys.PRED), pred)
            item[self.output_key] = pred


_NEEDS_DECOLLATED = (
    "ReferencePrediction needs the engine's output as decollated items; use an evaluator with decollate=True (the default)."
)


def _decollates(engine: Workflow) -> bool:
    """Whether a MONAI workflow decollates its output after the forward pass (``decollate=True``)."""
    registered = engine._event_handlers.get(IterationEvents.MODEL_COMPLETED, [])
    return any(getattr(entry[0], "__name__", "") == "_decollate_data" for entry in registered)


def _is_discrete(tensor: torch.Tensor) -> bool:
    """Labels, one-hot or not (whole numbers), rather than logits or probabilities."""
    return bool((tensor == tensor.round()).all())


def _check_post_processed_alike(pred: Any, reference: Any) -> None:
    """Refuse a reference post-processed otherwise than the engine's prediction: a metric of the two (the FP
    agreement) would compare labels with raw logits and read near zero, however close the networks are."""
    if not isinstance(pred, torch.Tensor) or not isinstance(reference, torch.Tensor):
        return
    if pred.shape == reference.shape and _is_discrete(pred) == _is_discrete(reference):
        return
    kind = {True: "labels", False: "logits or probabilities"}
    raise UserInputError(
        f"the FP reference prediction is {tuple(reference.shape)} {kind[_is_discrete(reference)]} where the evaluator's pred is "
        f"{tuple(pred.shape)} {kind[_is_discrete(pred)]}: they are post-processed differently, so their agreement would be "
        "meaningless. Give the reference the evaluator's post-processing (the overlay: --fp_reference#postprocessing "
        "\"@validate#evaluator#postprocessing\" where the bundle sets it inline)."
    )


class AgreementDice(IgniteMetricHandler):
    """Dice of the evaluated network's labels against the reference network's (:class:`ReferencePrediction`).

    MONAI's ``MeanDice`` against a ground truth skips a case whose truth lacks a class
    (``ignore_empty``); against the FP network that would skip exactly the cases where quantization
    adds a class the FP network does not predict, and read a class neither network predicts anywhere
    as 0. Here such a case counts: 1 where the evaluated network leaves the class out too, 0 where it
    predicts it (``DiceMetric(ignore_empty=False)``).

    Args:
        include_background: whether the first channel counts (as the bundle's own Dice counts it).
        reduction: as ``MeanDice``'s (``"mean"`` one figure, ``"mean_batch"`` one per class).
        num_classes: as ``MeanDice``'s, for label-map (not one-hot) predictions.
        output_transform: the ``(pred, reference)`` pair of an engine's output; by default its
            ``"pred"`` and ``"reference_pred"``.
        save_details: keep every case's figures in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        include_background: bool = True,
        reduction: str = "mean",
        num_classes: int | None = None,
        output_transform: Callable | None = None,
        save_details: bool = True,
    ) -> None:
        metric = DiceMetric(include_background=include_background, reduction=reduction, ignore_empty=False, num_classes=num_classes)
        super().__init__(
            metric_fn=metric, output_transform=output_transform or from_engine(["pred", REFERENCE_KEY]), save_details=save_details
        )
