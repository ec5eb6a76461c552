import json
import math
import os

import pytest
import torch
from monai.networks.nets import UNet

import monai_effq
from monai_effq import EfficientQConfig, load_quantized, load_quantized_result, quantize, save_quantized
from monai_effq.utils.errors import UserInputError

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


def test_the_checkpoint_records_fingerprints_of_the_fp_weights_config_and_calibration(trained_unet, w2_result, tmp_path):
    from monai_effq.utils.fingerprint import fingerprint_json, fingerprint_state, fingerprint_tensors

    calib, _ = sphere_volumes(1, seed=5)
    expected = {
        "fp_weights": fingerprint_state(trained_unet),
        "config": fingerprint_json(w2_result.config.to_dict()),
        # one fingerprint per window, so a run split across ranks records the same
        "calibration": fingerprint_json([fingerprint_tensors([window]) for window in calib]),
    }
    assert w2_result.report.sources == expected
    path = save_quantized(w2_result, tmp_path / "q.pt")
    assert load_quantized_result(path, _fresh_unet()).report.sources == expected


def test_quantizing_twice_writes_byte_identical_checkpoints_that_load_bit_for_bit(trained_unet, w2_result, tmp_path):
    calib, _ = sphere_volumes(1, seed=5)
    again = quantize(trained_unet, calib, w2_result.config, progress=False)
    assert again.report.wall_seconds != w2_result.report.wall_seconds  # the runs' times differ ...
    first = save_quantized(w2_result, tmp_path / "first" / "q.pt")
    second = save_quantized(again, tmp_path / "second" / "q.pt")
    assert first.read_bytes() == second.read_bytes()  # ... their checkpoints do not
    x = torch.randn(1, 1, 24, 24, 24)
    with torch.no_grad():
        assert torch.equal(load_quantized(second, _fresh_unet())(x), w2_result.network(x))


def test_a_report_loaded_from_a_checkpoint_has_no_times_and_still_summarises(w2_result, tmp_path):
    path = save_quantized(w2_result, tmp_path / "q.pt")
    report = load_quantized_result(path, _fresh_unet()).report
    assert math.isnan(report.wall_seconds) and math.isnan(report.peak_memory_mib)
    assert all(math.isnan(r.seconds) and math.isnan(r.solve_seconds) for r in report.layers)
    assert " s," not in report.summary() and "layers quantized; size" in report.summary()
    assert report.compression == w2_result.report.compression


