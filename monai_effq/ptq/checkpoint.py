"""Quantized checkpoints: one file with packed integer codes, rebuilt on a fresh FP architecture.

The file is a ``torch.save`` archive of six entries: ``format``, ``meta`` (a JSON string: the
config, the report with the fingerprints of the FP weights, config and calibration data it was made
from, the library versions, and tables of the layers, of the quantized norm inputs and of the
tensors with their offsets), ``codes`` (every layer's packed codes, end to end, in one ``uint8``
tensor), ``data`` (every other tensor, flattened into one tensor per dtype), ``checksum`` (the
fingerprint of ``meta``, ``codes`` and ``data``) and ``model``, a string saying how to load the
file. Few, large tensors keep the archive's per-entry overhead negligible, so the file is as small
as the packed codes promise.

The checksum is the checkpoint's identity: loading verifies it (torch reads a flipped byte in a
tensor without complaint), deployment records it in the files it exports and compares it to decide
whether they are stale (:func:`checkpoint_fingerprint`), and report files record it
(:func:`result_fingerprint`), so a report or an export left by an older run is told apart from the
checkpoint beside it. The meta holds no times or dates, so quantizing the same inputs twice writes
the same bytes.

``model`` is where MONAI's ``CheckpointLoader`` and MONAI Label look for a state dict; a string there
makes ``load_state_dict`` raise (torch's "Expected state_dict to be dict-like"; the string itself says
how to load the file to whoever opens it), where a missing entry would let ``strict=False`` load
nothing and leave a network with random weights, silently.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from monai_effq.ptq.config import EfficientQConfig
from monai_effq.ptq.graph import set_submodule, unique_state_dict
from monai_effq.ptq.modules import (
    SHARED_INPUT_QUANTIZER,
    ActivationQuantizer,
    QuantizedLayer,
    QuantizedNorm,
    quantize_shared_input,
    quantized_layer_class,
    shared_input_quantizer,
)
from monai_effq.ptq.prepare import quantizable_network
from monai_effq.ptq.result import QuantizationResult
from monai_effq.ptq.report import QuantizationReport
from monai_effq.quant.grid import UniformGrid
from monai_effq.quant.packing import pack_codes, unpack_codes
from monai_effq.utils.errors import MissingInputError, UserInputError
from monai_effq.utils.fingerprint import fingerprint_state, fingerprint_tensors
from monai_effq.utils.io import atomic_write

__all__ = [
    "FORMAT",
    "NOT_A_STATE_DICT",
    "READABLE_FORMATS",
    "architecture_table",
    "checkpoint_fingerprint",
    "load_quantized",
    "load_quantized_result",
    "report_provenance",
    "result_fingerprint",
    "save_quantized",
    "verify_checkpoint",
    "versions",
]

logger = logging.getLogger("monai_effq")
# version 2 added the quantized norm inputs (meta "norm_inputs"); version 1 files load as having none
FORMAT = "monai-effq-quantized/2"
READABLE_FORMATS = ("monai-effq-quantized/1", FORMAT)
NOT_A_STATE_DICT = (
    "monai-effq packed checkpoint, not a state dict: load it with monai_effq.load_quantized(path, network_def); "
    "to serve it without monai-effq, use the TorchScript bundle the quantize workflow exports (models/model.ts)"
)


def versions() -> dict[str, str]:
    """The versions of monai-effq, MONAI and torch, as checkpoints and reports record them.

    Returns:
        ``{"monai_effq": ..., "monai": ..., "torch": ...}``.
    """
    import monai

    import monai_effq

    return {"monai_effq": monai_effq.__version__, "monai": monai.__version__, "torch": torch.__version__}


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


# settings of torch's layers that change what a network computes without changing a state dict's keys or shapes: a
# checkpoint rebuilt on a network built with other ones (another stride, no norm) ran silently and computed otherwise
_ARCHITECTURE_SETTINGS = (
    "stride", "padding", "dilation", "groups", "padding_mode", "output_padding", "num_groups", "eps", "affine",
    "negative_slope", "scale_factor", "mode", "align_corners",
    # activations, pooling, softmax, resampling and norms' running statistics (ELU's alpha 1.0 against 0.2 loaded
    # silently and computed otherwise)
    "alpha", "approximate", "beta", "threshold", "value", "min_val", "max_val", "lambd", "kernel_size", "ceil_mode",
    "count_include_pad", "divisor_override", "output_size", "norm_type", "dim", "size", "track_running_stats",
    "upscale_factor", "downscale_factor", "start_dim", "end_dim",
)


def architecture_table(network: nn.Module) -> dict[str, list]:
    """The network's ``torch.nn`` leaf modules by name, each as its class name and its :data:`_ARCHITECTURE_SETTINGS`.

    Only torch's own leaves count: their classes and settings are torch's (a MONAI block renamed between
    releases does not make a file unreadable), and they are what computes.
    """
    layers = {}
    quantized = {name for name, module in network.named_modules() if isinstance(module, QuantizedLayer)}
    for name, module in network.named_modules():
        if next(module.children(), None) is not None or not type(module).__module__.startswith("torch.nn"):
            continue
        owner = name.rpartition(".")[0] if name.endswith(".layer") else None
        name = owner if owner in quantized else name  # a quantized layer's FP layer: by the name the user knows
        settings = {a: getattr(module, a) for a in _ARCHITECTURE_SETTINGS if hasattr(module, a) and not callable(getattr(module, a))}
        layers[name] = [type(module).__name__, json.loads(json.dumps(settings, default=str))]
    return layers


def _architecture_differences(saved: dict[str, list], here: dict[str, list]) -> list[str]:
    """How the network a checkpoint was saved from (``saved``) differs from this one (``here``), one phrase each."""
    differences = []
    in_both_there, in_both_here = [n for n in saved if n in here], [n for n in here if n in saved]
    if in_both_there != in_both_here:
        # the same layers built in another order (MONAI's adn_ordering "ADN" against "NDA") compute otherwise
        moved = next(a for a, b in zip(in_both_there, in_both_here) if a != b)
        differences.append(f"its layers are built in another order ({moved} comes elsewhere there)")
    for name in [*saved, *(n for n in here if n not in saved)]:
        there, this = saved.get(name), here.get(name)
        if there == this:
            continue
        if there is None:
            differences.append(f"{name} ({this[0]}) is not in it")
        elif this is None:
            differences.append(f"its {name} ({there[0]}) is not in this network")
        elif there[0] != this[0]:
            differences.append(f"{name} is a {there[0]} there and a {this[0]} here")
        else:
            # a setting only one table records was not recorded by the version that wrote the other
            for key in [k for k in there[1] if k in this[1]]:
                if there[1][key] != this[1][key]:
                    differences.append(f"{name}.{key} is {there[1].get(key)} there and {this[1].get(key)} here")
    return differences


def _activation_entry(quantizer: ActivationQuantizer, store: _FlatStore) -> dict[str, Any]:
    return {
        "bits": quantizer.grid.bits,
        "kind": quantizer.grid.kind,
        "scale": store.add(quantizer.scale),
        "zero_point": store.add(quantizer.zero_point),
    }


def _activation_quantizer(entry: dict[str, Any], data: dict[str, torch.Tensor]) -> ActivationQuantizer:
    scale, zero = float(_take(data, entry["scale"])), float(_take(data, entry["zero_point"]))
    return ActivationQuantizer(entry["bits"], entry["kind"], scale, zero)


def _payload(result: QuantizationResult) -> dict[str, Any]:
    """The archive's entries, all but the checksum."""
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
                "act": None if aq is None else _activation_entry(aq, store),
            }
        )
        codes_offset += packed.numel()
        quantized_prefixes.append(name + ".")
    norm_inputs = []
    for name, module in net.named_modules():
        if isinstance(module, QuantizedNorm):
            norm_inputs.append({"name": name, **_activation_entry(module.input_quantizer, store)})
            quantized_prefixes.append(name + ".input_quantizer.")
        elif shared_input_quantizer(module) is not None:  # a block whose first norm or layer and skip path share the rounding
            norm_inputs.append({"name": name, "shared": True, **_activation_entry(shared_input_quantizer(module), store)})
            quantized_prefixes.append(f"{name}.{SHARED_INPUT_QUANTIZER}.")
    rest = {}
    for key, t in unique_state_dict(net).items():  # a layer the network holds under two names is stored once
        if not any(key.startswith(p) for p in quantized_prefixes):
            rest[key] = store.add(t)
    meta = {
        "config": result.config.to_dict(),
        # times and memory differ from run to run: they stay in the report files, out of the checkpoint
        "report": result.report.to_dict(measurements=False),
        "folded": list(result.folded),
        "layers": layers,
        "norm_inputs": norm_inputs,
        "state": rest,
        "architecture": architecture_table(net),
        "provenance": versions(),
    }
    return {
        "model": NOT_A_STATE_DICT,
        "format": FORMAT,
        "meta": json.dumps(meta, default=float),
        "codes": torch.cat(codes_parts) if codes_parts else torch.zeros(0, dtype=torch.uint8),
        "data": store.tensors(),
    }


