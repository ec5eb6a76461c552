"""The held-out check's score and decision: Dice against a brute-force count, the start/end rule."""

import math

import torch
import torch.nn as nn
from monai.networks.nets import UNet

from monai_effq import EfficientQConfig
from monai_effq.qat import HeldOutScore, end_is_better, prepare_finetune, score_windows
from monai_effq.qat.check import FinetuneCheck


def _zero_loss(logits, label):
    return logits.sum() * 0.0


def test_multiclass_dice_sums_every_window_and_skips_a_class_no_label_holds():
    g = torch.Generator().manual_seed(0)
    windows = []
    for _ in range(3):
        logits = torch.randn(2, 3, 6, 6, 6, generator=g)
        label = torch.randint(0, 2, (2, 1, 6, 6, 6), generator=g)  # class 2 never appears
        windows.append((logits, label))
    score = score_windows(nn.Identity(), windows, _zero_loss, "multiclass")
    pred = torch.cat([w[0] for w in windows]).argmax(1)
    true = torch.cat([w[1] for w in windows])[:, 0]
    inter = ((pred == 1) & (true == 1)).sum().item()
    expected = 2 * inter / ((pred == 1).sum().item() + (true == 1).sum().item())
    assert math.isclose(score.dice[0], expected, rel_tol=1e-9)
    assert math.isnan(score.dice[1]) and math.isclose(score.mean_dice, expected, rel_tol=1e-9)


def test_multilabel_dice_counts_a_channel_where_its_logit_is_positive():
    logits = torch.tensor([[[[[2.0, -1.0, 3.0, -2.0]]], [[[1.0, 1.0, -1.0, -1.0]]]]])  # (1, 2, 1, 1, 4)
    label = torch.tensor([[[[[1, 1, 1, 0]]], [[[0, 0, 0, 1]]]]])
    score = score_windows(nn.Identity(), [(logits, label)], _zero_loss, "multilabel")
    assert score.dice == (2 * 2 / (2 + 3), 0.0)


def test_the_end_is_kept_on_a_higher_dice_and_on_an_equal_dice_with_a_lower_loss():
    start = HeldOutScore(loss=0.5, dice=(0.8, 0.4))
    assert end_is_better(start, HeldOutScore(loss=0.9, dice=(0.8, 0.5)))
    assert not end_is_better(start, HeldOutScore(loss=0.1, dice=(0.8, 0.3)))
    assert end_is_better(start, HeldOutScore(loss=0.4, dice=(0.8, 0.4)))
    assert not end_is_better(start, HeldOutScore(loss=0.6, dice=(0.8, 0.4)))
    nothing = HeldOutScore(loss=0.5, dice=(float("nan"),))
    assert not end_is_better(nothing, HeldOutScore(loss=0.7, dice=(float("nan"),)))


def test_an_unknown_task_a_multichannel_multiclass_label_and_an_empty_held_out_loader_are_named():
    import pytest

    from monai_effq.qat.check import draw_windows

    logits = torch.randn(1, 3, 4, 4, 4)
    with pytest.raises(ValueError, match="task must be one of .* got 'regression'"):
        score_windows(nn.Identity(), [(logits, torch.zeros(1, 1, 4, 4, 4))], _zero_loss, "regression")
    one_hot = torch.zeros(1, 3, 4, 4, 4)
    with pytest.raises(ValueError, match="a multiclass label is one channel of class indices, got shape \\(1, 3, 4, 4, 4\\)"):
        score_windows(nn.Identity(), [(logits, one_hot)], _zero_loss, "multiclass")
    with pytest.raises(ValueError, match="the held-out data yielded no batch"):
        draw_windows([], 2)
    pairs = [{"image": logits, "label": one_hot}] * 3
    assert len(draw_windows(pairs, 2)) == 2  # one pass, cut at the count


def test_a_flat_training_loss_blames_the_learning_rate_only_when_the_steps_could_change_codes():
    torch.manual_seed(0)
    batches = [{"image": torch.randn(1, 1, 16, 16, 16), "label": (torch.rand(1, 1, 16, 16, 16) > 0.7).long()}]
    trainable = prepare_finetune(UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0), batches, EfficientQConfig(weight_bits=4, act_bits=6))
    check = FinetuneCheck(trainable, [], lambda logits, label: logits.sum(), "multiclass")
    step = sorted(float(m.scale.float().median()) for m in trainable.layers().values())[len(trainable.layers()) // 2]
    flat = [0.5] * 10
    few = check.causes([step / 100] * 10, flat)  # together they move a weight by a tenth of a step
    assert any(c.startswith("steps:") for c in few) and not any(c.startswith("training loss") for c in few), few
    many = check.causes([step / 2] * 10, flat)  # five steps' worth: the codes could change, and the loss did not fall
    assert not any(c.startswith("steps:") for c in many) and any("did not fall" in c and "lower the learning rate" in c for c in many), many


def test_a_held_out_loss_that_falls_with_the_training_loss_blames_the_loss_not_the_windows():
    torch.manual_seed(0)
    batches = [{"image": torch.randn(1, 1, 16, 16, 16), "label": (torch.rand(1, 1, 16, 16, 16) > 0.7).long()}]
    trainable = prepare_finetune(UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0), batches, EfficientQConfig(weight_bits=4, act_bits=6))
    check = FinetuneCheck(trainable, [], lambda logits, label: logits.sum(), "multiclass")
    check.start_score = HeldOutScore(loss=2.0, dice=(0.3, 0.0))
    falling = [2.0] * 5 + [1.5] * 5
    same_windows = check.causes([1e-6] * 10, falling, end=HeldOutScore(loss=1.5, dice=(0.0, 0.0)))
    assert any(c.startswith("loss and Dice:") and "(2.0000 -> 1.5000)" in c for c in same_windows), same_windows
    assert not any("do not represent" in c for c in same_windows)
    other_windows = check.causes([1e-6] * 10, falling, end=HeldOutScore(loss=2.5, dice=(0.0, 0.0)))
    assert any("do not represent the held-out ones" in c for c in other_windows), other_windows


def test_inputs_clipped_by_ranges_fitted_to_other_data_blame_the_calibration_not_a_format():
    torch.manual_seed(0)
    net = UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    windows = [(torch.randn(1, 1, 16, 16, 16), (torch.rand(1, 1, 16, 16, 16) > 0.7).long())]
    nearly_empty = torch.rand(1, 1, 16, 16, 16) * 1e-3
    causes = {}
    for name, config in (("fitted", EfficientQConfig(weight_bits=8, act_bits=8)), ("formats", EfficientQConfig(act_format="Q6.0"))):
        check = FinetuneCheck(prepare_finetune(net, nearly_empty, config), windows, lambda logits, label: logits.sum(), "multiclass")
        check.start()
        (causes[name],) = [c for c in check.causes([], []) if c.startswith("format:")]
    assert "their input ranges were calibrated on the start's calibration batches" in causes["fitted"], causes
    assert "choose formats that fit" not in causes["fitted"]
    assert "choose formats that fit these layers" in causes["formats"], causes
