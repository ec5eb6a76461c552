import errno
import io
import os

import pytest
import torch

import monai_effq.deploy.torchscript as torchscript_module
from monai_effq.deploy import export_torchscript
from monai_effq.utils.errors import OutputWriteError, UserInputError


def test_the_saved_trace_gives_the_quantized_networks_outputs(quantized, tmp_path):
    path = export_torchscript(quantized.network, tmp_path / "model.ts", (1, 2, 24, 24, 24))
    served = torch.jit.load(str(path))
    x = torch.rand(1, 2, 24, 24, 24, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.allclose(served(x), quantized.network(x), atol=1e-5)


class _CountsCalls(torch.nn.Module):
    """A forward that depends on Python state, which a trace freezes at its first call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(x) * self.calls


def test_a_trace_that_differs_from_the_network_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(RuntimeError, match="differs from the network"):
        export_torchscript(_CountsCalls(), tmp_path / "model.ts", (1, 1, 8, 8, 8))
    assert not list(tmp_path.iterdir())


def test_an_input_shape_without_batch_and_channels_is_refused(tmp_path):
    with pytest.raises(ValueError, match="input_shape"):
        export_torchscript(_CountsCalls(), tmp_path / "model.ts", (8, 8, 8))


def test_a_fractional_size_a_negative_tolerance_or_a_window_the_network_refuses_is_named(quantized, tmp_path):
    with pytest.raises(UserInputError, match=r"input_shape\[2\] \(of \(1, 2, 16.5, 16, 16\)\) must be an integer"):
        export_torchscript(quantized.network, tmp_path / "model.ts", (1, 2, 16.5, 16, 16))  # was traced at 16
    with pytest.raises(UserInputError, match="atol must be a non-negative number"):
        export_torchscript(quantized.network, tmp_path / "model.ts", (1, 2, 16, 16, 16), atol=-1)
    with pytest.raises(UserInputError, match=r"input_shape of shape \(1, 3, 16, 16, 16\) does not fit the network \(.*channels"):
        export_torchscript(quantized.network, tmp_path / "model.ts", (1, 3, 16, 16, 16))
    assert not list(tmp_path.iterdir())


class _FullDisk(io.FileIO):
    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_trace_written_onto_a_full_disk_is_named_and_leaves_nothing(tmp_path, monkeypatch):
    # torch's own file writer aborts the process there (basic_ios::clear); a Python file raises what happened
    monkeypatch.setattr(torchscript_module, "open", _FullDisk, raising=False)
    with pytest.raises(OutputWriteError, match=f"could not write {tmp_path / 'model.ts'}: No space left on device"):
        export_torchscript(torch.nn.Conv3d(1, 1, 1), tmp_path / "model.ts", (1, 1, 8, 8, 8))
    assert not list(tmp_path.iterdir())
