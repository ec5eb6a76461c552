import inspect
import logging
import re

import pytest
import torch
import torch.nn as nn
from monai.networks.nets import BasicUNet, DynUNet, SegResNet, SegResNetDS, SwinUNETR, UNet, UNETR

from monai_effq import EfficientQConfig, quantize
from monai_effq.ptq import QuantizedConv, QuantizedConvTranspose, QuantizedLayer, QuantizedLinear
from monai_effq.quant import UniformGrid, fit_minmax
from monai_effq.utils.errors import UserInputError

from ..nnunet_like import nnunet_like
from ..threads import torch_threads
from .conftest import dice, sphere_volumes


def _rel_err(net, qnet, x):
    with torch.no_grad():
        y, yq = net(x), qnet(x)
    return ((yq - y).norm() / y.norm()).item()


def test_w8a8_keeps_dice_within_a_hundredth_of_full_precision(trained_unet, validation_spheres):
    calib, _ = sphere_volumes(1, seed=5)
    x, y = validation_spheres
    fp_dice = dice(trained_unet, x, y)
    assert fp_dice > 0.7  # the network learned the task, so a loss would show
    q = quantize(trained_unet, calib, EfficientQConfig(weight_bits=8, act_bits=8), progress=False)
    assert abs(dice(q.network, x, y) - fp_dice) <= 0.01


def test_w4a8_efficientq_output_error_is_below_round_to_nearest(trained_unet, validation_spheres):
    calib, _ = sphere_volumes(1, seed=5)
    x, _ = validation_spheres
    effq = quantize(trained_unet, calib, EfficientQConfig(weight_bits=4), progress=False)
    rtn = quantize(trained_unet, calib, EfficientQConfig(weight_bits=4, method="rtn"), progress=False)
    assert _rel_err(trained_unet, effq.network, x) < _rel_err(trained_unet, rtn.network, x)
    assert all(r.mse <= r.mse_rtn * (1 + 1e-6) for r in effq.report.layers)


def test_round_to_nearest_reports_the_output_errors_the_layer_statistics_give(trained_unet):
    calib, _ = sphere_volumes(1, seed=5)
    effq = quantize(trained_unet, calib, EfficientQConfig(weight_bits=4), progress=False)
    rtn = quantize(trained_unet, calib, EfficientQConfig(weight_bits=4, method="rtn"), progress=False)
    # the first layer reads the image in both runs: RTN's measured figures equal EfficientQ's summed
    # ones to the summed ones' precision (an error of small differences of large float32 sums)
    first_effq, first_rtn = effq.report.layers[0], rtn.report.layers[0]
    assert first_rtn.mse == pytest.approx(first_effq.mse_rtn, rel=1e-2)
    assert first_rtn.mse_fp == pytest.approx(first_effq.mse_fp, rel=1e-2)
    assert (first_rtn.voxels, first_rtn.effective_voxels) == pytest.approx((first_effq.voxels, first_effq.effective_voxels))
    assert all(r.mse == r.mse_rtn and r.mse >= 0 and r.mse_fp >= 0 for r in rtn.report.layers)


def test_a_method_without_statistics_other_than_round_to_nearest_reports_round_to_nearests_error(trained_unet):
    from monai_effq.solver import METHODS, MethodResult, register_method

    @register_method("lowest-code", refits_bias=False, needs_statistics=False)
    def lowest(problem):
        return MethodResult(torch.full_like(problem.rtn_codes, problem.fit.grid.qmin), problem.fit)

    calib, _ = sphere_volumes(1, seed=5)
    try:
        lowest_run = quantize(trained_unet, calib, EfficientQConfig(weight_bits=4, method="lowest-code"), progress=False)
    finally:
        del METHODS["lowest-code"]
    rtn = quantize(trained_unet, calib, EfficientQConfig(weight_bits=4, method="rtn"), progress=False)
    # the first layer reads the image in both runs: round to nearest's figure is the same bits
    assert lowest_run.report.layers[0].mse_rtn == rtn.report.layers[0].mse
    assert all(r.mse > r.mse_rtn >= 0 for r in lowest_run.report.layers)


