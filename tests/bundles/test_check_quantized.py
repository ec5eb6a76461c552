"""The evaluate workflows' check: the quantized checkpoint belongs with the FP weights, its report and no unfinished run."""

import pytest
import torch
from monai.networks.nets import UNet

import monai_effq
from monai_effq.bundle import check_quantize_finished, check_quantized
from monai_effq.utils.errors import UserInputError


def small_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0).eval()


@pytest.fixture
def checkpoint(tmp_path):
    config = monai_effq.EfficientQConfig(method="rtn", attention=False)
    result = monai_effq.quantize(small_unet(), torch.rand(1, 1, 16, 16, 16), config, progress=False)
    return monai_effq.save_quantized(result, tmp_path / "model_rtn_w4a8.pt")


def test_a_checkpoint_of_these_fp_weights_passes_and_gives_its_fingerprint(checkpoint):
    assert check_quantized(checkpoint, small_unet(), checkpoint.parent / "no_report.json") == (
        monai_effq.checkpoint_fingerprint(checkpoint)
    )


def test_a_checkpoint_of_other_fp_weights_is_refused(checkpoint):
    other = small_unet()
    with torch.no_grad():
        next(other.parameters()).add_(0.1)
    with pytest.raises(ValueError, match="made from other FP weights"):
        check_quantized(checkpoint, other)


def test_an_unfinished_runs_journal_beside_the_checkpoint_is_refused_saying_how_to_resume(checkpoint):
    journal = checkpoint.parent / f"{checkpoint.name}.journal"
    journal.mkdir()
    with pytest.raises(UserInputError, match="did not finish.*rerun the same quantize command to resume"):
        check_quantized(checkpoint, small_unet())


def test_an_fp_state_dict_given_as_the_quantized_checkpoint_is_refused_before_the_fp_pass(tmp_path):
    # the evaluate workflows call check_quantize_finished before their FP evaluator runs
    torch.save(small_unet().state_dict(), tmp_path / "model.pt")
    with pytest.raises(UserInputError, match="model.pt is not a monai-effq quantized checkpoint"):
        check_quantize_finished(tmp_path / "model.pt")
