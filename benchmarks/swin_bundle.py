"""A trained window-attention transformer through the model-zoo overlays: SwinUNETR in a
spleen_ct_segmentation-style bundle on the LiTS demo cases (generated; nothing downloaded).

Steps, all through the commands the README gives: write the zoo-style bundle (the test suite's
``spleen_style`` bundle with ``network_def`` a SwinUNETR, ``feature_size`` 12, 3 classes, 64³ windows),
train its FP network on the 8 training cases for ``--steps`` steps (seeded; DiceCE, AdamW), quantize it
with the ``quantize`` overlay on one calibration volume, then run the bundle's own evaluation (FP and
with the ``evaluate`` overlay: mean Dice on the 2 validation cases) and its inference (FP, the
``inference`` overlay, and the ``openvino`` overlay in OpenVINO and ONNX Runtime), and print the Dice
and how many voxels of each runtime's masks equal the fake-quant network's. The CPU's flags and
OpenVINO's default float precision are printed beside the figures.

Usage::

    python benchmarks/swin_bundle.py                 # 200 training steps (~20 min on a 2-core Xeon)
    python benchmarks/swin_bundle.py --steps 20      # a quick look (untrained-ish weights)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from machine import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
SWIN = {"_target_": "SwinUNETR", "spatial_dims": 3, "in_channels": 1, "out_channels": 3, "feature_size": 12, "use_checkpoint": False}
ROI = [64, 64, 64]


def _write_bundle(folder: Path) -> tuple[Path, Path]:
    """The zoo-style bundle (SwinUNETR inside) and the demo data folder."""
    sys.path.insert(0, str(ROOT))
    from monai_effq.bundle import demo_dataset
    from tests.overlays.conftest import spleen_style

    data = Path(demo_dataset(folder / "data", "lits"))
    root = spleen_style(folder / "bundle", data)
    for name in ("inference.json", "train.json"):
        path = root / "configs" / name
        config = json.loads(path.read_text())
        config["network_def"] = SWIN
        for inferer in (config.get("inferer"), config.get("validate", {}).get("inferer")):
            if inferer is not None:
                inferer["roi_size"] = ROI
        path.write_text(json.dumps(config, indent=4))
    return root, data


def _train(root: Path, data: Path, steps: int) -> float:
    """Train the bundle's FP network on its 8 training cases; returns the last loss."""
    from monai.bundle import ConfigParser
    from monai.data import Dataset
    from monai.losses import DiceCELoss
    from monai.transforms import Compose, RandSpatialCropd, SpatialPadd

    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "train.json"))
    pairs = list(zip(sorted(glob.glob(str(data / "volume-*.nii"))), sorted(glob.glob(str(data / "segmentation-*.nii")))))[:8]
    transform = Compose([parser.get_parsed_content("validate#preprocessing"), SpatialPadd(["image", "label"], ROI)])
    cases = [item for item in Dataset([{"image": i, "label": l} for i, l in pairs], transform)]
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    crop = RandSpatialCropd(["image", "label"], ROI, random_size=False)
    crop.set_random_state(0)
    optimiser = torch.optim.AdamW(net.parameters(), 1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        batch = [crop(cases[(2 * step + k) % len(cases)]) for k in range(2)]
        x = torch.stack([b["image"].as_tensor() for b in batch])
        y = torch.stack([b["label"].as_tensor() for b in batch])
        loss = loss_fn(net(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return float(loss)


def _run(root: Path, configs: list[str], *options: str, run_id: str | None = None) -> float:
    """``python -m monai.bundle run [run_id] --config_file configs options`` in the bundle; returns its wall time."""
    command = [sys.executable, "-m", "monai.bundle", "run", *([run_id] if run_id else []), "--config_file", str(configs), *options]
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def _masks(folder: Path) -> dict[str, np.ndarray]:
    import nibabel as nib

    return {p.parent.name: np.asarray(nib.load(p).dataobj) for p in sorted(folder.glob("*/*.nii.gz"))}


def _dice(folder: Path) -> float:
    return float((folder / "metrics.csv").read_text().strip().split(",")[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="FP training steps (batch of two 64³ crops)")
    parser.add_argument("--folder", type=Path, default=None, help="where to write the bundle (default: a temporary folder)")
    args = parser.parse_args()

    import openvino as ov

    from monai_effq.deploy.runtime import float_precision_for
    from monai_effq.overlays import overlay_path

    print(f"CPU: {cpu_summary()}; torch {torch.__version__}; OpenVINO default float precision: {float_precision_for(ov.Core())}")
    with tempfile.TemporaryDirectory() as scratch:
        root, data = _write_bundle(args.folder or Path(scratch))
        t0 = time.perf_counter()
        loss = _train(root, data, args.steps)
        print(f"SwinUNETR feature_size 12, {args.steps} training steps in {time.perf_counter() - t0:.0f} s, last DiceCE loss {loss:.3f}")
        inference = ["configs/inference.json"]
        evaluation = ["configs/train.json", "configs/evaluate.json"]
        seconds = _run(root, inference + [str(overlay_path("quantize"))], f"--calibration_images={[str(data / 'volume-0.nii')]}", run_id="quantize")
        print(f"quantize overlay (W4A8, one calibration volume): {seconds:.0f} s")
        _run(root, evaluation)
        _run(root, evaluation + [str(overlay_path("evaluate"))])
        tag = "efficientq_w4a8"
        print(f"mean Dice on the 2 validation cases: FP {_dice(root / 'eval'):.4f}, {tag} {_dice(root / 'eval' / tag):.4f}")
        _run(root, inference)
        _run(root, inference + [str(overlay_path("inference"))])
        fake_quant = _masks(root / "eval" / tag)
        fp = _masks(root / "eval")
        agreement = {"FP": np.mean([(fp[c] == m).mean() for c, m in fake_quant.items()])}
        for runtime in ("openvino", "onnxruntime"):
            _run(root, inference + [str(overlay_path("openvino"))], f"--runtime={runtime}")
            masks = _masks(root / "eval" / f"{tag}_{runtime}")
            agreement[runtime] = np.mean([(masks[c] == m).mean() for c, m in fake_quant.items()])
        print("voxels of the masks equal to the fake-quant network's: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in agreement.items()))


if __name__ == "__main__":
    main()
