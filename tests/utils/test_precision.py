"""Full float32 inside ``ieee_float32``: TF32 is off for the block and the caller's settings come back."""

import pytest
import torch
import torch.nn as nn

from monai_effq import EfficientQConfig, quantize
from monai_effq.utils.precision import _precision_settings, ieee_float32


def _current() -> list:
    return [getattr(space, name) for space, name, _ in _precision_settings()]


def test_the_block_runs_in_full_float32_and_the_callers_settings_return_even_after_an_error():
    before = _current()
    full = [value for _, _, value in _precision_settings()]
    with ieee_float32():
        assert _current() == full
    assert _current() == before
    with pytest.raises(RuntimeError), ieee_float32():
        raise RuntimeError("in the block")
    assert _current() == before


def test_quantize_computes_its_calibration_passes_without_tf32_whatever_the_caller_set():
    seen = []
    network = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1)).eval()
    network[0].register_forward_hook(lambda *_: seen.append(_current()))
    full = [value for _, _, value in _precision_settings()]
    before = _current()
    quantize(network, torch.rand(1, 1, 8, 8, 8), EfficientQConfig(attention=False), progress=False)
    assert seen and all(s == full for s in seen)
    assert _current() == before
