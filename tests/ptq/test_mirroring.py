import pytest
import torch

from monai_effq.ptq.mirroring import mirror_axes, mirror_count, mirror_images, mirror_masks


def test_every_subset_of_the_spatial_axes_is_a_copy_and_the_window_itself_comes_first():
    assert mirror_axes(3) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert mirror_axes(2) == [(), (0,), (1,), (0, 1)]
    assert [mirror_count(d) for d in (1, 2, 3)] == [2, 4, 8]


@pytest.mark.parametrize("spatial", [(3, 4), (2, 3, 4)])
def test_each_window_is_followed_by_its_mirror_images(spatial):
    batch = torch.arange(2 * 2 * torch.Size(spatial).numel(), dtype=torch.float32).reshape(2, 2, *spatial)
    mirrored = mirror_images(batch)
    copies = mirror_count(len(spatial))
    assert mirrored.shape == (2 * copies, 2, *spatial)
    for w in range(2):
        for i, axes in enumerate(mirror_axes(len(spatial))):
            assert torch.equal(mirrored[w * copies + i], batch[w].flip([1 + a for a in axes]) if axes else batch[w])


def test_masks_of_the_windows_spatial_axes_flip_with_their_windows():
    batch = torch.rand(2, 1, 3, 4, 5)
    masks = batch[:, 0] > 0.5
    assert torch.equal(mirror_masks(masks, 3), mirror_images(batch)[:, 0] > 0.5)


def test_masks_over_other_axes_are_repeated_unflipped_for_every_copy():
    tokens = torch.tensor([[True, False, False], [False, False, True]])  # (N, tokens) of a linear layer
    assert torch.equal(mirror_masks(tokens, 3), tokens.repeat_interleave(8, dim=0))
