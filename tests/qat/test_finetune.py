"""Quantization-aware fine-tuning: STE gradients, exact freezing, bit-exact checkpoints, bad input."""

import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import UNet

from monai_effq import EfficientQConfig, finetune, load_quantized, load_quantized_result, quantize, save_quantized
from monai_effq.ptq import QuantizedLayer
from monai_effq.qat import FrozenBatchNorm, TrainableQuantizedLayer, prepare_finetune
from monai_effq.quant import UniformGrid, fractional_bits
from monai_effq.utils.errors import UserInputError

from ..ptq.conftest import dice, sphere_volumes, trained_unet, validation_spheres  # noqa: F401 - the fixtures are shared with the PTQ tests

FIXED = EfficientQConfig(weight_bits=4, act_bits=6, power_of_two=True, weight_grid="symmetric")


def _unet(seed=0):
    torch.manual_seed(seed)
    return UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)


@pytest.fixture(scope="module")
def spheres():
    x, y = sphere_volumes(8, seed=0)
    return [(x[i : i + 4], y[i : i + 4]) for i in (0, 4)]


def test_ste_hands_the_rounded_weights_gradient_to_the_shadow_weights():
    conv = nn.ConvTranspose3d(4, 6, 2, stride=2)
    layer = TrainableQuantizedLayer(conv, conv.weight, conv.bias, UniformGrid(4, "symmetric"), torch.full((6,), 0.05), torch.full((6,), 8.0))
    x = torch.randn(2, 4, 5, 5, 5)
    layer(x).square().sum().backward()
    reference = layer.quantized_weight().detach().requires_grad_()
    F.conv_transpose3d(x, reference, layer.bias.detach(), stride=2).square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert torch.allclose(layer.weight.grad, reference.grad)


def test_the_loss_falls_over_a_short_fine_tune(spheres):
    res = finetune(_unet(), spheres, FIXED, steps=25, lr=1e-2)
    info = res.report.extra["finetune"]
    assert info["steps"] == 25 and info["start"] == "fp"
    assert info["loss_last"] < 0.7 * info["loss_first"]


def test_fixed_point_codes_times_two_to_the_minus_f_are_the_fake_quant_weights(spheres):
    res = finetune(_unet(), spheres, FIXED, steps=2, lr=1e-3)
    layers = [m for m in res.network.modules() if isinstance(m, QuantizedLayer)]
    assert len(layers) == 10
    for m in layers:
        f = int(fractional_bits(m.scale))
        ints = m.codes.long() - int(m.zero_point)
        assert torch.equal(ints.double() * 2.0**-f, m.weight().double())
        if m.input_quantizer is not None:
            assert float(m.input_quantizer.scale) == 2.0 ** -int(fractional_bits(m.input_quantizer.scale))


def test_freezing_keeps_the_trained_outputs_exactly(spheres):
    trainable = prepare_finetune(_unet(), spheres[0][0], FIXED)
    with torch.no_grad():
        for p in trainable.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    x = spheres[1][0][:2]
    trainable.network.eval()
    with torch.no_grad():
        expected = trainable.network(x)
        assert torch.equal(trainable.freeze().network(x), expected)


def test_a_ptq_result_restarts_exactly_where_it_was(trained_unet):
    calib, _ = sphere_volumes(1, seed=5)
    ptq = quantize(trained_unet, calib, EfficientQConfig(weight_bits=3, per_channel=True, method="rtn"), progress=False)
    trainable = prepare_finetune(ptq)
    assert trainable.start == "ptq" and trainable.layers()
    x = calib.repeat(2, 1, 1, 1, 1)
    trainable.network.eval()
    with torch.no_grad():
        assert torch.equal(trainable.network(x), ptq.network(x))
        assert torch.equal(trainable.freeze().network(x), ptq.network(x))


