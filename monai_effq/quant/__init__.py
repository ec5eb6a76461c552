"""Quantization grids and code packing: stateless functions that know nothing of networks."""

from monai_effq.quant.grid import (
    GRID_KINDS,
    UniformGrid,
    check_bits,
    dequantize,
    fake_quantize,
    fit_minmax,
    fit_scale,
    fit_scale_als,
    fit_scale_mse,
    quantize_codes,
)
from monai_effq.quant.packing import pack_codes, packed_nbytes, unpack_codes

__all__ = [
    "GRID_KINDS",
    "UniformGrid",
    "check_bits",
    "dequantize",
    "fake_quantize",
    "fit_minmax",
    "fit_scale",
    "fit_scale_als",
    "fit_scale_mse",
    "quantize_codes",
    "pack_codes",
    "packed_nbytes",
    "unpack_codes",
]
