"""Bit-exact packing of integer codes into bytes.

Codes of ``bits`` bits are laid end to end, most significant bit first, so ``n`` codes take
``ceil(n * bits / 8)`` bytes: four 2-bit codes or two 4-bit codes share one byte.
"""

from __future__ import annotations

import numpy as np
import torch

from monai_effq.quant.grid import check_bits

__all__ = ["pack_codes", "unpack_codes", "packed_nbytes"]


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take once packed.

    Args:
        numel: number of codes.
        bits: bits per code.

    Returns:
        the packed size in bytes.
    """
    return (numel * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer codes into a flat ``uint8`` tensor.

    Args:
        codes: integer codes in ``[0, 2**bits - 1]``, any shape (flattened in C order).
        bits: bits per code, 1 to 8.

    Returns:
        ``uint8`` tensor of ``packed_nbytes(codes.numel(), bits)`` bytes.

    Raises:
        ValueError: when a code does not fit in ``bits`` bits.
    """
    check_bits(bits, "packing bits", 1, 8)
    flat = codes.detach().reshape(-1).cpu().numpy().astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] to pack into {bits} bits.")
    if bits == 8:
        return torch.from_numpy(flat.astype(np.uint8))
    bitplanes = ((flat[:, None] >> np.arange(bits - 1, -1, -1)) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(bitplanes.reshape(-1)))


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_codes`.

    Args:
        packed: the ``uint8`` bytes.
        bits: bits per code.
        shape: shape of the codes.

    Returns:
        ``int64`` codes of ``shape``.

    Raises:
        ValueError: when the byte count does not match ``shape`` and ``bits``.
    """
    check_bits(bits, "packing bits", 1, 8)
    numel = int(np.prod(tuple(shape), dtype=np.int64))
    raw = packed.detach().reshape(-1).cpu().numpy().astype(np.uint8)
    if raw.size != packed_nbytes(numel, bits):
        raise ValueError(
            f"packed codes hold {raw.size} bytes but {numel} codes of {bits} bits need "
            f"{packed_nbytes(numel, bits)}: the checkpoint is corrupt or from another network."
        )
    if bits == 8:
        return torch.from_numpy(raw.astype(np.int64)).reshape(tuple(shape))
    bitplanes = np.unpackbits(raw)[: numel * bits].reshape(numel, bits).astype(np.int64)
    codes = (bitplanes << np.arange(bits - 1, -1, -1)).sum(axis=1)
    return torch.from_numpy(codes).reshape(tuple(shape))
