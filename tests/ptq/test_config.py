import dataclasses
import json

import numpy as np
import pytest
import torch

from monai_effq import AdmmSettings, EfficientQConfig
from monai_effq.ptq.config import NETWORK_INPUT_GRID
from monai_effq.ptq.modules import ActivationQuantizer
from monai_effq.quant import ActivationSpec, FixedPointFormat, WeightSpec
from monai_effq.utils.errors import UserInputError


def test_config_round_trips_through_json():
    cfg = EfficientQConfig(
        weight_bits=3, act_bits=6, overrides={"model.1.*": {"weight_bits": 8}}, skip=["re:.*final.*"],
        admm=AdmmSettings(iterations=50), per_channel=True,
    )
    again = EfficientQConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert isinstance(again.admm, AdmmSettings) and again.admm.iterations == 50


def test_unknown_config_keys_are_named():
    with pytest.raises(ValueError, match="wieght_bits"):
        EfficientQConfig.from_dict({"wieght_bits": 4})


def test_first_and_last_layers_keep_eight_bits_and_overrides_win():
    cfg = EfficientQConfig(weight_bits=2, act_bits=6, overrides={"b": {"weight_bits": 5, "act_bits": None}}, skip=["c"])
    plans = {p.name: p for p in cfg.plan(["a", "b", "c", "d", "e"])}
    assert set(plans) == {"a", "b", "d", "e"}
    assert (plans["a"].weight_bits, plans["a"].act_bits) == (8, 8)
    assert (plans["b"].weight_bits, plans["b"].act_bits) == (5, None)
    assert (plans["d"].weight_bits, plans["d"].act_bits) == (2, 6)
    assert plans["e"].weight_bits == 8


def test_glob_and_regex_patterns_select_layers():
    cfg = EfficientQConfig(skip=["model.0.*", "re:.*\\.conv$"], first_layer_bits=None, last_layer_bits=None)
    names = ["model.0.a", "model.1.conv", "model.1.adn", "model.2"]
    assert [p.name for p in cfg.plan(names)] == ["model.1.adn", "model.2"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"method": "adaround"}, "method"),
        ({"weight_grid": "log"}, "weight_grid"),
        ({"overrides": {"x": {"bits": 4}}}, "override"),
        ({"overrides": {"x": {"weight_bits": 1}}}, "weight_bits"),
        ({"act_bits": 1}, "act_bits"),
        ({"attention_power": -1.0}, "attention_power"),
        ({"act_grid": "signed"}, "act_grid"),
        ({"act_grid": "symmetric", "act_format": "Q6.0"}, "act_format"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EfficientQConfig(**kwargs)


@pytest.mark.parametrize("power", [float("inf"), 1e6, 8.5])
def test_an_infinite_or_huge_attention_power_is_refused_naming_the_setting(power):
    with pytest.raises(UserInputError, match=rf"attention_power must be a number from 0\.0 to 8\.0 \(the paper uses 0\.5\), got {power!r}"):
        EfficientQConfig(attention_power=power)
    assert EfficientQConfig(attention_power=8).attention_power == 8.0


def test_fixed_point_settings_round_trip_and_formats_set_the_word_size():
    cfg = EfficientQConfig(weight_format="Q0.4", act_format="Q6.0", power_of_two=True)
    assert (cfg.weight_bits, cfg.act_bits) == (5, 6)
    again = EfficientQConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_explicit_formats_apply_to_the_body_layers_only():
    cfg = EfficientQConfig(weight_format="Q0.4", act_format="Q6.0", overrides={"c": {"weight_bits": 8}})
    plans = {p.name: p for p in cfg.plan(["a", "b", "c", "d"])}
    assert (plans["b"].weight_format, plans["b"].act_format) == ("Q0.4", "Q6.0")
    assert plans["a"].weight_format is None and plans["d"].act_format is None  # first/last keep 8 bits
    assert (plans["c"].weight_format, plans["c"].act_format) == (None, "Q6.0")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"weight_format": "Q0.8"}, "9-bit word"),
        ({"act_format": "Q9.0"}, "9-bit word"),
        ({"weight_format": "Q0.4", "power_of_two": "yes"}, "power_of_two"),
    ],
)
def test_bad_fixed_point_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EfficientQConfig(**kwargs)