def test_a_qat_checkpoint_round_trips_bit_exact(spheres, trained_unet, tmp_path):
    calib, _ = sphere_volumes(1, seed=5)
    ptq = quantize(trained_unet, calib, EfficientQConfig(weight_bits=4, act_bits=6, method="rtn"), progress=False)
    res = finetune(ptq, spheres, steps=3, lr=1e-3)
    assert res.report.method == "rtn+qat"
    path = save_quantized(res, tmp_path / "qat.pt")
    loaded = load_quantized(path, UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1))
    x = spheres[1][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), res.network(x))


def test_batchnorm_is_folded_from_fp_and_frozen_where_it_cannot_be():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.BatchNorm3d(4), nn.Conv3d(4, 2, 1))
    x = torch.randn(4, 1, 8, 8, 8)
    trainable = prepare_finetune(net.eval(), x, EfficientQConfig(first_layer_bits=None, last_layer_bits=None))
    assert trainable.folded == ["1"]
    frozen = trainable.network[3]
    assert isinstance(frozen, FrozenBatchNorm)
    before = frozen.norm.running_mean.clone()
    trainable.network.train()
    trainable.network(x).sum().backward()
    assert not frozen.norm.training and torch.equal(frozen.norm.running_mean, before)
    assert isinstance(trainable.freeze().network[3], nn.BatchNorm3d)


def test_the_methods_own_formats_train_from_scratch(spheres):
    cfg = EfficientQConfig(weight_format="Q0.4", act_format="Q6.0", first_layer_bits=None, last_layer_bits=None)
    res = finetune(_unet(), spheres, cfg, steps=2, from_scratch=True)
    layers = [m for m in res.network.modules() if isinstance(m, QuantizedLayer)]
    assert {m.grid.bits for m in layers} == {5} and {float(m.scale) for m in layers} == {1 / 16}
    assert res.report.extra["finetune"]["start"] == "scratch"


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_steps_must_be_a_positive_integer(spheres, steps):
    with pytest.raises(ValueError, match=r"steps must be an integer of at least 1 \(optimizer steps"):
        finetune(_unet(), spheres, FIXED, steps=steps)


def test_a_loader_without_labels_is_a_clear_error():
    data = [{"image": torch.randn(2, 1, 24, 24, 24)}]
    with pytest.raises(ValueError, match="has no 'label'"):
        finetune(_unet(), data, FIXED, steps=1)


def test_an_empty_loader_and_a_bad_start_are_clear_errors(spheres):
    with pytest.raises(ValueError, match="yielded no batch"):
        finetune(_unet(), [], FIXED, steps=1)
    with pytest.raises(TypeError, match="QuantizationResult or an FP nn.Module"):
        finetune("model.pt", spheres, steps=1)
    with pytest.raises(ValueError, match="lr must be a positive"):
        finetune(_unet(), spheres, FIXED, steps=1, lr=0.0)


def test_fractional_bits_that_overflow_the_word_are_a_clear_error(spheres):
    with pytest.raises(ValueError, match="needs a 9-bit word"):
        finetune(_unet(), spheres, {"weight_format": "Q0.8"}, steps=1)


@pytest.fixture(scope="module")
def rtn_result(trained_unet):
    calib, _ = sphere_volumes(1, seed=5)
    return quantize(trained_unet, calib, EfficientQConfig(weight_bits=4, act_bits=8, method="rtn"), progress=False)


def test_a_fine_tune_made_worse_returns_its_start_and_warns(rtn_result, spheres, validation_spheres, caplog):
    held_out = [validation_spheres]
    with caplog.at_level(logging.WARNING, logger="monai_effq"):
        res = finetune(rtn_result, spheres, steps=4, lr=5.0, cosine=False, validation_data=held_out)
    check = res.report.extra["finetune"]["check"]
    assert check["kept"] == "start" and check["end"]["mean_dice"] < check["start"]["mean_dice"]
    x = validation_spheres[0]
    with torch.no_grad():
        assert torch.equal(res.network(x), rtn_result.network(x))
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "made the network worse" in warning and "learning rate: 5 is larger than the median weight step" in warning


