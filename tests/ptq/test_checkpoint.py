import json
import os

import pytest
import torch
from monai.networks.nets import UNet

import monai_effq
from monai_effq import EfficientQConfig, load_quantized, load_quantized_result, quantize, save_quantized

from .conftest import sphere_volumes


@pytest.fixture(scope="module")
def w2_result(trained_unet):
    calib, _ = sphere_volumes(1, seed=5)
    cfg = EfficientQConfig(weight_bits=2, first_layer_bits=None, last_layer_bits=None, per_channel=True)
    return quantize(trained_unet, calib, cfg, progress=False)


def _fresh_unet():
    return UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)


def test_save_then_load_reproduces_the_outputs_bit_for_bit(w2_result, tmp_path):
    path = save_quantized(w2_result, tmp_path / "q.pt")
    loaded = load_quantized(path, _fresh_unet())
    x = torch.randn(2, 1, 24, 24, 24)
    with torch.no_grad():
        assert torch.equal(loaded(x), w2_result.network(x))


def test_load_restores_config_report_and_provenance(w2_result, tmp_path):
    path = save_quantized(w2_result, tmp_path / "q.pt")
    res = load_quantized_result(path, _fresh_unet())
    assert res.config == w2_result.config
    assert [r.mse for r in res.report.layers] == [r.mse for r in w2_result.report.layers]
    meta = json.loads(torch.load(path, weights_only=True)["meta"])
    assert meta["provenance"]["monai_effq"] == monai_effq.__version__
    assert meta["provenance"]["torch"] == torch.__version__


def test_two_bit_file_is_at_most_a_twelfth_of_the_fp_state_dict(tmp_path):
    torch.manual_seed(0)
    net = UNet(3, 1, 2, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1).eval()
    cfg = EfficientQConfig(weight_bits=2, first_layer_bits=None, last_layer_bits=None, method="rtn")
    res = quantize(net, torch.randn(1, 1, 16, 16, 16), cfg, progress=False)
    torch.save(net.state_dict(), tmp_path / "fp.pt")
    save_quantized(res, tmp_path / "q.pt")
    ratio = os.path.getsize(tmp_path / "q.pt") / os.path.getsize(tmp_path / "fp.pt")
    assert ratio <= 1 / 12


def test_an_interrupted_save_leaves_no_file(w2_result, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(w2_result, tmp_path / "q.pt")
    assert list(tmp_path.iterdir()) == []


def test_loading_onto_a_different_architecture_is_a_clear_error(w2_result, tmp_path):
    path = save_quantized(w2_result, tmp_path / "q.pt")
    other = UNet(3, 1, 2, channels=(8, 16, 64), strides=(2, 2), num_res_units=1)
    with pytest.raises(ValueError, match="does not match this network architecture"):
        load_quantized(path, other)


def test_a_corrupt_checkpoint_is_a_clear_error(w2_result, tmp_path):
    path = save_quantized(w2_result, tmp_path / "q.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        load_quantized(path, _fresh_unet())


def test_a_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_quantized(tmp_path / "nope.pt", _fresh_unet())


def test_an_fp_state_dict_is_not_mistaken_for_a_quantized_checkpoint(tmp_path):
    torch.save(_fresh_unet().state_dict(), tmp_path / "fp.pt")
    with pytest.raises(ValueError, match="not a monai-effq quantized checkpoint"):
        load_quantized(tmp_path / "fp.pt", _fresh_unet())


def test_saving_something_else_writes_nothing(tmp_path):
    with pytest.raises(TypeError, match="monai_effq.quantize"):
        save_quantized(_fresh_unet(), tmp_path / "q.pt")
    assert not (tmp_path / "q.pt").exists()


def test_a_packed_checkpoint_loaded_as_a_state_dict_by_name_fails_loudly(w2_result, tmp_path):
    from ignite.engine import Engine
    from monai.handlers import CheckpointLoader

    path = save_quantized(w2_result, tmp_path / "q.pt")
    payload = torch.load(path, weights_only=True)
    # MONAI Label and MONAI's CheckpointLoader take the "model" entry with strict=False: it must not load nothing quietly
    with pytest.raises((TypeError, AttributeError)):
        _fresh_unet().load_state_dict(payload.get("model", payload), strict=False)
    with pytest.raises((TypeError, AttributeError)):
        CheckpointLoader(load_path=str(path), load_dict={"model": _fresh_unet()}, strict=False)(Engine(lambda engine, batch: None))
    assert "monai_effq.load_quantized" in payload["model"]