def test_a_config_is_checked_once_and_cannot_change_afterwards():
    cfg = EfficientQConfig(weight_format="Q0.4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.weight_bits = 4
    with pytest.raises(ValueError, match="act_bits"):
        dataclasses.replace(cfg, act_bits=9)  # a changed copy is checked again


@pytest.mark.parametrize(
    "weight_grid, expected",
    [
        ("auto", {2: "midrise", 3: "midrise", 4: "signed", 6: "midrise", 8: "symmetric"}),
        ("midrise", {2: "midrise", 4: "midrise", 8: "symmetric"}),
        ("signed", {2: "signed", 4: "signed", 8: "signed"}),
    ],
)
def test_the_default_grid_is_the_papers_wherever_its_integers_fit_the_deployed_container(weight_grid, expected):
    cfg = EfficientQConfig(weight_grid=weight_grid)
    assert {bits: cfg.weight_grid_for(bits) for bits in expected} == expected
    # a layer's own override is taken as written, "auto" included
    assert cfg.weight_grid_for(8, "midrise") == "midrise" and cfg.weight_grid_for(4, "auto") == "signed"


def test_overrides_set_any_per_layer_setting_and_the_plan_holds_whole_specs():
    cfg = EfficientQConfig(
        weight_bits=4, act_bits=8, first_layer_bits=None, last_layer_bits=None,
        overrides={
            "b": {"per_channel": True, "method": "gptq", "weight_grid": "signed"},
            "c": {"weight_format": "Q0.3", "power_of_two": True},
            "d": {"act_format": "Q4.0"},
        },
    )
    plans = {p.name: p for p in cfg.plan(["a", "b", "c", "d"])}
    assert plans["a"].weight == WeightSpec.of(4, "signed") and plans["a"].method == "efficientq"
    assert plans["a"].act == ActivationSpec(8, signed_kind=NETWORK_INPUT_GRID)  # "a" reads the network input
    assert (plans["b"].weight.per_channel, plans["b"].weight.grid.kind, plans["b"].method) == (True, "signed", "gptq")
    assert (plans["c"].weight.scale_rule, plans["c"].weight.step, plans["c"].weight_bits) == ("fixed", 0.125, 4)
    assert plans["c"].act.power_of_two and not plans["a"].act.power_of_two
    assert (plans["d"].act_bits, plans["d"].act_format) == (4, "Q4.0")


@pytest.mark.parametrize(
    "override,message",
    [
        ({"per_channel": "false"}, "per_channel must be True or False"),
        ({"method": "adaround"}, "method"),
        ({"weight_grid": "log"}, "weight_grid"),
        ({"weight_format": "Q0.9"}, "word"),
        ({"scale_method": "l1"}, r"overrides\['x'\]\.scale_method must be one of"),
        ({"act_grid": "signed"}, r"overrides\['x'\]\.act_grid must be one of"),
    ],
)
def test_bad_override_values_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        EfficientQConfig(overrides={"x": override})


def test_an_override_format_cannot_contradict_the_symmetric_activation_grid():
    with pytest.raises(ValueError, match="act_format sets its own grid"):
        EfficientQConfig(act_grid="symmetric", overrides={"x": {"act_format": "Q4.0"}})
    with pytest.raises(UserInputError, match="layer b gets act_format Q6.0, .* and act_grid='symmetric'"):
        EfficientQConfig(act_format="Q6.0", overrides={"b": {"act_grid": "symmetric"}}).plan(["a", "b", "c"])
    # a layer that sets its own grid back to "auto" may take its own format under a symmetric config
    plans = EfficientQConfig(act_grid="symmetric", overrides={"b": {"act_grid": "auto", "act_format": "Q4.0"}}).plan(["a", "b", "c"])
    assert (plans[1].act.kind, plans[1].act_format) == (None, "Q4.0")


def test_overrides_set_the_scale_fit_and_the_activation_grid_of_one_layer():
    cfg = EfficientQConfig(
        first_layer_bits=None, last_layer_bits=None,
        overrides={"b": {"scale_method": "mse", "act_grid": "symmetric"}, "c": {"act_grid": "auto"}},
    )
    plans = {p.name: p for p in cfg.plan(["a", "b", "c"])}
    assert (plans["a"].weight.scale_method, plans["a"].act.kind) == ("als", None)
    assert (plans["b"].weight.scale_method, plans["b"].act.kind) == ("mse", "symmetric")
    assert plans["c"].act.kind is None
    everywhere = EfficientQConfig(act_grid="symmetric", overrides={"c": {"act_grid": "auto"}}).plan(["a", "b", "c"])
    assert [p.act.kind for p in everywhere] == ["symmetric", "symmetric", None]


def test_each_format_text_is_parsed_once_when_the_config_is_made_and_never_downstream(monkeypatch):
    parsed = []
    parse = FixedPointFormat.parse.__func__
    monkeypatch.setattr(FixedPointFormat, "parse", classmethod(lambda cls, text, signed=True: parsed.append(text) or parse(cls, text, signed)))
    cfg = EfficientQConfig(
        weight_format="Q0.4", act_format="Q6.0", first_layer_bits=None, last_layer_bits=None,
        overrides={"c": {"weight_format": "Q0.3"}},
    )
    assert sorted(parsed) == ["Q0.3", "Q0.4", "Q6.0"]
    plans = {p.name: p for p in cfg.plan(["a", "b", "c"])}
    after_relu = ActivationQuantizer.from_spec(torch.rand(64), plans["b"].act)
    signed = ActivationQuantizer.from_spec(torch.rand(64) - 0.5, plans["b"].act)
    assert sorted(parsed) == ["Q0.3", "Q0.4", "Q6.0"]  # the plan and the quantizers read parsed formats
    assert (plans["b"].weight.step, plans["c"].weight.step, plans["b"].act.format) == (2**-4, 2**-3, FixedPointFormat(6, 0, signed=False))
    # an input calibration finds negative takes the signed format of the same integer and fractional bits
    assert (after_relu.grid.bits, after_relu.grid.kind, signed.grid.bits, signed.grid.kind) == (6, "unsigned", 7, "symmetric")


def test_a_format_is_kept_as_written_canonically_so_spellings_of_one_format_make_one_config():
    loose = EfficientQConfig(weight_format=" q0.4 ", act_format="Q 6 . 0", overrides={"c": {"weight_format": "q0.3"}})
    assert (loose.weight_format, loose.act_format, loose.overrides["c"]["weight_format"]) == ("Q0.4", "Q6.0", "Q0.3")
    assert loose == EfficientQConfig(weight_format="Q0.4", act_format="Q6.0", overrides={"c": {"weight_format": "Q0.3"}})


def test_an_unsigned_8_bit_activation_format_on_an_input_with_negative_values_names_the_layer_and_the_sign_bit():
    plan = {p.name: p for p in EfficientQConfig(act_format="Q7.1").plan(["a", "b", "c"])}["b"]  # a body layer
    ActivationQuantizer.from_spec(torch.rand(64), plan.act, "model.1.conv")  # after a ReLU: 8 unsigned bits
    with pytest.raises(UserInputError, match=r"the input of layer model\.1\.conv holds negative values, so its act_format takes a sign bit: .*9-bit word"):
        ActivationQuantizer.from_spec(torch.rand(64) - 0.5, plan.act, "model.1.conv")


def test_an_unregistered_method_says_how_to_register_it():
    with pytest.raises(ValueError, match="import the module that registers it"):
        EfficientQConfig(method="mine")


@pytest.mark.parametrize("flag", ["per_channel", "attention", "fold_batchnorm"])
def test_booleans_must_be_booleans(flag):
    with pytest.raises(ValueError, match=f"{flag} must be True or False"):
        EfficientQConfig(**{flag: "false"})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"weight_bits": 4.0}, r"weight_bits must be an integer from 2 to 8, got 4\.0"),
        ({"weight_bits": "four"}, "a word on the command line arrives as text"),
        ({"attention": "no"}, "attention must be True or False"),
        ({"skip": "model.0.conv"}, r"skip must be a list .* write \['model\.0\.conv'\]"),
        ({"target_memory_mib": 0}, "target_memory_mib must be an integer of at least 1, got 0"),
        ({"max_chunk_elements": -1}, "max_chunk_elements must be an integer of at least 1, got -1"),
        ({"device": "gpu7"}, "device must be a torch device name"),
        ({"overrides": {"x": {"per_channel": "false"}}}, r"overrides\['x'\]\.per_channel must be True or False"),
        ({"admm": {"iters": 3}}, "admm:"),
        ({"admm": 60}, "admm must be AdmmSettings or a dict of its fields, got 60"),
        ({"skip": ["model.0.conv", 3]}, r"skip must be a list of layer-name patterns \(strings\)"),
        ({"overrides": [("model.0.conv", {"weight_bits": 8})]}, "overrides must be a dict from layer-name pattern"),
        ({"method": None}, "method must be a name"),
        ({"init": "kmeans"}, "init must be 'gptq' or 'rtn', got 'kmeans'"),
        ({"weight_format": 4}, "weight_format must be a fixed-point format such as 'Q0.4', got 4"),
    ],
)
def test_settings_of_the_wrong_type_are_user_errors_that_name_them(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        EfficientQConfig(**kwargs)


def test_numpy_integers_and_booleans_are_accepted_and_stored_as_python_values():
    config = EfficientQConfig(
        weight_bits=np.int64(4), act_bits=np.int32(8), per_channel=np.bool_(True),
        overrides={"x": {"weight_bits": np.int8(3)}}, target_memory_mib=np.int64(64),
    )
    assert type(config.weight_bits) is int and type(config.act_bits) is int and config.per_channel is True
    assert type(config.overrides["x"]["weight_bits"]) is int and type(config.target_memory_mib) is int
    assert EfficientQConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_the_plan_gives_each_per_channel_layer_the_channel_axis_of_its_weight():
    config = EfficientQConfig(per_channel=True, overrides={"head": {"per_channel": False}})
    plans = {p.name: p.weight for p in config.plan(["stem", "up", "head"], channel_axes={"up": 1, "head": 1})}
    assert [plans[n].channel_axis for n in ("stem", "up", "head")] == [0, 1, None]
    per_tensor = EfficientQConfig().plan(["stem", "up"], channel_axes={"up": 1})
    assert [p.weight.channel_axis for p in per_tensor] == [None, None]


def test_the_plan_lets_a_transposed_convolutions_signed_input_take_the_symmetric_grid_unless_a_grid_is_set():
    names, up = ["stem", "up", "head"], ["up"]
    auto = {p.name: p.act for p in EfficientQConfig().plan(names, transposed_layers=up)}
    assert (auto["up"].kind, auto["up"].signed_kind) == (None, "symmetric")
    assert auto["head"].signed_kind == "asymmetric"
    # below 8 bits the asymmetric grid's export needs no zero point
    assert EfficientQConfig(act_bits=6).plan(names, transposed_layers=up)[1].act.signed_kind == "asymmetric"
    # an override keeps the calibrated zero point for a runtime that does not need it gone
    overridden = EfficientQConfig(overrides={"up": {"act_grid": "asymmetric"}}).plan(names, transposed_layers=up)
    assert [p.act.kind for p in overridden] == [None, "asymmetric", None]
    with pytest.raises(ValueError, match="act_format sets its own grid: use it or act_grid='asymmetric'"):
        EfficientQConfig(act_grid="asymmetric", act_format="Q6.0")
    assert EfficientQConfig(act_format="Q6.0").plan(names, transposed_layers=up)[1].act.format is not None


def test_the_plan_puts_an_8_bit_network_input_on_the_signed_grid_and_leaves_the_body_asymmetric():
    names = ["stem", "body", "head"]
    auto = {p.name: p.act for p in EfficientQConfig().plan(names)}
    assert auto["stem"].signed_kind == NETWORK_INPUT_GRID == "signed" and auto["stem"].kind is None
    assert auto["body"].signed_kind == auto["head"].signed_kind == "asymmetric"
    # every layer that reads the input, not only the first in execution order
    assert EfficientQConfig().plan(names, input_layers=["stem", "body"])[1].act.signed_kind == "signed"
    # an input kept below 8 bits stays asymmetric (its export needs no zero point), as does an override
    assert EfficientQConfig(act_bits=4, first_layer_bits=None).plan(names)[0].act.signed_kind == "asymmetric"
    overridden = EfficientQConfig(overrides={"stem": {"act_grid": "asymmetric"}}).plan(names)
    assert overridden[0].act.kind == "asymmetric"


def test_a_config_is_read_from_a_dict_and_anything_else_is_named():
    assert EfficientQConfig.from_dict({"weight_bits": 3}).weight_bits == 3
    with pytest.raises(UserInputError, match=r"read from a dict of its fields, got \['weight_bits', 3\]"):
        EfficientQConfig.from_dict(["weight_bits", 3])


def test_a_torch_device_is_stored_as_its_name():
    assert EfficientQConfig(device=torch.device("cpu")).device == "cpu"
