"""An ignite handler that runs an engine's network in OpenVINO or ONNX Runtime (shaped like MONAI's ``TrtHandler``).

It hands off to :func:`monai_effq.deploy.runtime_network`, which exports the quantized checkpoint's
ONNX file when it is missing or stale; the handler only decides when that happens (as the run
starts, after whatever loaded the FP weights) and which network it replaces.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from monai.inferers import SlidingWindowInferer
from monai.utils import IgniteInfo, ensure_tuple_rep, min_version, optional_import

from monai_effq.data.calibration import WHOLE_AXIS, check_roi_size
from monai_effq.deploy.runtime import RUNTIMES, runtime_network
from monai_effq.handlers.quantization import require_quantized_checkpoint
from monai_effq.utils.errors import UserInputError

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["RuntimeNetworkLoader", "input_channels", "trace_shape"]


def input_channels(network: torch.nn.Module, spatial_size: Sequence[int] | None = None) -> int:
    """The number of channels ``network`` reads.

    That is the first ``in_channels`` among the network and its modules (MONAI's networks and every
    convolution keep one), else the first linear layer's inputs. A linear patch embedding (UNETR's
    ``proj_type="perceptron"``) reads channels times patch voxels, so it comes last. A network need not
    register its layers in the order it runs them (an output head first): with ``spatial_size`` each
    candidate is tried in one forward pass until the network takes it.

    Args:
        network: an FP segmentation network.
        spatial_size: a spatial size the network runs (e.g. the sliding-window ROI), or None to take the first
            candidate untried.

    Returns:
        the input channels.

    Raises:
        UserInputError: when the network has neither.
    """
    candidates = list(dict.fromkeys(m.in_channels for m in network.modules() if isinstance(getattr(m, "in_channels", None), int)))
    candidates += [m.in_features for m in network.modules() if isinstance(m, torch.nn.Linear)][:1]
    if not candidates:
        raise UserInputError(f"{type(network).__name__} has no convolution or linear layer to read its input channels from.")
    if spatial_size is None or len(candidates) == 1 or isinstance(getattr(network, "in_channels", None), int):
        return candidates[0]
    device = next(iter(network.parameters()), torch.empty(0)).device
    training = network.training
    network.eval()
    try:
        for channels in candidates:
            try:
                with torch.no_grad():
                    network(torch.zeros(1, channels, *spatial_size, device=device))
            except Exception:  # the network's own complaint: another candidate, or the export names it
                continue
            return channels
    finally:
        network.train(training)
    return candidates[0]


def trace_shape(network: torch.nn.Module, roi_size: Sequence[int] | int) -> list[int]:
    """The input shape an export traces ``network`` at, ``(1, in_channels, *window)``, from a sliding-window ROI.

    One size stands for every spatial axis of the network's convolutions. A window that spans an
    axis (``-1``) has no size of its own: it is traced at the ROI's largest size, a size the network
    runs (an export of such a window keeps that axis dynamic).

    Args:
        network: an FP segmentation network.
        roi_size: the ROI as ``SlidingWindowInferer`` takes it (:func:`~monai_effq.data.calibration.check_roi_size`).

    Returns:
        the shape.

    Raises:
        UserInputError: for a malformed ROI, a network without convolutions given one size, or a
            ROI that spans every axis.
    """
    roi = check_roi_size(roi_size)
    if isinstance(roi, int):
        conv = next((m for m in network.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
        if conv is None:
            raise UserInputError(
                f"roi_size {roi} is one size, but {type(network).__name__} has no convolution to count its spatial axes "
                "from: give one size per axis."
            )
        roi = (roi,) * (conv.weight.dim() - 2)
    sizes = [r for r in roi if r != WHOLE_AXIS]
    if not sizes:
        raise UserInputError(
            f"roi_size {list(roi)} spans every axis, so it gives no window to export the network at: set the export's "
            "window (the overlays' --export_roi, e.g. \"[96,96,96]\")."
        )
    window = [max(sizes) if r == WHOLE_AXIS else r for r in roi]
    return [1, input_channels(network, window), *window]


class RuntimeNetworkLoader:
    """Replaces an engine's FP network, when it starts, by the quantized checkpoint run in OpenVINO or ONNX Runtime.

    Attach it after the handler that loads the FP weights: the FP network gives the architecture
    the checkpoint is rebuilt on for the export (it is not modified).

    Args:
        quantized_path: a file written by :func:`monai_effq.save_quantized`.
        onnx_path: where the ONNX file is (exported there when missing or made from another checkpoint).
        roi_size: the sliding-window ROI, the spatial shape the export is traced with. When the
            engine's inferer is a ``SlidingWindowInferer`` with this ``roi_size``, the file's spatial
            axes are fixed at it (exported about twice as fast; exported again when it changes);
            with any other inferer they stay dynamic, so whole volumes of any size run.
        runtime: ``"openvino"`` or ``"onnxruntime"``.
        options: passed to the runtime network (e.g. ``{"precision": "f32"}`` for OpenVINO).

    Example::

        RuntimeNetworkLoader("models/model_efficientq_w8a8.pt", "models/model_efficientq_w8a8.onnx", [96, 96, 96]).attach(evaluator)
    """

    def __init__(
        self,
        quantized_path: str | Path,
        onnx_path: str | Path,
        roi_size: Sequence[int] | int,
        runtime: str = "openvino",
        options: dict[str, Any] | None = None,
    ) -> None:
        require_quantized_checkpoint(quantized_path)
        if runtime not in RUNTIMES:
            raise UserInputError(f"runtime must be one of {', '.join(sorted(RUNTIMES))}, got {runtime!r}.")
        self.roi_size = check_roi_size(roi_size)
        self.quantized_path = quantized_path
        self.onnx_path = onnx_path
        self.runtime = runtime
        self.options = dict(options or {})
        self.fp_network: nn.Module | None = None
        self.loaded: nn.Module | None = None

    def runs_windows_of_roi_size(self, inferer: Any) -> bool:
        """Whether every input ``inferer`` gives the network has ``roi_size``'s spatial size.

        Args:
            inferer: the engine's inferer.

        Returns:
            ``True`` for a ``SlidingWindowInferer`` whose ``roi_size`` is this one (it pads smaller
            images up to it); ``False`` for any other inferer, or a window that spans whole axes.
        """
        if not isinstance(inferer, SlidingWindowInferer):
            return False
        # one size stands for every axis, in either ROI
        dims = next((len(r) for r in (self.roi_size, inferer.roi_size) if not isinstance(r, int)), 1)
        try:
            mine, theirs = (tuple(ensure_tuple_rep(r, dims)) for r in (self.roi_size, inferer.roi_size))
        except ValueError:  # another number of axes: not this window
            return False
        return mine == theirs and WHOLE_AXIS not in mine

    def attach(self, engine: Engine) -> None:
        """Register on ``engine`` (attaching twice is harmless)."""
        self.logger = engine.logger
        if not engine.has_event_handler(self, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        """Swap the runtime network in (on a later run of the engine, from the FP network of the first: the
        checkpoint may have changed since, e.g. a ValidationHandler's evaluator after another epoch of fine-tuning)."""
        if self.loaded is None or engine.network is not self.loaded:
            # replaced below, so moving it to the CPU, where the export traces, costs nothing
            self.fp_network = engine.network.cpu()
        shape = trace_shape(self.fp_network, self.roi_size)
        engine.network = self.loaded = runtime_network(
            self.runtime, self.onnx_path, self.quantized_path, self.fp_network, shape,
            fixed_window=self.runs_windows_of_roi_size(getattr(engine, "inferer", None)), **self.options,
        )  # fmt: skip
        self.logger.info(f"{self.runtime} runs {self.onnx_path}, exported from {self.quantized_path}")