def test_attention_changes_the_solution_on_an_imbalanced_sample(trained_unet):
    calib, _ = sphere_volumes(1, seed=7, radius=(3, 4))  # a small foreground: strongly imbalanced
    cfg = dict(weight_bits=2, act_bits=8)
    on = quantize(trained_unet, calib, EfficientQConfig(**cfg, attention=True), progress=False)
    off = quantize(trained_unet, calib, EfficientQConfig(**cfg, attention=False), progress=False)
    codes_on = [m.codes for m in on.network.modules() if isinstance(m, QuantizedLayer)]
    codes_off = [m.codes for m in off.network.modules() if isinstance(m, QuantizedLayer)]
    assert any(not torch.equal(a, b) for a, b in zip(codes_on, codes_off))


def test_quantized_network_is_in_eval_mode_with_fake_quant_modules_and_activation_quantizers(trained_unet):
    calib, _ = sphere_volumes(1, seed=5)
    q = quantize(trained_unet, calib, EfficientQConfig(weight_bits=4, method="rtn"), progress=False)
    assert not q.network.training
    kinds = {type(m) for m in q.network.modules() if isinstance(m, QuantizedLayer)}
    assert kinds == {QuantizedConv, QuantizedConvTranspose}
    layers = [m for m in q.network.modules() if isinstance(m, QuantizedLayer)]
    # The raw image is signed: an 8-bit network input takes the signed grid, with no zero point.
    assert layers[0].input_quantizer.grid.kind == "signed"
    # The first residual unit's shortcut and first convolution both read the image: both are first layers.
    assert [r.weight_bits for r in q.report.layers[:2]] == [8, 8] and q.report.layers[-1].weight_bits == 8
    assert {r.weight_bits for r in q.report.layers[2:-1]} == {4}
    assert not any(p.requires_grad for p in q.network.parameters())


def test_unsigned_activation_grid_after_relu():
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 3, padding=1))
    q = quantize(net, torch.randn(1, 1, 8, 8, 8), EfficientQConfig(method="rtn"), progress=False, task="multiclass")
    assert [r.act_grid for r in q.report.layers] == ["signed", "unsigned"]  # the 8-bit network input: zero point 0


def test_a_config_given_as_a_dict_quantizes_as_its_efficientq_config_and_another_type_is_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 3, padding=1))
    x = torch.randn(1, 1, 8, 8, 8)
    settings = {"method": "rtn", "weight_bits": 3, "first_layer_bits": None, "last_layer_bits": None}
    from_dict = quantize(net, x, settings, progress=False)
    from_config = quantize(net, x, EfficientQConfig(**settings), progress=False)
    assert [r.weight_bits for r in from_dict.report.layers] == [3, 3]
    assert torch.equal(from_dict.network(x), from_config.network(x))
    with pytest.raises(UserInputError, match="unknown EfficientQConfig keys \\['bits'\\]"):
        quantize(net, x, {"bits": 4}, progress=False)
    with pytest.raises(UserInputError, match="config must be an EfficientQConfig or a dict of its fields, got a str"):
        quantize(net, x, "w4a8", progress=False)


def test_a_transposed_convolution_reads_a_signed_input_on_the_symmetric_grid_and_a_non_negative_one_unsigned():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.PReLU(), nn.ConvTranspose3d(4, 4, 2, stride=2), nn.ReLU(),
        nn.ConvTranspose3d(4, 4, 2, stride=2), nn.PReLU(), nn.Conv3d(4, 2, 1),
    ).eval()
    q = quantize(net, torch.randn(1, 1, 4, 4, 4), EfficientQConfig(method="rtn"), progress=False, task="multiclass")
    # OpenVINO runs a transposed convolution in int8 only when its input has no zero point
    assert [r.act_grid for r in q.report.layers] == ["signed", "symmetric", "unsigned", "asymmetric"]
    assert q.network[2].input_quantizer.grid.is_signed and q.network[4].input_quantizer.grid.kind == "unsigned"


