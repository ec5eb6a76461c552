import logging

import pytest
import torch
import torch.nn as nn

from monai_effq import EfficientQConfig, quantize
from monai_effq.ptq.graph import execution_order, find_foldable_batchnorms, probe_network
from monai_effq.ptq.modules import ActivationQuantizer
from monai_effq.ptq.prepare import prepare_network
from monai_effq.ptq.result import state_bytes
from monai_effq.utils.errors import UserInputError


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
        nn.Conv3d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1),
    )
    bn = net[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _count_passes(net: nn.Module) -> list[int]:
    calls = [0]
    net.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_one_probe_pass_finds_what_three_passes_found():
    net, x = _net(), torch.randn(1, 1, 6, 6, 6)
    numels: dict[str, int] = {}
    order = execution_order(net, x, output_numels=numels)
    probe = probe_network(net, x)
    assert probe.order == order == ["0", "3", "5"]
    assert probe.output_numels == numels
    assert probe.foldable == find_foldable_batchnorms(net, x) == [("0", "1")]
    torch.testing.assert_close(probe.output, net(x))


def test_preparing_runs_the_network_twice_with_a_fold_and_once_without():
    net, x = _net(), torch.randn(2, 1, 6, 6, 6)
    results = []
    for fold in (True, False):
        prepared = prepare_network(net, x, EfficientQConfig(fold_batchnorm=fold))
        results.append(prepared)
    folded, plain = results
    assert folded.folded == ["1"] and isinstance(folded.network[1], nn.Identity)
    assert plain.folded == [] and isinstance(plain.network[1], nn.BatchNorm3d)
    assert isinstance(net[1], nn.BatchNorm3d)  # the user's network is not modified
    assert [p.name for p in folded.plans] == folded.order == ["0", "3", "5"]
    counted = _net()
    calls = _count_passes(counted)
    prepare_network(counted, x, EfficientQConfig())  # the copy keeps the counting hook
    assert calls[0] == 2  # the probe and the check of the fold


def test_a_network_that_refuses_the_sample_is_named_with_its_shape():
    with pytest.raises(ValueError, match=r"shape \(1, 3, 6, 6, 6\) does not fit"):
        prepare_network(_net(), torch.randn(1, 3, 6, 6, 6), EfficientQConfig())


def test_a_qat_start_from_scratch_folds_nothing_and_reinitialises():
    net, x = _net(), torch.randn(1, 1, 6, 6, 6)
    prepared = prepare_network(net, x, EfficientQConfig(), from_scratch=True)
    assert prepared.folded == [] and isinstance(prepared.network[1], nn.BatchNorm3d)
    assert not torch.equal(prepared.network[0].weight, net[0].weight)


def test_a_nan_running_variance_is_named_before_any_pass_runs():
    net = _net()
    net[1].running_var[2] = float("nan")
    calls = _count_passes(net)
    with pytest.raises(UserInputError, match=r"^1\.running_var holds 1 NaN or Inf value\(s\) of 4"):
        prepare_network(net, torch.randn(1, 1, 6, 6, 6), EfficientQConfig())
    assert calls == [0]


def test_a_constant_calibration_volume_is_named_at_the_first_layer_not_reported_as_success():
    with pytest.raises(UserInputError, match=r"calibration input of layer 0 is one value \(0\) everywhere"):
        quantize(_net(), torch.zeros(1, 1, 6, 6, 6), EfficientQConfig(attention=False), progress=False)


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv3d(4, 6, 3, padding=1, groups=2),
        lambda: nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2),
        lambda: nn.ConvTranspose3d(4, 6, 2, stride=2, bias=False),
    ],
    ids=["grouped conv", "grouped transposed conv", "transposed conv without bias"],
)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_batchnorm_folds_into_grouped_and_transposed_convolutions_leaving_the_output_unchanged(conv, affine):
    import copy

    from monai_effq.ptq.graph import fold_batchnorm

    torch.manual_seed(0)
    net = nn.Sequential(conv(), nn.BatchNorm3d(6, affine=affine)).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        if affine:
            net[1].weight.uniform_(0.5, 2.0)
            net[1].bias.uniform_(-0.5, 0.5)
    reference, x = copy.deepcopy(net), torch.randn(2, 4, 6, 6, 6)
    # a wrong fold would be undone by fold_batchnorm's own output check and fold nothing
    assert fold_batchnorm(net, x) == ["1"] and isinstance(net[1], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x), atol=1e-5, rtol=1e-5)


