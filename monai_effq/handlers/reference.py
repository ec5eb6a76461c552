"""Label-free agreement with the FP network: its prediction beside the evaluated network's, for MONAI metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from monai.data import decollate_batch
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer, SimpleInferer
from monai.utils import CommonKeys, IgniteInfo, min_version, optional_import

if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["ReferencePrediction", "REFERENCE_KEY"]

# where each output item keeps the reference network's prediction
REFERENCE_KEY = "reference_pred"


class ReferencePrediction:
    """Runs a reference network (the FP one) on every batch an evaluator infers and keeps its
    post-processed prediction beside the evaluated network's ``"pred"``.

    A stock MONAI metric then measures how closely the evaluated network (quantized, or deployed in a
    runtime) reproduces the reference, with no ground truth: ``MeanDice(output_transform=
    from_engine(["pred", "reference_pred"]))``. PTQ fits the FP network, so this is the figure that
    says what quantization changed; Dice against the truth mixes that with the FP network's own errors,
    which a quantized network can land on either side of. It also works on cases without labels.

    The handler runs after the engine's decollation and post-processing (it attaches later, to the
    same event), so the metrics, which run when the iteration completes, see both predictions.

    Args:
        network: the reference network, e.g. a bundle's FP ``@network`` (the quantized checkpoint loader
            swaps a copy into its engine and leaves this one FP).
        inferer: how to run it; the evaluator's inferer (e.g. ``SlidingWindowInferer``).
        postprocessing: applied to each item ``{"pred": reference output}``: the transforms the
            evaluator applies to its own ``"pred"`` (activation, threshold or arg-max, one-hot).
        output_key: the key of the reference prediction in each output item.
        image_key: the key of the input image in each output item.
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
        self.postprocessing = postprocessing
        self.output_key = output_key
        self.image_key = image_key

    def attach(self, engine: Engine) -> None:
        """Register on ``engine`` (attaching twice is harmless)."""
        if not engine.has_event_handler(self, IterationEvents.MODEL_COMPLETED):
            engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Add the reference prediction to each of the iteration's output items."""
        items = engine.state.output
        if not isinstance(items, list) or not all(isinstance(i, dict) and self.image_key in i for i in items):
            raise ValueError(
                f"ReferencePrediction needs the engine's output as decollated items with {self.image_key!r}; "
                "use an evaluator with decollate=True (the default) and its image in the output."
            )
        images = torch.stack([torch.as_tensor(i[self.image_key]) for i in items])
        device = next(iter(self.network.parameters()), images).device
        self.network.eval()
        with torch.no_grad():
            preds = self.inferer(images.to(device), self.network)
        for item, pred in zip(items, decollate_batch(preds)):
            out = {CommonKeys.PRED: pred.to(images.device)}
            if self.postprocessing is not None:
                out = self.postprocessing(out)
            item[self.output_key] = out[CommonKeys.PRED]
