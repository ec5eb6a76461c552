"""ONNX export time: every axis dynamic (``export_onnx``'s default) against the batch axis alone (the
file ``runtime_network`` writes at the inferer's window), for the bundles' networks.

Each bundle's shipped FP weights are quantized with RTN W4A8 (the export does not depend on the
method), then exported both ways at the bundle's window, rounds interleaved after one untimed warm
export (torch's exporter pays its first-call set-up once per process); the median seconds of each
and their ratio are printed. Both files are run by ONNX Runtime on a batch of two windows, and the
largest difference between their outputs is printed: the faster export must compute the same. The
CPU's flags are printed beside the figures.

With ``--norm-forms``, it times instead the channel-statistics group-norm form (the one OpenVINO gets
where its float parts run in f32) written two ways, both axes settings each: through one operator per
norm (``ChannelStatsGroupNormOp``, what ``export_onnx`` does) and through the norm's own torch operators
(``ChannelStatsGroupNorm``, how it was written before), with ONNX Runtime's outputs of the two files
compared the same way (they should be equal to the bit).

Usage::

    python benchmarks/export.py               # both bundles, 3 rounds (~3 min on 2 cores)
    python benchmarks/export.py --rounds 1 --bundles lits_effq
    python benchmarks/export.py --norm-forms  # one operator per norm against its torch operators
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

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
    parser.add_argument("--norm-forms", action="store_true", help="time the channel-statistics norms as one operator against their torch operators")
    args = parser.parse_args()

    import numpy as np
    import onnxruntime as ort

    from monai_effq import export_onnx

    # a random calibration window suits the export; the calibration advice it draws is not the point here
    logging.getLogger("monai_effq").setLevel(logging.ERROR)
    print(f"CPU: {cpu_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    axes = {"all axes": {}, "batch axis": {"dynamic_spatial": False, "dynamic_batch": True}}
    if args.norm_forms:
        from monai_effq.deploy import ChannelStatsGroupNorm
        from monai_effq.deploy import export as export_module

        # the baseline: the export form holds the norm whose torch operators the exporter traces one by one
        before = lambda: mock.patch.object(export_module, "ChannelStatsGroupNormOp", ChannelStatsGroupNorm)  # noqa: E731
        ways = {
            f"{form}, {axis}": (dict(options, group_norm="channel_stats"), patch)
            for axis, options in axes.items()
            for form, patch in (("torch operators", before), ("one operator", contextlib.nullcontext))
        }
        print(f"{'bundle':<12} {'window':<16} {'axes':<11} {'torch operators s':>18} {'one operator s':>15} {'ratio':>6} {'max |diff|':>11}")
    else:
        ways = {way: (options, contextlib.nullcontext) for way, options in axes.items()}
        print(f"{'bundle':<12} {'window':<16} {'all axes s':>11} {'batch axis s':>13} {'ratio':>6} {'max |diff|':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.bundles:
            result, window = _quantized_bundle_network(name)
            paths = {way: Path(tmp) / f"{name}_{i}.onnx" for i, way in enumerate(ways)}
            first, (options, patch) = next(iter(ways.items()))
            with patch():
                export_onnx(result, paths[first], window, **options)  # untimed: first-call set-up
            times: dict[str, list[float]] = {way: [] for way in ways}
            for _ in range(args.rounds):
                for way, (options, patch) in ways.items():
                    with patch():
                        t0 = time.perf_counter()
                        export_onnx(result, paths[way], window, **options)
                        times[way].append(time.perf_counter() - t0)
            x = torch.rand(2, *window[1:], generator=torch.Generator().manual_seed(1)).numpy()
            outputs = []
            for path in paths.values():
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                outputs.append(session.run(None, {session.get_inputs()[0].name: x})[0])
            seconds = [statistics.median(times[way]) for way in ways]
            size = "x".join(str(s) for s in window[2:])
            if args.norm_forms:  # per axes setting: torch operators, then one operator
                for k, axis in enumerate(axes):
                    slow, fast = seconds[2 * k], seconds[2 * k + 1]
                    diff = float(np.abs(outputs[2 * k] - outputs[2 * k + 1]).max())
                    print(f"{name:<12} {size:<16} {axis:<11} {slow:>18.2f} {fast:>15.2f} {slow / fast:>5.2f}x {diff:>11.2e}")
            else:
                full, batch = seconds
                diff = float(np.abs(outputs[0] - outputs[1]).max())
                print(f"{name:<12} {size:<16} {full:>11.2f} {batch:>13.2f} {full / batch:>5.2f}x {diff:>11.2e}")


if __name__ == "__main__":
    main()
