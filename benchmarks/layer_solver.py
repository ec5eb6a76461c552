"""Layer solver benchmark: time, peak memory and output error of EfficientQ, GPTQ and RTN.

Each configuration runs in its own subprocess so that its peak resident memory is its own.
Figures are printed as ratios against round-to-nearest measured in the same run.

With ``--authors DIR`` (a checkout of github.com/rongzhao-zhang/EfficientQ, never part of this
repository) it instead compares our EfficientQ with the authors' ``EfficientQConv.ptq`` on the same
layers, in one process per layer, ours first and theirs second: wall time, speed ratio, and the
output MSE ``mean((conv(x, W_q) + b_q - y)^2)`` of both solutions computed the same way. No attention
map (the authors' default when none is given), per-tensor weights, weights only (their ``q_act`` off).
Both timings cover the same work, from the layer, its input and its FP output to quantized weights
and bias: ours is ``solve_layer`` (Gram sums, the round-to-nearest start, ADMM with its monitor,
refinement, bias refit and the error figures of the solution), theirs is ``EfficientQConv.ptq``
(im2col and Gram products, 200 ADMM iterations, each scored by a full convolution). Both solvers
first run once on a 4^3 crop, so neither pays first-call costs in the timed runs.

Usage::

    python benchmarks/layer_solver.py                 # the three standard layers, 2 and 4 bits
    python benchmarks/layer_solver.py --quick         # smaller layers, for a smoke run
    python benchmarks/layer_solver.py --memory        # also the 32ch @ 128^3 streaming-memory check
    python benchmarks/layer_solver.py --authors ~/src/EfficientQ --repeat 3   # ours against theirs
    python benchmarks/layer_solver.py --authors ~/src/EfficientQ --only "64->64@24^3 W2"   # one of those layers
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys

from machine import column_loops_summary, cpu_summary

LAYERS = {"32ch@64^3": (32, 64), "128ch@16^3": (128, 16), "256ch@8^3": (256, 8)}
QUICK_LAYERS = {"16ch@16^3": (16, 16), "64ch@8^3": (64, 8)}
# the layers of the comparison with the authors' solver: (channels, size, weight bits)
AUTHOR_LAYERS = {"32->32@32^3 W2": (32, 32, 2), "64->64@24^3 W2": (64, 24, 2), "128->128@16^3 W2": (128, 16, 2), "32->32@32^3 W4": (32, 32, 4)}
SPEED_BAR, MSE_BAR = 20.0, 1.0
VARIANTS = {
    "rtn": {"method": "rtn"},
    "gptq": {"method": "gptq"},
    "efficientq": {"method": "efficientq"},
    "effq paper init (rtn)": {"method": "efficientq", "init": "rtn"},
    "effq no bias refit": {"method": "efficientq", "refit_bias": False},
    "effq 200 iters": {"method": "efficientq", "admm": {"iterations": 200, "patience": 0}},
}


def _rss_peak_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def make_layer(channels: int, size: int, seed: int = 0):
    """A trained-looking 3x3x3 convolution, its input (as quantized layers before it would perturb
    it) and its FP output: heavy-tailed, channel-scaled weights fed ReLU features."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    layer = nn.Conv3d(channels, channels, 3, padding=1)
    w = torch.randn(channels, channels, 3, 3, 3, generator=g) / (channels * 27) ** 0.5
    w = w * (torch.rand(channels, 1, 1, 1, 1, generator=g) + 0.5) * (1 + 2 * (torch.rand(w.shape, generator=g) < 0.05))
    layer.weight.data = w
    with torch.no_grad():
        mix = torch.randn(channels, channels, 3, 3, 3, generator=g) / (channels * 27) ** 0.5
        x = F.relu(F.conv3d(torch.randn(1, channels, size, size, size, generator=g), mix, padding=1) + 0.1)
        y = layer(x)
        x = x + 0.02 * x.std() * torch.randn(x.shape, generator=g)
    return layer, x, y