def test_a_fine_tune_that_improves_keeps_its_end(spheres, validation_spheres):
    res = finetune(_unet(), spheres, FIXED, steps=25, lr=1e-2, validation_data=[validation_spheres])
    check = res.report.extra["finetune"]["check"]
    assert check["kept"] == "end" and check["end"]["mean_dice"] > check["start"]["mean_dice"]
    assert check["reference"] is not None  # an FP start is compared with its FP network
    assert math.isclose(dice(res.network, *validation_spheres), check["end"]["mean_dice"], rel_tol=1e-6)


def test_a_multilabel_ptq_result_fine_tunes_without_repeating_its_task(trained_unet, spheres, tmp_path):
    calib, _ = sphere_volumes(1, seed=5)
    ptq = quantize(trained_unet, calib, EfficientQConfig(weight_bits=4, method="rtn"), task="multilabel", progress=False)
    channels = [(x, torch.cat([y, 1 - y], 1)) for x, y in spheres]  # sigmoid channels: the loss needs two label channels
    res = finetune(ptq, channels, steps=2, lr=1e-4)
    assert res.report.extra["finetune"]["task"] == "multilabel"
    path = save_quantized(res, tmp_path / "multilabel.pt")
    reloaded = load_quantized_result(path, UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1))
    assert finetune(reloaded, channels, steps=1, check_batches=0).report.extra["finetune"]["task"] == "multilabel"
    with pytest.raises(ValueError, match="quantized for task 'multilabel', not 'multiclass'"):
        finetune(ptq, spheres, steps=1, task="multiclass")


def test_check_batches_must_be_a_non_negative_integer(spheres):
    with pytest.raises(ValueError, match=r"check_batches must be an integer of at least 0 \(0 turns"):
        finetune(_unet(), spheres, FIXED, steps=1, check_batches=-1)
    with pytest.raises(ValueError, match="weight_decay must be a non-negative number"):
        finetune(_unet(), spheres, FIXED, steps=1, weight_decay=-1e-5)


def test_numpy_numbers_set_a_fine_tune_as_python_ones_do(spheres, tmp_path):
    import json

    import numpy as np

    res = finetune(_unet(), spheres, FIXED, steps=np.int64(2), lr=np.float32(1e-3), weight_decay=np.float64(0), check_batches=np.int64(1))
    info = res.report.extra["finetune"]
    assert info["steps"] == 2 and info["check"]["windows"] == 1 and math.isclose(info["lr"], 1e-3, rel_tol=1e-6)
    json.loads(json.dumps(info))  # the report is written as JSON


def test_a_fine_tuned_result_fine_tuned_again_keeps_its_method_and_the_earlier_round(rtn_result, spheres):
    once = finetune(rtn_result, spheres, steps=2, lr=1e-4, check_batches=0)
    twice = finetune(once, spheres, steps=1, lr=1e-4, check_batches=0)
    thrice = finetune(twice, spheres, steps=3, lr=1e-4, check_batches=0)
    assert once.report.method == twice.report.method == thrice.report.method == "rtn+qat"
    assert [r["steps"] for r in thrice.report.extra["finetune"]["earlier"]] == [2, 1]
    assert thrice.report.extra["finetune"]["steps"] == 3


def test_an_fp_start_calibrates_its_input_ranges_on_its_first_training_batches_not_the_first_alone(spheres):
    empty = (spheres[0][0][:1] * 0.01, torch.zeros_like(spheres[0][1][:1]))  # an almost empty crop
    first, last = (prepare_finetune(_unet(), batches, FIXED).layers() for batches in ([empty, *spheres], [*spheres, empty]))
    scales = {name: float(layer.input_quantizer.scale) for name, layer in last.items() if layer.input_quantizer is not None}
    assert scales and all(math.isclose(float(first[n].input_quantizer.scale), s, rel_tol=1e-3) for n, s in scales.items())
    alone = prepare_finetune(_unet(), empty, FIXED).layers()
    assert any(float(alone[n].input_quantizer.scale) < s / 4 for n, s in scales.items())  # what one crop alone gives