def _checksum(meta: str, codes: torch.Tensor, data: dict[str, torch.Tensor]) -> str:
    """The fingerprint of an archive's content: its meta text and every tensor."""
    text = torch.frombuffer(bytearray(meta.encode()), dtype=torch.uint8) if meta else torch.zeros(0, dtype=torch.uint8)
    return fingerprint_tensors({"meta": text, "codes": codes, **{f"data.{k}": v for k, v in sorted(data.items())}})


def result_fingerprint(result: QuantizationResult) -> str:
    """The fingerprint :func:`save_quantized` records for ``result`` (its checkpoint's :func:`checkpoint_fingerprint`).

    Args:
        result: what :func:`monai_effq.quantize` returned.

    Returns:
        a hex string (:mod:`monai_effq.utils.fingerprint`).

    Raises:
        TypeError: when ``result`` is not a :class:`QuantizationResult`.
    """
    payload = _payload(result)
    return _checksum(payload["meta"], payload["codes"], payload["data"])


def save_quantized(result: QuantizationResult, path: str | os.PathLike) -> Path:
    """Write a quantized network to one file, atomically, with the checksum that loading verifies.

    The same result gives the same bytes: the meta holds no times, and the archive is written through
    a file object, so its inner folder is always ``archive`` and not the temporary file's random name.

    Args:
        result: what :func:`monai_effq.quantize` returned.
        path: destination file (its folder is created).

    Returns:
        the path written.

    Raises:
        TypeError: when ``result`` is not a :class:`QuantizationResult`.
    """
    payload = _payload(result)
    payload["checksum"] = _checksum(payload["meta"], payload["codes"], payload["data"])
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)
    return Path(path)


