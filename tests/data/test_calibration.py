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


def test_a_window_that_spans_an_axis_is_cut_as_a_sliding_window_inferer_cuts_it():
    from monai_effq.data.calibration import window_size

    volume = torch.randn(1, 40, 33, 20)
    windows = calibration_windows(volume, (16, 16, -1))
    assert windows.shape[1:] == (1, 16, 16, 20) and windows.shape[0] == _windows_visited(volume, (16, 16, -1), 0.0)
    assert window_size(16, (40, 33, 20)) == (16, 16, 16) and window_size((16, -1), (40, 33)) == (16, 33)
    with pytest.raises(ValueError, match=r"roi_size \[16, 16\] has 2 sizes, but the volumes have 3 spatial axes"):
        window_size((16, 16), (40, 33, 20))
    with pytest.raises(ValueError, match=r"roi_size \(16, 16, -1\) spans an axis along which the calibration volumes differ"):
        calibration_windows([volume, volume[:, :, :, :10]], (16, 16, -1))


@pytest.mark.parametrize(
    "roi, message",
    [
        ("96", r"roi_size must be a window size or a list of them such as \[96,96,96\] \(-1 spans the axis\), got '96'"),
        ([96, 0, 96], r"each roi_size must be a positive window size or -1 \(the whole axis\), got 0"),
        ([96, 9.5, 96], "each roi_size must be an integer, got 9.5"),
        ([], r"roi_size must name at least one window size, got \[\]"),
    ],
)
def test_a_roi_is_taken_as_monai_takes_it_and_a_malformed_one_is_named(roi, message):
    from monai_effq.data.calibration import check_roi_size
    from monai_effq.utils.errors import UserInputError

    assert check_roi_size(64) == 64 and check_roi_size([96, 96, -1]) == (96, 96, -1)
    with pytest.raises(UserInputError, match=message):
        check_roi_size(roi)
