"""Network PTQ benchmark: time, peak memory and output error of EfficientQ, GPTQ and RTN on a SegResNet.

The bar (from the issue): MONAI ``SegResNet(spatial_dims=3, init_filters=16, in_channels=4,
out_channels=3)`` calibrated on one 1x4x128x128x128 volume, W4A8 EfficientQ, must quantize in under
5 minutes with a peak memory under 8 GiB on 2 CPU cores.

The calibration volume is a synthetic BraTS-like case (``monai_effq.data.make_brats_demo``, seed 0)
preprocessed by ``brats_transforms`` (z-scored per contrast over the brain), cropped or padded to the
benchmark size. The output error is measured on it and on a second, different case (seed 1). The
network is untrained (``torch.manual_seed(0)`` initialisation): this measures cost and the
quantizer's error, not Dice; a trained network is measured by the bundles.

Each method runs in its own subprocess so that its peak resident memory is its own. Time and error
are also printed as ratios against round-to-nearest measured in the same run.

Usage::

    python benchmarks/network_ptq.py                      # the bar: 128^3, init_filters 16, W4A8
    python benchmarks/network_ptq.py --quick              # 64^3, for a smoke run
    python benchmarks/network_ptq.py --methods efficientq rtn --bits 2
    python benchmarks/network_ptq.py --devices cpu cuda   # each method on the CPU and on the GPU: "x first" is the GPU's time over the CPU's
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from machine import cpu_summary

BAR_SECONDS = 300.0
BAR_MIB = 8 * 1024.0
BAR_SIZE = 128
BAR_FILTERS = 16
BAR_BITS = 4
ACT_BITS = 8


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_volumes(folder: str, size: int) -> dict[str, str]:
    """Write the calibration (seed 0) and test (seed 1) volumes as ``(1, 4, size, size, size)`` tensors."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import ResizeWithPadOrCrop

    from monai_effq.data import brats_transforms, load_datalist, make_brats_demo

    pipeline = brats_transforms(layout="native", train=False, roi_size=None)
    fit = ResizeWithPadOrCrop((size, size, size))
    paths = {}
    for name, seed in (("calibration", 0), ("test", 1)):
        root = make_brats_demo(os.path.join(folder, f"brats_seed{seed}"), n_cases=1, shape=(size,) * 3, seed=seed)
        case = pipeline(load_datalist(root, layout="brats")[0])
        image = case["image"]
        if tuple(image.shape[1:]) != (size,) * 3:
            image = fit(image)
        image = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
        image = image.to(torch.float32).clone().unsqueeze(0).contiguous()  # a plain tensor, no metadata
        paths[name] = os.path.join(folder, f"{name}.pt")
        torch.save(image, paths[name])
    return paths


def _relative_error(q: torch.Tensor, fp: torch.Tensor) -> float:  # noqa: F821 - torch is imported lazily
    return float((q - fp).norm() / fp.norm().clamp_min(1e-30))