def test_every_layer_that_reads_the_image_keeps_the_first_layer_bits_under_explicit_formats(spheres):
    # A residual unit's first convolution reads the image as its shortcut (run first) does: on the
    # body's Q6.0 inputs (step 1) the image in [0, 1] would be rounded to two levels.
    cfg = EfficientQConfig(weight_format="Q0.4", act_format="Q6.0")
    layers = prepare_finetune(_unet(), spheres[0][0], cfg).layers()
    for name in ("model.0.residual", "model.0.conv.unit0.conv"):
        assert layers[name].grid.bits == 8 and layers[name].input_quantizer.grid.bits == 8
    body = layers["model.1.submodule.0.conv.unit0.conv"]
    assert body.grid.bits == 5 and float(body.scale) == 1 / 16


def test_batches_without_a_label_or_of_another_kind_are_clear_errors():
    x = torch.randn(2, 1, 24, 24, 24)
    with pytest.raises(ValueError, match=r"training batch 0 has no label: pass \(image, label\) pairs"):
        finetune(_unet(), [(x, None)], FIXED, steps=1, check_batches=0)
    with pytest.raises(TypeError, match="training batch 0 is a str; expected a dict with 'image' and 'label'"):
        finetune(_unet(), ["case_000.nii.gz"], FIXED, steps=1, check_batches=0)


def test_a_ptq_result_is_fine_tuned_with_its_own_config_and_task(rtn_result, spheres):
    with pytest.raises(ValueError, match="from_scratch=True needs an FP network, not a PTQ result"):
        finetune(rtn_result, spheres, steps=1, from_scratch=True)
    with pytest.raises(ValueError, match="a PTQ result is fine-tuned with the config it was quantized with"):
        finetune(rtn_result, spheres, FIXED, steps=1)
    with pytest.raises(ValueError, match="task must be 'multiclass' or 'multilabel', got 'regression'"):
        finetune(rtn_result, spheres, steps=1, task="regression")


def test_a_loss_that_is_not_finite_stops_the_fine_tune_naming_the_step(spheres):
    def exploding(logits, label):
        return logits.sum() * float("inf")

    # before any weight changed, the learning rate cannot be the cause
    with pytest.raises(UserInputError, match="loss is (inf|nan) at the first step, before any weight changed, so the learning rate is not"):
        finetune(_unet(), spheres, FIXED, steps=2, loss_function=exploding, check_batches=0)
    calls = []

    def diverging(logits, label):
        calls.append(1)
        return F.cross_entropy(logits, label[:, 0]) * (float("nan") if len(calls) == 2 else 1.0)

    with pytest.raises(UserInputError, match="the fine-tuning loss is nan at step 1: lower the learning rate"):
        finetune(_unet(), spheres, FIXED, steps=3, loss_function=diverging, check_batches=0)


def test_a_label_holding_nan_is_refused_naming_its_batch_not_the_learning_rate(rtn_result, spheres):
    (x, y), second = spheres
    bad = y.float()
    bad[0, 0, 2, 2, 2] = float("nan")
    with pytest.raises(UserInputError, match="training batch 0 holds NaN or Inf label values"):
        finetune(rtn_result, [(x, bad), second], steps=2, lr=1e-8, check_batches=0)


