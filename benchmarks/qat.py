"""Fixed-point QAT vs EfficientQ PTQ on the demo BraTS bundle: Dice per class, memory and time, side by side.

For each bit setting (W4A6 and W2A8 by default) the rows are: FP, EfficientQ PTQ, fixed-point
QAT from FP (power-of-two scales, f chosen per tensor from the calibrated range, sign-magnitude
weights), EfficientQ -> QAT (fine-tuning the PTQ result), and once the method's own formats
(weights Q0.4, activations Q6.0, QAT from FP). A second table checks power-of-two (fixed-point)
EfficientQ PTQ at W4A8 against uniform scales.

Everything uses the bundle's own pieces: its SegResNet and demo FP checkpoint, the calibration
crop of ``quantize.json``, the training transforms and loss of ``train.json`` (random 48^3 crops,
batch 2, ``DiceLoss``) and the sliding-window evaluation of ``evaluate.json`` on the demo
validation cases. Memory is counted at the stated bits: packed weight bytes of every weight layer
and the largest weight-layer input of one 64x64x48 patch, each with its ratio against fp32.

Bars (issue 7, 2 CPU cores): EfficientQ -> QAT at W4A6 in at most 5 minutes ends with mean Dice
>= the PTQ-only Dice and within 0.02 of FP, with a weight memory ratio >= 7.5x; power-of-two
EfficientQ at W4A8 loses at most 0.01 Dice against uniform scales.

Usage::

    python benchmarks/qat.py                    # the tables and the bars (about 25 minutes on 2 cores)
    python benchmarks/qat.py --steps 20 --settings W4A6 --quick   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from machine import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "brats_effq"
CLASSES = ["TC", "WT", "ET"]
BAR_SECONDS = 300.0


def _setup():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser["bundle_root"] = str(BUNDLE)
    return parser


def load_pieces(batch_size: int) -> dict:
    """The bundle's network (FP weights loaded), loaders, calibration crop, loss and inferer."""
    from monai.data import CacheDataset, DataLoader
    from monai.inferers import SlidingWindowInferer

    from monai_effq import bundle as b

    parser = _setup()
    network = parser.get_parsed_content("network_def")
    state = torch.load(BUNDLE / "models" / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(state.get("model", state) if isinstance(state, dict) and "model" in state else state)
    network.eval()
    data = b.demo_dataset(BUNDLE / "data" / "demo", "brats")
    train_cases = b.datalist(data, "brats", "train")
    val_cases = b.datalist(data, "brats", "val")
    train_tf = b.preprocessing("brats", data, train=True, roi_size=parser["roi_size"])
    train_loader = DataLoader(
        CacheDataset(train_cases, train_tf, progress=False), batch_size=batch_size, shuffle=True, num_workers=0
    )
    val = [b.preprocessing("brats", data)(c) for c in val_cases]
    calib = b.preprocessing("brats", data, crop=[64, 64, 48])(train_cases[0])["image"]
    return {
        "network": network,
        "train_loader": train_loader,
        "val": [(v["image"].as_tensor()[None], v["label"].as_tensor()[None]) for v in val],
        "calibration": calib.as_tensor()[None].float(),
        "loss": parser.get_parsed_content("loss"),
        "inferer": SlidingWindowInferer(roi_size=[64, 64, 48], sw_batch_size=1, overlap=0.25),
    }


@torch.no_grad()
def dice_per_class(network: torch.nn.Module, pieces: dict) -> list[float]:
    """Mean Dice per class over the validation cases (sigmoid > 0.5, as evaluate.json)."""
    from monai.metrics import DiceMetric

    metric = DiceMetric(include_background=True, reduction="mean_batch")
    network.eval()
    for x, y in pieces["val"]:
        pred = (torch.sigmoid(pieces["inferer"](x, network)) > 0.5).float()
        metric(pred, y)
    return [float(v) for v in metric.aggregate()]


def measure(name: str, network: torch.nn.Module, pieces: dict, seconds: float, extra: dict | None = None) -> dict:
    from monai_effq.ptq import activation_footprint, weight_footprint

    dice = dice_per_class(network, pieces)
    weights = weight_footprint(network)
    acts = activation_footprint(network, pieces["calibration"])
    row = {"model": name}
    row.update({f"dice_{c}": d for c, d in zip(CLASSES, dice)})
    row["dice_mean"] = sum(dice) / len(dice)
    row.update(
        weight_KiB=weights.packed_bytes / 1024,
        weight_x=weights.ratio,
        act_peak_KiB=acts.quantized_bytes / 1024,
        act_x=acts.ratio,
        seconds=seconds,
    )
    row.update(extra or {})
    print(json.dumps(row), flush=True)
    return row


def run(settings: list[str], steps: int, lr: float, batch_size: int, with_formats: bool, with_power_of_two: bool) -> dict:
    from monai_effq import EfficientQConfig, finetune, quantize

    torch.manual_seed(0)
    pieces = load_pieces(batch_size)
    fp = pieces["network"]
    tables: dict[str, list[dict]] = {}
    fp_row = measure("FP32", fp, pieces, 0.0)
    for setting in settings:
        wbits, abits = (int(v) for v in setting[1:].split("A"))
        rows = [dict(fp_row)]
        t0 = time.perf_counter()
        ptq = quantize(fp, pieces["calibration"], EfficientQConfig(weight_bits=wbits, act_bits=abits), task="multilabel", progress=False)
        rows.append(measure(f"EfficientQ PTQ {setting}", ptq.network, pieces, time.perf_counter() - t0))
        fixed = EfficientQConfig(weight_bits=wbits, act_bits=abits, power_of_two=True, weight_grid="symmetric")
        torch.manual_seed(0)
        t0 = time.perf_counter()
        qat_fp = finetune(copy.deepcopy(fp), pieces["train_loader"], fixed, steps=steps, lr=lr, loss_function=pieces["loss"], task="multilabel")
        rows.append(measure(f"fixed-point QAT from FP {setting}", qat_fp.network, pieces, time.perf_counter() - t0, _losses(qat_fp)))
        torch.manual_seed(0)
        t0 = time.perf_counter()
        qat_ptq = finetune(ptq, pieces["train_loader"], steps=steps, lr=lr, loss_function=pieces["loss"])
        qat_seconds = time.perf_counter() - t0
        rows.append(measure(f"EfficientQ -> QAT {setting}", qat_ptq.network, pieces, qat_seconds, _losses(qat_ptq)))
        rows[-1]["report_weight_x"] = qat_ptq.report.weight_compression
        tables[setting] = rows
    if with_formats:
        cfg = EfficientQConfig(weight_format="Q0.4", act_format="Q6.0", power_of_two=True, weight_grid="symmetric")
        torch.manual_seed(0)
        t0 = time.perf_counter()
        res = finetune(copy.deepcopy(fp), pieces["train_loader"], cfg, steps=steps, lr=lr, loss_function=pieces["loss"], task="multilabel")
        tables["Q0.4/Q6.0"] = [dict(fp_row), measure("QAT from FP, W Q0.4 / A Q6.0", res.network, pieces, time.perf_counter() - t0, _losses(res))]
    if with_power_of_two:
        rows = [dict(fp_row)]
        for p2 in (False, True):
            t0 = time.perf_counter()
            res = quantize(fp, pieces["calibration"], EfficientQConfig(weight_bits=4, act_bits=8, power_of_two=p2), task="multilabel", progress=False)
            rows.append(measure(f"EfficientQ W4A8 {'power-of-two' if p2 else 'uniform'}", res.network, pieces, time.perf_counter() - t0))
        tables["power-of-two W4A8"] = rows
    return tables


def _losses(result) -> dict:
    info = result.report.extra["finetune"]
    # "kept": "start" when the held-out check found the trained end worse and returned the start
    return {"loss_first": info["loss_first"], "loss_last": info["loss_last"], "steps": info["steps"], "kept": info["check"]["kept"]}


def markdown(tables: dict[str, list[dict]]) -> str:
    """One Markdown table per setting."""
    out = []
    for setting, rows in tables.items():
        cols = ["model", *[f"dice_{c}" for c in CLASSES], "dice_mean", "weight_KiB", "weight_x", "act_peak_KiB", "act_x", "seconds"]
        out.append(f"**{setting}**\n")
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        for r in rows:
            cells = [f"{r[c]:.3f}" if isinstance(r[c], float) and c.startswith("dice") else f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def bars(tables: dict[str, list[dict]], steps: int, default_steps: int) -> list[str]:
    if steps != default_steps:  # a smoke run: its figures say nothing about the bars, set at the workflow's steps
        return [f"bars not judged: this run fine-tuned {steps} steps, the bars are set at the finetune workflow's {default_steps}"]
    lines = []
    if "W4A6" in tables:
        fp, ptq, _, qat = tables["W4A6"]
        ok = qat["dice_mean"] >= ptq["dice_mean"] and fp["dice_mean"] - qat["dice_mean"] <= 0.02 and qat["seconds"] <= BAR_SECONDS
        lines.append(
            f"W4A6 EfficientQ->QAT: Dice {qat['dice_mean']:.4f} vs PTQ {ptq['dice_mean']:.4f} vs FP {fp['dice_mean']:.4f}, "
            f"{qat['seconds']:.0f} s (bar {BAR_SECONDS:.0f} s), report weight ratio {qat['report_weight_x']:.2f}x: "
            f"{'PASS' if ok and qat['report_weight_x'] >= 7.5 else 'FAIL'}"
        )
    if "power-of-two W4A8" in tables:
        _, uni, p2 = tables["power-of-two W4A8"]
        loss = uni["dice_mean"] - p2["dice_mean"]
        lines.append(f"power-of-two W4A8: Dice {p2['dice_mean']:.4f} vs uniform {uni['dice_mean']:.4f} (loss {loss:+.4f}, bar 0.01): {'PASS' if loss <= 0.01 else 'FAIL'}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["W4A6", "W2A8"])
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the finetune workflow's)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="skip the Q0.4/Q6.0 and power-of-two tables")
    parser.add_argument("--json", type=Path, default=None, help="also write the tables as JSON here")
    args = parser.parse_args(argv)
    from monai_effq.qat import DEFAULT_LR, DEFAULT_STEPS

    torch.set_num_threads(args.threads)
    steps = args.steps or DEFAULT_STEPS
    print(f"CPU: {cpu_summary()}; torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}, float32), {args.threads} threads")
    t0 = time.perf_counter()
    tables = run(args.settings, steps, args.lr or DEFAULT_LR, args.batch_size, not args.quick, not args.quick)
    print("\n" + markdown(tables))
    for line in bars(tables, steps, DEFAULT_STEPS):
        print(line)
    print(f"total wall time {time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} threads")
    if args.json:
        args.json.write_text(json.dumps(tables, indent=2))


if __name__ == "__main__":
    main()
