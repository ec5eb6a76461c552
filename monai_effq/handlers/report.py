"""Reports of a quantization run and of an FP-vs-quantized evaluation: JSON, CSV and PNG plots."""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from monai_effq.ptq.checkpoint import report_provenance
from monai_effq.ptq.report import QuantizationReport
from monai_effq.utils.distributed import is_rank_zero
from monai_effq.utils.errors import UserInputError
from monai_effq.utils.io import atomic_write, atomic_write_text, json_text

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
# a Figure of its own, not pyplot: pyplot would switch the caller's backend (a notebook's inline plots) to Agg
Figure, _has_plt = optional_import("matplotlib.figure", name="Figure")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = [
    "QuantizationReportHandler",
    "dice_axis_limits",
    "plot_finetune_loss",
    "plot_layer_errors",
    "plot_dice",
    "write_comparison",
    "format_table",
]

logger = logging.getLogger(__name__)


def _save_figure(fig: Any, path: Path) -> Path:
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_layer_errors(report: QuantizationReport, path: str | Path) -> Path | None:
    """Bar plot of each layer's output error: round-to-nearest vs the solution (log scale).

    Args:
        report: the quantization report.
        path: the PNG to write.

    Returns:
        the path, or ``None`` when matplotlib is not installed.
    """
    if not _has_plt:
        return None
    names = [r.name for r in report.layers]
    fig = Figure(figsize=(max(6, 0.28 * len(names)), 4))
    ax = fig.subplots()
    xs = range(len(names))
    finite = [v for r in report.layers for v in (r.mse, r.mse_rtn) if math.isfinite(v) and v > 0]
    floor = min(finite) / 10 if finite else 1e-12
    # A layer that 8 bits reproduces exactly has error 0, which a log axis cannot show: floor it.
    shown = lambda v: v if math.isfinite(v) and v > floor else floor  # noqa: E731
    ax.bar([x - 0.2 for x in xs], [shown(r.mse_rtn) for r in report.layers], width=0.4, label="round to nearest")
    ax.bar([x + 0.2 for x in xs], [shown(r.mse) for r in report.layers], width=0.4, label=report.method)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("weighted output MSE of the layer")
    ax.set_title(f"Per-layer error before/after ({report.compression:.1f}x smaller)")
    ax.legend()
    return _save_figure(fig, Path(path))


def plot_finetune_loss(report: QuantizationReport, path: str | Path) -> Path | None:
    """Line plot of the training loss of a quantization-aware fine-tune (``report.extra["finetune"]``).

    Args:
        report: the report of a fine-tuned result.
        path: the PNG to write.

    Returns:
        the path, or ``None`` when matplotlib is missing or the report has no losses.
    """
    losses = report.extra.get("finetune", {}).get("losses")
    if not _has_plt or not losses:
        return None
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"Quantization-aware fine-tuning ({report.method}, {report.weight_compression:.1f}x smaller weights)")
    return _save_figure(fig, Path(path))


def plot_dice(table: dict[str, dict[str, float]], path: str | Path) -> Path | None:
    """Grouped bars of Dice per class for each model (FP, quantized, ...), each bar labelled with its value.

    The y axis spans the values with a margin (see :func:`dice_axis_limits`), not 0 to 1: Dice of
    0.981 and 0.988 would otherwise be bars of the same height.

    Args:
        table: model name → class name → Dice.
        path: the PNG to write.

    Returns:
        the path, or ``None`` when matplotlib is not installed.
    """
    if not _has_plt:
        return None
    models = list(table)
    classes = list(next(iter(table.values())))
    fig = Figure(figsize=(1.5 + 1.2 * len(classes) * len(models) / 2, 3.5))
    ax = fig.subplots()
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        bars = ax.bar([c + i * width for c in range(len(classes))], [table[model][k] for k in classes], width=width, label=model)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, rotation=90, padding=2)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(classes))])
    ax.set_xticklabels(classes)
    ax.set_ylim(*dice_axis_limits([table[m][k] for m in models for k in classes]))
    ax.set_ylabel("Dice")
    ax.legend(fontsize=8, loc="lower right")
    return _save_figure(fig, Path(path))