def run_one(spec: dict) -> dict:
    """Quantize the network in this process and return its figures."""
    import time

    import torch
    from monai.networks.nets import SegResNet

    from monai_effq import EfficientQConfig, quantize

    device = torch.device(spec.get("device", "cpu"))
    calibration = torch.load(spec["volumes"]["calibration"], weights_only=True).to(device)
    test = torch.load(spec["volumes"]["test"], weights_only=True).to(device)
    torch.manual_seed(0)
    network = SegResNet(spatial_dims=3, init_filters=spec["init_filters"], in_channels=4, out_channels=3).eval().to(device)
    config = EfficientQConfig(weight_bits=spec["bits"], act_bits=ACT_BITS, method=spec["method"], device=str(device))
    # untimed, on a 16^3 corner: the process's first run pays for lazy kernel and JIT set-up, which would fall on
    # whichever method ran first in its process (a fast one, round-to-nearest, most)
    quantize(network, calibration[..., :16, :16, :16], config, task="multilabel", progress=False)
    rss_before = _rss_mib()
    cpu0 = time.process_time()
    res = quantize(network, calibration, config, task="multilabel", progress=False)
    cpu_seconds = time.process_time() - cpu0  # all threads; on a shared machine this is steadier than wall time
    load = os.getloadavg()[0]
    report = res.report

    # outside the timed region: output error on the calibration volume and on an unseen one
    errors = {}
    with torch.no_grad():
        for name, x in (("calibration", calibration), ("test", test)):
            fp = network(x)
            q = res.network(x)
            errors[name] = _relative_error(q, fp)
            del fp, q
    layers = report.layers
    ratios = [r.mse / r.mse_rtn for r in layers if r.mse_rtn > 0]
    slowest = sorted(layers, key=lambda r: r.seconds, reverse=True)[:5]
    return {
        "seconds": report.wall_seconds,
        "cpu_seconds": cpu_seconds,
        "load": load,
        "peak_mib": report.peak_memory_mib,
        "peak_gpu_mib": report.peak_gpu_memory_mib,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "rss_before_mib": rss_before,
        "err_calibration": errors["calibration"],
        "err_test": errors["test"],
        "layer_ratio": sum(ratios) / max(len(ratios), 1),
        "layers": len(layers),
        "compression": report.compression,
        "fp_mib": report.fp_bytes / 2**20,
        "quantized_mib": report.quantized_bytes / 2**20,
        "solve_seconds": sum(r.solve_seconds for r in layers),
        "layer_seconds": sum(r.seconds for r in layers),
        "iterations": sum(r.iterations for r in layers),
        "slowest": [
            {"name": r.name, "seconds": r.seconds, "solve_seconds": r.solve_seconds, "iterations": r.iterations}
            for r in slowest
        ],
        "threads": torch.get_num_threads(),
    }