def test_a_flipped_byte_in_a_tensor_is_one_error_naming_the_file_and_the_fix(w2_result, tmp_path):
    path = save_quantized(w2_result, tmp_path / "q.pt")
    codes = torch.load(path, weights_only=True)["codes"]
    data = bytearray(path.read_bytes())
    data[_tensor_offset(path, "codes") + codes.numel() // 2] ^= 0x10
    path.write_bytes(bytes(data))
    flipped = torch.load(path, weights_only=True)["codes"]  # torch reads the changed byte without complaint
    assert int((flipped != codes).sum()) == 1
    with pytest.raises(ValueError, match=r"q\.pt is damaged.*re-run the quantize step"):
        load_quantized(path, _fresh_unet())


def _tensor_offset(path, entry: str) -> int:
    """Where the bytes of a payload entry's tensor start in the file (the zip stores them uncompressed)."""
    import zipfile

    payload = torch.load(path, weights_only=True)
    with zipfile.ZipFile(path) as archive:
        storages = [i for i in archive.infolist() if "/data/" in i.filename and not i.filename.endswith("serialization_id")]
        sizes = {i.filename: i.file_size for i in storages}
        target = payload[entry].numel() * payload[entry].element_size()
        info = next(i for i in storages if sizes[i.filename] == target)
        with open(path, "rb") as f:
            f.seek(info.header_offset + 26)
            name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        return info.header_offset + 30 + name_len + extra_len


def test_the_fingerprint_of_a_checkpoint_is_its_results_and_survives_a_reload(w2_result, tmp_path):
    from monai_effq.ptq.checkpoint import checkpoint_fingerprint, result_fingerprint

    path = save_quantized(w2_result, tmp_path / "q.pt")
    assert checkpoint_fingerprint(path) == result_fingerprint(w2_result)
    reloaded = load_quantized_result(path, _fresh_unet())
    assert result_fingerprint(reloaded) == result_fingerprint(w2_result)
    other = EfficientQConfig(weight_bits=3, first_layer_bits=None, last_layer_bits=None, method="rtn")
    calib, _ = sphere_volumes(1, seed=5)
    assert result_fingerprint(quantize(_fresh_unet(), calib, other, progress=False)) != checkpoint_fingerprint(path)


def test_verify_checkpoint_tells_a_report_or_fp_weights_of_another_run(trained_unet, w2_result, tmp_path):
    from monai_effq.ptq.checkpoint import checkpoint_fingerprint, report_provenance, verify_checkpoint

    path = save_quantized(w2_result, tmp_path / "q.pt")
    w2_result.report.save(tmp_path, "report", provenance=report_provenance(w2_result))
    assert verify_checkpoint(path, fp_network=trained_unet, report=tmp_path / "report.json") == checkpoint_fingerprint(path)
    with pytest.raises(ValueError, match="made from other FP weights.*re-run the quantize step"):
        verify_checkpoint(path, fp_network=_fresh_unet())
    # a later run killed after writing its checkpoint leaves the earlier run's report beside it
    calib, _ = sphere_volumes(1, seed=6)
    save_quantized(quantize(trained_unet, calib, w2_result.config, progress=False), path)
    with pytest.raises(ValueError, match=r"report\.json describes another checkpoint.*re-run the quantize step"):
        verify_checkpoint(path, report=tmp_path / "report.json")


def test_verify_checkpoint_names_a_missing_or_damaged_report(w2_result, tmp_path):
    from monai_effq.ptq.checkpoint import verify_checkpoint

    path = save_quantized(w2_result, tmp_path / "q.pt")
    with pytest.raises(FileNotFoundError, match=r"quantization report .*report\.json does not exist: re-run the quantize step"):
        verify_checkpoint(path, report=tmp_path / "report.json")
    for damaged in ('{"provenance": {"checkpoint"', "[1, 2]", '{"provenance": 3}'):
        (tmp_path / "report.json").write_text(damaged)
        with pytest.raises(ValueError, match=r"quantization report .*report\.json is damaged \(not a JSON report\): re-run"):
            verify_checkpoint(path, report=tmp_path / "report.json")


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


PLAIN_UNET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": (4, 8), "strides": (2,), "num_res_units": 0, "act": "relu"}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"strides": (1,)}, r"model\.0\.conv\.stride is \[2, 2, 2\] there and \[1, 1, 1\] here"),
        ({"norm": None}, r"its model\.0\.adn\.N \(InstanceNorm3d\) is not in this network"),
        ({"act": ("leakyrelu", {"negative_slope": 0.2})}, r"model\.0\.adn\.A is a ReLU there and a LeakyReLU here"),
        # the same layers, run activation first: it loaded without a word and computed otherwise
        ({"adn_ordering": "AND"}, r"its layers are built in another order \(model\.0\.adn\.N comes elsewhere there\)"),
    ],
    ids=["stride", "no_norm", "activation", "order"],
)
def test_a_network_built_otherwise_with_the_same_weights_is_refused_naming_the_layer(tmp_path, changes, message):
    torch.manual_seed(0)
    result = quantize(UNet(**PLAIN_UNET).eval(), torch.randn(1, 1, 16, 16, 16), EfficientQConfig(method="rtn"), progress=False)
    path = save_quantized(result, tmp_path / "q.pt")
    with pytest.raises(UserInputError, match=f"was quantized from a network built otherwise than this one: .*{message}.*same arguments"):
        load_quantized(path, UNet(**{**PLAIN_UNET, **changes}))


