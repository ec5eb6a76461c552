"""Quantized checkpoints: one file with packed integer codes, rebuilt on a fresh FP architecture.

The file is a ``torch.save`` archive of five entries: ``format``, ``meta`` (a JSON string: the
config, the report, provenance, and a table of layers and tensors with their offsets), ``codes``
(every layer's packed codes, end to end, in one ``uint8`` tensor), ``data`` (every other tensor,
flattened into one tensor per dtype) and ``model``, a string saying how to load the file. Few, large
tensors keep the archive's per-entry overhead negligible, so the file is as small as the packed codes
promise.

``model`` is where MONAI's ``CheckpointLoader`` and MONAI Label look for a state dict; a string there
makes ``load_state_dict`` raise (torch's "Expected state_dict to be dict-like"; the string itself says
how to load the file to whoever opens it), where a missing entry would let ``strict=False`` load
nothing and leave a network with random weights, silently.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from monai_effq.ptq.config import EfficientQConfig
from monai_effq.ptq.graph import set_submodule
from monai_effq.ptq.modules import ActivationQuantizer, QuantizedLayer, quantized_layer_class
from monai_effq.ptq.result import QuantizationResult
from monai_effq.ptq.report import QuantizationReport
from monai_effq.quant.grid import UniformGrid
from monai_effq.quant.packing import pack_codes, unpack_codes
from monai_effq.utils.io import atomic_write

__all__ = ["save_quantized", "load_quantized", "load_quantized_result", "FORMAT", "NOT_A_STATE_DICT"]

FORMAT = "monai-effq-quantized/1"
NOT_A_STATE_DICT = (
    "monai-effq packed checkpoint, not a state dict: load it with monai_effq.load_quantized(path, network_def); "
    "to serve it without monai-effq, use the TorchScript bundle the quantize workflow exports (models/model.ts)"
)


def _provenance() -> dict[str, str]:
    import monai

    import monai_effq

    return {
        "monai_effq": monai_effq.__version__,
        "monai": monai.__version__,
        "torch": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


class _FlatStore:
    """Collects tensors into one flat tensor per dtype and records where each one went."""

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.sizes: dict[str, int] = {}

    def add(self, t: torch.Tensor) -> dict[str, Any]:
        t = t.detach().as_subclass(torch.Tensor).cpu().contiguous()
        key = str(t.dtype).replace("torch.", "")
        offset = self.sizes.get(key, 0)
        self.parts.setdefault(key, []).append(t.reshape(-1))
        self.sizes[key] = offset + t.numel()
        return {"dtype": key, "offset": offset, "shape": list(t.shape)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: torch.cat(v) for k, v in self.parts.items()}


def _take(data: dict[str, torch.Tensor], entry: dict[str, Any]) -> torch.Tensor:
    flat = data[entry["dtype"]]
    n = 1
    for s in entry["shape"]:
        n *= s
    return flat[entry["offset"] : entry["offset"] + n].reshape(entry["shape"]).clone()


def save_quantized(result: QuantizationResult, path: str | os.PathLike) -> Path:
    """Write a quantized network to one file, atomically.

    Args:
        result: what :func:`monai_effq.quantize` returned.
        path: destination file (its folder is created).

    Returns:
        the path written.

    Raises:
        TypeError: when ``result`` is not a :class:`QuantizationResult`.
    """
    if not isinstance(result, QuantizationResult):
        raise TypeError(f"save_quantized expects the result of monai_effq.quantize, got {type(result).__name__}.")
    net = result.network
    store = _FlatStore()
    codes_parts: list[torch.Tensor] = []
    codes_offset = 0
    layers = []
    quantized_prefixes = []
    for name, module in net.named_modules():
        if not isinstance(module, QuantizedLayer):
            continue
        packed = pack_codes(module.codes, module.grid.bits)
        codes_parts.append(packed)
        aq = module.input_quantizer
        layers.append(
            {
                "name": name,
                "kind": type(module).__name__,
                "bits": module.grid.bits,
                "grid": module.grid.kind,
                "shape": list(module.codes.shape),
                "codes_offset": codes_offset,
                "codes_bytes": packed.numel(),
                "scale": store.add(module.scale),
                "zero_point": store.add(module.zero_point),
                "bias": None if module.bias is None else store.add(module.bias),
                "act": None
                if aq is None
                else {"bits": aq.grid.bits, "kind": aq.grid.kind, "scale": store.add(aq.scale), "zero_point": store.add(aq.zero_point)},
            }
        )
        codes_offset += packed.numel()
        quantized_prefixes.append(name + ".")
    rest = {}
    for key, t in net.state_dict().items():
        if not any(key.startswith(p) for p in quantized_prefixes):
            rest[key] = store.add(t)
    meta = {
        "config": result.config.to_dict(),
        "report": result.report.to_dict(),
        "folded": list(result.folded),
        "layers": layers,
        "state": rest,
        "provenance": _provenance(),
    }
    payload = {
        "model": NOT_A_STATE_DICT,
        "format": FORMAT,
        "meta": json.dumps(meta, default=float),
        "codes": torch.cat(codes_parts) if codes_parts else torch.zeros(0, dtype=torch.uint8),
        "data": store.tensors(),
    }
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], torch.Tensor, dict[str, torch.Tensor]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"quantized checkpoint {p} does not exist: run the quantize step first or fix the path.")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"corrupt or unreadable quantized checkpoint {p} ({type(e).__name__}); re-run the quantize step."
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(
            f"{p} is not a monai-effq quantized checkpoint (expected format {FORMAT!r}); "
            "an FP state_dict is loaded with CheckpointLoader instead."
        )
    return json.loads(payload["meta"]), payload["codes"], payload["data"]


def load_quantized_result(path: str | os.PathLike, network: nn.Module) -> QuantizationResult:
    """Rebuild the quantized network, its config and report, on a fresh FP architecture.

    Args:
        path: a file written by :func:`save_quantized`.
        network: a freshly constructed FP network of the same architecture (not modified).

    Returns:
        the :class:`QuantizationResult`, network in eval mode.

    Raises:
        FileNotFoundError: when the file is missing.
        ValueError: when it is corrupt or does not match ``network``.
    """
    meta, codes, data = _read(path)
    net = copy.deepcopy(network).eval()
    try:
        for bn_name in meta["folded"]:
            set_submodule(net, bn_name, nn.Identity())
        for entry in meta["layers"]:
            layer = net.get_submodule(entry["name"])
            packed = codes[entry["codes_offset"] : entry["codes_offset"] + entry["codes_bytes"]]
            layer_codes = unpack_codes(packed, entry["bits"], tuple(entry["shape"]))
            if tuple(layer.weight.shape) != tuple(entry["shape"]):
                raise ValueError(
                    f"layer {entry['name']} has weight shape {tuple(layer.weight.shape)} but the checkpoint "
                    f"holds {tuple(entry['shape'])}"
                )
            act = entry["act"]
            act_q = None
            if act is not None:
                act_q = ActivationQuantizer(act["bits"], act["kind"], float(_take(data, act["scale"])), float(_take(data, act["zero_point"])))
            cls = quantized_layer_class(layer)
            module = cls(
                layer,
                layer_codes,
                _take(data, entry["scale"]),
                _take(data, entry["zero_point"]),
                UniformGrid(entry["bits"], entry["grid"]),
                None if entry["bias"] is None else _take(data, entry["bias"]),
                act_q,
            )
            set_submodule(net, entry["name"], module)
        state = {k: _take(data, v) for k, v in meta["state"].items()}
        for key in state:
            module_name, _, attr = key.rpartition(".")
            owner = net.get_submodule(module_name) if module_name else net
            if attr == "bias" and getattr(owner, "bias", 0) is None:  # a folded BatchNorm gave it a bias
                owner.bias = nn.Parameter(torch.zeros_like(state[key]), requires_grad=False)
        missing, unexpected = net.load_state_dict(state, strict=False)
        quantized = tuple(e["name"] + "." for e in meta["layers"])
        missing = [k for k in missing if not k.startswith(quantized)]
        if missing or unexpected:
            raise ValueError(f"missing entries {missing[:5]}, unexpected entries {unexpected[:5]}")
    except (AttributeError, KeyError, RuntimeError, ValueError) as e:
        raise ValueError(
            f"quantized checkpoint {path} does not match this network architecture: {e}. Build the network "
            "with the same arguments as when it was quantized."
        ) from e
    for p in net.parameters():
        p.requires_grad_(False)
    return QuantizationResult(
        network=net.eval(),
        report=QuantizationReport.from_dict(meta["report"]),
        config=EfficientQConfig.from_dict(meta["config"]),
        folded=list(meta["folded"]),
    )


def load_quantized(path: str | os.PathLike, network: nn.Module) -> nn.Module:
    """Rebuild the quantized network saved at ``path`` on a fresh FP architecture.

    Args:
        path: a file written by :func:`save_quantized`.
        network: a freshly constructed FP network of the same architecture (not modified).

    Returns:
        the quantized network, in eval mode; its outputs equal the saved network's bit for bit.
    """
    return load_quantized_result(path, network).network