def _subprocess(args: list[str]) -> dict:
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _row_name(method: str, device: str, devices: list[str]) -> str:
    return method if len(devices) == 1 else f"{method}@{device}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=BAR_SIZE, help="side of the cubic volume (default 128)")
    parser.add_argument("--init-filters", type=int, default=BAR_FILTERS, help="SegResNet init_filters (default 16)")
    parser.add_argument("--bits", type=int, default=BAR_BITS, help="weight bits (activations stay at 8)")
    parser.add_argument("--methods", nargs="+", default=["efficientq", "gptq", "rtn"], choices=["efficientq", "gptq", "rtn"])
    parser.add_argument("--quick", action="store_true", help="64^3 volume, for a smoke run")
    parser.add_argument(
        "--devices", nargs="+", default=["cpu"], help="run each method on each of these (e.g. cpu cuda); times are also given against the first"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(json.loads(args.worker))))
        return
    if args.quick:
        args.size = 64

    import torch

    from monai_effq.ptq.prepare import available_device
    from monai_effq.utils.errors import UserInputError

    try:
        for device in args.devices:
            available_device(device)
    except UserInputError as error:
        parser.error(str(error))

    with tempfile.TemporaryDirectory(prefix="network_ptq_") as folder:
        volumes = make_volumes(folder, args.size)
        rows = {}
        for device in args.devices:
            for method in args.methods:
                spec = {
                    "method": method,
                    "size": args.size,
                    "init_filters": args.init_filters,
                    "bits": args.bits,
                    "volumes": volumes,
                    "device": device,
                }
                rows[_row_name(method, device, args.devices)] = _subprocess(["--worker", json.dumps(spec)])

    threads = next(iter(rows.values()))["threads"]
    print(cpu_summary())
    print(f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs")
    for device in dict.fromkeys(r["device"] for r in rows.values() if r["device"] != "cpu"):
        print(f"GPU: {device} (CUDA {torch.version.cuda})")
    print(
        f"\n== SegResNet(spatial_dims=3, init_filters={args.init_filters}, in_channels=4, out_channels=3), "
        f"untrained (torch.manual_seed(0)); W{args.bits}A{ACT_BITS} (first/last layer 8 bits), "
        f"calibration 1x4x{args.size}^3 synthetic BraTS case (seed 0), test case seed 1"
    )
    header = (
        f"{'method':16s} {'time s':>8s} {'x rtn':>6s} {'x first':>7s} {'GPU MiB':>8s} {'cpu s':>8s} {'peak MiB':>9s} {'rel err calib':>13s} {'x rtn':>6s} "
        f"{'rel err test':>12s} {'x rtn':>6s} {'layer MSE/rtn':>13s} {'layers':>6s} {'compr':>6s} "
        f"{'solve s':>8s} {'other s':>8s} {'iters':>6s} {'load':>5s}"
    )
    print(header)
    for name, r in rows.items():
        method, _, device = name.partition("@")
        base = rows.get(_row_name("rtn", device, args.devices))
        first = rows[_row_name(method, args.devices[0], args.devices)]
        ratio = (
            (lambda key: f"{r[key] / base[key]:6.2f}" if base[key] > 0 else f"{'-':>6s}")
            if base is not None
            else (lambda key: f"{'-':>6s}")
        )
        print(
            f"{name:16s} {r['seconds']:8.1f} {ratio('seconds')} {r['seconds'] / first['seconds']:7.2f} {r['peak_gpu_mib']:8.0f} {r['cpu_seconds']:8.1f} {r['peak_mib']:9.0f} "
            f"{r['err_calibration']:13.4e} {ratio('err_calibration')} {r['err_test']:12.4e} {ratio('err_test')} "
            f"{r['layer_ratio']:13.3f} {r['layers']:6d} {r['compression']:5.1f}x "
            f"{r['solve_seconds']:8.1f} {r['seconds'] - r['solve_seconds']:8.1f} {r['iterations']:6d} {r['load']:5.1f}"
        )
    print(
        "\ntime s: wall time of quantize(); cpu s: its CPU time, all threads; load: the 1-minute load average when "
        "quantize() returned (times are only comparable with the bar when load <= the CPU count);\n"
        "x first: the time against the same method on the first of --devices; GPU MiB: peak memory allocated on the GPU "
        "(nan on the CPU);\n"
        "rel err: ||q(x) - fp(x)|| / ||fp(x)|| of the logits; layer MSE/rtn: mean over layers of the layer "
        "output MSE against round-to-nearest's;\nsolve s: sum of the layer solves; other s: the rest of the "
        "wall time (forward passes, Gram accumulation, attention, copies)."
    )
    r0 = next(iter(rows.values()))
    print(
        f"size {r0['fp_mib']:.2f} MiB FP -> {r0['quantized_mib']:.3f} MiB packed; process RSS before quantize "
        f"{r0['rss_before_mib']:.0f} MiB (included in peak)"
    )

    print("\nwhere the time goes, slowest layers (total s / solve s / ADMM iterations):")
    for name, r in rows.items():
        parts = ", ".join(
            f"{s['name']} {s['seconds']:.1f}/{s['solve_seconds']:.1f}/{s['iterations']}" for s in r["slowest"]
        )
        print(f"  {name:16s} {parts}")

    bar_row = _row_name("efficientq", "cpu", args.devices)
    if bar_row in rows:  # the bar is set for the CPU
        r = rows[bar_row]
        at_bar = args.size == BAR_SIZE and args.init_filters == BAR_FILTERS and args.bits == BAR_BITS
        note = "" if at_bar else "  (the bar is set for 128^3, init_filters 16, W4A8; this run is not that setting)"
        print(f"\n== bar, efficientq W{args.bits}A{ACT_BITS} on {os.cpu_count()} CPUs{note}")
        print(
            f"  time {r['seconds']:.1f} s  vs {BAR_SECONDS:.0f} s ({BAR_SECONDS / 60:.0f} min): "
            f"{_verdict(r['seconds'] < BAR_SECONDS)}"
        )
        print(
            f"  peak memory {r['peak_mib']:.0f} MiB ({r['peak_mib'] / 1024:.2f} GiB)  vs {BAR_MIB:.0f} MiB "
            f"({BAR_MIB / 1024:.0f} GiB): {_verdict(r['peak_mib'] < BAR_MIB)}"
        )


if __name__ == "__main__":
    main()