def test_an_activation_built_with_another_setting_is_refused_and_a_table_without_that_setting_still_loads(tmp_path):
    from monai_effq.ptq.checkpoint import FORMAT

    torch.manual_seed(0)
    elu = {**PLAIN_UNET, "act": ("elu", {"alpha": 1.0})}
    result = quantize(UNet(**elu).eval(), torch.randn(1, 1, 16, 16, 16), EfficientQConfig(method="rtn"), progress=False)
    path = save_quantized(result, tmp_path / "q.pt")
    # no weight tells alpha 1.0 from 0.2: it loaded and the outputs differed by up to 4.2 in the review
    with pytest.raises(UserInputError, match=r"built otherwise than this one: .*model\.0\.adn\.A\.alpha is 1\.0 there and 0\.2 here"):
        load_quantized(path, UNet(**{**elu, "act": ("elu", {"alpha": 0.2})}))

    def as_an_earlier_version_recorded_it(meta):
        for _, settings in meta["architecture"].values():
            settings.pop("alpha", None)

    _rewrite(path, as_an_earlier_version_recorded_it, FORMAT)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(load_quantized(path, UNet(**elu))(x), result.network(x))


def test_a_checkpoint_written_before_the_architecture_table_still_loads(w2_result, tmp_path):
    from monai_effq.ptq.checkpoint import FORMAT

    path = save_quantized(w2_result, tmp_path / "q.pt")
    _rewrite(path, lambda meta: meta.pop("architecture"), FORMAT)
    x = torch.randn(1, 1, 24, 24, 24)
    with torch.no_grad():
        assert torch.equal(load_quantized(path, _fresh_unet())(x), w2_result.network(x))


@pytest.mark.parametrize("entry", ["checksum", "meta", "codes", "data"])
def test_a_checkpoint_missing_an_entry_its_format_always_has_is_named_damaged(w2_result, tmp_path, entry):
    path = save_quantized(w2_result, tmp_path / "q.pt")
    payload = torch.load(path, weights_only=True)
    del payload[entry]  # one changed byte in an entry's name reads so; without its checksum, changed codes loaded
    torch.save(payload, path)
    with pytest.raises(UserInputError, match=f"quantized checkpoint .*q.pt is damaged: it has no valid {entry} entry"):
        load_quantized(path, _fresh_unet())


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


@pytest.fixture(scope="module")
def segresnet_norm_inputs():
    """A small SegResNet quantized with its group norms' inputs rounded too."""
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    net = SegResNet(3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1), blocks_up=(1,)).eval()
    calib = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    cfg = EfficientQConfig(weight_bits=4, method="rtn", attention=False, quantize_norm_inputs=True)
    return net, quantize(net, calib, cfg, progress=False)


def test_quantized_norm_inputs_survive_a_save_and_load_bit_for_bit(segresnet_norm_inputs, tmp_path):
    from monai_effq.ptq.modules import QuantizedNorm

    fp, result = segresnet_norm_inputs
    loaded = load_quantized_result(save_quantized(result, tmp_path / "q.pt"), fp)
    saved_norms = {n: m.input_quantizer for n, m in result.network.named_modules() if isinstance(m, QuantizedNorm)}
    loaded_norms = {n: m.input_quantizer for n, m in loaded.network.named_modules() if isinstance(m, QuantizedNorm)}
    assert saved_norms and saved_norms.keys() == loaded_norms.keys()
    for name, q in saved_norms.items():
        assert (loaded_norms[name].grid, float(loaded_norms[name].scale)) == (q.grid, float(q.scale))
    assert loaded.config.quantize_norm_inputs
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.network(x), result.network(x))


def _rewrite(path, edit_meta, format_name):
    """Rewrite a checkpoint's meta and format, with a checksum that matches the new meta."""
    from monai_effq.ptq.checkpoint import _checksum

    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["meta"])
    edit_meta(meta)
    payload["meta"] = json.dumps(meta)
    payload["format"] = format_name
    payload["checksum"] = _checksum(payload["meta"], payload["codes"], payload["data"])
    torch.save(payload, path)