def dice_axis_limits(values: list[float]) -> tuple[float, float]:
    """The y range of a Dice plot: the values' span, widened so labels fit, within [0, 1.05].

    Args:
        values: the Dice values to show.

    Returns:
        ``(bottom, top)``: bottom 1.5 spans below the smallest value (at least 0.01) but not below 0,
        top one span above the largest but not above 1.05.
    """
    finite = [v for v in values if math.isfinite(v)] or [0.0, 1.0]
    low, high = min(finite), max(finite)
    span = max(high - low, 0.01)
    bottom = max(0.0, low - 1.5 * span)
    top = min(1.05, high + 1.0 * span)
    return bottom, max(top, high + 1e-3)


class QuantizationReportHandler:
    """Writes the quantization report (JSON, CSV) and the per-layer error plot when a run completes.

    The JSON holds the run's times and memory, which checkpoints leave out, and under ``"provenance"``
    the fingerprint of the checkpoint of this result (:func:`monai_effq.ptq.checkpoint.verify_checkpoint`
    compares them), the library versions and the date.

    Reads ``engine.state.quantization`` (set by :class:`QuantizationHandler`, attach that first).

    Args:
        output_dir: the bundle's output folder.
        stem: file name stem of the report files.
    """

    def __init__(self, output_dir: str | Path, stem: str = "quantization_report") -> None:
        self.output_dir = Path(output_dir)
        self.stem = stem

    def attach(self, engine: Engine) -> None:
        """Register on ``engine`` (attaching twice is harmless)."""
        self.logger = engine.logger
        if not engine.has_event_handler(self, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Write the files."""
        result = getattr(engine.state, "quantization", None)
        if result is None:
            raise RuntimeError("no quantization result on the engine: attach QuantizationHandler before this handler.")
        if not is_rank_zero():  # every rank holds the same result (as the checkpoint, written once)
            return
        layers_png = self.output_dir / f"{self.stem}_layers.png"
        curve_png = self.output_dir / f"{self.stem}_finetune_loss.png"
        _remove_earlier_plots(layers_png, curve_png)
        # the checkpoint's fingerprint lets evaluation tell this report from one an unfinished run left
        paths = list(result.report.save(self.output_dir, self.stem, provenance=report_provenance(result)))
        png = plot_layer_errors(result.report, layers_png)
        if png is not None:
            paths.append(png)
        curve = plot_finetune_loss(result.report, curve_png)
        if curve is not None:
            paths.append(curve)
        self.logger.info(f"quantization report written: {', '.join(str(p) for p in paths)}")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of a list of flat dicts (every key of any row; blank where a row has none)."""
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else "" if v is None else str(v)  # noqa: E731
    cells = [[k for k in keys]] + [[cell(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(keys))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _remove_earlier_plots(*paths: Path) -> None:
    """Remove an earlier run's plots before new figures are written: each file is written whole, but a run
    stopped between its tables and its plots would leave the earlier figures' plot beside the new tables."""
    for path in paths:
        path.unlink(missing_ok=True)


def _metric_per_class(value: Any, classes: list[str], model: str, metric: str) -> list[float]:
    """One value per class of an evaluator's metric.

    Raises:
        UserInputError: when the metric has another number of values than there are classes: zipped with
            the names, the values would be silently cut and the columns mislabelled; one value for several
            classes (``reduction="mean"``) would fill every class's column with the mean.
    """
    t = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    if t.numel() == 1 and len(classes) > 1:
        raise UserInputError(
            f"evaluator {model!r} reports one {metric} value ({float(t):.4f}) for the {len(classes)} classes "
            f"{list(classes)}: its metric averages them (MONAI's default reduction='mean'), so every class's column "
            f"would show the mean; compute {metric} with reduction='mean_batch' (this run's figure is in its log)."
        )
    if t.numel() != len(classes):
        raise UserInputError(
            f"evaluator {model!r} reports {t.numel()} {metric} values but {len(classes)} class names were given "
            f"({list(classes)}): name every channel, or compute {metric} with include_background=False."
        )
    return [float(v) for v in t]


def _unscored_as_nan(values: list[float], engine: Engine, metric: str) -> list[float]:
    """The values with NaN for each class that no case scored, as the metric's per-case details show.

    MONAI's metrics give a case without a class in its ground truth NaN for that class (``ignore_empty``), and
    their ``mean_batch`` reduction turns a class whose every case is NaN into 0: a Dice of 0 and an HD95 of
    0 mm would read as a failed and a perfect class where nothing was measured. The details (``save_details``,
    MONAI's default) are every rank's cases; without them the values stay as reduced.
    """
    details = (getattr(engine.state, "metric_details", None) or {}).get(metric)
    if not isinstance(details, torch.Tensor) or details.ndim != 2 or details.shape[1] != len(values):
        return values
    scored = (~torch.isnan(details.detach().cpu().to(torch.float64))).sum(0)
    return [v if int(n) else math.nan for v, n in zip(values, scored)]


def _mean_of_scored(values: list[float]) -> float:
    """The mean of the values that are numbers (the classes some case scored); NaN when none is."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def write_comparison(
    evaluators: dict[str, Engine],
    class_names: list[str],
    output_dir: str | Path,
    stem: str = "evaluation",
    extra: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Collect Dice and HD95 per class from evaluators that ran, write CSV/JSON/PNG, print a table.

    Each evaluator must have ``"dice"`` and (optionally) ``"hd95"`` in ``engine.state.metrics``
    (MONAI ``MeanDice``/``HausdorffDistance`` with ``reduction="mean_batch"``). One with
    ``"fp_agreement"`` (a ``MeanDice`` of its predictions against the FP network's, see
    :class:`~monai_effq.handlers.ReferencePrediction`) gets that column too. A class no case scored (no
    case's ground truth holds it, as the metric's per-case details show) is NaN, written ``null`` in the
    JSON, and ``dice_mean`` averages the classes that were scored.

    Under ``torchrun`` every rank calls this with the same figures (MONAI's metrics gather every
    rank's cases before they reduce them); only rank 0 writes and prints.

    Args:
        evaluators: model name (e.g. ``"FP"``, ``"W4A8"``) → evaluator that has run.
        class_names: the output channels' names (e.g. TC, WT, ET).
        output_dir: folder for ``<stem>.csv``, ``<stem>.json`` and ``<stem>_dice.png``.
        stem: file name stem.
        extra: model name → further columns (e.g. size in MiB, seconds).

    Returns:
        one row per model.

    Raises:
        UserInputError: when an evaluator has no ``"dice"`` metric, or its Dice or HD95 has another number
            of values than ``class_names`` (a ``MeanDice`` that includes the background), naming it.
    """
    rows = []
    dice_table: dict[str, dict[str, float]] = {}
    for model, engine in evaluators.items():
        metrics = engine.state.metrics
        if "dice" not in metrics:
            raise UserInputError(
                f"evaluator {model!r} has no 'dice' metric (it has {sorted(metrics)}): name its MeanDice 'dice'."
            )
        dice = _unscored_as_nan(_metric_per_class(metrics["dice"], class_names, model, "Dice"), engine, "dice")
        row: dict[str, Any] = {"model": model}
        for name, d in zip(class_names, dice):
            row[f"dice_{name}"] = d
        row["dice_mean"] = _mean_of_scored(dice)
        if "hd95" in metrics:
            hd95 = _unscored_as_nan(_metric_per_class(metrics["hd95"], class_names, model, "HD95"), engine, "hd95")
            for name, h in zip(class_names, hd95):
                row[f"hd95_{name}"] = h
        if "fp_agreement" in metrics:
            agreement = [float(v) for v in torch.as_tensor(metrics["fp_agreement"], dtype=torch.float64).reshape(-1)]
            if len(agreement) == len(class_names):
                agreement = _unscored_as_nan(agreement, engine, "fp_agreement")
            row["fp_agreement"] = _mean_of_scored(agreement)
        row.update((extra or {}).get(model, {}))
        rows.append(row)
        dice_table[model] = dict(zip(class_names, dice))
    if not is_rank_zero():
        return rows
    out = Path(output_dir)
    buf = io.StringIO()
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    _remove_earlier_plots(out / f"{stem}_dice.png")
    atomic_write_text(out / f"{stem}.csv", buf.getvalue())
    atomic_write_text(out / f"{stem}.json", json_text(rows))
    plot = plot_dice(dice_table, out / f"{stem}_dice.png")
    print(format_table(rows), flush=True)
    written = [out / f"{stem}.csv", out / f"{stem}.json", *([plot] if plot is not None else [])]
    logger.info(f"evaluation written: {', '.join(str(p) for p in written)}")
    return rows
