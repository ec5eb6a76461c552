"""Compare two demo runs (``python -m monai_effq.demo --output-dir A`` and ``... B``), e.g. on a GPU and on a CPU.

Prints, per bundle and model: the quantized size each run reported and the size of its checkpoint
reloaded here, the state-dict entries whose size differs, and the layers whose solver choice differs
with their held-out errors. ``scripts/gpu_check.sh`` runs it on its demo_cuda and demo_cpu folders.

Usage::

    python scripts/compare_demo_runs.py outputs/gpu_check/demo_cuda outputs/gpu_check/demo_cpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from monai.bundle import ConfigParser

from monai_effq import load_quantized_result
from monai_effq.ptq.result import quantized_size_bytes

ROOT = Path(__file__).resolve().parents[1]


def _network_def(bundle: str):
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / bundle / "configs" / "train.json"))
    return parser.get_parsed_content("network_def")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs=2, type=Path, help="two demo output folders")
    args = parser.parse_args()
    first, second = args.runs
    for bundle_dir in sorted(p for p in first.iterdir() if (p / "models").is_dir()):
        bundle = bundle_dir.name
        network_def = _network_def(bundle)  # load_quantized_result leaves it unchanged: one serves every load
        for checkpoint in sorted((bundle_dir / "models").glob("model_*.pt")):
            tag = checkpoint.stem.removeprefix("model_")
            runs = {}
            for run in (first, second):
                report = json.loads((run / bundle / "eval" / f"quantization_report_{tag}.json").read_text())
                result = load_quantized_result(run / bundle / "models" / checkpoint.name, network_def)
                sizes = {k: t.numel() * t.element_size() for k, t in result.network.state_dict().items()}
                runs[run] = (report, quantized_size_bytes(result.network), sizes)
            (r1, q1, s1), (r2, q2, s2) = runs[first], runs[second]
            print(f"== {bundle} {tag}: reported {r1['quantized_bytes']} / {r2['quantized_bytes']} bytes, reloaded {q1} / {q2}")
            for key in sorted(set(s1) | set(s2)):
                if s1.get(key) != s2.get(key):
                    print(f"   state {key}: {s1.get(key)} / {s2.get(key)} bytes")
            for a, b in zip(r1["layers"], r2["layers"]):
                if a["choice"] != b["choice"]:
                    print(
                        f"   layer {a['name']}: {a['choice']} (held-out {a['mse_holdout']}) / {b['choice']} (held-out {b['mse_holdout']})"
                    )


if __name__ == "__main__":
    main()
