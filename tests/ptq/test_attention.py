import pytest
import torch

from monai_effq.ptq import ClassAttention


def _logits_for(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, classes).movedim(-1, 1).float() * 4 - 2


def test_rare_classes_get_inverse_frequency_weights():
    labels = torch.zeros(1, 10, 10, 10, dtype=torch.long)
    labels[0, :4] = 1  # 400 liver voxels
    labels[0, 0, 0, :4] = 2  # 4 tumour voxels (overwriting liver)
    att = ClassAttention(_logits_for(labels, 3), "multiclass", power=0.5)
    n = torch.tensor([600.0, 396.0, 4.0])
    assert torch.allclose(att.class_weights, (n.max() / n).sqrt())
    h = att((10, 10, 10))
    assert h[0, 0, 0, 0] == pytest.approx(float((600 / 4) ** 0.5))
    assert h[0, 9, 9, 9] == pytest.approx(1.0)


def test_weights_are_real_valued_not_truncated():
    labels = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    labels[0, :3] = 1  # 48 vs 16: weight sqrt(3) for the background
    att = ClassAttention(_logits_for(labels, 2), power=0.5)
    assert att.class_weights[0] == pytest.approx(3**0.5)


def test_a_voxel_whose_classes_tie_counts_as_the_first_of_them_as_argmax_picks():
    logits = torch.zeros(2, 3, 4, 4, 4)
    logits[:, 2, :2] = 1.0  # half the voxels: class 2 alone on top
    logits[:, 1, 2:] = 1.0
    logits[:, 2, 2:] = 1.0  # the other half: classes 1 and 2 tie
    logits[1, 0, 0, 0, 0] = float("nan")  # a NaN counts as the largest, as in argmax
    att = ClassAttention(logits, "multiclass")
    want = torch.bincount(logits.argmax(dim=1).reshape(-1), minlength=3)
    assert torch.equal(att.class_counts, want) and want.tolist() == [1, 64, 63]


def test_voxels_outside_the_body_weigh_one():
    labels = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    labels[0, 0, 0, 0] = 1
    mask = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    mask[0, :2] = True
    h = ClassAttention(_logits_for(labels, 2), body_mask=mask)((4, 4, 4))
    assert (h[0, 2:] == 1).all() and h[0, 0, 0, 0] > 1


def test_multilabel_channels_make_overlapping_classes():
    logits = -torch.ones(1, 3, 8, 8, 8)
    logits[0, 1, :4] = 1  # WT
    logits[0, 0, :1] = 1  # TC inside WT: 64 voxels, WT only: 192, neither: 256
    att = ClassAttention(logits, "multilabel")
    h = att((8, 8, 8))
    assert h[0, 0, 0, 0] > h[0, 3, 0, 0] > h[0, 7, 0, 0]


def test_pyramid_levels_match_any_layer_size():
    labels = torch.zeros(1, 12, 12, 12, dtype=torch.long)
    labels[0, :6, :6, :6] = 1
    att = ClassAttention(_logits_for(labels, 2))
    for size in [(6, 6, 6), (3, 3, 3), (5, 7, 12), (24, 24, 24)]:
        h = att(size)
        assert h.shape == (1, *size)
        assert h.max() > 1 and h.min() == pytest.approx(1.0)


def test_a_mask_of_the_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match="body_mask"):
        ClassAttention(torch.zeros(1, 2, 4, 4, 4), body_mask=torch.ones(1, 5, 5, 5))


def test_a_mask_per_image_channel_is_refused_not_cut_to_its_first_channel():
    mask = torch.zeros(1, 4, 4, 4, 4, dtype=torch.bool)
    mask[:, 1:] = True  # image != 0 of a four-contrast case whose first contrast is empty
    with pytest.raises(ValueError, match=r"body_mask has 4 channels.*\.any\(dim=1\)"):
        ClassAttention(torch.zeros(1, 2, 4, 4, 4), body_mask=mask)
    one = ClassAttention(torch.zeros(1, 2, 4, 4, 4), body_mask=mask.any(dim=1, keepdim=True))
    assert int(one.class_counts.sum()) == 64


def test_a_mask_that_selects_no_voxel_is_rejected_with_what_to_do():
    # e.g. a calibration crop that lies in the air outside the body, with body_mask='nonzero'
    with pytest.raises(ValueError, match="body_mask selects no voxel.*holds the body"):
        ClassAttention(torch.zeros(1, 2, 4, 4, 4), body_mask=torch.zeros(1, 4, 4, 4, dtype=torch.bool))


@pytest.mark.parametrize("value", [float("nan"), 0.3])
def test_a_float_mask_of_values_that_are_not_whole_numbers_is_refused_rather_than_read_as_body(value):
    mask = torch.zeros(1, 4, 4, 4)
    mask[0, :2] = 1.0
    ClassAttention(torch.zeros(1, 2, 4, 4, 4), body_mask=mask)  # a float mask of 0 and 1 is a mask
    ClassAttention(torch.zeros(1, 2, 4, 4, 4), body_mask=mask * 255)  # so is an image tool's 0 and 255, loaded as float
    ClassAttention(torch.zeros(1, 2, 4, 4, 4), body_mask=(mask * 255).to(torch.uint8))
    mask[0, 3, 3, 3] = value  # a NaN, or a probability map's soft edge
    with pytest.raises(ValueError, match=r"body_mask holds 1 value\(s\) that are not whole numbers .*threshold a probability map"):
        ClassAttention(torch.zeros(1, 2, 4, 4, 4), body_mask=mask)


def test_a_mask_empty_here_is_accepted_when_the_counts_reduced_from_elsewhere_are_not():
    def elsewhere(counts: list[torch.Tensor]) -> None:
        counts[0] += torch.tensor([5.0, 1.0], dtype=torch.float64)

    att = ClassAttention(torch.zeros(1, 2, 4, 4, 4), body_mask=torch.zeros(1, 4, 4, 4, dtype=torch.bool), reduce_counts=elsewhere)
    assert att.class_counts.tolist() == [5, 1]


def test_an_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="task"):
        ClassAttention(torch.zeros(1, 2, 4, 4, 4), task="regression")


def test_a_classifiers_output_without_voxels_is_refused_naming_attention_false():
    # pooling (N, classes) logits to a layer's size failed in torch: "Input dimension should be at least 4"
    with pytest.raises(ValueError, match=r"network returns shape \(4, 3\): quantize it with attention=False"):
        ClassAttention(torch.zeros(4, 3))
