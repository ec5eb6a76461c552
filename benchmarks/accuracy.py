"""Real-data accuracy benchmark: held-out Dice of EfficientQ, GPTQ and RTN against FP and peer PTQ tools.

Data: the MNI ICBM152 2009 symmetric T1 template with its grey- and white-matter probability maps,
real 3D MRI that ``nilearn`` ships inside its wheel (no download at run time: ``pip install
nilearn``, part of the ``[bench]`` extra). The files are read with MONAI's ``LoadImaged`` and
resampled to 2 mm (``Spacingd``); the label of a voxel is the arg-max of (1 - GM - WM, GM, WM), so the
task is three-class tissue segmentation (background+CSF / grey matter / white matter).

Split: the volume is cut into four slabs across the anterior-posterior axis. A network is trained
on the first and third and every figure is measured on the second and fourth, which neither
training nor calibration ever sees (held-out anatomy; alternating slabs keep both parts' mix of
cortex, white matter and cerebellum alike), with MONAI's ``SlidingWindowInferer`` and
``DiceMetric`` (grey and white matter, background excluded). The trained weights are cached in
``--cache`` (``benchmarks/.cache`` by default) so reruns skip training.

Networks (``--network``): ``unet``, a MONAI ``UNet`` (channels 16..128; 48³ windows), and
``swinunetr``, MONAI's ``SwinUNETR`` (the model zoo's window-attention transformer, ``feature_size``
12; 64x32x64 windows, since each side must divide by 32), each with its own table.

Calibration, both from the training half:
- ``crop``: one small crop (8x64x64 voxels for the UNet, 32x64x64 for SwinUNETR, one window), the
  regime of a bundle's ``calibration_crop``;
- ``volume``: the whole training part, as every sliding window of its two slabs
  (:func:`monai_effq.data.calibration_windows`).

Peers at W8A8 (optional; skipped with a note when the package is missing): NNCF's post-training
quantization of the torch network and ONNX Runtime's static QDQ quantization of its ONNX export,
both calibrated on the same windows.

Every row also gives its labels' Dice against the FP network's own held-out labels ("Dice vs FP
labels"): PTQ fits the FP network, and on one held-out brain a quantized network's departures from FP
can land on either side of the truth, so Dice against the truth alone does not say which method
reproduces the network best.

Each configuration runs in this process one after the other; the table is printed and, with
``--write``, written between markers into ``docs/results.md`` (atomically). Every figure comes
from this run: Dice per class, the drop against FP, quantize time and peak resident memory (of the
process so far, so it only grows).

Usage::

    python benchmarks/accuracy.py --write                   # the full table
    python benchmarks/accuracy.py --network swinunetr --write  # the SwinUNETR's table (trains it first)
    python benchmarks/accuracy.py --network swinunetr --settings W4A8 --methods efficientq --calibration volume \
        --no-peers --deploy openvino onnxruntime            # Dice of the exported file in each runtime
    python benchmarks/accuracy.py --settings W2A8 W4A4 --calibration crop --methods efficientq rtn
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from machine import column_loops_summary, cpu_summary

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"W8A8": (8, 8), "W4A8": (4, 8), "W3A8": (3, 8), "W2A8": (2, 8), "W4A4": (4, 4), "W2A4": (2, 4)}
# label -> EfficientQConfig settings. The baselines are the plain algorithms a user gets elsewhere
# (no held-out validation); "gptq+val" is GPTQ with this project's per-layer validation;
# "efficientq gptq-start" starts ADMM from the better of GPTQ's and RTN's codes instead of RTN's.
METHODS = {
    "efficientq": {"method": "efficientq"},
    "efficientq gptq-start": {"method": "efficientq", "init": "gptq"},
    "gptq": {"method": "gptq", "validation_fraction": 0.0},
    "rtn": {"method": "rtn"},
    "gptq+val": {"method": "gptq"},
}
# not in the default table: EfficientQ with every norm's input rounded to 8 bits as well (the
# rounding that lets OpenVINO read norms in int8, as NNCF's graphs do)
# "efficientq mirrored": calibrated on every window and its mirror images (calibration_flips)
EXTRA_METHODS = {
    "efficientq+N": {"method": "efficientq", "quantize_norm_inputs": True},
    "efficientq mirrored": {"method": "efficientq", "calibration_flips": True},
}
ALL_METHODS = {**METHODS, **EXTRA_METHODS}
BASELINES = ("gptq", "rtn")
CALIBRATIONS = ("crop", "volume")
# "slab": the windows of the first training slab only (half the volume calibration's data), to see
# what more cases buy; not in the default table
EXTRA_CALIBRATIONS = ("slab",)
SPACING = (2.0, 2.0, 2.0)
TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def template_files() -> dict[str, Path]:
    """Paths of the T1, GM and WM files inside the installed nilearn package (not imported)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise SystemExit("benchmarks/accuracy.py needs nilearn's packaged MNI template: pip install -e '.[bench]'.")
    folder = Path(spec.origin).parent / "datasets" / "data"
    files = {k: folder / TEMPLATE.format(k) for k in ("t1", "gm", "wm")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"nilearn is installed but lacks {missing}: reinstall it (pip install --force-reinstall nilearn).")
    return files


