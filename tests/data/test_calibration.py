import pytest
import torch
from monai.inferers import SlidingWindowInferer

from monai_effq.data import calibration_windows


def _windows_visited(volume, roi, overlap):
    count = []

    def net(x):
        count.append(x.shape[0])
        return x

    SlidingWindowInferer(roi, sw_batch_size=1, overlap=overlap)(volume[None], net)
    return sum(count)


@pytest.mark.parametrize("overlap", [0.0, 0.25])
def test_a_volume_becomes_the_windows_a_sliding_window_inferer_visits(overlap):
    volume = torch.randn(2, 40, 33, 20)
    windows = calibration_windows(volume, (16, 16, 16), overlap=overlap)
    assert windows.shape[1:] == (2, 16, 16, 16)
    assert windows.shape[0] == _windows_visited(volume, (16, 16, 16), overlap)
    assert torch.equal(windows[0], volume[:, :16, :16, :16])


def test_every_voxel_of_the_volume_is_in_some_window():
    volume = torch.arange(30 * 20 * 10, dtype=torch.float32).reshape(1, 30, 20, 10)
    windows = calibration_windows(volume, (16, 16, 8))
    assert set(windows.unique().tolist()) == set(volume.unique().tolist())


def test_volumes_of_different_sizes_and_ones_smaller_than_the_roi_are_accepted():
    windows = calibration_windows([torch.ones(1, 20, 20, 20), torch.ones(1, 8, 30, 16)], (16, 16, 16))
    assert windows.shape[1:] == (1, 16, 16, 16)
    small = windows[-1]
    assert small[:, 8:].abs().sum() == 0  # zero padding beyond the small axis


def test_bad_volumes_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="NaN"):
        calibration_windows(torch.full((1, 16, 16, 16), float("nan")), (8, 8, 8))
    with pytest.raises(ValueError, match="spatial axes"):
        calibration_windows(torch.ones(16, 16), (8, 8, 8))
    with pytest.raises(ValueError, match="overlap"):
        calibration_windows(torch.ones(1, 16, 16, 16), (8, 8, 8), overlap=1.0)
