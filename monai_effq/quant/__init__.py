"""Quantization grids (uniform and fixed-point) and code packing: stateless functions that know nothing of networks."""

from monai_effq.quant.fixed_point import (
    MAX_WORD_BITS,
    FixedPointFormat,
    fixed_point_scale,
    fractional_bits,
    is_power_of_two,
    snap_to_power_of_two,
)
from monai_effq.quant.grid import (
    GRID_KINDS,
    UniformGrid,
    channel_view,
    check_bits,
    dequantize,
    fake_quantize,
    fit_minmax,
    fit_scale,
    fit_scale_als,
    fit_scale_mse,
    grid_codes,
    quantize_codes,
)
from monai_effq.quant.packing import pack_codes, packed_nbytes, unpack_codes
from monai_effq.quant.spec import SCALE_RULES, ActivationSpec, WeightSpec

__all__ = [
    "MAX_WORD_BITS",
    "FixedPointFormat",
    "fixed_point_scale",
    "fractional_bits",
    "is_power_of_two",
    "snap_to_power_of_two",
    "GRID_KINDS",
    "UniformGrid",
    "channel_view",
    "check_bits",
    "dequantize",
    "fake_quantize",
    "fit_minmax",
    "fit_scale",
    "fit_scale_als",
    "fit_scale_mse",
    "grid_codes",
    "quantize_codes",
    "pack_codes",
    "packed_nbytes",
    "unpack_codes",
    "SCALE_RULES",
    "ActivationSpec",
    "WeightSpec",
]