def test_the_plan_reads_a_transposed_convolutions_output_channels_on_axis_1():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.ConvTranspose3d(4, 4, 2, stride=2), nn.Conv3d(4, 2, 1))
    prepared = prepare_network(net.eval(), torch.randn(1, 1, 4, 4, 4), EfficientQConfig(per_channel=True))
    assert [(p.name, p.weight.channel_axis) for p in prepared.plans] == [("0", 0), ("2", 1), ("3", 0)]


class _SkipAroundBatchNorm(nn.Module):
    """A conv whose output feeds a BatchNorm and also a skip add: folding would change the skip path."""

    def __init__(self, track: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm3d(4, track_running_stats=track)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.head(self.bn(y) + y)


def test_a_fold_that_would_change_the_output_is_undone_and_nothing_is_folded(caplog):
    from monai_effq.ptq.graph import fold_batchnorm

    torch.manual_seed(0)
    net = _SkipAroundBatchNorm().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 2, 6, 6, 6)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        reference = net(x)
    assert find_foldable_batchnorms(net, x) == [("conv", "bn")]  # adjacent, but not foldable as the check finds
    with caplog.at_level("INFO", logger="monai_effq"):
        assert fold_batchnorm(net, x) == []
    assert "1 of 1 BatchNorm(s) stay unfolded and run in floating point after their quantized convolutions (bn)" in caplog.text
    assert "1 because something else reads or adds to the convolution's output first" in caplog.text  # the user is told which and why
    # the architecture's own BatchNorm: nothing to act on, so not a warning
    assert [r.levelname for r in caplog.records if "stay unfolded" in r.getMessage()] == ["INFO"]
    assert isinstance(net.bn, nn.BatchNorm3d) and net.conv.bias is not None
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        assert torch.equal(net(x), reference)


def _fold_keeping_output(net: nn.Module, x: torch.Tensor, caplog) -> list[str]:
    """``fold_batchnorm`` on ``net`` with every BatchNorm's statistics drawn; the output must not change."""
    from monai_effq.ptq.graph import fold_batchnorm

    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        reference = net(x)
    with caplog.at_level("INFO", logger="monai_effq"):
        folded = fold_batchnorm(net, x)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference, atol=1e-5, rtol=1e-5)
    return folded


