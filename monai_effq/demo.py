"""The main job on the embedded demo: quantize each bundle's network, evaluate FP vs quantized, print a table.

Runs the bundles' own ``quantize`` and ``evaluate`` workflows (``monai.bundle.run``, the same code
as ``python -m monai.bundle run ...``) on each bundle's shipped FP checkpoint for each bit width,
prints Dice per class, model size and quantization time, and writes the table and the rows to an
output folder (``outputs/demo/results.md`` and ``results.json``; the checkpoints, reports and
evaluations under ``outputs/demo/<bundle>/``). A run replaces what an earlier demo run wrote there,
and nothing else: the bundles' folders (except their generated demo data), the README and
``docs/results.md`` stay as they are. ``--publish`` (for maintainers) also writes the table into the
README, ``docs/results.md`` and each bundle's ``docs/README.md`` and the mean Dice into each
bundle's ``configs/metadata.json``.

Usage::

    python -m monai_effq.demo                      # both bundles, efficientq W4A8 and W2A8
    python -m monai_effq.demo --bundles lits_effq --weight-bits 4 --output-dir /tmp/demo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from monai_effq.bundle import model_tag
from monai_effq.utils.errors import install_bundle_error_hook
from monai_effq.utils.io import atomic_write_text

__all__ = [
    "DEFAULT_OUTPUT_DIR",
    "cpu_kind",
    "machine_kind",
    "main",
    "publish",
    "publish_per_bundle",
    "record_eval_metrics",
    "results_markdown",
    "run_demo",
    "write_results",
]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT_DIR = ROOT / "outputs" / "demo"
MARK_START, MARK_END = "<!-- results:start -->", "<!-- results:end -->"


def _run(bundle: str, workflow: str, **overrides) -> float:
    from monai.bundle import run

    configs = ROOT / "bundles" / bundle / "configs"
    t0 = time.perf_counter()
    # model-zoo layout: each workflow overlays the bundle's train.json
    run(workflow, config_file=[str(configs / "train.json"), str(configs / f"{workflow}.json")], **overrides)
    return time.perf_counter() - t0


def run_demo(
    bundles: list[str],
    weight_bits: list[int],
    act_bits: int = 8,
    output_dir: str | Path = DEFAULT_OUTPUT_DIR,
    method: str = "efficientq",
    device: str = "cpu",
) -> list[dict]:
    """Quantize and evaluate each bundle's shipped network at each bit width; return one row per bundle and model.

    Args:
        bundles: bundle folder names under ``bundles/``.
        weight_bits: weight bit widths to quantize to.
        act_bits: activation bits.
        output_dir: where the checkpoints, reports and evaluations go (``<output_dir>/<bundle>/``);
            what an earlier demo run wrote there is replaced.
        method: the solver method.
        device: where calibration, the solver and evaluation run (the bundles' ``device``: ``"cpu"``,
            ``"cuda"``, ``"cuda:1"`` ...).

    Returns:
        rows with the bundle, the device, model (``"FP32"`` or the model tag, e.g. ``"efficientq_w4a8"``), Dice per
        class, mean Dice, size and quantization time.
    """
    rows = []
    for bundle in bundles:
        root = ROOT / "bundles" / bundle
        out = Path(output_dir) / bundle
        overrides = {
            "bundle_root": str(root),  # the demo data are generated (once) in the bundle's data/demo
            "fp_checkpoint": str(root / "models" / "model.pt"),  # the shipped checkpoint, never one trained since
            "ckpt_dir": str(out / "models"),
            "output_dir": str(out / "eval"),
            "export_dir": "",
            "overwrite": True,
            "method": method,
            "device": device,
        }
        fp_row = None
        for bits in weight_bits:
            tag = model_tag(method, bits, act_bits)
            q_seconds = _run(bundle, "quantize", weight_bits=bits, act_bits=act_bits, **overrides)
            _run(bundle, "evaluate", weight_bits=bits, act_bits=act_bits, **overrides)
            evaluation = json.loads((out / "eval" / f"evaluation_{tag}.json").read_text())
            report = json.loads((out / "eval" / f"quantization_report_{tag}.json").read_text())
            fp, q = evaluation
            if fp_row is None:
                fp_row = {"bundle": bundle, "device": device, **fp, "size_MiB": report["fp_bytes"] / 2**20, "quantize_s": 0.0}
                rows.append(fp_row)
            rows.append({"bundle": bundle, "device": device, **q, "size_MiB": report["quantized_bytes"] / 2**20, "quantize_s": q_seconds})
    return rows


def cpu_kind() -> str:
    """The CPU's vendor and the vector kernels torch runs on it, e.g. ``"GenuineIntel, AVX512 kernels"``.

    Dice of a quantized network moves in the third decimal between CPU kinds (MKL and oneDNN sum
    in other orders, and a 2-bit layer's rounding follows), so the demo's table names the kind.

    Returns:
        the description.
    """
    import platform

    import torch

    vendor = platform.processor() or "unknown vendor"
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), vendor)
    except OSError:
        pass
    return f"{vendor}, {torch.backends.cpu.get_cpu_capability()} kernels"


def machine_kind(device: str = "cpu") -> str:
    """:func:`cpu_kind`, after the GPU's name and CUDA version where the run used a CUDA device.

    Args:
        device: the device the run used.

    Returns:
        the description.
    """
    import torch

    kind = cpu_kind()
    if torch.device(device).type == "cuda":
        kind = f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda}, torch {torch.__version__}) and {kind}"
    return kind


def results_markdown(rows: list[dict]) -> str:
    """A Markdown table per bundle (the classes differ between bundles), after the machine it was measured on."""
    out = [f"Measured on: {machine_kind(rows[0].get('device', 'cpu') if rows else 'cpu')}.\n"]
    for bundle in dict.fromkeys(r["bundle"] for r in rows):
        part = [r for r in rows if r["bundle"] == bundle]
        agreement = ["fp_agreement"] if any("fp_agreement" in r for r in part) else []
        cols = ["model", *[k for k in part[0] if k.startswith("dice_")], *agreement, "size_MiB", "quantize_s"]
        out.append(f"**{bundle}** (demo validation cases, sliding-window evaluate)\n")
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        for r in part:
            # the FP row has no agreement figure: it is the reference the others are scored against
            cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def write_results(rows: list[dict], output_dir: str | Path) -> tuple[Path, Path]:
    """Write the demo's table (``results.md``) and rows (``results.json``) into ``output_dir``, atomically.

    Args:
        rows: :func:`run_demo`'s rows.
        output_dir: the demo's output folder.

    Returns:
        the two files.
    """
    folder = Path(output_dir)
    markdown = atomic_write_text(folder / "results.md", f"# Demo results\n\nWritten by `python -m monai_effq.demo`.\n\n{results_markdown(rows)}")
    table = atomic_write_text(folder / "results.json", json.dumps(rows, indent=2) + "\n")
    return markdown, table


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
    """Make each bundle's ``configs/metadata.json`` ``eval_metrics`` the demo's measured mean Dice.

    Metrics of models the demo did not run are dropped, so none is left from an older naming or run.

    Args:
        rows: :func:`run_demo`'s rows; keys become ``mean_dice_<model>`` (e.g. ``mean_dice_efficientq_w4a8``).
    """
    for bundle in dict.fromkeys(r["bundle"] for r in rows):
        path = ROOT / "bundles" / bundle / "configs" / "metadata.json"
        meta = json.loads(path.read_text())
        meta["eval_metrics"] = {f"mean_dice_{r['model'].lower()}": round(float(r["dice_mean"]), 4) for r in rows if r["bundle"] == bundle}
        atomic_write_text(path, json.dumps(meta, indent=4) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    """Command-line entry point; returns :func:`run_demo`'s rows."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", nargs="+", default=["brats_effq", "lits_effq"])
    parser.add_argument("--weight-bits", nargs="+", type=int, default=[4, 2])
    parser.add_argument("--act-bits", type=int, default=8)
    parser.add_argument("--method", default="efficientq")
    parser.add_argument("--device", default="cpu", help="where calibration, the solver and evaluation run: cpu (default), cuda, cuda:1 ...")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="where the table and the models go (default: outputs/demo)")
    parser.add_argument(
        "--publish", action="store_true", help="also rewrite the README's and docs/results.md's table, the bundle docs and metadata (maintainers)"
    )
    args = parser.parse_args(argv)
    if args.publish and args.device != "cpu":
        parser.error("--publish writes the README's CPU table: run it with --device cpu")
    t0 = time.perf_counter()
    rows = run_demo(args.bundles, args.weight_bits, args.act_bits, args.output_dir, args.method, args.device)
    markdown = results_markdown(rows)
    written = write_results(rows, args.output_dir)
    print("\n" + markdown)
    print(f"table written to {written[0]}; total wall time {time.perf_counter() - t0:.0f} s")
    if args.publish:
        publish(markdown)
        publish_per_bundle(rows)
        record_eval_metrics(rows)
    return rows


if __name__ == "__main__":
    # the demo runs the bundles' workflows in this process: their user errors and Ctrl-C end it with one line,
    # as the bundle command's do (a quantize run it interrupted resumes from its journal)
    install_bundle_error_hook(force=True)
    main()
