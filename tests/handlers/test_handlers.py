import json

import pytest
import torch
from ignite.engine import Engine
from monai.engines import SupervisedEvaluator
from monai.networks.nets import UNet

from monai_effq.handlers import (
    QuantizationHandler,
    QuantizationReportHandler,
    QuantizedCheckpointLoader,
    batch_images,
    plot_dice,
    write_comparison,
)
from monai_effq.ptq import QuantizedLayer
from monai_effq.utils.errors import UserInputError


def _evaluator(net, batches):
    return SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=batches, epoch_length=len(batches), network=net)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0).eval()


def test_calibration_handler_swaps_the_quantized_network_into_the_engine(net, tmp_path):
    batches = [{"image": torch.randn(1, 1, 16, 16, 16), "label": torch.zeros(1, 1, 16, 16, 16)} for _ in range(3)]
    evaluator = _evaluator(net, batches)
    handler = QuantizationHandler({"weight_bits": 4, "method": "rtn"}, save_path=tmp_path / "q.pt", max_batches=2, progress=False)
    handler.attach(evaluator)
    handler.attach(evaluator)  # attaching twice is harmless
    QuantizationReportHandler(tmp_path / "eval").attach(evaluator)
    evaluator.run()
    assert any(isinstance(m, QuantizedLayer) for m in evaluator.network.modules())
    assert evaluator.state.quantization.report.layers
    assert (tmp_path / "q.pt").is_file()
    report = json.loads((tmp_path / "eval" / "quantization_report.json").read_text())
    assert report["method"] == "rtn" and len(report["layers"]) == len(evaluator.state.quantization.report.layers)
    assert (tmp_path / "eval" / "quantization_report.csv").is_file()
    assert (tmp_path / "eval" / "quantization_report_layers.png").stat().st_size > 1000


def test_a_second_run_of_the_engine_evaluates_the_quantized_network_instead_of_quantizing_it_again(net, tmp_path, caplog):
    batches = [{"image": torch.randn(1, 1, 16, 16, 16), "label": torch.zeros(1, 1, 16, 16, 16)} for _ in range(2)]
    evaluator = _evaluator(net, batches)
    QuantizationHandler({"weight_bits": 4, "method": "rtn"}, save_path=tmp_path / "q.pt", progress=False).attach(evaluator)
    evaluator.run()
    quantized, written = evaluator.network, (tmp_path / "q.pt").read_bytes()
    evaluator.run()  # as a ValidationHandler runs it every epoch: it stopped with "the network has no quantizable layers"
    assert evaluator.network is quantized and (tmp_path / "q.pt").read_bytes() == written
    assert not any(p.name.endswith(".journal") for p in tmp_path.iterdir())


def test_fewer_calibration_batches_than_max_batches_are_quantized_on_with_a_warning_naming_both(net, caplog):
    batches = [{"image": torch.randn(1, 1, 16, 16, 16), "label": torch.zeros(1, 1, 16, 16, 16)} for _ in range(2)]
    evaluator = _evaluator(net, batches)
    QuantizationHandler({"weight_bits": 4, "method": "rtn"}, max_batches=4, progress=False).attach(evaluator)
    with caplog.at_level("WARNING"):
        evaluator.run()
    assert "max_batches (calibration_cases) is 4, but the evaluator's data gave 2 calibration batch(es)" in caplog.text
    assert evaluator.state.quantization.report.layers


def test_comparison_refuses_one_dice_value_for_several_classes_instead_of_writing_the_mean_as_each(tmp_path):
    e = Engine(lambda e, b: None)
    e.state.metrics = {"dice": torch.tensor(0.85)}  # MeanDice's default reduction="mean"
    with pytest.raises(UserInputError, match=r"evaluator 'FP' reports one Dice value \(0.8500\) for the 2 classes .*reduction='mean_batch'"):
        write_comparison({"FP": e}, ["liver", "tumour"], tmp_path, "cmp")
    assert not (tmp_path / "cmp.csv").exists()
    e.state.metrics = {"dice": torch.tensor([0.85])}
    assert write_comparison({"FP": e}, ["liver"], tmp_path, "cmp")[0]["dice_liver"] == pytest.approx(0.85)  # one class: its value


class _Called(Exception):
    """Raised by a stand-in for quantize once it has seen its arguments."""


