"""The one prepare phase of PTQ and QAT: copy the network, probe it once, fold BatchNorm, plan the layers."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from monai_effq.ptq.config import EfficientQConfig, LayerPlan
from monai_effq.ptq.graph import fold_batchnorm, probe_network

__all__ = ["PreparedNetwork", "prepare_network"]


@dataclass
class PreparedNetwork:
    """A working copy of a network, ready for its layers to be quantized.

    Attributes:
        network: the copy (eval mode, on the requested device, BatchNorms folded where they can be).
        folded: names of the BatchNorms folded (replaced by ``nn.Identity``).
        order: the quantizable layers in execution order.
        plans: what each layer not skipped gets, in that order.
        output_numels: each quantizable layer's output size on one sample.
    """

    network: nn.Module
    folded: list[str]
    order: list[str]
    plans: list[LayerPlan]
    output_numels: dict[str, int]


def prepare_network(
    network: nn.Module,
    sample: torch.Tensor,
    config: EfficientQConfig,
    *,
    device: torch.device | str | None = None,
    from_scratch: bool = False,
) -> PreparedNetwork:
    """Copy ``network`` and prepare the copy: one probe pass (it runs, its layers' order and output
    sizes, the BatchNorms to fold), the folds (checked by one more pass), the plan.

    Args:
        network: the FP network (not modified).
        sample: a batch it accepts; only its first sample is run.
        config: the quantization config (folding and the plan).
        device: where the copy goes (``config.device`` when ``None``).
        from_scratch: re-initialise the copy's parameters first and fold nothing (a QAT start from
            scratch has no trained BatchNorm statistics to fold).

    Returns:
        the :class:`PreparedNetwork`.

    Raises:
        ValueError: when the sample does not fit the network or it has no quantizable layer that runs.
        TypeError: when the network does not return one tensor.
    """
    device = torch.device(config.device if device is None else device)
    net = copy.deepcopy(network).eval().to(device)
    if from_scratch:
        for module in net.modules():
            if module is not net and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    first = sample[:1].to(device)
    probe = probe_network(net, first)
    folded = fold_batchnorm(net, first, probe=probe) if config.fold_batchnorm and not from_scratch else []
    if not probe.order:
        raise ValueError(
            "the network has no quantizable layers (Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear) that run in its forward pass."
        )
    return PreparedNetwork(net, folded, probe.order, config.plan(probe.order, probe.input_layers), probe.output_numels)
