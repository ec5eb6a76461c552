"""Content fingerprints: short hashes that say whether two tensors, networks or settings are the same.

Checkpoints record them (which FP weights, config and calibration data made a result), resumed runs
compare them (is the journal from this very run?) and deployment compares them (is the exported file
made from this checkpoint?), so a file's identity never rests on its name or modification time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

__all__ = ["DIGEST_CHARS", "fingerprint_json", "fingerprint_state", "fingerprint_tensors"]

# 16 hex digits (64 bits) tell apart any files a user will ever compare, and stay readable in logs
DIGEST_CHARS = 16


def _update(digest: Any, t: torch.Tensor) -> None:
    t = t.detach().as_subclass(torch.Tensor).cpu().contiguous()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    # bytes, not values: -0.0 and 0.0, or two NaN payloads, are different files
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def fingerprint_tensors(tensors: Iterable[torch.Tensor] | Mapping[str, torch.Tensor]) -> str:
    """The SHA-256 (first :data:`DIGEST_CHARS` hex digits) of tensors' dtypes, shapes and bytes, in order.

    Args:
        tensors: a sequence of tensors, or a mapping whose names are hashed with them.

    Returns:
        a hex string; equal for equal content on any device.
    """
    digest = hashlib.sha256()
    if isinstance(tensors, Mapping):
        for name, t in tensors.items():
            digest.update(name.encode())
            _update(digest, t)
    else:
        for t in tensors:
            _update(digest, t)
    return digest.hexdigest()[:DIGEST_CHARS]


def fingerprint_state(network: nn.Module) -> str:
    """The fingerprint of a network's state dict (parameters and buffers, by name).

    Args:
        network: any module.

    Returns:
        a hex string.
    """
    return fingerprint_tensors(network.state_dict())


def fingerprint_json(value: Any) -> str:
    """The fingerprint of a JSON-serialisable value (keys sorted, so dict order does not matter).

    Args:
        value: e.g. a config's ``to_dict()``.

    Returns:
        a hex string.
    """
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]