@pytest.mark.parametrize("world", [1, 2])
def test_the_calibration_handler_journals_beside_its_checkpoint_in_one_process_and_under_torchrun(net, tmp_path, monkeypatch, world):
    from monai_effq.handlers import quantization

    journals = []

    def stand_in(*_args, journal=None, **_kwargs):
        journals.append(journal)
        raise _Called

    monkeypatch.setattr(quantization, "get_world_size", lambda: world)
    monkeypatch.setattr(quantization, "quantize", stand_in)
    evaluator = _evaluator(net, [{"image": torch.randn(1, 1, 16, 16, 16), "label": torch.zeros(1, 1, 16, 16, 16)}])
    QuantizationHandler({"weight_bits": 4}, save_path=tmp_path / "q.pt", progress=False).attach(evaluator)
    with pytest.raises(_Called):
        evaluator.run()
    assert journals == [tmp_path / "q.pt.journal"]


def test_the_report_file_names_its_checkpoint_and_keeps_the_times_the_checkpoint_leaves_out(net, tmp_path):
    from monai_effq.ptq.checkpoint import verify_checkpoint

    batches = [{"image": torch.randn(1, 1, 16, 16, 16), "label": torch.zeros(1, 1, 16, 16, 16)}]
    evaluator = _evaluator(net, batches)
    QuantizationHandler({"weight_bits": 4, "method": "rtn"}, save_path=tmp_path / "q.pt", progress=False).attach(evaluator)
    QuantizationReportHandler(tmp_path / "eval").attach(evaluator)
    evaluator.run()
    report_path = tmp_path / "eval" / "quantization_report.json"
    fingerprint = verify_checkpoint(tmp_path / "q.pt", fp_network=net, report=report_path)
    report = json.loads(report_path.read_text())
    assert report["provenance"]["checkpoint"] == fingerprint and report["provenance"]["created"]
    assert report["wall_seconds"] > 0 and all(r["seconds"] > 0 for r in report["layers"])


def test_checkpoint_loader_replaces_the_fp_network_when_the_engine_starts(net, tmp_path):
    batches = [{"image": torch.randn(1, 1, 16, 16, 16), "label": torch.zeros(1, 1, 16, 16, 16)}]
    calibrator = _evaluator(net, batches)
    QuantizationHandler({"weight_bits": 4}, save_path=tmp_path / "q.pt", progress=False).attach(calibrator)
    calibrator.run()
    evaluator = _evaluator(UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0), batches)
    QuantizedCheckpointLoader(tmp_path / "q.pt").attach(evaluator)
    x = torch.randn(1, 1, 16, 16, 16)
    for _ in range(2):  # a ValidationHandler runs its evaluator again every validation epoch
        evaluator.run()
        with torch.no_grad():
            assert torch.equal(evaluator.network(x), calibrator.network(x))


def test_only_rank_zero_writes_the_quantization_report(net, tmp_path, monkeypatch):
    import monai_effq.handlers.report as report_module

    batches = [{"image": torch.randn(1, 1, 16, 16, 16), "label": torch.zeros(1, 1, 16, 16, 16)}]
    evaluator = _evaluator(net, batches)
    QuantizationHandler({"weight_bits": 4, "method": "rtn"}, progress=False).attach(evaluator)
    QuantizationReportHandler(tmp_path / "eval").attach(evaluator)
    monkeypatch.setattr(report_module, "is_rank_zero", lambda: False)
    evaluator.run()
    assert evaluator.state.quantization is not None and not (tmp_path / "eval").exists()


def test_batch_images_reads_collated_and_decollated_batches():
    collated = {"image": torch.ones(2, 1, 4, 4, 4)}
    decollated = [{"image": torch.ones(1, 4, 4, 4)}, {"image": torch.zeros(1, 4, 4, 4)}]
    assert batch_images(collated).shape == (2, 1, 4, 4, 4)
    assert batch_images(decollated).shape == (2, 1, 4, 4, 4)


def test_a_config_given_as_text_is_refused_naming_what_the_handler_takes():
    with pytest.raises(UserInputError, match="config must be an EfficientQConfig or a dict of its settings, got 'w4a8'"):
        QuantizationHandler("w4a8")