def test_a_version_1_checkpoint_without_norm_inputs_still_loads(trained_unet, tmp_path):
    calib, _ = sphere_volumes(1, seed=5)
    # what monai-effq made before shared roundings existed: every layer rounds its own input
    cfg = EfficientQConfig(weight_bits=2, first_layer_bits=None, last_layer_bits=None, per_channel=True, share_skip_rounding=False)
    result = quantize(trained_unet, calib, cfg, progress=False)
    path = save_quantized(result, tmp_path / "q.pt")

    def as_version_1(meta):  # what monai-effq wrote before norm inputs existed
        del meta["norm_inputs"], meta["architecture"]
        del meta["config"]["quantize_norm_inputs"]
        del meta["config"]["share_skip_rounding"]

    _rewrite(path, as_version_1, "monai-effq-quantized/1")
    loaded = load_quantized_result(path, _fresh_unet())
    assert loaded.config.quantize_norm_inputs is False and loaded.config.share_skip_rounding is False
    x = torch.randn(1, 1, 24, 24, 24)
    with torch.no_grad():
        assert torch.equal(loaded.network(x), result.network(x))


def test_a_checkpoint_of_a_newer_format_asks_for_an_upgrade(w2_result, tmp_path):
    path = save_quantized(w2_result, tmp_path / "q.pt")
    _rewrite(path, lambda meta: None, "monai-effq-quantized/99")
    with pytest.raises(ValueError, match="newer than this version reads.*upgrade monai-effq"):
        load_quantized(path, _fresh_unet())


def test_a_checkpoint_loads_onto_a_compiled_network_as_onto_the_module_it_compiles(w2_result, tmp_path):
    path = save_quantized(w2_result, tmp_path / "q.pt")
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load_quantized(path, torch.compile(_fresh_unet()))(x), load_quantized(path, _fresh_unet())(x))


def test_a_checkpoint_loads_onto_a_half_precision_network_as_onto_a_float32_one(w2_result, tmp_path):
    path = save_quantized(w2_result, tmp_path / "q.pt")
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load_quantized(path, _fresh_unet().half())(x), load_quantized(path, _fresh_unet())(x))


def test_verify_checkpoint_knows_the_fp_weights_in_a_compiled_network(trained_unet, w2_result, tmp_path):
    from monai_effq.ptq.checkpoint import checkpoint_fingerprint, verify_checkpoint

    path = save_quantized(w2_result, tmp_path / "q.pt")
    assert verify_checkpoint(path, fp_network=torch.compile(trained_unet)) == checkpoint_fingerprint(path)


def test_a_checkpoint_whose_layers_ran_in_fp_under_a_second_name_is_refused_with_quantize_again(tmp_path, monkeypatch):
    import monai_effq.ptq.pipeline as pipeline

    from ..nnunet_like import nnunet_like

    def one_name_only(root, name, module):  # how set_submodule replaced a layer before it replaced every name
        owner, _, attr = name.rpartition(".")
        setattr(root.get_submodule(owner) if owner else root, attr, module)

    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with monkeypatch.context() as m:
        m.setattr(pipeline, "set_submodule", one_name_only)
        old = quantize(nnunet_like(), x, EfficientQConfig(weight_bits=4, method="rtn"), progress=False)
    path = save_quantized(old, tmp_path / "old.pt")
    with pytest.raises(UserInputError, match=r"floating-point weights under a second name of quantized layers \(0\.all_modules\.0\.weight.*Quantize the FP network again"):
        load_quantized(path, nnunet_like())


def _unaligned_net() -> torch.nn.Module:
    """Layers of 135, 405 and 6 weights: at 3 bits the first layer's codes end mid-byte (405 bits)."""
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 5, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(5, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(3, 2, 1),
    ).eval()


@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7])
def test_layers_whose_packed_codes_end_mid_byte_reload_bit_for_bit(tmp_path, bits):
    x = torch.rand(2, 1, 12, 12, 12, generator=torch.Generator().manual_seed(0))
    config = EfficientQConfig(weight_bits=bits, first_layer_bits=None, last_layer_bits=None, method="rtn", attention=False)
    result = quantize(_unaligned_net(), x, config, progress=False)
    # every layer after the first reads its codes at an offset the bytes before it set
    loaded = load_quantized(save_quantized(result, tmp_path / "q.pt"), _unaligned_net())
    with torch.no_grad():
        assert torch.equal(loaded(x), result.network(x))