def test_an_override_sets_one_layers_weight_scale_fit_and_input_grid():
    torch.manual_seed(0)
    net = nn.Sequential(*[m for c in (1, 4, 4) for m in (nn.Conv3d(c, 4, 3, padding=1), nn.ReLU())][:-1]).eval()
    overrides = {"2": {"scale_method": "minmax", "act_grid": "symmetric"}}
    cfg = EfficientQConfig(method="rtn", first_layer_bits=None, last_layer_bits=None, overrides=overrides)
    q = quantize(net, torch.randn(1, 1, 8, 8, 8), cfg, progress=False)
    assert [r.act_grid for r in q.report.layers] == ["signed", "symmetric", "unsigned"]
    grid = UniformGrid(4, "signed")
    minmax = [fit_minmax(net[i].weight.detach(), grid)[0] for i in (2, 4)]
    assert torch.equal(q.network[2].scale, minmax[0])  # the override's first fit, kept by round-to-nearest
    assert not torch.equal(q.network[4].scale, minmax[1])  # the default's ALS fit


@pytest.mark.parametrize(
    "make,shape,task",
    [
        (lambda: SegResNet(spatial_dims=3, init_filters=8, in_channels=4, out_channels=3), (1, 4, 16, 16, 16), "multilabel"),
        (lambda: BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4)), (1, 1, 32, 32, 32), "multiclass"),
        (
            lambda: DynUNet(3, 1, 3, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[8, 16, 32], norm_name="batch"),
            (1, 1, 16, 16, 16),
            "multiclass",
        ),
        (lambda: UNet(2, 1, 2, channels=(4, 8), strides=(2,)), (2, 1, 16, 16), "multiclass"),
        (lambda: SegResNetDS(3, init_filters=4, in_channels=1, out_channels=2, blocks_down=(1, 2)), (1, 1, 16, 16, 16), "multiclass"),
    ],
)
def test_monai_networks_are_quantized_close_to_full_precision_at_w8a8(make, shape, task):
    torch.manual_seed(0)
    net = make().eval()
    x = torch.randn(shape)
    q = quantize(net, x, EfficientQConfig(weight_bits=8, act_bits=8), task=task, progress=False)
    assert _rel_err(net, q.network, x) < 0.05
    n_layers = sum(isinstance(m, (nn.Conv3d, nn.Conv2d, nn.ConvTranspose3d, nn.ConvTranspose2d)) for m in net.modules())
    assert len(q.report.layers) == n_layers


def test_batchnorm_after_a_convolution_is_folded_first():
    net = DynUNet(
        3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[4, 8, 8], norm_name="batch"
    )
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    net.eval()
    q = quantize(net, torch.randn(1, 1, 16, 16, 16), EfficientQConfig(weight_bits=8, method="rtn"), progress=False)
    assert q.folded and all(isinstance(q.network.get_submodule(n), nn.Identity) for n in q.folded)
    assert not any(isinstance(m, nn.BatchNorm3d) for m in q.network.modules())


def test_segresnetds_folds_the_batchnorms_inside_its_blocks_and_keeps_the_ones_its_skips_read():
    # Auto3DSeg's network: pre-activation blocks, so each block's norm1 reads the tensor its skip adds back
    torch.manual_seed(0)
    net = SegResNetDS(3, init_filters=4, in_channels=1, out_channels=2, blocks_down=(1, 2)).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 1, 16, 16, 16)
    q = quantize(net, x, EfficientQConfig(weight_bits=8, act_bits=8), progress=False)
    norms = {n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm3d)}
    assert set(q.folded) == {n for n in norms if n.endswith("norm2")}
    assert _rel_err(net, q.network, x) < 0.05