def run_one(channels: int, size: int, bits: int, variant: dict, seed: int = 0, repeat: int = 1) -> dict:
    """Solve one layer in this process and return its figures: the median time of ``repeat`` solves, each
    after an untimed one on a corner of the input (the process's first call pays for lazy kernel and JIT
    set-up, which made one variant 10x slower than the same settings in another process)."""
    import statistics
    import time

    from monai_effq import AdmmSettings, solve_layer

    layer, x, y = make_layer(channels, size, seed)
    kwargs = dict(variant)
    if "admm" in kwargs:
        kwargs["admm"] = AdmmSettings(**kwargs["admm"])
    corner = (..., slice(0, max(size // 2, 4)), slice(0, max(size // 2, 4)), slice(0, max(size // 2, 4)))
    solve_layer(layer, x[corner], y[corner], bits, **kwargs)
    base = _rss_peak_mib()
    _reset_peak()
    times = []
    for _ in range(max(repeat, 1)):
        t0 = time.perf_counter()
        sol = solve_layer(layer, x, y, bits, **kwargs)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    out = {
        "seconds": seconds,
        "peak_extra_mib": max(_rss_peak_mib() - base, 0.0),
        "mse": sol.mse,
        "mse_rtn": sol.mse_rtn,
        "iterations": sol.trace.iterations if sol.trace else 0,
        "parts": dict(sol.trace.seconds) if sol.trace else {},
        "lowrank": sol.info.get("lowrank", False),
    }
    out["parts"]["statistics+rounding"] = seconds - sum(out["parts"].values())
    return out


def run_memory_check(channels: int = 32, size: int = 128) -> dict:
    """Peak extra memory of accumulating a layer's Gram matrices on a large input."""
    import time

    import torch
    import torch.nn as nn

    from monai_effq.solver import GramAccumulator, layer_view

    layer = nn.Conv3d(channels, channels, 3, padding=1)
    x = torch.rand(1, channels, size, size, size)
    with torch.no_grad():
        y = layer(x)
    im2col_mib = x.numel() * 27 * 4 / 2**20
    base = _rss_peak_mib()
    _reset_peak()
    t0 = time.perf_counter()
    acc = GramAccumulator(layer_view(layer))
    acc.add_batch(x, y)
    acc.statistics()
    return {
        "seconds": time.perf_counter() - t0,
        "peak_extra_mib": max(_rss_peak_mib() - base, 0.0),
        "im2col_mib": im2col_mib,
    }


def run_versus_authors(authors: str, channels: int, size: int, bits: int, repeat: int) -> dict:
    """Ours and the authors' EfficientQ on the same layer in this process; median times of ``repeat`` runs."""
    import time

    import torch
    import torch.nn.functional as F

    from monai_effq import solve_layer

    sys.path.insert(0, f"{authors}/src")
    from models import EfficientQConv  # the authors' module, from their checkout

    layer, x, y = make_layer(channels, size)

    def theirs_on(inputs: torch.Tensor, targets: torch.Tensor):
        ref = EfficientQConv(channels, channels, 3, padding=1, qlvl=2**bits, q_act=False)
        ref.weight.data = layer.weight.data.clone()
        ref.bias.data = layer.bias.data.clone()
        ref.output_fp, ref.name, ref.layer_loss = targets, "layer", []
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            ref.ptq(inputs)
        return ref, time.perf_counter() - t0

    def output_mse(weight: torch.Tensor, bias: torch.Tensor) -> float:
        with torch.no_grad():
            return F.mse_loss(F.conv3d(x, weight, bias, padding=1), y).item()

    # first-call costs (thread pool, kernels, LAPACK) paid on a small crop by both solvers
    solve_layer(layer, x[:, :, :4, :4, :4], y[:, :, :4, :4, :4], bits)
    theirs_on(x[:, :, :4, :4, :4], y[:, :, :4, :4, :4])
    ours, theirs = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sol = solve_layer(layer, x, y, bits)
        ours.append(time.perf_counter() - t0)
        ref, seconds = theirs_on(x, y)
        theirs.append(seconds)
    return {
        "ours_s": statistics.median(ours),
        "theirs_s": statistics.median(theirs),
        "ours_mse": output_mse(sol.weight, sol.bias),
        "theirs_mse": output_mse(ref.weight.data, ref.bias.data),
        "iterations": sol.trace.iterations,
        "parts": dict(sol.trace.seconds),
    }


def versus_authors(authors: str, repeat: int, only: list[str] | None = None) -> None:
    """Print ours against the authors' solver on :data:`AUTHOR_LAYERS` (those named in ``only``, if given)."""
    print(
        f"\n== EfficientQ: ours against the authors' EfficientQConv ({authors}), median of {repeat}, output MSE on the "
        f"calibration sample\n{'layer':18s} {'ours s':>7s} {'theirs s':>9s} {'speed':>7s} {'ours MSE':>10s} "
        f"{'theirs MSE':>10s} {'MSE ratio':>9s}  bars (>= {SPEED_BAR:.0f}x, MSE ratio <= {MSE_BAR:.1f})"
    )
    for name, (channels, size, bits) in AUTHOR_LAYERS.items():
        if only and name not in only:
            continue
        spec = {"authors": authors, "channels": channels, "size": size, "bits": bits, "repeat": repeat}
        r = _subprocess(["--worker", json.dumps(spec)])
        speed, ratio = r["theirs_s"] / r["ours_s"], r["ours_mse"] / r["theirs_mse"]
        verdict = "met" if speed >= SPEED_BAR and ratio <= MSE_BAR else "missed"
        print(
            f"{name:18s} {r['ours_s']:7.2f} {r['theirs_s']:9.2f} {speed:6.1f}x {r['ours_mse']:10.4e} "
            f"{r['theirs_mse']:10.4e} {ratio:9.3f}  {verdict}"
        )


def _subprocess(args: list[str]) -> dict:
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller layers")
    parser.add_argument("--memory", action="store_true", help="also the 32ch@128^3 streaming check")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--authors", help="a checkout of the authors' EfficientQ: compare against their solver")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per layer and variant, each after an untimed warm-up (median)")
    parser.add_argument("--only", nargs="+", choices=list(AUTHOR_LAYERS), help="with --authors: just these layers")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        if "authors" in spec:
            print(json.dumps(run_versus_authors(spec["authors"], spec["channels"], spec["size"], spec["bits"], spec["repeat"])))
        elif spec.get("memory"):
            print(json.dumps(run_memory_check()))
        else:
            print(json.dumps(run_one(spec["channels"], spec["size"], spec["bits"], spec["variant"], repeat=spec.get("repeat", 1))))
        return

    import torch

    print(f"CPU: {cpu_summary()}; torch {torch.__version__} fp32, {torch.get_num_threads()} threads; {column_loops_summary()}")
    if args.authors:
        versus_authors(args.authors, args.repeat, args.only)
        return
    layers = QUICK_LAYERS if args.quick else LAYERS
    for name, (channels, size) in layers.items():
        for bits in args.bits:
            print(f"\n== {name} 3x3x3, ReLU input, 1 sample, W{bits} (per-tensor, midrise grid)")
            print(f"{'variant':24s} {'time s':>8s} {'x rtn':>7s} {'peak MiB':>9s} {'out MSE':>11s} {'MSE/rtn':>8s} {'iters':>6s}  where the time goes")
            rows = {}
            for vname, variant in VARIANTS.items():
                spec = {"channels": channels, "size": size, "bits": bits, "variant": variant, "repeat": args.repeat}
                rows[vname] = _subprocess(["--worker", json.dumps(spec)])
            base = rows["rtn"]
            for vname, r in rows.items():
                parts = ", ".join(f"{k} {v:.2f}" for k, v in r["parts"].items()) if r["parts"] else ""
                print(
                    f"{vname:24s} {r['seconds']:8.2f} {r['seconds'] / base['seconds']:7.1f} {r['peak_extra_mib']:9.0f} "
                    f"{r['mse']:11.4e} {r['mse'] / base['mse']:8.3f} {r['iterations']:6d}  {parts}"
                )
    if args.memory:
        r = _subprocess(["--worker", json.dumps({"memory": True})])
        print(
            f"\n== Gram streaming, 32ch 3x3x3 on 1x32x128^3: {r['seconds']:.1f} s, peak extra memory "
            f"{r['peak_extra_mib']:.0f} MiB (the full im2col matrix would be {r['im2col_mib']:.0f} MiB; "
            f"ratio {r['peak_extra_mib'] / r['im2col_mib']:.3f})"
        )


if __name__ == "__main__":
    main()