class _ResidualBlocks(nn.Module):
    """Pre-activation residual blocks as in MONAI's SegResNetDS: each block's first BatchNorm reads the
    output of the convolution before the block, which the skip add reads too; its second one reads
    only the block's first convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(1, 4, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm1": nn.BatchNorm3d(4), "conv1": nn.Conv3d(4, 4, 3, padding=1), "norm2": nn.BatchNorm3d(4), "conv2": nn.Conv3d(4, 4, 3, padding=1)})
            for _ in range(3)
        )

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = x + b["conv2"](torch.relu(b["norm2"](b["conv1"](torch.relu(b["norm1"](x))))))
        return x


def test_only_the_folds_that_would_change_the_output_are_undone_and_they_are_named(caplog):
    torch.manual_seed(0)
    net = _ResidualBlocks().eval()
    x, stem_weight = torch.randn(1, 1, 6, 6, 6), net.stem.weight.detach().clone()
    assert find_foldable_batchnorms(net, x) == [("stem", "blocks.0.norm1"), ("blocks.0.conv1", "blocks.0.norm2"),
                                                ("blocks.1.conv1", "blocks.1.norm2"), ("blocks.2.conv1", "blocks.2.norm2")]
    assert _fold_keeping_output(net, x, caplog) == ["blocks.0.norm2", "blocks.1.norm2", "blocks.2.norm2"]
    assert "1 of 4 BatchNorm(s) stay unfolded and run in floating point after their quantized convolutions (blocks.0.norm1)" in caplog.text
    assert "1 because something else reads or adds" in caplog.text and "The other 3 were folded" in caplog.text
    assert isinstance(net.blocks[0]["norm1"], nn.BatchNorm3d) and torch.equal(net.stem.weight, stem_weight)


class _InPlaceBetween(nn.Module):
    """A BatchNorm that reads its convolution's output tensor after an in-place addition autograd does
    not record: adjacent by tensor identity, the conv's own graph node, yet folding it changes the
    output (as reduced-precision arithmetic would), so only the output check can catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4)
        self.conv_b, self.bn_b = nn.Conv3d(4, 4, 3, padding=1), nn.BatchNorm3d(4)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        y = self.conv_b(torch.relu(self.bn_a(self.conv_a(x))))
        with torch.no_grad():
            y.add_(1.0)
        return self.head(torch.relu(self.bn_b(y)))


def test_a_fold_that_only_the_output_check_catches_is_found_by_halving_and_undone(caplog):
    torch.manual_seed(0)
    net, x = _InPlaceBetween().eval(), torch.randn(1, 1, 6, 6, 6)
    assert find_foldable_batchnorms(net, x) == [("conv_a", "bn_a"), ("conv_b", "bn_b")]  # the bad one last
    assert _fold_keeping_output(net, x, caplog) == ["bn_a"]
    assert "(bn_b)" in caplog.text and "0 because something else reads" in caplog.text and "1 because the folded output differed" in caplog.text
    assert [r.levelname for r in caplog.records if "stay unfolded" in r.getMessage()] == ["WARNING"]  # unexpected: said loudly
    assert isinstance(net.bn_b, nn.BatchNorm3d) and isinstance(net.bn_a, nn.Identity)