def test_linear_layers_of_a_transformer_are_quantized():
    torch.manual_seed(0)
    net = UNETR(1, 2, img_size=(16, 16, 16), feature_size=4, hidden_size=32, mlp_dim=64, num_heads=2, spatial_dims=3).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    q = quantize(net, x, EfficientQConfig(weight_bits=8, act_bits=8), progress=False)
    assert any(isinstance(m, QuantizedLinear) for m in q.network.modules())
    assert _rel_err(net, q.network, x) < 0.1


class _WindowTokens(nn.Module):
    """Linear layers on 4x4x4 windows of tokens, batched attention windows first ``(N * 8, 64, 16)`` as
    SwinUNETR runs them, or with each volume's tokens together ``(N, 512, 16)``."""

    def __init__(self, windows_lead: bool = True) -> None:
        super().__init__()
        self.windows_lead = windows_lead
        self.conv = nn.Conv3d(1, 16, 3, padding=1)
        self.fc = nn.Linear(16, 32)
        self.proj = nn.Linear(32, 16)
        self.head = nn.Conv3d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, d, h, w = x.shape
        f = self.conv(x).reshape(n, 16, d // 4, 4, h // 4, 4, w // 4, 4)
        tokens = f.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(-1, 64, 16)
        if not self.windows_lead:
            tokens = tokens.reshape(n, -1, 16)
        tokens = self.proj(torch.relu(self.fc(tokens)))
        f = tokens.reshape(n, d // 4, h // 4, w // 4, 4, 4, 4, 16).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return self.head(f.reshape(n, 16, d, h, w))


@pytest.mark.parametrize("windows", [1, 4])
def test_linear_layers_on_attention_windows_are_solved_as_on_each_calibration_windows_tokens(windows):
    # held out and numbered by calibration window: the attention windows' batch is a regrouping only
    torch.manual_seed(0)
    attention_windows, per_volume = _WindowTokens().eval(), _WindowTokens(windows_lead=False).eval()
    per_volume.load_state_dict(attention_windows.state_dict())
    x = torch.randn(windows, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    a = quantize(attention_windows, x, EfficientQConfig(weight_bits=4), progress=False)
    b = quantize(per_volume, x, EfficientQConfig(weight_bits=4), progress=False)
    assert all(r.mse_holdout is not None for r in a.report.layers)
    assert [(r.name, r.choice, r.mse_holdout) for r in a.report.layers] == [(r.name, r.choice, r.mse_holdout) for r in b.report.layers]
    sa, sb = a.network.state_dict(), b.network.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_layer_registered_under_two_names_is_quantized_where_the_forward_runs_it(tmp_path):
    from monai_effq import load_quantized, save_quantized

    net, x = nnunet_like(), torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    q = quantize(net, x, EfficientQConfig(weight_bits=2, method="rtn"), progress=False)

    def by_names(network: nn.Module) -> torch.Tensor:  # the blocks run through their named layers instead
        y = x
        for block in network[:2]:
            y = block.nonlin(block.norm(block.conv(y)))
        return network[2](y)

    for network in (q.network, load_quantized(save_quantized(q, tmp_path / "q.pt"), nnunet_like())):
        assert all(isinstance(b.conv, QuantizedLayer) and b.all_modules[0] is b.conv for b in network[:2])
        with torch.no_grad():
            assert torch.equal(network(x), by_names(network))
    assert _rel_err(net, q.network, x) > 0.05  # 2-bit weights, where the forward reads them


def test_a_layer_registered_under_two_names_is_counted_and_stored_once(tmp_path):
    from monai_effq import save_quantized

    net, x = nnunet_like(), torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    plain = nn.Sequential(*(nn.Sequential(b.conv, b.norm, b.nonlin) for b in net[:2]), net[2]).eval()  # the same layers, once each
    config = EfficientQConfig(weight_bits=2, method="rtn")
    aliased, once = (quantize(network, x, config, progress=False) for network in (net, plain))
    assert (aliased.report.fp_bytes, aliased.report.quantized_bytes) == (once.report.fp_bytes, once.report.quantized_bytes)
    assert once.report.fp_bytes == sum(p.numel() * 4 for p in plain.parameters())
    data = [torch.load(save_quantized(r, tmp_path / f"{i}.pt"), weights_only=True)["data"] for i, r in enumerate((aliased, once))]
    assert {k: v.numel() for k, v in data[0].items()} == {k: v.numel() for k, v in data[1].items()}


def test_swin_unetr_is_quantized_close_to_full_precision_at_w8a8(caplog):
    # window attention (its linear layers on attention windows) and shifted windows; 64^3 is its smallest input
    torch.manual_seed(0)
    # MONAI 1.4 needs the input size, which later releases dropped
    sized = {"img_size": (64, 64, 64)} if "img_size" in inspect.signature(SwinUNETR).parameters else {}
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=3, **sized).eval()
    x = torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.WARNING, logger="monai_effq"):
        q = quantize(net, x, EfficientQConfig(weight_bits=8, act_bits=8), progress=False)
    linear = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    assert linear and all(isinstance(q.network.get_submodule(n), QuantizedLinear) for n in linear)
    assert _rel_err(net, q.network, x) < 0.06
    # its relative position tables stay in floating point, named in the report, too small a part for a warning
    assert q.report.float_weights and all(n.endswith("relative_position_bias_table") for n in q.report.float_weights)
    assert not any("stay in floating point" in r.getMessage() for r in caplog.records)


def test_a_weight_no_quantized_layer_holds_is_reported_and_warned_about_naming_it(caplog):
    class FunctionalConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 4, 3, 3, 3) * 0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.conv3d(x, self.w, padding=1)

    class WithUnusedHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), FunctionalConv(), nn.ReLU(), nn.Conv3d(16, 2, 1))
            self.head = nn.Conv3d(16, 2, 3)  # never run, as a VAE branch in eval mode: it changes no output

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    torch.manual_seed(0)
    net = WithUnusedHead().eval()
    with caplog.at_level(logging.WARNING, logger="monai_effq"):
        q = quantize(net, torch.randn(1, 1, 8, 8, 8), EfficientQConfig(method="rtn"), progress=False)
    assert q.report.float_weights == ["body.2.w"]
    (warning,) = [r.getMessage() for r in caplog.records if "stay in floating point" in r.getMessage()]
    assert warning.startswith("1 weight tensors, 63% of the network's parameters") and "body.2.w (16x4x3x3x3)" in warning
    skipped = quantize(net, torch.randn(1, 1, 8, 8, 8), EfficientQConfig(method="rtn", skip=("body.0",)), progress=False)
    assert skipped.report.float_weights == ["body.2.w"]  # the skipped layer's weight is floating point on purpose