def load_volume() -> tuple[torch.Tensor, torch.Tensor]:
    """The preprocessed ``(1, X, Y, Z)`` image and ``(1, X, Y, Z)`` integer label at 2 mm."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd, Orientationd, Spacingd

    files = template_files()
    keys = ["t1", "gm", "wm"]
    load = Compose(
        [
            LoadImaged(keys, image_only=True),
            EnsureChannelFirstd(keys),
            Orientationd(keys, axcodes="RAS"),
            Spacingd(keys, pixdim=SPACING, mode="bilinear"),
            NormalizeIntensityd("t1", nonzero=True),
        ]
    )
    d = load({k: str(files[k]) for k in keys})
    gm, wm = d["gm"].as_tensor() / 255.0, d["wm"].as_tensor() / 255.0
    label = torch.cat([(1 - gm - wm).clamp_min(0), gm, wm]).argmax(0, keepdim=True)
    return d["t1"].as_tensor().float(), label


def split(image: torch.Tensor, label: torch.Tensor) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Slabs 1 and 3 of four across the anterior-posterior axis (axis 2 of ``(1, X, Y, Z)``) for training
    and calibration, slabs 2 and 4 held out."""
    edges = [round(image.shape[2] * q / 4) for q in range(5)]
    slabs = [(image[:, :, a:b], label[:, :, a:b]) for a, b in zip(edges, edges[1:])]
    return {"train": slabs[0::2], "test": slabs[1::2]}


def build_unet() -> torch.nn.Module:
    """The benchmark's MONAI UNet (channels 16..128, one residual unit per level)."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1)


def build_swinunetr() -> torch.nn.Module:
    """MONAI's SwinUNETR as the model zoo builds it, at ``feature_size`` 12 (a quarter of the zoo's width)."""
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(in_channels=1, out_channels=3, feature_size=12, spatial_dims=3, use_checkpoint=False)


@dataclass(frozen=True)
class NetworkSpec:
    """A benchmark network: how to build and train it, its windows, and where its table goes."""

    build: Callable[[], torch.nn.Module]
    description: str
    roi: tuple[int, int, int]  # training and sliding-window size
    crop: tuple[int, int, int]  # the one-crop calibration; 8 or 32 voxels across the anterior-posterior axis
    steps: int
    optimizer: Callable[..., torch.optim.Optimizer]
    lr: float
    cache_name: str
    marker: str

    @property
    def marks(self) -> tuple[str, str]:
        """The comments that bound this network's section of ``docs/results.md``."""
        return f"<!-- {self.marker}:begin -->", f"<!-- {self.marker}:end -->"


NETWORKS = {
    "unet": NetworkSpec(
        build_unet, "UNet 16..128", (48, 48, 48), (64, 8, 64), 1200, torch.optim.Adam, 2e-3,
        "unet_mni_slabs", "accuracy-benchmark",
    ),
    # SwinUNETR's sides must divide by 32: its windows span a whole 29-30-voxel slab (padded to 32)
    "swinunetr": NetworkSpec(
        build_swinunetr, "SwinUNETR feature_size 12", (64, 32, 64), (64, 32, 64), 600, torch.optim.AdamW, 1e-3,
        "swinunetr_fs12_mni_slabs", "accuracy-benchmark-swinunetr",
    ),
}


