"""The main job on the embedded demo: quantize each bundle's network, evaluate FP vs quantized, print a table.

Runs the bundles' own ``quantize`` and ``evaluate`` workflows (``monai.bundle.run``, the same code
as ``python -m monai.bundle run ...``) for each bit width, then prints Dice per class, model size
and quantization time, writes the table to ``docs/results.md`` and into the README between its
results markers, and records the mean Dice in each bundle's metadata (``eval_metrics``).

Usage::

    python -m monai_effq.demo                      # both bundles, W4A8 and W2A8
    python -m monai_effq.demo --bundles lits_effq --weight-bits 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from monai_effq.utils.io import atomic_write_text

__all__ = ["run_demo", "publish", "publish_per_bundle", "record_eval_metrics", "main"]

ROOT = Path(__file__).resolve().parents[1]
MARK_START, MARK_END = "<!-- results:start -->", "<!-- results:end -->"


def _run(bundle: str, workflow: str, **overrides) -> float:
    from monai.bundle import run

    configs = ROOT / "bundles" / bundle / "configs"
    t0 = time.perf_counter()
    # model-zoo layout: each workflow overlays the bundle's train.json
    run(workflow, config_file=[str(configs / "train.json"), str(configs / f"{workflow}.json")], **overrides)
    return time.perf_counter() - t0


def run_demo(bundles: list[str], weight_bits: list[int], act_bits: int = 8) -> list[dict]:
    """Quantize and evaluate each bundle at each bit width; return one row per bundle and model.

    Args:
        bundles: bundle folder names under ``bundles/``.
        weight_bits: weight bit widths to quantize to.
        act_bits: activation bits.

    Returns:
        rows with the bundle, model, Dice per class, mean Dice, size and quantization time.
    """
    rows = []
    for bundle in bundles:
        root = ROOT / "bundles" / bundle
        overrides = {"bundle_root": str(root)}
        fp_row = None
        for bits in weight_bits:
            tag = f"w{bits}a{act_bits}"
            q_seconds = _run(bundle, "quantize", weight_bits=bits, act_bits=act_bits, **overrides)
            _run(bundle, "evaluate", weight_bits=bits, act_bits=act_bits, **overrides)
            evaluation = json.loads((root / "eval" / f"evaluation_{tag}.json").read_text())
            report = json.loads((root / "eval" / f"quantization_report_{tag}.json").read_text())
            fp, q = evaluation
            if fp_row is None:
                fp_row = {"bundle": bundle, **fp, "size_MiB": report["fp_bytes"] / 2**20, "quantize_s": 0.0}
                rows.append(fp_row)
            rows.append({"bundle": bundle, **q, "size_MiB": report["quantized_bytes"] / 2**20, "quantize_s": q_seconds})
    return rows


def results_markdown(rows: list[dict]) -> str:
    """A Markdown table per bundle (the classes differ between bundles)."""
    out = []
    for bundle in dict.fromkeys(r["bundle"] for r in rows):
        part = [r for r in rows if r["bundle"] == bundle]
        cols = ["model", *[k for k in part[0] if k.startswith("dice_")], "size_MiB", "quantize_s"]
        out.append(f"**{bundle}** (demo validation cases, sliding-window evaluate)\n")
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        for r in part:
            cells = [f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _replace_between_markers(path: Path, markdown: str) -> bool:
    """Rewrite the text between the results markers of ``path``; ``False`` when it has none."""
    if not path.is_file():
        return False
    text = path.read_text()
    if MARK_START not in text or MARK_END not in text:
        return False
    head, rest = text.split(MARK_START, 1)
    _, tail = rest.split(MARK_END, 1)
    atomic_write_text(path, f"{head}{MARK_START}\n{markdown}\n{MARK_END}{tail}")
    return True


def publish(markdown: str) -> None:
    """Write the demo table into ``docs/results.md`` and the README, between their results markers.

    Other sections of ``docs/results.md`` (e.g. the QAT benchmark) are kept; a file without the
    markers is written afresh.
    """
    results = ROOT / "docs" / "results.md"
    if not _replace_between_markers(results, markdown):
        atomic_write_text(
            results, f"# Demo results\n\nWritten by `python -m monai_effq.demo`.\n\n{MARK_START}\n{markdown}\n{MARK_END}\n"
        )
    _replace_between_markers(ROOT / "README.md", markdown)


def publish_per_bundle(rows: list[dict]) -> None:
    """Write each bundle's own table into its ``docs/README.md`` (the model-zoo Performance section).

    Args:
        rows: :func:`run_demo`'s rows.
    """
    for bundle in dict.fromkeys(r["bundle"] for r in rows):
        _replace_between_markers(ROOT / "bundles" / bundle / "docs" / "README.md", results_markdown([r for r in rows if r["bundle"] == bundle]))


def record_eval_metrics(rows: list[dict]) -> None:
    """Write each bundle's measured mean Dice into its ``configs/metadata.json`` ``eval_metrics``.

    Args:
        rows: :func:`run_demo`'s rows; keys become ``mean_dice_<model>`` (e.g. ``mean_dice_w4a8``).
    """
    for bundle in dict.fromkeys(r["bundle"] for r in rows):
        path = ROOT / "bundles" / bundle / "configs" / "metadata.json"
        meta = json.loads(path.read_text())
        metrics = {f"mean_dice_{r['model'].lower()}": round(float(r["dice_mean"]), 4) for r in rows if r["bundle"] == bundle}
        meta["eval_metrics"] = {**meta.get("eval_metrics", {}), **metrics}
        atomic_write_text(path, json.dumps(meta, indent=4) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", nargs="+", default=["brats_effq", "lits_effq"])
    parser.add_argument("--weight-bits", nargs="+", type=int, default=[4, 2])
    parser.add_argument("--act-bits", type=int, default=8)
    parser.add_argument("--no-publish", action="store_true", help="do not rewrite docs/results.md and the README table")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rows = run_demo(args.bundles, args.weight_bits, args.act_bits)
    markdown = results_markdown(rows)
    print("\n" + markdown)
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    if not args.no_publish:
        publish(markdown)
        publish_per_bundle(rows)
        record_eval_metrics(rows)


if __name__ == "__main__":
    main()