class _Archive(NamedTuple):
    meta: dict[str, Any]
    codes: torch.Tensor
    data: dict[str, torch.Tensor]
    fingerprint: str


def _read(path: str | os.PathLike) -> _Archive:
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(f"quantized checkpoint {p} does not exist: run the quantize workflow first or fix the path.")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserInputError(
            f"corrupt or unreadable quantized checkpoint {p} ({type(e).__name__}); re-run the quantize step."
        ) from e
    if not isinstance(payload, dict) or payload.get("format") not in READABLE_FORMATS:
        found = payload.get("format") if isinstance(payload, dict) else None
        if isinstance(found, str) and found.startswith("monai-effq-quantized/"):
            raise UserInputError(
                f"{p} is a monai-effq quantized checkpoint of format {found!r}, newer than this version reads "
                f"({', '.join(READABLE_FORMATS)}): upgrade monai-effq or re-run the quantize step."
            )
        raise UserInputError(
            f"{p} is not a monai-effq quantized checkpoint (expected format {FORMAT!r}); "
            "an FP state_dict is loaded with CheckpointLoader instead."
        )
    parts = {"meta": str, "codes": torch.Tensor, "data": dict}
    missing = [key for key, kind in parts.items() if not isinstance(payload.get(key), kind)]
    # every file of format 2 was written with its checksum; only format-1 files may lack one
    if "checksum" not in payload and payload["format"] != READABLE_FORMATS[0]:
        missing.append("checksum")
    if missing:
        raise UserInputError(
            f"quantized checkpoint {p} is damaged: it has no valid {', '.join(missing)} entry (a changed byte on disk or "
            "in a copy); re-run the quantize step."
        )
    fingerprint = _checksum(payload["meta"], payload["codes"], payload["data"])
    if payload.get("checksum", fingerprint) != fingerprint:
        raise UserInputError(
            f"quantized checkpoint {p} is damaged: its content does not match the checksum recorded when it was "
            "written (a changed byte on disk or in a copy); re-run the quantize step."
        )
    return _Archive(json.loads(payload["meta"]), payload["codes"], payload["data"], fingerprint)


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """The fingerprint of a quantized checkpoint's content, verified against the checksum it records.

    Args:
        path: a file written by :func:`save_quantized`.

    Returns:
        a hex string, equal to :func:`result_fingerprint` of the result that was saved.

    Raises:
        MissingInputError: (a ``FileNotFoundError``) when the file is missing.
        UserInputError: (a ``ValueError``) when it is damaged or not a quantized checkpoint.
    """
    return _read(path).fingerprint


