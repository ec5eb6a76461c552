"""ONNX export time: every axis dynamic (``export_onnx``'s default) against the batch axis alone (the
file ``runtime_network`` writes at the inferer's window), for the bundles' networks.

Each bundle's shipped FP weights are quantized with RTN W4A8 (the export does not depend on the
method), then exported both ways at the bundle's window, rounds interleaved after one untimed warm
export (torch's exporter pays its first-call set-up once per process); the median seconds of each
and their ratio are printed. Both files are run by ONNX Runtime on a batch of two windows, and the
largest difference between their outputs is printed: the faster export must compute the same. The
CPU's flags are printed beside the figures.

Usage::

    python benchmarks/export.py               # both bundles, 3 rounds (~3 min on 2 cores)
    python benchmarks/export.py --rounds 1 --bundles lits_effq
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from machine import cpu_summary


def _quantized_bundle_network(name: str):  # noqa: ANN202
    """The bundle's trained network, quantized RTN W4A8, and its sliding window ``(1, C, *roi)``."""
    from monai_effq import EfficientQConfig, quantize

    from deploy import fp_network, parser_for

    net, _ = fp_network(name, None, Path("."))  # the shipped weights: nothing is written
    parser = parser_for(name, [])
    window = (1, parser["network_def"]["in_channels"], *parser["sw_roi_size"])
    calibration = torch.rand(*window, generator=torch.Generator().manual_seed(0))
    config = EfficientQConfig(weight_bits=4, act_bits=8, method="rtn", attention=False)
    return quantize(net, calibration, config, progress=False), window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles", nargs="+", default=["brats_effq", "lits_effq"], help="bundles under bundles/")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    args = parser.parse_args()

    import numpy as np
    import onnxruntime as ort

    from monai_effq import export_onnx

    # a random calibration window suits the export; the calibration advice it draws is not the point here
    logging.getLogger("monai_effq").setLevel(logging.ERROR)
    print(f"CPU: {cpu_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'bundle':<12} {'window':<16} {'all axes s':>11} {'batch axis s':>13} {'ratio':>6} {'max |diff|':>11}")
    ways = {"all axes": {}, "batch axis": {"dynamic_spatial": False, "dynamic_batch": True}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.bundles:
            result, window = _quantized_bundle_network(name)
            paths = {way: Path(tmp) / f"{name}_{i}.onnx" for i, way in enumerate(ways)}
            export_onnx(result, paths["batch axis"], window, **ways["batch axis"])  # untimed: first-call set-up
            times: dict[str, list[float]] = {way: [] for way in ways}
            for _ in range(args.rounds):
                for way, options in ways.items():
                    t0 = time.perf_counter()
                    export_onnx(result, paths[way], window, **options)
                    times[way].append(time.perf_counter() - t0)
            x = torch.rand(2, *window[1:], generator=torch.Generator().manual_seed(1)).numpy()
            outputs = []
            for path in paths.values():
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                outputs.append(session.run(None, {session.get_inputs()[0].name: x})[0])
            full, batch = (statistics.median(times[way]) for way in ways)
            size = "x".join(str(s) for s in window[2:])
            diff = float(np.abs(outputs[0] - outputs[1]).max())
            print(f"{name:<12} {size:<16} {full:>11.2f} {batch:>13.2f} {full / batch:>5.2f}x {diff:>11.2e}")


if __name__ == "__main__":
    main()