@pytest.mark.parametrize(
    "label, message",
    [
        (lambda y: torch.cat([1 - y, y], 1), r"a multiclass label is one channel of class indices, got shape \(4, 2, 24, 24, 24\)"),
        (lambda y: y * 5, r"label holds values from 0 to 5, where the network's 2 output channels take whole class indices 0 to 1"),
        (lambda y: y * 0.5, r"label holds values from 0 to 0.5, where"),
        (lambda y: y[..., :12], r"its label is \(4, 1, 24, 24, 12\) where the network's output is \(4, 2, 24, 24, 24\)"),
    ],
)
@pytest.mark.parametrize("check_batches, where", [(0, "training batch 0"), (1, "held-out window 0")])
def test_a_label_the_networks_output_cannot_be_scored_against_is_named_before_the_loss_runs(
    rtn_result, spheres, label, message, check_batches, where
):
    (x, y), _ = spheres
    # MONAI's loss would stop with an AssertionError or an index out of bounds naming no batch
    with pytest.raises(UserInputError, match=f"{where}: .*{message}"):
        finetune(rtn_result, [(x, label(y))], steps=1, lr=1e-8, check_batches=check_batches)


def test_two_image_batches_calibrate_an_fp_start_together_and_an_image_label_pair_by_its_image():
    from monai_effq.qat import calibration_batch

    quiet, bright = torch.randn(1, 1, 8, 8, 8) * 0.1, torch.randn(1, 1, 8, 8, 8) * 40
    # read as an (image, label) pair, the bright batch's range was left out and clipped 100-fold for the whole fine-tune
    assert torch.equal(calibration_batch([quiet, bright]), torch.cat([quiet, bright]))
    label = (bright > 0).long()
    assert torch.equal(calibration_batch([quiet, label]), quiet)
    assert torch.equal(calibration_batch((quiet, label.float())), quiet)


def test_a_compiled_fp_network_is_prepared_for_fine_tuning_as_the_module_it_compiles(spheres):
    compiled, plain = (prepare_finetune(net, spheres[0][0], FIXED) for net in (torch.compile(_unet()), _unet()))
    # trained eagerly: a compiled copy would compile its forward again at each change the fine-tune makes
    assert type(compiled.network) is type(plain.network) is UNet
    x = spheres[1][0][:2]
    with torch.no_grad():
        assert torch.equal(compiled.network.eval()(x), plain.network.eval()(x))


def test_a_half_precision_fp_network_fine_tunes_with_its_held_out_check_as_in_float32(spheres):
    # the check compares with the FP network, which must run the float32 windows too
    half, full = (finetune(net, spheres, FIXED, steps=1, lr=1e-3) for net in (_unet().to(torch.bfloat16), _unet().to(torch.bfloat16).float()))
    x = spheres[1][0][:2]
    with torch.no_grad():
        assert torch.equal(half.network(x), full.network(x))


def test_a_start_from_fp_rounds_what_quantize_rounds_and_keeps_its_task_for_the_next_fine_tune(spheres, tmp_path):
    from monai.networks.nets import SegResNet

    from monai_effq.ptq.modules import QuantizedNorm, shared_input_quantizer

    def rounded(network):
        return sorted(n for n, m in network.named_modules() if isinstance(m, QuantizedNorm) or shared_input_quantizer(m) is not None)

    config = EfficientQConfig(weight_bits=8, act_bits=8)  # share_skip_rounding is on by default
    unet = _unet().eval()
    tuned = finetune(unet, spheres, config, steps=1, task="multiclass", check_batches=0)
    assert rounded(tuned.network) == rounded(quantize(unet, spheres[0][0], config, progress=False).network) != []
    assert tuned.report.extra["task"] == "multiclass"
    again = finetune(tuned, spheres, steps=1, check_batches=0)  # told no task: the result's
    assert again.report.extra["finetune"]["task"] == "multiclass"
    torch.manual_seed(0)
    segres = SegResNet(3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1), blocks_up=(1,)).eval()
    norms = EfficientQConfig(weight_bits=8, act_bits=8, quantize_norm_inputs=True)
    tuned = finetune(segres, spheres, norms, steps=1, task="multiclass", check_batches=0)
    assert rounded(tuned.network) == rounded(quantize(segres, spheres[0][0], norms, progress=False).network) != []
    save_quantized(tuned, tmp_path / "tuned.pt")
    loaded = load_quantized(tmp_path / "tuned.pt", segres)
    with torch.no_grad():
        assert torch.equal(loaded(spheres[1][0]), tuned.network(spheres[1][0]))