def test_a_later_calibration_batch_of_other_channels_or_axes_is_named_before_any_layer_runs():
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1)).eval()
    for later in (torch.randn(1, 2, 8, 8, 8), torch.randn(1, 1, 8, 8)):
        with pytest.raises(UserInputError, match=rf"calibration batch 1 has shape {re.escape(str(tuple(later.shape)))} where batch 0 has \(1, 1, 8, 8, 8\)"):
            quantize(net, [torch.randn(1, 1, 8, 8, 8), later], EfficientQConfig(method="rtn"), progress=False)


def test_calibration_may_be_several_batches_of_different_sizes(trained_unet):
    a, _ = sphere_volumes(1, size=24, seed=3)
    b, _ = sphere_volumes(1, size=16, seed=4)
    q = quantize(trained_unet, [a, b], EfficientQConfig(weight_bits=4), progress=False)
    assert all(r.mse <= r.mse_rtn * (1 + 1e-6) for r in q.report.layers)
    assert _rel_err(trained_unet, q.network, a) < 0.2


def test_report_totals(trained_unet):
    calib, _ = sphere_volumes(1, seed=5)
    q = quantize(trained_unet, calib, EfficientQConfig(weight_bits=2), progress=False)
    r = q.report
    assert r.fp_bytes > 10 * r.quantized_bytes > 0
    assert r.compression == pytest.approx(r.fp_bytes / r.quantized_bytes)
    assert r.wall_seconds > 0 and r.peak_memory_mib > 0
    assert "layers quantized" in r.summary()
    assert r.to_csv().count("\n") == len(r.layers) + 1