def _held_by_quantized_layer(network: nn.Module, key: str) -> bool:
    """Whether a state-dict key names a parameter of a module that is now a quantized layer (which has none of that name)."""
    owner, _, _ = key.rpartition(".")
    try:
        return isinstance(network.get_submodule(owner), QuantizedLayer)
    except AttributeError:
        return False


def load_quantized_result(path: str | os.PathLike, network: nn.Module) -> QuantizationResult:
    """Rebuild the quantized network, its config and report, on a fresh FP architecture.

    Args:
        path: a file written by :func:`save_quantized`.
        network: a freshly constructed FP network of the same architecture (not modified).

    Returns:
        the :class:`QuantizationResult`, network in eval mode.

    Raises:
        MissingInputError: (a ``FileNotFoundError``) when the file is missing.
        UserInputError: (a ``ValueError``) when it is corrupt, damaged (its checksum does not match) or does not
            match ``network``.
    """
    meta, codes, data, _ = _read(path)
    net = copy.deepcopy(quantizable_network(network)).eval()
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
            act_q = None if entry["act"] is None else _activation_quantizer(entry["act"], data)
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
        for entry in meta.get("norm_inputs", []):  # version 1 files have none
            module = net.get_submodule(entry["name"])
            if entry.get("shared"):
                quantize_shared_input(module, _activation_quantizer(entry, data))
            else:
                set_submodule(net, entry["name"], QuantizedNorm(module, _activation_quantizer(entry, data)))
        state = {k: _take(data, v) for k, v in meta["state"].items()}
        for key in state:
            module_name, _, attr = key.rpartition(".")
            owner = net.get_submodule(module_name) if module_name else net
            if attr == "bias" and getattr(owner, "bias", 0) is None:  # a folded BatchNorm gave it a bias
                owner.bias = nn.Parameter(torch.zeros_like(state[key]), requires_grad=False)
        missing, unexpected = net.load_state_dict(state, strict=False)
        quantized = tuple(e["name"] + "." for e in meta["layers"]) + tuple(
            f"{e['name']}.{SHARED_INPUT_QUANTIZER if e.get('shared') else 'input_quantizer'}." for e in meta.get("norm_inputs", [])
        )
        # a later name of a tensor (a layer held under two names) is loaded through its first
        aliases = set(net.state_dict(keep_vars=True)) - set(unique_state_dict(net))
        missing = [k for k in missing if not k.startswith(quantized) and k not in aliases]
        if unexpected and missing == [] and all(_held_by_quantized_layer(net, k) for k in unexpected):
            # before 1523990, set_submodule replaced such a layer under one of its names only, so the forward ran
            # the FP layer under the other, which the file stored
            raise UserInputError(
                f"quantized checkpoint {path} holds floating-point weights under a second name of quantized layers "
                f"({', '.join(unexpected[:3])}): it was written by an earlier monai-effq that left layers registered under two "
                "names (nnU-Net's blocks) unquantized where the network runs them. Quantize the FP network again."
            )
        if missing or unexpected:
            raise ValueError(f"missing entries {missing[:5]}, unexpected entries {unexpected[:5]}")
    except (AttributeError, KeyError, RuntimeError, ValueError) as e:
        raise UserInputError(
            f"quantized checkpoint {path} does not match this network architecture: {e}. Build the network "
            "with the same arguments as when it was quantized."
        ) from e
    differences = _architecture_differences(meta["architecture"], architecture_table(net)) if "architecture" in meta else []
    if differences:  # files written before the table have none: their keys and shapes were all that was checked
        raise UserInputError(
            f"quantized checkpoint {path} was quantized from a network built otherwise than this one: "
            f"{'; '.join(differences[:3])}{'; ...' if len(differences) > 3 else ''}. Build the network with the same "
            "arguments as when it was quantized."
        )
    for p in net.parameters():
        p.requires_grad_(False)
    return QuantizationResult(
        network=net.eval(),
        report=QuantizationReport.from_dict(meta["report"]),
        # fields newer than the file take the value that matches what the file holds
        config=EfficientQConfig.from_dict(
            {
                "quantize_norm_inputs": bool(meta.get("norm_inputs")),
                "share_skip_rounding": False,  # files from before the option: their entries say what is shared
                **meta["config"],
            }
        ),
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


def report_provenance(result: QuantizationResult) -> dict[str, str]:
    """What a report file records of where it comes from: its checkpoint's fingerprint, versions and date.

    Args:
        result: the result the report describes.

    Returns:
        ``{"checkpoint": ..., "monai_effq": ..., "monai": ..., "torch": ..., "created": ...}``, for
        :meth:`QuantizationReport.save`'s ``provenance``; :func:`verify_checkpoint` reads it back.
    """
    return {
        "checkpoint": result_fingerprint(result),
        **versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def verify_checkpoint(
    path: str | os.PathLike,
    *,
    fp_network: nn.Module | None = None,
    report: str | os.PathLike | None = None,
) -> str:
    """Check that a quantized checkpoint is whole and belongs with the FP weights and report beside it.

    A quantize run killed before it wrote its checkpoint, or after the checkpoint but before its
    report, leaves files of two runs side by side; an evaluation of them would credit one run with
    the other's results. Evaluation and deployment call this first.

    Args:
        path: a file written by :func:`save_quantized`.
        fp_network: the FP network holding the weights the checkpoint should have been quantized from
            (e.g. once the FP checkpoint is loaded into it); ``None``: not checked.
        report: the report JSON written with the checkpoint (``QuantizationReportHandler``);
            ``None``: not checked.

    Returns:
        the checkpoint's fingerprint (:func:`checkpoint_fingerprint`).

    Raises:
        MissingInputError: (a ``FileNotFoundError``) when the checkpoint or the report is missing.
        UserInputError: (a ``ValueError``) when the checkpoint is damaged, was made from other FP
            weights, or the report is damaged or describes another checkpoint.
    """
    archive = _read(path)
    if fp_network is not None:
        made_from = archive.meta["report"].get("sources", {}).get("fp_weights")
        current = fingerprint_state(quantizable_network(fp_network))  # as quantize fingerprinted it
        if made_from is None:  # written before checkpoints recorded their sources, or by fine-tuning
            logger.warning("quantized checkpoint %s does not record the FP weights it was made from: not checked", path)
        elif made_from != current:
            raise UserInputError(
                f"quantized checkpoint {path} was made from other FP weights (fingerprint {made_from}) than the "
                f"network's ({current}): re-run the quantize step with the current FP checkpoint."
            )
    if report is not None:
        report_path = Path(report)
        if not report_path.is_file():
            raise MissingInputError(f"quantization report {report_path} does not exist: re-run the quantize step.")
        try:
            provenance = json.loads(report_path.read_text(encoding="utf-8")).get("provenance", {})
            described = provenance.get("checkpoint")
        except (UnicodeDecodeError, ValueError, AttributeError):
            raise UserInputError(
                f"quantization report {report_path} is damaged (not a JSON report): re-run the quantize step."
            ) from None
        if described != archive.fingerprint:
            raise UserInputError(
                f"quantization report {report_path} describes another checkpoint (fingerprint {described}) than "
                f"{path} ({archive.fingerprint}): another quantize run wrote it into the same folder (another FP "
                "checkpoint quantized to the same model tag, or a run that did not finish). Point at the folder this "
                "checkpoint's run wrote its report to (a bundle's --output_dir), or re-run the quantize step for this "
                "checkpoint (--overwrite True) to write its report again."
            )
    return archive.fingerprint