def train(spec: NetworkSpec, slabs: list[tuple[torch.Tensor, torch.Tensor]], steps: int, seed: int = 0) -> torch.nn.Module:
    """Train the network on random ROI crops (with flips and intensity jitter) of the training slabs."""
    from monai.losses import DiceCELoss
    from monai.transforms import Compose, RandFlipd, RandScaleIntensityd, RandShiftIntensityd, RandSpatialCropSamplesd, SpatialPadd

    torch.manual_seed(seed)
    np.random.seed(seed)
    net = spec.build()
    sample = Compose(
        [
            SpatialPadd(["image", "label"], spec.roi),
            RandSpatialCropSamplesd(["image", "label"], spec.roi, num_samples=2, random_size=False),
            RandFlipd(["image", "label"], prob=0.5, spatial_axis=0),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        ]
    )
    sample.set_random_state(seed)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = spec.optimizer(net.parameters(), spec.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    net.train()
    t0 = time.perf_counter()
    for step in range(steps):
        image, label = slabs[step % len(slabs)]
        crops = sample({"image": image, "label": label})
        x = torch.stack([torch.as_tensor(c["image"]) for c in crops]).float()
        y = torch.stack([torch.as_tensor(c["label"]) for c in crops])
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  train step {step + 1}/{steps}: loss {float(loss.detach()):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return net.eval()


def trained_network(spec: NetworkSpec, data: dict, cache: Path, steps: int) -> torch.nn.Module:
    """The trained network, from the cache when it holds weights for the same number of steps."""
    from monai_effq.utils.io import atomic_write

    path = cache / f"{spec.cache_name}_{steps}steps.pt"
    net = spec.build()
    if path.is_file():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        print(f"trained weights from {path}")
        return net.eval()
    print(f"training the {spec.description} for {steps} steps (cached in {path})")
    t0 = time.perf_counter()
    net = train(spec, data["train"], steps=steps)
    print(f"trained in {time.perf_counter() - t0:.0f} s")
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(net.state_dict(), tmp)
    return net


def predict(network: torch.nn.Module, slabs: list[tuple[torch.Tensor, torch.Tensor]], roi: tuple[int, ...]) -> torch.Tensor:
    """The ``(1, 1, X, Y, Z)`` sliding-window labels of the slabs (each inferred on its own), joined."""
    from monai.inferers import SlidingWindowInferer

    inferer = SlidingWindowInferer(roi, sw_batch_size=4, overlap=0.25, mode="gaussian")
    with torch.no_grad():
        return torch.cat([inferer(image[None], network).argmax(1, keepdim=True) for image, _ in slabs], dim=3)


def dice_against(pred: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """Dice of grey and white matter of labels ``pred`` against labels ``reference``, both ``(1, 1, X, Y, Z)``."""
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    scores = DiceMetric(include_background=False)(one_hot(pred, 3), one_hot(reference, 3))
    return [float(v) for v in scores[0]]


def dice_of(pred: torch.Tensor, slabs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """Dice of grey and white matter of joined labels ``pred`` against the slabs' labels."""
    return dice_against(pred, torch.cat([label[None] for _, label in slabs], dim=3))


def fp_agreement(pred: torch.Tensor, fp_pred: torch.Tensor) -> float:
    """Mean grey/white-matter Dice of ``pred`` against the FP network's labels: how well a quantized
    network reproduces the network it was made from, which is what PTQ fits.

    Dice against the ground truth alone does not rank that: on one held-out brain a quantized network's
    departures from FP can land on either side of the truth (several rows beat FP there).
    """
    return float(np.mean(dice_against(pred, fp_pred)))


def runtime_rows(
    qnet, fake_quant: torch.Tensor, label: str, calib_kind: str, spec: NetworkSpec, test: list, fp: tuple[float, torch.Tensor],
    runtimes: list[str], folder: Path,
) -> list[dict]:
    """Rows for the quantized network exported to ONNX and run by each runtime, and the share of its labels equal to
    torch's (``fake_quant``: the quantized torch network's held-out labels, already predicted for its own row)."""
    from monai_effq.deploy import RUNTIMES, export_onnx

    path = export_onnx(qnet, folder / f"{label.replace(' ', '_')}_{calib_kind}.onnx", (1, 1, *spec.roi))
    rows = []
    for runtime in runtimes:
        t0 = time.perf_counter()
        network = RUNTIMES[runtime](path)
        pred = predict(network, test, spec.roi)
        same = float((pred == fake_quant).float().mean())
        # OpenVINO picks the float parts' precision per CPU (bf16 with AMX or AVX-512 BF16)
        precision = getattr(network, "chosen_precision", None) or "f32"
        rows.append(row(f"{label} {runtime}", calib_kind, pred, test, fp, None))
        print(
            f"  {rows[-1]['config']:<16} {calib_kind:<6} mean {rows[-1]['mean']:.4f}; labels equal to the fake-quant "
            f"network's on {same:.2%} of voxels (float parts {precision}; inference {time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    return rows


def calibration_data(spec: NetworkSpec, data: dict, kind: str) -> torch.Tensor:
    """``(N, 1, *roi)`` windows of both training slabs (``volume``) or of the first (``slab``), or one ``(1, 1, *crop)`` crop."""
    from monai.transforms import SpatialPad

    from monai_effq.data import calibration_windows

    if kind == "volume":
        return calibration_windows([image for image, _ in data["train"]], spec.roi)
    if kind == "slab":
        return calibration_windows(data["train"][0][0], spec.roi)
    image = SpatialPad(spec.crop)(data["train"][0][0]).as_tensor()  # a slab is thinner than SwinUNETR's crop
    starts = [(s - c) // 2 for s, c in zip(image.shape[1:], spec.crop)]
    sl = tuple(slice(a, a + c) for a, c in zip(starts, spec.crop))
    return image[(slice(None), *sl)][None].contiguous()


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ptq(net, calib, method: str, bits: tuple[int, int]):
    """Quantize with monai-effq; returns the quantized network, the seconds it took and the report."""
    from monai_effq import EfficientQConfig, quantize

    config = EfficientQConfig(weight_bits=bits[0], act_bits=bits[1], **ALL_METHODS[method])
    t0 = time.perf_counter()
    result = quantize(net, calib, config, task="multiclass", body_mask=(calib != 0).any(1), progress=False)
    return result.network, time.perf_counter() - t0, result.report


def run_nncf(net, calib):
    """NNCF post-training quantization (W8A8) of the torch network; ``None`` when NNCF is missing."""
    if importlib.util.find_spec("nncf") is None:
        return None
    import copy

    import nncf

    t0 = time.perf_counter()
    dataset = nncf.Dataset([calib[i : i + 1] for i in range(calib.shape[0])])
    qnet = nncf.quantize(copy.deepcopy(net), dataset, subset_size=calib.shape[0])
    return qnet.eval(), time.perf_counter() - t0


def run_onnxruntime(net, calib, folder: Path):
    """ONNX Runtime static QDQ quantization (W8A8) of the network's ONNX export; ``None`` when missing.

    The TorchScript exporter it needs refuses SwinUNETR with a dynamic batch axis ("instance_norm for
    unknown channel size"), so that row reports the failure.
    """
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return None
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from monai_effq.deploy import OnnxRuntimeNetwork

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": calib[i : i + 1].numpy()} for i in range(calib.shape[0])])

        def get_next(self):
            return next(self.items, None)

    t0 = time.perf_counter()
    fp_path, q_path = folder / "fp.onnx", folder / "ort_static_w8a8.onnx"
    axes = {0: "n", 2: "x", 3: "y", 4: "z"}
    torch.onnx.export(
        net, (calib[:1],), str(fp_path), input_names=["input"], output_names=["output"],
        dynamic_axes={"input": axes, "output": axes}, opset_version=17, dynamo=False,
    )
    quantize_static(
        str(fp_path), str(q_path), Reader(), quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=False,
    )
    return OnnxRuntimeNetwork(q_path), time.perf_counter() - t0


def row(
    label: str, calib: str, pred: torch.Tensor, test: list, fp: tuple[float, torch.Tensor], seconds: float | None
) -> dict:
    """One table row from a configuration's held-out labels ``pred``; ``fp`` is the FP mean Dice and labels."""
    scores = dice_of(pred, test)
    mean = float(np.mean(scores))
    return {
        "config": label, "calibration": calib, "gm": scores[0], "wm": scores[1], "mean": mean,
        "drop": fp[0] - mean, "vs_fp": fp_agreement(pred, fp[1]), "seconds": seconds, "peak_mib": peak_rss_mib(),
    }


def table(rows: list[dict], header: str) -> str:
    """The Markdown table of the rows."""
    lines = [
        header, "",
        "| configuration | calibration | GM Dice | WM Dice | mean | drop vs FP | Dice vs FP labels | quantize s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        secs = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(
            f"| {r['config']} | {r['calibration']} | {r['gm']:.4f} | {r['wm']:.4f} | {r['mean']:.4f} | "
            f"{r['drop']:+.4f} | {r['vs_fp']:.4f} | {secs} | {r['peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def compared(rows: list[dict], field: str) -> Iterator[tuple[str, str, float, str, float]]:
    """``(setting, calibration, efficientq's value, the best plain baseline, its value)`` of ``field``
    wherever the run has efficientq and every baseline."""
    by = {(r["config"], r["calibration"]): r[field] for r in rows}
    for setting in SETTINGS:
        for calib in CALIBRATIONS:
            keys = {m: (f"{m} {setting}", calib) for m in ("efficientq", *BASELINES)}
            if all(k in by for k in keys.values()):
                best = max(BASELINES, key=lambda m: by[keys[m]])
                yield setting, calib, by[keys["efficientq"]], best, by[keys[best]]


def verdicts(rows: list[dict], fp_mean: float) -> list[str]:
    """The issue's bars, checked on the rows of this run."""
    out = []
    for setting, calib, e, _, best_peer in compared(rows, "mean"):
        bar = min(best_peer, fp_mean) - 0.005
        out.append(f"{setting} {calib}: efficientq {e:.4f} vs max(RTN, GPTQ) {best_peer:.4f}: {'met' if e >= bar else 'NOT met'}")
    by = {(r["config"], r["calibration"]): r["mean"] for r in rows}
    for setting, limit in (("W4A8", 0.005), ("W2A8", 0.03)):
        k = (f"efficientq {setting}", "volume")
        if k in by:
            ok = fp_mean - by[k] <= limit
            out.append(f"{setting} volume within {limit} of FP: drop {fp_mean - by[k]:.4f}: {'met' if ok else 'NOT met'}")
    return out


def fidelity(rows: list[dict]) -> list[str]:
    """Per setting and calibration, how closely EfficientQ and the best plain baseline reproduce FP's labels (no bar)."""
    return [f"{setting} {calib}: efficientq {e:.4f} vs {best} {b:.4f}" for setting, calib, e, best, b in compared(rows, "vs_fp")]


def write_results(text: str, path: Path, marks: tuple[str, str]) -> None:
    """Replace the network's section of ``docs/results.md`` (appended the first time), atomically."""
    from monai_effq.utils.io import atomic_write_text

    begin, end = marks
    old = path.read_text() if path.is_file() else ""
    block = f"{begin}\n{text}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(path, new)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(ALL_METHODS))
    parser.add_argument("--calibration", nargs="+", default=list(CALIBRATIONS), choices=[*CALIBRATIONS, *EXTRA_CALIBRATIONS])
    parser.add_argument("--no-peers", action="store_true", help="skip NNCF and ONNX Runtime")
    parser.add_argument(
        "--deploy", nargs="+", default=[], choices=["openvino", "onnxruntime"],
        help="also export each efficientq network to ONNX and measure its Dice in these runtimes",
    )
    parser.add_argument("--network", default="unet", choices=list(NETWORKS))
    parser.add_argument("--train-steps", type=int, default=None, help="training steps (default: 1200 UNet, 600 SwinUNETR)")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    parser.add_argument("--write", action="store_true", help="write the table into docs/results.md")
    args = parser.parse_args(argv)
    spec = NETWORKS[args.network]
    steps = spec.steps if args.train_steps is None else args.train_steps
    torch.set_num_threads(os.cpu_count() or 1)

    print(f"CPU: {cpu_summary()}; torch {torch.__version__} fp32, {torch.get_num_threads()} threads; {column_loops_summary()}")
    image, label = load_volume()
    data = split(image, label)
    print(f"volume {tuple(image.shape[1:])} at {SPACING} mm; slabs of {[tuple(i.shape[1:]) for i, _ in data['train'] + data['test']]}")
    net = trained_network(spec, data, args.cache, steps)
    test = data["test"]
    print(f"FP Dice on the training slabs {dice_of(predict(net, data['train'], spec.roi), data['train'])}")
    fp_pred = predict(net, test, spec.roi)
    scores = dice_of(fp_pred, test)
    fp = (float(np.mean(scores)), fp_pred)
    rows = [row("FP", "-", fp_pred, test, fp, None)]
    print(f"FP held-out Dice GM {scores[0]:.4f} WM {scores[1]:.4f}", flush=True)
    for calib_kind in args.calibration:
        calib = calibration_data(spec, data, calib_kind)
        print(f"calibration {calib_kind}: {tuple(calib.shape)}", flush=True)
        for setting in args.settings:
            for method in args.methods:
                qnet, secs, _ = run_ptq(net, calib, method, SETTINGS[setting])
                fake_quant = predict(qnet, test, spec.roi)
                rows.append(row(f"{method} {setting}", calib_kind, fake_quant, test, fp, secs))
                r = rows[-1]
                print(
                    f"  {r['config']:<16} {calib_kind:<6} mean {r['mean']:.4f} (drop {r['drop']:+.4f}; "
                    f"Dice vs FP labels {r['vs_fp']:.4f}) in {secs:.1f} s",
                    flush=True,
                )
                if args.deploy and method == "efficientq":
                    rows += runtime_rows(qnet, fake_quant, f"{method} {setting}", calib_kind, spec, test, fp, args.deploy, args.cache)
        if not args.no_peers:
            peers = (
                ("NNCF W8A8", lambda: run_nncf(net, calib)),
                ("ORT static W8A8", lambda: run_onnxruntime(net, calib, args.cache)),
            )
            for name, fn in peers:
                try:
                    out = fn()
                except Exception as e:  # a peer's failure is a result to report, not a reason to lose the run
                    print(f"  {name}: failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
                    continue
                if out is None:
                    print(f"  {name}: skipped (package missing: pip install -e '.[bench]')")
                    continue
                rows.append(row(name, calib_kind, predict(out[0], test, spec.roi), test, fp, out[1]))
                r = rows[-1]
                print(
                    f"  {name:<16} {calib_kind:<6} mean {r['mean']:.4f} (Dice vs FP labels {r['vs_fp']:.4f}) in {out[1]:.1f} s",
                    flush=True,
                )
    header = (
        f"### Real-data accuracy{'' if args.network == 'unet' else ', ' + spec.description} "
        f"(`python benchmarks/accuracy.py {shlex.join(sys.argv[1:] if argv is None else argv)}`)\n\n"
        f"MNI ICBM152 2009 T1 with GM/WM maps (nilearn's packaged files), 2 mm, {spec.description} trained "
        f"{steps} steps on anterior-posterior slabs 1 and 3 of 4; held-out Dice on slabs 2 and 4. "
        f"Crop = one {'x'.join(map(str, spec.crop))} crop; volume = every {'x'.join(map(str, spec.roi))} window of the "
        f"training slabs. gptq and rtn are the plain algorithms; efficientq and gptq+val choose each "
        f"layer's setting on held-out calibration voxels (the defaults). Dice vs FP labels: mean GM/WM Dice "
        f"against the FP network's own held-out labels instead of the truth (how closely a configuration "
        f"reproduces FP, what PTQ fits; 1 for FP). CPU: {cpu_summary()}; "
        f"torch {torch.__version__} fp32."
    )
    text = table(rows, header) + "\n\nBars (from this run):\n" + "\n".join(f"- {v}" for v in verdicts(rows, fp[0]))
    if lines := fidelity(rows):
        text += "\n\nDice vs FP labels, efficientq against the better plain baseline (no bar):\n" + "\n".join(f"- {v}" for v in lines)
    print("\n" + text)
    if args.write:
        write_results(text, ROOT / "docs" / "results.md", spec.marks)


if __name__ == "__main__":
    sys.exit(main())