class TestBadInput:
    def test_calibration_shape_that_does_not_fit_the_network(self, trained_unet):
        with pytest.raises(ValueError, match=r"does not fit the network"):
            quantize(trained_unet, torch.randn(1, 3, 24, 24, 24), progress=False)

    def test_nan_in_calibration(self, trained_unet):
        x = torch.randn(1, 1, 24, 24, 24)
        x[0, 0, 3, 3, 3] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            quantize(trained_unet, x, progress=False)

    def test_config_that_names_a_layer_that_does_not_exist(self, trained_unet):
        with pytest.raises(ValueError, match="model.99.conv"):
            quantize(trained_unet, torch.randn(1, 1, 24, 24, 24), EfficientQConfig(skip=["model.99.conv"]), progress=False)

    @pytest.mark.parametrize("field", ["weight_bits", "act_bits", "first_layer_bits"])
    def test_bits_outside_two_to_eight(self, field):
        with pytest.raises(ValueError, match=field):
            EfficientQConfig(**{field: 9})

    def test_network_without_quantizable_layers(self):
        with pytest.raises(ValueError, match="no quantizable layers"):
            quantize(nn.Sequential(nn.ReLU(), nn.InstanceNorm3d(1)), torch.randn(1, 1, 8, 8, 8), progress=False)

    def test_empty_calibration(self, trained_unet):
        with pytest.raises(ValueError, match="calibration is empty"):
            quantize(trained_unet, [], progress=False)

    def test_calibration_that_is_not_tensors(self, trained_unet):
        with pytest.raises(TypeError, match="expected a tensor"):
            quantize(trained_unet, [[1, 2, 3]], progress=False)

    def test_calibration_dicts_give_their_image(self, trained_unet):
        x, _ = sphere_volumes(1, seed=7)
        config = EfficientQConfig(weight_bits=4, method="rtn")
        from_dicts = quantize(trained_unet, [{"image": x, "label": None}], config, progress=False).network
        from_tensor = quantize(trained_unet, x, config, progress=False).network
        for a, b in zip(from_dicts.state_dict().values(), from_tensor.state_dict().values()):
            assert torch.equal(a, b)

    def test_calibration_dicts_without_an_image_name_their_keys(self, trained_unet):
        with pytest.raises(TypeError, match=r"calibration batch 0 is a dict with keys \['img', 'seg'\] and no 'image'"):
            quantize(trained_unet, [{"img": torch.randn(1, 1, 8, 8, 8), "seg": None}], progress=False)

    def test_numpy_calibration_is_taken_as_the_same_tensor(self, trained_unet):
        x, _ = sphere_volumes(1, seed=7)
        config = EfficientQConfig(weight_bits=4, method="rtn")
        from_tensor = quantize(trained_unet, x, config, progress=False).network
        big_endian, flipped = x.numpy().astype(">f4"), x.flip(-1).numpy()[..., ::-1]  # as nibabel's dataobj or np.flip give them
        for calibration in (x.numpy(), [x.numpy()], big_endian, flipped):  # a batch, a list of batches
            from_numpy = quantize(trained_unet, calibration, config, progress=False).network
            assert all(torch.equal(a, b) for a, b in zip(from_numpy.state_dict().values(), from_tensor.state_dict().values()))

    def test_calibration_that_is_not_even_iterable(self, trained_unet):
        with pytest.raises(TypeError, match="tensor batch or an iterable of tensor batches, got float"):
            quantize(trained_unet, 3.0, progress=False)

    def test_a_calibration_batch_without_voxels(self, trained_unet):
        with pytest.raises(ValueError, match=r"calibration batch 1 is empty \(shape \(0, 1, 8, 8, 8\)\)"):
            quantize(trained_unet, [torch.randn(1, 1, 8, 8, 8), torch.empty(0, 1, 8, 8, 8)], progress=False)


