"""Window-attention transformer benchmark: MONAI's SwinUNETR as the model zoo's
``swin_unetr_btcv_segmentation`` bundle builds it (``feature_size=48``, 14 classes, 96³ windows), with
seeded random weights (no download), quantized and deployed.

Measured, all in one run on this machine: the time and peak memory of ``quantize`` on one calibration
window (as ``--calibration_roi 96 96 96`` makes the quantize overlay do), the ONNX export's time and
file size against the FP checkpoint's, and latency on one window for torch fp32 eager, OpenVINO
running our FP export with its default settings, and our int8 export through ``OpenVINONetwork``
with its default settings, each timed after an untimed warm call, rounds interleaved, the median
reported with its speed ratio against torch fp32 and against OpenVINO FP. The label agreement of each
output with the fake-quant network's is printed too; with random weights it says how closely the
runtime follows the network, not what Dice a trained one keeps. The CPU's flags and OpenVINO's chosen
float precision are printed beside the figures.

Usage::

    python benchmarks/transformer.py              # the zoo's size (~7 min on a 2-core Xeon)
    python benchmarks/transformer.py --quick      # feature_size 12, 64³ windows (~2 min)
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from machine import cpu_summary


def _median_times(runners: dict, x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Each runner's median seconds per call, each timed right after an untimed warm call, rounds interleaved."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.no_grad():
        for _ in range(rounds):
            for name, run in runners.items():
                run(x)
                t0 = time.perf_counter()
                run(x)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="feature_size 12 and 64³ windows")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--weight-bits", type=int, default=8, help="weight bits (activations at 8)")
    args = parser.parse_args()

    from monai.networks.nets import SwinUNETR

    from monai_effq import EfficientQConfig, export_onnx, quantize
    from monai_effq.deploy import OpenVINONetwork

    torch.manual_seed(0)
    feature_size, size = (12, 64) if args.quick else (48, 96)
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=feature_size, spatial_dims=3).eval()
    x = torch.rand(1, 1, size, size, size, generator=torch.Generator().manual_seed(1))
    print(f"CPU: {cpu_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"SwinUNETR feature_size={feature_size}, 14 classes, one {size}³ window, random weights (seed 0)")

    t0 = time.perf_counter()
    result = quantize(net, x, EfficientQConfig(weight_bits=args.weight_bits, act_bits=8), progress=False)
    quantize_s = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"quantize W{args.weight_bits}A8 on one window: {quantize_s:.1f} s, peak RSS {peak_gb:.1f} GiB so far")

    with tempfile.TemporaryDirectory() as folder:
        fp_path, q_path = Path(folder) / "fp.onnx", Path(folder) / "int8.onnx"
        t0 = time.perf_counter()
        export_onnx(result, q_path, x, dynamic_spatial=False)
        export_s = time.perf_counter() - t0
        export_onnx(net, fp_path, x, dynamic_spatial=False, require_quantized=False)
        checkpoint = Path(folder) / "model.pt"
        torch.save(net.state_dict(), checkpoint)
        print(
            f"ONNX export: {export_s:.1f} s; int8 file {q_path.stat().st_size / 2**20:.1f} MiB, FP file "
            f"{fp_path.stat().st_size / 2**20:.1f} MiB, FP checkpoint {checkpoint.stat().st_size / 2**20:.1f} MiB"
        )
        fp_ov, q_ov = OpenVINONetwork(fp_path), OpenVINONetwork(q_path)
        runners = {"torch fp32": net, "OpenVINO FP (default)": fp_ov, "ours int8 (default)": q_ov}
        medians = _median_times(runners, x, args.rounds)
        with torch.no_grad():
            reference = result.network(x).argmax(1)
            agreement = {name: float((run(x).argmax(1) == reference).float().mean()) for name, run in runners.items()}
        print(f"OpenVINO float precision: FP {fp_ov.chosen_precision}, int8 {q_ov.chosen_precision}")
        print(f"{'runner':24s} {'median s':>9s} {'vs torch':>9s} {'vs OV FP':>9s} {'labels = fake-quant':>20s}")
        for name, seconds in medians.items():
            print(
                f"{name:24s} {seconds:9.3f} {medians['torch fp32'] / seconds:8.2f}x "
                f"{medians['OpenVINO FP (default)'] / seconds:8.2f}x {100 * agreement[name]:19.2f}%"
            )


if __name__ == "__main__":
    main()
