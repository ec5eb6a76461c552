import pytest

from monai_effq.quant import UniformGrid, WeightSpec


def test_a_per_channel_spec_carries_its_channel_axis_and_a_per_tensor_spec_none():
    transposed = WeightSpec.of(4, "midrise", per_channel=True, channel_axis=1)
    assert (transposed.per_channel, transposed.channel_axis) == (True, 1)
    assert WeightSpec.of(4, "midrise", per_channel=True).channel_axis == 0
    per_tensor = WeightSpec.of(4, "midrise", channel_axis=1)
    assert (per_tensor.per_channel, per_tensor.channel_axis) == (False, None)
    assert WeightSpec.of(4, format="Q0.3", per_channel=True, channel_axis=1).channel_axis == 1


@pytest.mark.parametrize("axis", [-1, True, 1.0])
def test_a_channel_axis_that_is_not_a_weight_axis_is_named(axis):
    with pytest.raises(ValueError, match="channel_axis must be None"):
        WeightSpec(UniformGrid(4), channel_axis=axis)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"scale_rule": "log"}, "scale_rule must be one of"),
        ({"scale_method": "kmeans"}, "scale_method must be one of"),
        ({"scale_rule": "fixed"}, "a step is given exactly for the 'fixed' scale rule, got 'fixed' with step None"),
        ({"step": 0.25}, "a step is given exactly for the 'fixed' scale rule, got 'free' with step 0.25"),
        ({"scale_rule": "fixed", "step": -0.25}, "a fixed step must be positive, got -0.25"),
    ],
)
def test_a_weight_spec_that_contradicts_itself_is_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WeightSpec(UniformGrid(4, "signed"), **kwargs)


def test_an_unknown_weight_grid_kind_is_named():
    with pytest.raises(ValueError, match="weight grid must be one of .* got 'log'"):
        WeightSpec.of(4, "log")