def test_power_of_two_network_is_shift_only_in_weights_and_activations(trained_unet):
    from monai_effq.quant import is_power_of_two

    calib, _ = sphere_volumes(1, seed=5)
    res = quantize(trained_unet, calib, EfficientQConfig(weight_bits=4, power_of_two=True), progress=False)
    layers = [m for m in res.network.modules() if isinstance(m, QuantizedLayer)]
    assert layers and all(is_power_of_two(m.scale) for m in layers)
    assert all(is_power_of_two(m.input_quantizer.scale) for m in layers if m.input_quantizer is not None)
    assert 7.5 <= res.report.weight_compression <= 8.0
    assert res.report.to_dict()["weight_compression"] == res.report.weight_compression


def test_codes_are_the_same_on_one_and_two_threads():
    # 16-channel 3x3x3 convolutions: before float64 scale sums and factorisations, 16% of these codes
    # changed between one and two threads
    torch.manual_seed(0)
    net = SegResNet(spatial_dims=3, init_filters=16, in_channels=2, out_channels=3, blocks_down=(1, 1), blocks_up=(1,)).eval()
    x = torch.randn(1, 2, 32, 32, 32, generator=torch.Generator().manual_seed(3))
    codes = []
    for n in (1, 2):
        with torch_threads(n):
            q = quantize(net, x, EfficientQConfig(weight_bits=4), progress=False)
        codes.append([m.codes for m in q.network.modules() if isinstance(m, QuantizedLayer)])
    assert len(codes[0]) > 5 and all(torch.equal(a, b) for a, b in zip(*codes))


def test_a_network_whose_layers_fit_one_window_runs_one_full_precision_pass_after_the_probe():
    torch.manual_seed(0)
    net = SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1), blocks_up=(1,)).eval()
    passes = []
    net.register_forward_pre_hook(lambda module, args: passes.append(args[0].shape[0]))  # the working copies keep it
    quantize(net, torch.randn(3, 1, 8, 8, 8), EfficientQConfig(weight_bits=4, method="rtn"), progress=False)
    # the probe (one window), the FP scan that also keeps every layer's target, the quantized pass
    assert passes == [1, 3, 3]


def test_an_all_round_to_nearest_run_without_attention_makes_no_full_precision_scan_and_the_same_layers():
    torch.manual_seed(0)
    net = SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1), blocks_up=(1,)).eval()
    x = torch.randn(3, 1, 8, 8, 8)
    whole = []
    net.register_forward_hook(lambda module, args, out: whole.append(args[0].shape[0]))  # passes that reach the logits
    rtn = quantize(net, x, EfficientQConfig(weight_bits=4, method="rtn", attention=False), progress=False)
    assert whole == [1]  # the probe only: no scan (the first window's targets come from a pass stopped at its last layer)
    # the last layer solved from statistics needs the scan's bounds: the layers before it are the all-RTN run's
    last = rtn.report.layers[-1].name
    cfg = EfficientQConfig(weight_bits=4, method="rtn", attention=False, overrides={last: {"method": "efficientq"}})
    mixed = quantize(net, x, cfg, progress=False)
    assert whole == [1, 1, 3]
    figures = [[(r.name, r.mse, r.mse_fp, r.mse_rtn) for r in q.report.layers[:-1]] for q in (rtn, mixed)]
    assert figures[0] == figures[1]
    codes = [[m.codes for m in q.network.modules() if isinstance(m, QuantizedLayer)][:-1] for q in (rtn, mixed)]
    assert all(torch.equal(a, b) for a, b in zip(*codes))
    whole.clear()
    quantize(net, x, EfficientQConfig(weight_bits=4, method="rtn"), progress=False)
    assert whole == [1, 3]  # the attention's logits come from the scan


