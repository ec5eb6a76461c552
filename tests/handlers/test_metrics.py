"""HD95 in millimetres: each case's distances with the voxel spacing of its own affine."""

import json
import re

import pytest
import torch
from ignite.engine import Engine
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


@pytest.mark.parametrize("name", list(BUNDLES))
def test_every_per_case_table_a_bundle_writes_is_written_whole(name):
    configs = sorted((ROOT / "bundles" / name / "configs").glob("*.json"))
    savers = [t for c in configs for t in re.findall(r'"_target_": "([^"]*MetricsSaver)"', c.read_text())]
    assert savers and set(savers) == {"monai_effq.handlers.AtomicMetricsSaver"}


def test_ignite_hands_the_handler_one_case_at_a_time_and_its_affine_still_gives_the_spacing():
    pred, label = _shifted_cube((2.0, 1.0, 1.0), axis=0, shift=3)
    engine = Engine(lambda e, b: {"pred": [pred, pred], "label": [label, label]})  # decollated items, as an evaluator's
    handler = HausdorffDistanceMm(
        include_background=True, percentile=95, reduction="mean_batch", output_transform=lambda o: (o["pred"], o["label"])
    )
    handler.attach(engine, "hd95")
    engine.run([0], max_epochs=1)
    assert engine.state.metrics["hd95"] == pytest.approx(6.0)
    assert engine.state.metric_details["hd95"].flatten().tolist() == pytest.approx([6.0, 6.0])


def _evaluated_cases(saver_cls, save_dir) -> Engine:
    """An engine that measures Dice on two cases, with ``saver_cls`` saving each case's figure to ``save_dir``."""
    from monai.handlers import MeanDice

    pred, label = _shifted_cube((1.0, 1.0, 1.0), axis=0, shift=1)
    batches = [{"image_meta_dict": {"filename_or_obj": [f"case{i}.nii.gz"]}} for i in range(2)]
    engine = Engine(lambda e, b: {"pred": [pred], "label": [label]})
    MeanDice(output_transform=lambda o: (o["pred"], o["label"])).attach(engine, "dice")
    saver_cls(save_dir=str(save_dir), metrics=None, metric_details=["dice"], batch_transform=lambda b: b["image_meta_dict"]).attach(engine)
    engine.run(batches, max_epochs=1)
    return engine


def test_the_atomic_saver_writes_the_files_monai_writes_and_leaves_the_folders_other_files_alone(tmp_path):
    from monai.handlers import MetricsSaver

    from monai_effq.handlers import AtomicMetricsSaver

    _evaluated_cases(MetricsSaver, tmp_path / "monai")
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "case0_seg.nii.gz").write_text("mask")
    _evaluated_cases(AtomicMetricsSaver, tmp_path / "ours")
    theirs = {p.name: p.read_text() for p in (tmp_path / "monai").iterdir()}
    ours = {p.name: p.read_text() for p in (tmp_path / "ours").iterdir()}
    assert ours.pop("case0_seg.nii.gz") == "mask"
    assert ours == theirs and "case1.nii.gz" in ours["dice_raw.csv"]


def test_a_report_interrupted_mid_table_is_not_left_looking_whole(tmp_path, monkeypatch):
    import monai.handlers.metrics_saver as metrics_saver

    from monai_effq.handlers import AtomicMetricsSaver

    # MONAI's MetricsSaver leaves this one-row dice_raw.csv behind (checked when this test was written)
    def killed_after_the_first_row(save_dir, images, metrics, metric_details, **kwargs):
        with open(f"{save_dir}/dice_raw.csv", "w") as f:
            f.write(f"filename,class0\n{images[0]},0.8\n")
        raise KeyboardInterrupt  # Ctrl-C before the second case's row

    monkeypatch.setattr(metrics_saver, "write_metrics_reports", killed_after_the_first_row)
    with pytest.raises(KeyboardInterrupt):
        _evaluated_cases(AtomicMetricsSaver, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_rank_that_does_not_save_writes_nothing_not_even_the_folder(tmp_path, monkeypatch):
    import ignite.distributed as idist

    from monai_effq.handlers import AtomicMetricsSaver

    monkeypatch.setattr(idist, "get_rank", lambda: 1)  # rank 1; the saver saves on rank 0
    _evaluated_cases(AtomicMetricsSaver, tmp_path / "reports")
    assert not (tmp_path / "reports").exists()