class _SharedModules(nn.Module):
    """One conv+BatchNorm block called twice, and one BatchNorm after two convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv3d(4, 4, 3, padding=1), nn.BatchNorm3d(4)
        self.left, self.right, self.shared_bn = nn.Conv3d(1, 4, 3, padding=1), nn.Conv3d(1, 4, 1), nn.BatchNorm3d(4)

    def forward(self, x):
        y = self.shared_bn(self.left(x)) + self.shared_bn(self.right(x))
        return self.bn(self.conv(torch.relu(self.bn(self.conv(y)))))


def test_a_block_called_twice_folds_and_a_batchnorm_after_two_convolutions_does_not(caplog):
    torch.manual_seed(0)
    assert _fold_keeping_output(_SharedModules().eval(), torch.randn(1, 1, 6, 6, 6), caplog) == ["bn"]
    assert "(shared_bn)" in caplog.text and "1 because the convolution or the BatchNorm also runs with another partner" in caplog.text


def test_a_network_whose_output_varies_from_pass_to_pass_keeps_every_batchnorm_and_says_so(caplog):
    from monai_effq.ptq.graph import fold_batchnorm

    class Stochastic(_SkipAroundBatchNorm):
        def forward(self, x):
            return torch.nn.functional.dropout(super().forward(x), 0.5, training=True)

    torch.manual_seed(0)
    net = Stochastic().eval()
    with caplog.at_level("INFO", logger="monai_effq"):
        assert fold_batchnorm(net, torch.randn(1, 2, 6, 6, 6)) == []  # ends, though no check can pass
    assert isinstance(net.bn, nn.BatchNorm3d) and "1 of 1 BatchNorm(s) stay unfolded" in caplog.text


def test_a_batchnorm_without_running_statistics_is_not_folded():
    from monai_effq.ptq.graph import fold_batchnorm

    net = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4, track_running_stats=False)).eval()
    assert fold_batchnorm(net, torch.randn(1, 2, 6, 6, 6)) == []
    assert isinstance(net[1], nn.BatchNorm3d)


def test_a_network_that_does_not_return_one_tensor_is_refused():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv3d(1, 2, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y, y.sigmoid()

    with pytest.raises(TypeError, match="the network must return one tensor of logits to be quantized, but it returns a tuple of 2"):
        probe_network(TwoHeads().eval(), torch.randn(1, 1, 6, 6, 6))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_network_is_quantized_from_an_exact_float32_copy_and_says_so(dtype, caplog):
    half = _net().to(dtype)  # kept in half precision for inference: float16 and bfloat16 widen to float32 exactly
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(2)).to(dtype)
    config = EfficientQConfig(weight_bits=4, method="rtn")
    with caplog.at_level(logging.WARNING, logger="monai_effq"):
        q = quantize(half, x, config, progress=False)
    assert f"holds {str(dtype).removeprefix('torch.')} weights: it is quantized from a float32 copy" in caplog.text
    assert all(p.dtype == dtype for p in half.parameters())  # the caller's network is left as it was
    reference = quantize(_net().to(dtype).float(), x.float(), config, progress=False)
    with torch.no_grad():
        assert torch.equal(q.network(x.float()), reference.network(x.float()))
        # the input the user's pipeline still feeds: named with the fix, where torch named a bias
        with pytest.raises(UserInputError, match=rf"input of the quantized Sequential is {str(dtype).removeprefix('torch.')}, but the network computes in float32.*x.to\(torch.float32\)"):
            q.network(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert q.network(x.bfloat16()).dtype == torch.bfloat16
    # the report sizes the network as the user has it, two bytes a weight, not as the float32 copy
    assert q.report.fp_bytes == state_bytes(half) < reference.report.fp_bytes


def test_a_compiled_network_is_quantized_as_the_module_it_compiles_and_says_so(caplog):
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    config = EfficientQConfig(weight_bits=4, method="rtn")
    with caplog.at_level(logging.WARNING, logger="monai_effq"):
        q = quantize(torch.compile(_net()), x, config, progress=False)  # a training script's compiled model
    assert "the network is compiled (torch.compile): its original module is used" in caplog.text
    with torch.no_grad():
        assert torch.equal(q.network(x), quantize(_net(), x, config, progress=False).network(x))


class _Encoded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        block = nn.Sequential(nn.Conv3d(4, 4, 3, padding=1), nn.ReLU())
        self.encoder = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), block)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def test_compiled_submodules_even_one_inside_another_are_quantized_as_the_modules_they_compile(caplog):
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    config = EfficientQConfig(weight_bits=4, method="rtn")
    net = _Encoded().eval()
    net.encoder[2] = torch.compile(net.encoder[2])
    net.encoder = torch.compile(net.encoder)  # a compiled block inside a compiled encoder
    with caplog.at_level(logging.WARNING, logger="monai_effq"):
        q = quantize(net, x, config, progress=False)
    assert "the network holds compiled modules (encoder, encoder.2; torch.compile)" in caplog.text
    assert not any(type(m).__name__ == "OptimizedModule" for m in q.network.modules())
    assert type(net.encoder).__name__ == "OptimizedModule"  # the caller's network is left as it was
    with torch.no_grad():
        assert torch.equal(q.network(x), quantize(_Encoded().eval(), x, config, progress=False).network(x))


def test_the_network_itself_is_not_a_submodule_to_replace():
    from monai_effq.ptq.graph import set_submodule

    with pytest.raises(ValueError, match="name one"):
        set_submodule(_net(), "", nn.Identity())


def test_a_layer_that_never_runs_on_the_calibration_input_is_named_as_kept_in_floating_point(caplog):
    class WithHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = _net(), nn.Conv3d(2, 2, 1)  # the head runs in training only

        def forward(self, x):
            y = self.body(x)
            return self.head(y) if self.training else y

    with caplog.at_level(logging.INFO, logger="monai_effq"):
        prepared = prepare_network(WithHead().eval(), torch.randn(1, 1, 6, 6, 6), EfficientQConfig())
    assert "head" not in prepared.order
    said = [r.getMessage() for r in caplog.records if "did not run on the calibration input" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("1 quantizable layer did not run") and ": head." in said[0], said


@pytest.mark.parametrize("method", ["efficientq", "rtn"])
def test_a_skip_that_covers_every_layer_is_refused_naming_it_instead_of_failing_in_the_scan(method):
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1)).eval()
    with pytest.raises(UserInputError, match=r"none of the network's 2 quantizable layers is left to quantize: skip \['\*'\] covers them"):
        quantize(net, torch.rand(1, 1, 8, 8, 8), EfficientQConfig(skip=["*"], method=method, attention=False), progress=False)


def test_every_layer_skipped_with_the_norm_inputs_rounded_quantizes_the_norm_inputs_alone():
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv3d(4, 2, 1)).eval()
    config = EfficientQConfig(skip=["*"], quantize_norm_inputs=True)  # the scan runs: attention is on
    result = quantize(net, torch.rand(1, 1, 8, 8, 8), config, progress=False)
    assert result.report.layers == [] and isinstance(result.network[1].input_quantizer, ActivationQuantizer)


class _StandardisedConv(nn.Conv3d):
    """Weight standardisation, as GroupNorm networks use it: the layer computes with a transformed weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return self._conv_forward(x, (w - w.mean((1, 2, 3, 4), keepdim=True)) / (w.std((1, 2, 3, 4), keepdim=True) + 1e-5), self.bias)


