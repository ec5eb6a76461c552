"""HD95 in millimetres: each case's distances with the voxel spacing of its own affine."""

import json

import pytest
import torch
from monai.data import MetaTensor, list_data_collate
from monai.handlers import HausdorffDistance
from monai.utils import optional_import

from monai_effq.handlers import HausdorffDistanceMm, voxel_spacing

from ..bundles.conftest import BUNDLES, ROOT


def _shifted_cube(spacing: tuple[float, float, float], axis: int, shift: int) -> tuple[MetaTensor, MetaTensor]:
    """A one-channel cube label and a prediction of it moved ``shift`` voxels along spatial ``axis``, on a grid of ``spacing``."""
    label = torch.zeros(1, 20, 20, 20)
    label[0, 5:10, 5:10, 5:10] = 1
    pred = torch.roll(label, shift, dims=1 + axis)
    affine = torch.diag(torch.tensor([*spacing, 1.0]))
    return MetaTensor(pred, affine=affine), MetaTensor(label, affine=affine)


def _hd95(handler_cls, output) -> float:
    handler = handler_cls(include_background=True, percentile=95, reduction="mean_batch", save_details=False)
    handler.reset()
    handler.update(output)
    return float(handler.compute())


def test_each_case_is_measured_in_the_millimetres_of_its_own_voxels_where_monai_measures_voxels():
    wide = _shifted_cube((2.0, 1.0, 1.0), axis=0, shift=3)  # 3 voxels of 2 mm
    thick = _shifted_cube((0.7, 0.7, 5.0), axis=2, shift=3)  # 3 slices of 5 mm
    preds, labels = [wide[0], thick[0]], [wide[1], thick[1]]
    assert _hd95(HausdorffDistance, [preds, labels]) == pytest.approx(3.0)
    assert _hd95(HausdorffDistanceMm, [[wide[0]], [wide[1]]]) == pytest.approx(6.0)
    assert _hd95(HausdorffDistanceMm, [[thick[0]], [thick[1]]]) == pytest.approx(15.0)
    assert _hd95(HausdorffDistanceMm, [preds, labels]) == pytest.approx((6.0 + 15.0) / 2)


def test_a_collated_batch_is_measured_case_by_case_and_plain_tensors_in_voxels():
    pred, label = _shifted_cube((2.0, 1.0, 1.0), axis=0, shift=3)
    batch = list_data_collate([{"pred": pred, "label": label}] * 2)
    assert _hd95(HausdorffDistanceMm, [batch["pred"], batch["label"]]) == pytest.approx(6.0)
    assert _hd95(HausdorffDistanceMm, [batch["pred"].as_tensor(), batch["label"].as_tensor()]) == pytest.approx(3.0)
    assert voxel_spacing(pred) == [2.0, 1.0, 1.0] and voxel_spacing(pred.as_tensor()) is None
    with pytest.raises(ValueError, match="one .C, .spatial. case"):
        voxel_spacing(batch["pred"])
    # a plain prediction is on its label's grid: the label's spacing
    assert _hd95(HausdorffDistanceMm, [[pred.as_tensor()], [label]]) == pytest.approx(6.0)


def test_an_output_without_a_label_or_with_uneven_cases_is_an_error():
    pred, label = _shifted_cube((1.0, 1.0, 1.0), axis=0, shift=1)
    handler = HausdorffDistanceMm(save_details=False)
    with pytest.raises(ValueError, match="length 2"):
        handler.update([[pred]])
    with pytest.raises(ValueError, match="2 predictions and 1 labels"):
        handler.update([[pred, pred], [label]])


@pytest.mark.parametrize("name", list(BUNDLES))
def test_both_bundles_report_hd95_in_millimetres(name):
    locate, _ = optional_import("pydoc", name="locate")
    metrics = json.loads((ROOT / "bundles" / name / "configs" / "train.json").read_text())["validate"]["additional_metrics"]
    assert locate(metrics["hd95"]["_target_"]) is HausdorffDistanceMm


def test_ignite_hands_the_handler_one_case_at_a_time_and_its_affine_still_gives_the_spacing():
    from ignite.engine import Engine

    pred, label = _shifted_cube((2.0, 1.0, 1.0), axis=0, shift=3)
    engine = Engine(lambda e, b: {"pred": [pred, pred], "label": [label, label]})  # decollated items, as an evaluator's
    handler = HausdorffDistanceMm(
        include_background=True, percentile=95, reduction="mean_batch", output_transform=lambda o: (o["pred"], o["label"])
    )
    handler.attach(engine, "hd95")
    engine.run([0], max_epochs=1)
    assert engine.state.metrics["hd95"] == pytest.approx(6.0)
    assert engine.state.metric_details["hd95"].flatten().tolist() == pytest.approx([6.0, 6.0])