def test_a_device_that_is_not_here_is_named_before_fine_tuning(spheres):
    from monai_effq.utils.errors import UserInputError

    with pytest.raises(UserInputError, match=r"device 'gpu' is not a device name: use 'cpu', 'cuda'"):
        finetune(_unet(), spheres, FIXED, steps=1, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match=r"device 'cuda' was asked for but this machine has no CUDA GPU"):
            finetune(_unet(), spheres, FIXED, steps=1, device="cuda")


def test_a_calibration_loader_is_read_no_further_than_the_batches_it_gives_and_a_list_of_images_is_a_loader():
    from monai_effq.qat import calibration_batch

    read = []

    class Volumes:  # a loader of volumes that differ in depth: only those of the first one's shape are joined
        def __iter__(self):
            for depth in range(16, 66):
                read.append(depth)
                yield torch.zeros(1, 1, 16, 16, depth if depth != 17 else 16)

    assert calibration_batch(Volumes(), 4).shape == (2, 1, 16, 16, 16) and len(read) == 4
    images = [torch.full((1, 1, 8, 8, 8), float(i)) for i in range(4)]
    assert calibration_batch(images).shape == (4, 1, 8, 8, 8)  # four image batches, not an (image, label) pair
    assert calibration_batch(images[:2]).shape == (1, 1, 8, 8, 8)  # two items are a pair, as training batches are read


def test_the_fine_tuned_report_keeps_each_layer_s_input_grid_and_ptq_figures(trained_unet, spheres):
    calib, _ = sphere_volumes(2, seed=5)
    ptq = quantize(trained_unet, calib, EfficientQConfig(weight_bits=8, act_bits=8), progress=False)
    assert all(r.act_bits is not None for r in ptq.report.layers)  # every input rounded, some by their unit
    tuned = finetune(ptq, spheres, steps=1, lr=1e-6, check_batches=0).report.layers
    kept = ("act_bits", "act_grid", "voxels", "effective_voxels", "unknowns", "mse_holdout", "choice", "mse")
    assert [r.name for r in tuned] == [r.name for r in ptq.report.layers]
    for before, after in zip(ptq.report.layers, tuned):
        assert {k: getattr(after, k) for k in kept} == {k: getattr(before, k) for k in kept}, before.name
    from_fp = finetune(_unet(), spheres, EfficientQConfig(weight_bits=8, act_bits=8), steps=1, lr=1e-6, check_batches=0)
    assert [r.act_bits for r in from_fp.report.layers] == [8] * len(from_fp.report.layers)


def test_an_image_holding_nan_is_refused_naming_its_batch_instead_of_training_on_the_lowest_code(rtn_result, spheres):
    (x, y), second = spheres
    bad = x.clone()
    bad[1, 0, 3, 3, 3] = float("nan")
    for check_batches in (0, 2):
        with pytest.raises(UserInputError, match="training batch 0 holds NaN or Inf image values"):
            finetune(rtn_result, [(bad, y), second], steps=2, lr=1e-4, check_batches=check_batches)


def test_held_out_and_training_data_are_named_for_what_they_are(rtn_result, spheres):
    (x, _), _ = spheres
    with pytest.raises(UserInputError, match="held-out batch 0 has no 'label'.*as validation_data"):
        finetune(rtn_result, spheres, steps=1, validation_data=[{"image": x}])
    with pytest.raises(UserInputError, match="the training data yielded no batch"):
        finetune(rtn_result, [], steps=1)
    with pytest.raises(UserInputError, match="train_data is a one-pass iterator \\(generator\\)"):
        finetune(rtn_result, (batch for batch in spheres), steps=3)