class _UpWithOutputSize(nn.Module):
    """A hand-written decoder step: the transposed convolution is told the skip's size (odd sizes)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = _StandardisedConv(1, 4, 3, padding=1)
        self.down = nn.Conv3d(4, 4, 2, stride=2)
        self.up = nn.ConvTranspose3d(4, 4, 2, stride=2)
        self.b = nn.Conv3d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        u = self.up(torch.relu(self.down(h)), output_size=h.shape[2:])
        return self.b(torch.cat([h, u], 1))


def test_layers_a_quantized_layer_cannot_stand_in_for_are_kept_in_floating_point_and_named(caplog):
    torch.manual_seed(0)
    net, x = _UpWithOutputSize().eval(), torch.randn(2, 1, 15, 15, 15)
    with caplog.at_level(logging.WARNING, logger="monai_effq"):
        result = quantize(net, x, EfficientQConfig(weight_bits=8), progress=False)
    # replaced, the first computed with the raw weight (17x the error of 8 bits) and the second failed when run
    assert result.report.skipped == ["a", "up"]
    assert "a (its class _StandardisedConv has a forward of its own" in caplog.text and "up (it is called with output_size=" in caplog.text
    with torch.no_grad():
        error = (result.network(x) - net(x)).abs().max() / net(x).abs().max()
    assert float(error) < 0.05


def test_a_network_quantized_already_is_named_as_such():
    net, x = _net(), torch.randn(1, 1, 6, 6, 6)
    quantized = quantize(net, x, EfficientQConfig(method="rtn"), progress=False).network
    with pytest.raises(UserInputError, match=r"the network is quantized already: its 3 layers such as 0 are quantized layers; pass the FP network"):
        quantize(quantized, x, progress=False)


def test_a_volume_without_its_batch_axis_is_named_with_its_own_shape_and_the_axis_to_add():
    # the first sample (1, 6, 6, 6) of the volume was named, as if the user had given that shape
    with pytest.raises(UserInputError, match=r"batch of shape \(2, 6, 6, 6\) does not fit .*it has 4 axes where the network's Conv3d takes 5: add the batch axis"):
        quantize(_net(), [torch.randn(2, 6, 6, 6)], progress=False)