def test_an_empty_calibration_loader_is_refused_when_the_handler_is_attached(net):
    # MONAI's evaluator skips an empty loader and reports success: the handler must refuse it first
    evaluator = _evaluator(net, [])
    handler = QuantizationHandler(progress=False)
    with pytest.raises(UserInputError, match="calibration data loader is empty"):
        handler.attach(evaluator)
    with pytest.raises(UserInputError, match="no calibration batch"):
        handler(evaluator)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"body_mask": "brain"}, "body_mask must be 'nonzero' or None, got 'brain'"),
        ({"task": "segmentation"}, r"task must be one of \('multiclass', 'multilabel'\), got 'segmentation'"),
        ({"roi_size": "96"}, r"roi_size must be a window size or a list of them such as \[96,96,96\]"),
        ({"roi_size": [96, 0, 96]}, r"each roi_size must be a positive window size or -1 \(the whole axis\), got 0"),
        pytest.param(
            {"config": {"device": "mps"}},
            "device 'mps' was asked for but this machine has no Apple GPU",
            marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an Apple GPU"),
        ),
    ],
)
def test_calibration_handler_settings_are_checked_when_it_is_made(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        QuantizationHandler(progress=False, **kwargs)


def test_report_handler_needs_a_quantization_result(tmp_path):
    engine = Engine(lambda e, b: None)
    handler = QuantizationReportHandler(tmp_path)
    handler.attach(engine)
    with pytest.raises(RuntimeError, match="attach QuantizationHandler"):
        handler(engine)


def test_comparison_writes_per_class_dice_for_each_model(tmp_path, capsys):
    engines = {}
    for name, dice in (("FP32", [0.9, 0.8]), ("W4A8", [0.89, 0.78])):
        e = Engine(lambda e, b: None)
        e.state.metrics = {"dice": torch.tensor(dice), "hd95": torch.tensor([3.0, 4.0])}
        engines[name] = e
    rows = write_comparison(engines, ["liver", "tumour"], tmp_path, "cmp")
    assert rows[1]["dice_tumour"] == pytest.approx(0.78)
    assert rows[0]["dice_mean"] == pytest.approx(0.85)
    assert (tmp_path / "cmp.csv").read_text().splitlines()[0].startswith("model,dice_liver,dice_tumour")
    assert (tmp_path / "cmp_dice.png").is_file()
    assert "W4A8" in capsys.readouterr().out


def test_an_hd95_of_a_class_never_predicted_is_written_as_json_null_not_infinity(tmp_path):
    e = Engine(lambda e, b: None)
    e.state.metrics = {"dice": torch.tensor([0.9, 0.0]), "hd95": torch.tensor([3.0, float("inf")])}
    write_comparison({"W2A4": e}, ["liver", "tumour"], tmp_path, "cmp")

    def not_json(constant):
        raise ValueError(f"{constant} is not JSON")

    row = json.loads((tmp_path / "cmp.json").read_text(), parse_constant=not_json)[0]
    assert row["hd95_tumour"] is None and row["hd95_liver"] == 3.0


def test_comparison_refuses_more_dice_values_than_class_names_instead_of_mislabelling_columns(tmp_path):
    e = Engine(lambda e, b: None)
    e.state.metrics = {"dice": torch.tensor([0.99, 0.9, 0.8])}  # MeanDice(include_background=True): background first
    expected = (
        r"evaluator 'FP' reports 3 Dice values but 2 class names were given \(\['liver', 'tumour'\]\): name every "
        r"channel, or compute Dice with include_background=False\."
    )
    with pytest.raises(UserInputError, match=expected):
        write_comparison({"FP": e}, ["liver", "tumour"], tmp_path, "cmp")
    e.state.metrics = {"dice": torch.tensor([0.9, 0.8]), "hd95": torch.tensor([1.0, 3.0, 4.0])}
    with pytest.raises(UserInputError, match=r"evaluator 'FP' reports 3 HD95 values but 2 class names"):
        write_comparison({"FP": e}, ["liver", "tumour"], tmp_path, "cmp")
    assert not (tmp_path / "cmp.csv").exists()


def test_comparison_names_the_metrics_of_an_evaluator_without_dice(tmp_path):
    e = Engine(lambda e, b: None)
    e.state.metrics = {"Mean_Dice": torch.tensor([0.9, 0.8])}
    with pytest.raises(UserInputError, match=r"evaluator 'FP' has no 'dice' metric \(it has \['Mean_Dice'\]\): name its MeanDice 'dice'\."):
        write_comparison({"FP": e}, ["liver", "tumour"], tmp_path, "cmp")


def test_the_dice_plot_axis_spans_the_values_so_small_differences_show():
    from monai_effq.handlers.report import dice_axis_limits

    bottom, top = dice_axis_limits([0.988, 0.981, 0.915])
    assert 0.8 < bottom < 0.915 and 0.988 < top <= 1.05
    assert dice_axis_limits([0.2, 0.9])[0] == 0.0  # a wide spread keeps the axis from 0
    low, high = dice_axis_limits([0.95, 0.95])
    assert low < 0.95 < high  # equal values still get a visible range


def test_the_comparison_logs_the_files_it_wrote(tmp_path, caplog):
    e = Engine(lambda e, b: None)
    e.state.metrics = {"dice": torch.tensor([0.9, 0.8])}
    with caplog.at_level("INFO", logger="monai_effq.handlers.report"):
        write_comparison({"FP32": e}, ["liver", "tumour"], tmp_path, "cmp")
    assert str(tmp_path / "cmp.csv") in caplog.text


def test_the_plots_leave_the_callers_matplotlib_backend_as_it_was(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    plt.switch_backend("svg")  # a notebook's inline backend, say
    try:
        path = plot_dice({"FP32": {"liver": 0.9, "tumour": 0.7}, "W4A8": {"liver": 0.89, "tumour": 0.68}}, tmp_path / "d.png")
        assert matplotlib.get_backend() == "svg"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        plt.switch_backend(before)


def _one_hot(labels: list[list[int]]) -> torch.Tensor:
    """One-hot (background, liver, tumour) cases of 2x2x2 voxels from each case's voxel labels."""
    t = torch.tensor(labels).reshape(len(labels), 2, 2, 2)
    return torch.nn.functional.one_hot(t, 3).permute(0, 4, 1, 2, 3).float()


def _evaluated(pred: torch.Tensor, label: torch.Tensor, **metrics) -> Engine:
    """An engine that ran MONAI's metric handlers (their per-case details as MONAI keeps them) over the cases."""
    engine = Engine(lambda e, b: b)
    for name, metric in metrics.items():
        metric.attach(engine, name)
    engine.run([{"pred": pred, "label": label}], max_epochs=1)
    return engine


def test_a_class_no_case_holds_is_reported_as_not_measured_and_left_out_of_the_mean(tmp_path):
    from monai.handlers import MeanDice, from_engine

    label = _one_hot([[0, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 0]])  # two livers without tumour
    pred = _one_hot([[0, 1, 1, 1, 1, 1, 0, 2], [0, 0, 1, 1, 1, 1, 1, 0]])  # a false tumour voxel in the first
    dice = MeanDice(include_background=False, reduction="mean_batch", output_transform=from_engine(["pred", "label"]))
    row = write_comparison({"W4A8": _evaluated(pred, label, dice=dice)}, ["liver", "tumour"], tmp_path, "cmp")[0]
    # MONAI's mean_batch turns a class every case skipped into 0: a tumour Dice of 0 and a mean halved
    assert row["dice_liver"] == pytest.approx(1.0)
    assert row["dice_tumour"] != row["dice_tumour"] and row["dice_mean"] == pytest.approx(row["dice_liver"])
    assert json.loads((tmp_path / "cmp.json").read_text())[0]["dice_tumour"] is None


def test_the_agreement_counts_a_class_both_networks_leave_out_as_agreeing_and_a_false_one_as_not():
    from monai.handlers import MeanDice

    from monai_effq.handlers import REFERENCE_KEY
    from monai_effq.overlays import agreement_metric

    fp = _one_hot([[0, 1, 1, 1, 1, 1, 0, 0]])
    for quantized, expected in ((fp, 1.0), (_one_hot([[0, 1, 1, 1, 1, 1, 0, 2]]), 0.5)):
        engine = Engine(lambda e, b: b)
        agreement_metric({"mean_dice": MeanDice(include_background=False)}).attach(engine, "fp_agreement")
        engine.run([{"pred": quantized, REFERENCE_KEY: fp}], max_epochs=1)
        assert float(engine.state.metrics["fp_agreement"]) == pytest.approx(expected)


def test_a_comparison_stopped_before_its_plot_leaves_no_plot_of_earlier_figures(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from monai_effq.handlers import report

    e = Engine(lambda e, b: None)
    e.state.metrics = {"dice": torch.tensor([0.5, 0.4])}
    write_comparison({"FP": e}, ["liver", "tumour"], tmp_path, "cmp")
    assert (tmp_path / "cmp_dice.png").is_file()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "plot_dice", killed)
    e.state.metrics = {"dice": torch.tensor([0.9, 0.8])}
    with pytest.raises(KeyboardInterrupt):
        write_comparison({"FP": e}, ["liver", "tumour"], tmp_path, "cmp")
    assert json.loads((tmp_path / "cmp.json").read_text())[0]["dice_liver"] == pytest.approx(0.9)
    assert not (tmp_path / "cmp_dice.png").exists()


def test_a_checkpoint_loader_for_a_device_this_machine_lacks_is_refused_when_made(net, tmp_path, monkeypatch):
    from monai_effq import save_quantized
    from monai_effq.ptq.pipeline import quantize

    path = save_quantized(quantize(net, torch.randn(1, 1, 16, 16, 16), {"method": "rtn"}, progress=False), tmp_path / "q.pt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # torch's "Torch not compiled with CUDA enabled" assertion came when the engine started
    with pytest.raises(UserInputError, match=r"device 'cuda' was asked for but this machine has no CUDA GPU"):
        QuantizedCheckpointLoader(path, map_location="cuda")
