"""RuntimeNetworkLoader checks what it is given when a workflow is built, reads a network's input channels, and
fixes the exported file at the window only under a sliding window of its roi."""

import pytest
import torch
from monai.networks.nets import UNETR, SegResNet, UNet

from monai_effq.handlers import RuntimeNetworkLoader, input_channels
from monai_effq.utils.errors import MissingInputError, UserInputError


def test_input_channels_are_those_of_the_first_weight_layer():
    assert input_channels(UNet(3, 1, 3, channels=(4, 8), strides=(2,))) == 1
    assert input_channels(SegResNet(spatial_dims=3, init_filters=8, in_channels=4, out_channels=3)) == 4
    assert input_channels(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(7, 2))) == 7
    unetr = UNETR(2, 3, (32, 32, 32), feature_size=16, hidden_size=96, mlp_dim=192, num_heads=4, proj_type="perceptron")
    assert input_channels(unetr) == 2  # its first layer is a linear patch embedding reading 2 x 16^3 values
    with pytest.raises(UserInputError, match="ReLU has no convolution or linear layer"):
        input_channels(torch.nn.ReLU())


def test_a_missing_checkpoint_an_unknown_runtime_or_a_malformed_roi_is_refused_before_the_run(tmp_path):
    with pytest.raises(MissingInputError, match="model_w8a8.pt does not exist: run the quantize workflow first"):
        RuntimeNetworkLoader(tmp_path / "model_w8a8.pt", tmp_path / "model_w8a8.onnx", [32, 32, 32])
    (tmp_path / "model_w8a8.pt").write_bytes(b"")
    with pytest.raises(UserInputError, match="roi_size must be a window size or a list of them"):
        RuntimeNetworkLoader(tmp_path / "model_w8a8.pt", tmp_path / "model_w8a8.onnx", "96")
    with pytest.raises(UserInputError, match="runtime must be one of onnxruntime, openvino, got 'tensorrt'"):
        RuntimeNetworkLoader(tmp_path / "model_w8a8.pt", tmp_path / "model_w8a8.onnx", [32, 32, 32], runtime="tensorrt")
    with pytest.raises(UserInputError, match="each roi_size"):
        RuntimeNetworkLoader(tmp_path / "model_w8a8.pt", tmp_path / "model_w8a8.onnx", [32, 0, 32])


def test_the_file_is_fixed_at_the_window_only_for_a_sliding_window_inferer_of_that_roi(tmp_path):
    from monai.inferers import SimpleInferer, SlidingWindowInferer

    from monai_effq import EfficientQConfig, quantize, save_quantized

    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1))
    ckpt = save_quantized(
        quantize(net, torch.rand(1, 1, 8, 8, 8), EfficientQConfig(method="rtn", attention=False), progress=False),
        tmp_path / "model_w4a8.pt",
    )
    loader = RuntimeNetworkLoader(ckpt, tmp_path / "model_w4a8.onnx", [32, 32, 32])
    assert loader.runs_windows_of_roi_size(SlidingWindowInferer([32, 32, 32]))
    assert loader.runs_windows_of_roi_size(SlidingWindowInferer(32))
    assert not loader.runs_windows_of_roi_size(SlidingWindowInferer([32, 32, 16]))
    assert not loader.runs_windows_of_roi_size(SlidingWindowInferer([32, 32, -1]))  # whole last axis: any size
    assert not loader.runs_windows_of_roi_size(SimpleInferer())
    assert RuntimeNetworkLoader(ckpt, tmp_path / "model_w4a8.onnx", 32).runs_windows_of_roi_size(SlidingWindowInferer([32, 32, 32]))
    spanning = RuntimeNetworkLoader(ckpt, tmp_path / "model_w4a8.onnx", [32, 32, -1])
    assert not spanning.runs_windows_of_roi_size(SlidingWindowInferer([32, 32, -1]))  # its windows differ with the volume
    assert not loader.runs_windows_of_roi_size(SlidingWindowInferer([32, 32]))  # another number of axes


def test_an_export_is_traced_at_the_rois_window_one_size_standing_for_every_axis_and_a_spanning_axis_at_the_largest():
    from monai_effq.handlers import trace_shape

    net = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1))
    assert trace_shape(net, [32, 24, 16]) == [1, 2, 32, 24, 16]
    assert trace_shape(net, 32) == [1, 2, 32, 32, 32]
    assert trace_shape(torch.nn.Conv2d(3, 1, 1), 16) == [1, 3, 16, 16]
    assert trace_shape(net, [32, 24, -1]) == [1, 2, 32, 24, 32]
    with pytest.raises(UserInputError, match=r"roi_size \[-1, -1, -1\] spans every axis, so it gives no window .* --export_roi"):
        trace_shape(net, [-1, -1, -1])


class _HeadFirst(torch.nn.Module):
    """A network that registers its output head before the convolution that reads its input."""

    def __init__(self) -> None:
        super().__init__()
        self.head, self.enc = torch.nn.Conv3d(16, 3, 1), torch.nn.Conv3d(2, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.enc(x)))


def test_the_input_channels_of_a_network_registered_out_of_order_are_the_ones_it_runs_on_at_a_given_size():
    from monai_effq.handlers import input_channels

    network = _HeadFirst().train()
    assert input_channels(network) == 16  # untried: the first registered layer's, as before
    assert input_channels(network, (8, 8, 8)) == 2 and network.training  # tried, and left in its mode


def test_an_evaluator_run_again_after_a_new_checkpoint_runs_the_new_one(tmp_path):
    from monai.engines import SupervisedEvaluator
    from monai.inferers import SlidingWindowInferer

    from monai_effq import EfficientQConfig, load_quantized, quantize, save_quantized

    def fp(seed):
        torch.manual_seed(seed)
        return UNet(3, 2, 3, channels=(4, 8), strides=(2,), num_res_units=1, norm="batch").eval()

    def checkpoint(seed):
        config = EfficientQConfig(weight_bits=8, method="rtn", attention=False)
        return save_quantized(quantize(fp(seed), torch.rand(1, 2, 16, 16, 16), config, progress=False), tmp_path / "q.pt")

    data = [{"image": torch.rand(1, 2, 20, 20, 20), "label": torch.zeros(1, 1, 20, 20, 20)}]
    evaluator = SupervisedEvaluator(torch.device("cpu"), data, fp(0), inferer=SlidingWindowInferer((16, 16, 16)))
    RuntimeNetworkLoader(checkpoint(0), tmp_path / "q.onnx", [16, 16, 16], runtime="onnxruntime").attach(evaluator)
    x = torch.rand(1, 2, 16, 16, 16)
    for seed in (0, 1):  # a ValidationHandler's evaluator, after another epoch of fine-tuning wrote a new checkpoint
        checkpoint(seed)
        evaluator.run()
        with torch.no_grad():
            expected = load_quantized(tmp_path / "q.pt", fp(0))(x)
        torch.testing.assert_close(evaluator.network(x), expected, atol=1e-4, rtol=1e-3)