def test_the_scan_bounds_only_the_data_of_layers_solved_from_statistics():
    from monai_effq.ptq.pipeline import _Run

    torch.manual_seed(0)
    net = SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1), blocks_up=(1,)).eval()
    x = torch.randn(3, 1, 8, 8, 8)
    run = _Run(net, [x], EfficientQConfig(weight_bits=4, method="rtn"))
    run.scan()
    assert run.bounds == {}
    last = run.plans[-1].name
    run = _Run(net, [x], EfficientQConfig(weight_bits=4, method="rtn", overrides={last: {"method": "gptq"}}))
    run.scan()
    assert list(run.bounds) == [last] and run.bounds[last][0] == 3 * 8 * 8 * 8


def test_a_layer_whose_sums_overflow_float32_is_named_by_its_module_path_not_the_solvers_cholesky():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1)).eval()
    with torch.no_grad():
        net[0].weight.view(-1)[0] = 1e19  # the network stays finite; the second layer's Gram sums do not
    with pytest.raises(UserInputError, match=r"the 2 \(Conv3d\) layer's inputs are too large for its float32 least-squares"):
        quantize(net, torch.rand(1, 1, 8, 8, 8), EfficientQConfig(attention=False), progress=False)
    with torch.no_grad():
        net[0].weight.view(-1)[0] = 1e38  # the first layer's own outputs
    with pytest.raises(UserInputError, match=r"the 0 \(Conv3d\) layer's outputs .*\(its own largest weight is 1e\+38"):
        quantize(net, torch.rand(1, 1, 8, 8, 8), EfficientQConfig(attention=False), progress=False)


class _SharedConv(nn.Module):
    """One convolution applied to two inputs of different scale, as a weight-shared branch is."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.mid, self.head = nn.Conv3d(1, 4, 3, padding=1), nn.Conv3d(4, 4, 3, padding=1), nn.Conv3d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(x))
        return self.head(torch.relu(self.mid(y) + self.mid(y * 50.0)))


def test_a_layer_run_twice_in_one_pass_stays_in_floating_point_with_a_warning_rather_than_clipping_its_second_call(caplog):
    torch.manual_seed(0)
    net, x = _SharedConv().eval(), torch.randn(2, 1, 16, 16, 16)
    with caplog.at_level(logging.WARNING, logger="monai_effq"):
        result = quantize(net, x, EfficientQConfig(weight_bits=8, act_bits=8, validation_fraction=0), progress=False)
    assert "mid runs more than once in one forward pass (mid: 2 calls)" in caplog.text
    assert type(result.network.mid) is nn.Conv3d and isinstance(result.network.c1, QuantizedLayer)
    assert result.report.skipped == ["mid"]
    with torch.no_grad():
        agreement = (result.network(x).argmax(1) == net(x).argmax(1)).float().mean()
    assert agreement > 0.95  # 0.71 when its input range was the first call's


def test_body_mask_nonzero_masks_the_voxels_where_the_image_is_not_zero_as_the_handler_does():
    torch.manual_seed(0)
    net = UNet(3, 2, 2, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    x = torch.randn(1, 2, 16, 16, 16)
    x[:, :, :, :, :6] = 0  # the air around a skull-stripped brain
    config = EfficientQConfig(weight_bits=4)
    # the error for a crop of air advised body_mask='nonzero', which quantize() took as a tensor (AttributeError)
    by_name = quantize(net, x, config, body_mask="nonzero", progress=False)
    by_hand = quantize(net, x, config, body_mask=(x != 0).any(dim=1), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(by_name.network.state_dict().values(), by_hand.network.state_dict().values()))
    with pytest.raises(UserInputError, match=r"body_mask must be a mask, 'nonzero' or None, got 'brain'"):
        quantize(net, x, config, body_mask="brain", progress=False)
