"""Deployment benchmark: the quantized bundles' networks run by torch, ONNX Runtime and OpenVINO.

Part 1, latency: for MONAI's SegResNet with ``init_filters=16`` (the issue's network; a seeded
initialisation) and the BraTS bundle's trained SegResNet (``init_filters=8``), both on a 1x4x128^3
demo volume, and the LiTS bundle's trained UNet on a 1x1x96^3 volume, at W8A8 and W4A8 (EfficientQ,
quantized by the bundle's own ``quantize`` workflow on its demo calibration case): torch fp32 eager
(also with denormals flushed, as OpenVINO does), torch fake-quant, ONNX Runtime fp32/int8, OpenVINO
running the FP model (three graphs: our export, in the group-norm form ``group_norm_form_for`` picks,
which makes OpenVINO's FP run faster too and so is the stricter baseline; ``torch.onnx.export``'s
own file; and OpenVINO's own conversion of the torch network, ``ov.convert_model``, what an OpenVINO
user without an ONNX file runs) and our int8 model, each with
``OpenVINONetwork``'s default precision for the layers left in floating point (bf16 where the CPU
computes it natively, as OpenVINO's own default) and with f32, our int8 with the other group-norm
export form than the one ``group_norm_form_for`` picks, and NNCF's int8 of each FP file
(``nncf.quantize`` with its defaults on the bundle's calibration case; which runs faster depends on
the CPU; ``--skip-nncf`` leaves it out), and with ``--norm-inputs`` our int8 quantized with
``quantize_norm_inputs`` as well (``+N``). Every runner is timed once per round, right after an
untimed call of its own (a warm call, as in a sliding-window loop), rounds interleaved, and the
median is reported with its speed ratio against torch fp32 and against OpenVINO running each FP graph
with its defaults, all measured in the same run; also the ONNX file sizes and each output's relative
L2 error and label agreement (sigmoid channels or argmax, as the bundle's task) against fp32 and
against the fake-quant network. The CPU's flags and each OpenVINO runner's chosen float precision are
printed beside the figures.

Part 2, Dice: each bundle's ``evaluate`` workflow with the ``evaluate_openvino.json`` overlay (the
sliding-window evaluation on the demo validation cases) for the fake-quant network, OpenVINO and ONNX
Runtime, and NNCF's int8 of the bundle's FP network in OpenVINO: Dice per class, the Dice of its labels
against the FP network's own ("vs FP labels", the bundle's ``fp_agreement``) and wall time.

``--counters`` adds OpenVINO's own per-node time for each OpenVINO runner, by kind (int8 and float
convolutions, norm statistics, elementwise subgraphs, reorders, resampling), the int8 convolutions'
throughput (the FP network's multiply-accumulates per second) and the most any int8 graph of the
network could gain over torch fp32 on this CPU with these convolution kernels: torch's time over the
int8 convolutions' alone, as if everything else were free.

``--emulate-avx2`` runs with OpenVINO (its own kernels and its oneDNN), torch and MKL capped at AVX2
(no AVX-512, no VNNI), to see what an AVX2 CPU would run; ``--emulate-avx512-vnni`` caps OpenVINO at
AVX-512 with VNNI but no bf16 or AMX (a Cascade Lake Xeon; torch's AVX-512 kernels are what such a
CPU runs). OpenVINO then reports no bf16 and runs the float parts in f32. The figures are this
machine's with narrower kernels, not another CPU's (ONNX Runtime picks its kernels itself and is not
capped). The kernels OpenVINO compiled are printed with each network, so a cap that did not take is
seen.

Usage::

    python benchmarks/deploy.py                 # the issue's sizes, 5 rounds
    python benchmarks/deploy.py --quick         # 64^3 volumes, 2 rounds, W4A8 only
    python benchmarks/deploy.py --emulate-avx2 --skip-nncf --bits 8   # AVX2 kernels on this CPU
    python benchmarks/deploy.py --emulate-avx512-vnni --skip-dice --bits 8   # AVX-512 without bf16/AMX
    python benchmarks/deploy.py --only init_filters=16 --skip-dice --bits 8 --counters   # where the time goes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.transforms import ResizeWithPadOrCrop

import monai_effq
from monai_effq.deploy import OnnxRuntimeNetwork, OpenVINONetwork, export_onnx, group_norm_form_for
from monai_effq.deploy.runtime import float_precision_for

from machine import COUNTER_KINDS, cpu_summary, openvino_counters, openvino_kernels

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ("brats_effq", "lits_effq")
OTHER_FORM = {"onnx": "channel_stats", "channel_stats": "onnx"}
# --emulate-*: the kernels another CPU kind would run, read when each library starts, so the script
# restarts itself with them set. OpenVINO needs both caps: ONEDNN_MAX_CPU_ISA alone capped its oneDNN
# convolutions but left its own Reduce, MVN and Interpolate kernels on AVX-512 and its capability
# query reporting bf16 (2026.4.1)
EMULATED_CPUS = {
    "avx2": {
        "OV_CPU_MAX_ISA": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    },
    "avx512_vnni": {"OV_CPU_MAX_ISA": "AVX512_CORE_VNNI", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"},
}
DEFAULT_PRECISION = "auto"  # OpenVINONetwork's own pick (f32 where OpenVINO reports no bf16)
# each OpenVINO FP baseline: its runner, the result field of the speed ratio against it, and its column
FP_BASELINES = (
    ("OV FP default", "speedup_vs_openvino_fp_default", "x OV FP def"),
    ("OV FP default, torch export", "speedup_vs_openvino_fp_default_torch_export", "x OV FP, torch exp"),
    ("OV FP default, convert_model", "speedup_vs_openvino_fp_default_convert_model", "x OV FP, convert"),
)
# name: (bundle whose workflows run it, volume size, network_def overrides; None = the bundle's trained network)
NETWORKS = {
    "SegResNet init_filters=16 (untrained)": ("brats_effq", 128, {"init_filters": 16, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]}),
    "SegResNet init_filters=8 (brats_effq, trained)": ("brats_effq", 128, None),
    "UNet (lits_effq, trained)": ("lits_effq", 96, None),
}


def parser_for(bundle: str, configs: list[str], **overrides) -> ConfigParser:
    """A bundle's config (train.json, then the overlays in order) with overrides, as ``python -m monai.bundle`` reads it."""
    parser = ConfigParser()
    parser.read_config([str(ROOT / "bundles" / bundle / "configs" / f"{c}.json") for c in ["train", *configs]])
    parser["bundle_root"] = str(ROOT / "bundles" / bundle)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def network_def(bundle: str, overrides: dict | None) -> ConfigParser:
    parser = parser_for(bundle, ["evaluate"])
    for key, value in (overrides or {}).items():
        parser[f"network_def#{key}"] = value
    return parser


def fp_network(bundle: str, overrides: dict | None, work: Path) -> tuple[torch.nn.Module, Path]:
    """The FP network and its checkpoint: the bundle's trained one, or a seeded initialisation."""
    net = network_def(bundle, overrides).get_parsed_content("network_def")
    if overrides is None:
        ckpt = ROOT / "bundles" / bundle / "models" / "model.pt"
        net.load_state_dict(torch.load(ckpt, map_location="cpu"))
    else:
        torch.manual_seed(0)
        net = network_def(bundle, overrides).get_parsed_content("network_def")
        ckpt = work / f"{bundle}_untrained.pt"
        torch.save(net.state_dict(), ckpt)
    return net.eval(), ckpt


def quantize_bundle(
    bundle: str,
    weight_bits: int,
    work: Path,
    overrides: dict | None = None,
    fp_ckpt: Path | None = None,
    norm_inputs: bool = False,
) -> Path:
    """Run the bundle's quantize workflow (EfficientQ, demo calibration case) into ``work``
    (``norm_inputs``: with ``quantize_norm_inputs`` on)."""
    tag = "_norm_inputs" if norm_inputs else ""
    path = work / f"{bundle}_{'custom' if overrides else 'bundle'}_w{weight_bits}a8{tag}.pt"
    parser = parser_for(
        bundle,
        ["quantize"],
        weight_bits=weight_bits,
        quantized_path=str(path),
        export_dir="",
        output_dir=str(work / "eval"),
        fp_checkpoint=str(fp_ckpt or ROOT / "bundles" / bundle / "models" / "model.pt"),
    )
    for key, value in (overrides or {}).items():
        parser[f"network_def#{key}"] = value
    if norm_inputs:
        parser["efficientq#quantize_norm_inputs"] = True
    parser.get_parsed_content("calibrate#calibrator").run()
    return path


def volume(bundle: str, size: int) -> torch.Tensor:
    """The first demo validation case, preprocessed by the bundle and padded/cropped to ``size``^3."""
    parser = parser_for(bundle, ["evaluate"])
    case = parser.get_parsed_content("validate#dataset")[0]
    image = ResizeWithPadOrCrop((size,) * 3)(case["image"])
    return image.as_tensor()[None].float()


class _FlushDenormals(torch.nn.Module):
    """Runs a network with denormals flushed to zero (as OpenVINO does), to show torch's best case."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.set_flush_denormal(True)
        try:
            return self.net(x)
        finally:
            torch.set_flush_denormal(False)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def label_agreement(a: torch.Tensor, b: torch.Tensor, task: str) -> float:
    """The share of voxels whose labels agree: every sigmoid channel's (``"multilabel"``) or the argmax (``"multiclass"``)."""
    if task == "multilabel":
        return float(((a > 0) == (b > 0)).float().mean())
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def nncf_int8(fp_onnx: Path, calibration: torch.Tensor, path: Path) -> Path:
    """NNCF's int8 of an FP ONNX file (its defaults, one calibration volume), saved as OpenVINO IR."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp_onnx))
    quantized = nncf.quantize(model, nncf.Dataset([calibration.numpy()]), subset_size=1)
    ov.save_model(quantized, str(path))
    return path


def convolution_macs(net: torch.nn.Module, x: torch.Tensor) -> int:
    """The multiply-accumulates of a network's convolutions (and transposed ones) on input ``x``."""
    total = 0

    def count(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        # a convolution spends in/groups x kernel MACs per output element; a transposed one as much per input element
        transposed = isinstance(module, torch.nn.modules.conv._ConvTransposeNd)
        elements = inputs[0].numel() if transposed else output.numel()
        per_element = (module.out_channels if transposed else module.in_channels) // module.groups
        total += elements * per_element * int(torch.tensor(module.kernel_size).prod())

    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for hook in hooks:
            hook.remove()
    return total


def print_counters(name: str, runners: dict, x: torch.Tensor, fp: torch.nn.Module, torch_seconds: float) -> list[dict]:
    """Each OpenVINO runner's per-node time by kind (``machine.openvino_counters``), its int8 convolutions'
    throughput and torch fp32's time over theirs (the most an int8 graph could gain with these kernels)."""
    macs = convolution_macs(fp, x)
    print(f"\nOpenVINO per-node counters, ms (the least disturbed of 3 requests); the FP network's convolutions: {macs / 1e9:.1f} GMAC")
    print(f"{'runner':30s} {'wall':>6s} " + "".join(f"{kind:>{max(len(kind), 7)}s} " for kind in COUNTER_KINDS) + "int8 GMAC/s  torch/int8 conv")
    rows = []
    for key, run in runners.items():
        if not isinstance(run, OpenVINONetwork):
            continue
        model = run.model.clone()
        model.reshape({0: list(x.shape)})
        compiled = run.core.compile_model(model, run.device, {**run.config, "PERF_COUNT": True})
        kinds, wall = openvino_counters(compiled, {0: x.numpy()})
        conv_s = kinds["int8 conv"] / 1e3
        row = {
            "network": name,
            "runner": key,
            "counters_ms": kinds,
            "counters_wall_seconds": wall,
            "int8_conv_gmac_per_s": macs / conv_s / 1e9 if conv_s else None,
            "torch_fp32_over_int8_conv": torch_seconds / conv_s if conv_s else None,
        }
        rows.append(row)
        tail = f"{row['int8_conv_gmac_per_s']:11.0f}  {row['torch_fp32_over_int8_conv']:13.2f}x" if conv_s else ""
        print(f"{key:30s} {wall * 1e3:6.0f} " + "".join(f"{kinds[kind]:{max(len(kind), 7)}.1f} " for kind in COUNTER_KINDS) + tail)
    return rows


def calibration_volume(bundle: str, size: int) -> torch.Tensor:
    """The bundle's calibration case (the one its ``quantize`` workflow uses), padded/cropped to ``size``^3."""
    parser = parser_for(bundle, ["quantize"])
    case = parser.get_parsed_content("calibrate#dataset")[0]
    return ResizeWithPadOrCrop((size,) * 3)(case["image"]).as_tensor()[None].float()


def latency(args: argparse.Namespace, work: Path) -> list[dict]:
    rows = []
    for index, (name, (bundle, size, overrides)) in enumerate(NETWORKS.items()):
        if args.only and args.only not in name:
            continue
        size = 64 if args.quick else size
        x = volume(bundle, size)
        fp, fp_ckpt = fp_network(bundle, overrides, work)
        fp_onnx = export_onnx(fp, work / f"net{index}_fp32.onnx", x, require_quantized=False)
        # OpenVINO runs the group-norm form group_norm_form_for picks, fp32 and int8 alike
        ov_norms = group_norm_form_for("openvino", fp, DEFAULT_PRECISION)
        fp_onnx_ov = export_onnx(fp, work / f"net{index}_fp32_ov.onnx", x, require_quantized=False, group_norm=ov_norms)
        # what a user without monai-effq runs: torch.onnx.export's own file (PyTorch's group-norm form)
        fp_onnx_torch = work / f"net{index}_fp32_torch_export.onnx"
        torch.onnx.export(fp, (x,), str(fp_onnx_torch), dynamo=True, external_data=False)
        fp_ir_convert = openvino_conversion(fp, x, work / f"net{index}_fp32_ov_convert.xml")
        # "default": OpenVINONetwork's default precision for the float parts (float_precision_for:
        # bf16 where the CPU computes it natively), which is OpenVINO's own default on CPUs
        runners = {
            "torch fp32": fp,
            "torch fp32 FTZ": _FlushDenormals(fp),
            "ORT fp32": OnnxRuntimeNetwork(fp_onnx, threads=args.threads),
            "OV FP default": OpenVINONetwork(fp_onnx_ov, precision=DEFAULT_PRECISION, threads=args.threads),
            "OV FP default, torch export": OpenVINONetwork(fp_onnx_torch, precision=DEFAULT_PRECISION, threads=args.threads),
            "OV FP default, convert_model": OpenVINONetwork(fp_ir_convert, precision=DEFAULT_PRECISION, threads=args.threads),
            "OV FP f32": OpenVINONetwork(fp_onnx_ov, precision="f32", threads=args.threads),
        }
        if not args.skip_nncf:
            calibration = calibration_volume(bundle, size)
            nncf_ir = nncf_int8(fp_onnx_ov, calibration, work / f"net{index}_nncf.xml")
            runners["NNCF int8 default W8A8"] = OpenVINONetwork(nncf_ir, precision=DEFAULT_PRECISION, threads=args.threads)
            runners["NNCF int8 f32 W8A8"] = OpenVINONetwork(nncf_ir, precision="f32", threads=args.threads)
            # NNCF from torch's own FP file too: which of the two NNCF runs faster depends on the CPU
            # (init 16: ours-form 1.06x faster in bf16 on AMX, torch's 1.10x faster in f32 at AVX-512 VNNI)
            nncf_ir_torch = nncf_int8(fp_onnx_torch, calibration, work / f"net{index}_nncf_torch_export.xml")
            runners["NNCF int8 torch-exp W8A8"] = OpenVINONetwork(nncf_ir_torch, precision=DEFAULT_PRECISION, threads=args.threads)
        files = {"fp32": fp_onnx.stat().st_size}
        for bits in args.bits:
            ckpt = quantize_bundle(bundle, bits, work, overrides, fp_ckpt)
            net = monai_effq.load_quantized(ckpt, network_def(bundle, overrides).get_parsed_content("network_def"))
            path = export_onnx(net, work / f"net{index}_w{bits}a8.onnx", x)
            path_ov = export_onnx(net, work / f"net{index}_w{bits}a8_ov.onnx", x, group_norm=ov_norms)
            path_other = export_onnx(net, work / f"net{index}_w{bits}a8_other.onnx", x, group_norm=OTHER_FORM[ov_norms])
            files[f"W{bits}A8"] = path.stat().st_size
            runners[f"torch fake-quant W{bits}A8"] = net.eval()
            runners[f"ORT int8 W{bits}A8"] = OnnxRuntimeNetwork(path, threads=args.threads)
            runners[f"OV int8 default W{bits}A8"] = OpenVINONetwork(path_ov, precision=DEFAULT_PRECISION, threads=args.threads)
            runners[f"OV int8 f32 W{bits}A8"] = OpenVINONetwork(path_ov, precision="f32", threads=args.threads)
            # the same network with the other group-norm form, to show what the choice is worth
            runners[f"OV int8 {OTHER_FORM[ov_norms]} W{bits}A8"] = OpenVINONetwork(path_other, precision=DEFAULT_PRECISION, threads=args.threads)
            if args.norm_inputs:  # the same quantize run with the norms' inputs rounded to 8 bits as well
                ckpt_n = quantize_bundle(bundle, bits, work, overrides, fp_ckpt, norm_inputs=True)
                net_n = monai_effq.load_quantized(ckpt_n, network_def(bundle, overrides).get_parsed_content("network_def"))
                path_n = export_onnx(net_n, work / f"net{index}_w{bits}a8_norm_inputs_ov.onnx", x, group_norm=ov_norms)
                runners[f"torch fake-quant W{bits}A8+N"] = net_n.eval()
                runners[f"OV int8 default W{bits}A8+N"] = OpenVINONetwork(path_n, precision=DEFAULT_PRECISION, threads=args.threads)
        times: dict[str, list[float]] = {k: [] for k in runners}
        outputs = {}
        with torch.no_grad():
            for key, run in runners.items():  # warm-up, and the outputs compared below
                outputs[key] = run(x)
            for key in ("OV FP default", f"OV int8 default W{args.bits[0]}A8"):
                request = runners[key].request_for(tuple(x.shape))
                print(f"{key} kernels: {openvino_kernels(request.get_compiled_model())}")
            for _ in range(args.rounds):
                for key, run in runners.items():
                    # timed right after an untimed call of its own, as in a sliding-window loop: the first
                    # OpenVINO call after the torch and ONNX Runtime runners ran 15-25% slower, whichever
                    # file it ran, which inflated the FP baseline that came first
                    run(x)
                    t0 = time.perf_counter()
                    run(x)
                    times[key].append(time.perf_counter() - t0)
                    # ONNX Runtime's worker threads spin on after a run; on 2 cores that slowed the
                    # next runner by up to 50%, so every runner starts on an idle machine
                    time.sleep(args.pause)
        base = statistics.median(times["torch fp32"])
        baselines = {field: statistics.median(times[runner]) for runner, field, _ in FP_BASELINES}
        print(f"\n{name}, input {tuple(x.shape)}, median of {args.rounds} interleaved rounds")
        task = parser_for(bundle, ["quantize"])["task"]
        print(
            f"{'runner':30s} {'float':>5s} {'seconds':>8s} {'x torch fp32':>12s} "
            + "".join(f"{title} " for _, _, title in FP_BASELINES)
            + f"{'relL2 vs fp32':>13s} "
            f"{'vs fake-quant':>13s} {'labels=fp32':>11s} {'=fake-quant':>11s}"
        )
        for key, run in runners.items():
            med = statistics.median(times[key])
            tag = key.split()[-1]
            # our fake-quant network is the reference of our own deployments only, not of NNCF's
            fq = outputs.get(f"torch fake-quant {tag}") if tag != "FTZ" and not key.startswith("NNCF") else None
            row = {
                "network": name,
                "runner": key,
                "float_precision": getattr(run, "chosen_precision", None),
                "seconds": med,
                "speedup_vs_torch_fp32": base / med,
                **{field: seconds / med for field, seconds in baselines.items()},
                "rel_l2_vs_fp32": rel_l2(outputs[key], outputs["torch fp32"]),
                "rel_l2_vs_fake_quant": rel_l2(outputs[key], fq) if fq is not None else None,
                "labels_equal_fp32": label_agreement(outputs[key], outputs["torch fp32"], task),
                "labels_equal_fake_quant": label_agreement(outputs[key], fq, task) if fq is not None else None,
            }
            rows.append(row)
            labels_fq = "" if fq is None else f"{row['labels_equal_fake_quant']:11.4f}"
            print(
                f"{key:30s} {row['float_precision'] or '':>5s} {med:8.3f} {row['speedup_vs_torch_fp32']:12.2f} "
                + "".join(f"{row[field]:{len(title)}.2f} " for _, field, title in FP_BASELINES)
                + f"{row['rel_l2_vs_fp32']:13.2e} "
                f"{'' if fq is None else format(row['rel_l2_vs_fake_quant'], '13.2e'):>13s} "
                f"{row['labels_equal_fp32']:11.4f} {labels_fq}"
            )
        if args.counters:
            rows += print_counters(name, runners, x, fp, base)
        for tag, size_bytes in files.items():
            print(f"ONNX {tag}: {size_bytes / 2**20:.2f} MiB ({size_bytes / files['fp32']:.3f} of fp32)")
            rows.append({"network": name, "file": tag, "bytes": size_bytes, "ratio_vs_fp32": size_bytes / files["fp32"]})
    return rows


def openvino_conversion(fp: torch.nn.Module, x: torch.Tensor, path: Path) -> Path:
    """OpenVINO's own conversion of the FP torch network (``ov.convert_model``, no ONNX file), saved as
    IR with its float32 weights as they are (``compress_to_fp16=False``: what ``compile_model`` of the
    converted model in memory runs)."""
    import openvino as ov

    ov.save_model(ov.convert_model(fp, example_input=x), str(path), compress_to_fp16=False)
    return path


def nncf_model(bundle: str, work: Path) -> Path:
    """NNCF's int8 of the bundle's trained FP network, calibrated on the bundle's calibration case."""
    path = work / f"{bundle}_nncf.xml"
    if not path.is_file():
        fp, _ = fp_network(bundle, None, work)
        parser = parser_for(bundle, ["quantize"])
        image = parser.get_parsed_content("calibrate#dataset")[0]["image"].as_tensor()[None].float()
        onnx_path = export_onnx(fp, work / f"{bundle}_fp32_ov.onnx", image, require_quantized=False, group_norm=group_norm_form_for("openvino", fp, DEFAULT_PRECISION))
        nncf_int8(onnx_path, image, path)
    return path


def dice(args: argparse.Namespace, work: Path) -> list[dict]:
    rows = []
    bits = args.dice_bits
    print(f"\nSliding-window evaluation on the demo validation cases (the bundles' evaluate workflow), W{bits}A8")
    # with --norm-inputs, also the network quantized with quantize_norm_inputs ("+N"), in torch and OpenVINO
    variants = [("", False, ("torch", "openvino", "onnxruntime"))]
    if args.norm_inputs:
        variants.append(("+N", True, ("torch", "openvino")))
    for bundle, (tag, norm_inputs, runtimes) in ((b, v) for b in BUNDLES for v in variants):
        ckpt = work / f"{bundle}_bundle_w{bits}a8{'_norm_inputs' if norm_inputs else ''}.pt"
        if not ckpt.is_file():
            quantize_bundle(bundle, bits, work, norm_inputs=norm_inputs)
        fp_ckpt = str(ROOT / "bundles" / bundle / "models" / "model.pt")
        for runtime in runtimes:
            configs = ["evaluate"] if runtime == "torch" else ["evaluate", "evaluate_openvino"]
            overrides = {"quantized_path": str(ckpt), "fp_checkpoint": fp_ckpt, "output_dir": str(work / "eval"), "weight_bits": bits}
            if runtime != "torch":
                overrides["runtime"] = runtime
            if runtime == "openvino" and DEFAULT_PRECISION != "auto":
                overrides["runtime_options"] = {"precision": DEFAULT_PRECISION}
            parser = parser_for(bundle, configs, **overrides)
            runs = {"torch fp32": "validate#evaluator"} if runtime == "torch" and not tag else {}
            runs[f"{runtime} W{bits}A8{tag}" if runtime != "torch" else f"torch fake-quant W{bits}A8{tag}"] = (
                "quantized#evaluator" if runtime == "torch" else "deployed#evaluator"
            )
            if runtime == "openvino" and not args.skip_nncf and not tag:
                runs["NNCF int8 W8A8 (OpenVINO)"] = "nncf"
            for label, key in runs.items():
                if key == "nncf":  # the deployed evaluator with NNCF's int8 of the FP network in its place
                    nncf_ir = str(nncf_model(bundle, work))
                    parser["deployed_network"] = f"$monai_effq.deploy.OpenVINONetwork({nncf_ir!r}, precision={DEFAULT_PRECISION!r})"
                    key = "deployed#evaluator"
                evaluator = parser.get_parsed_content(key)
                t0 = time.perf_counter()
                evaluator.run()
                seconds = time.perf_counter() - t0
                per_class = torch.as_tensor(evaluator.state.metrics["dice"]).float().reshape(-1).tolist()
                mean = sum(per_class) / len(per_class)
                agreement = evaluator.state.metrics.get("fp_agreement")  # the FP row is the reference itself
                agreement = None if agreement is None else torch.as_tensor(agreement, dtype=torch.float64).mean().item()
                rows.append({
                    "bundle": bundle, "runner": label, "dice_mean": mean, "dice_per_class": per_class, "fp_agreement": agreement,
                    "seconds": seconds,
                })
                shown = "-" if agreement is None else f"{agreement:.4f}"
                print(
                    f"{bundle:11s} {label:24s} Dice {mean:.4f}  {' '.join(f'{d:.4f}' for d in per_class)}  "
                    f"vs FP labels {shown:6s} {seconds:6.1f} s"
                )
    return rows


def main() -> None:
    global DEFAULT_PRECISION
    os.environ.setdefault("TQDM_DISABLE", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64^3 volumes, 2 rounds, W4A8 only")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; 2 with --quick)")
    parser.add_argument(
        "--threads", type=int, default=2, help="threads of torch, OpenVINO and ONNX Runtime alike (default 2, the bars' cores)"
    )
    parser.add_argument("--pause", type=float, default=0.5, help="idle seconds after each timed run")
    parser.add_argument("--bits", type=int, nargs="+", default=None, help="weight bits of our int8 files (default 8 4; 4 with --quick)")
    parser.add_argument("--skip-dice", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--dice-bits", type=int, default=4, help="weight bits of our network in the Dice part")
    parser.add_argument("--skip-nncf", action="store_true", help="leave out NNCF's int8 (the [bench] extra)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--norm-inputs", action="store_true", help="also quantize with quantize_norm_inputs and run that in OpenVINO (latency and Dice)"
    )
    parser.add_argument(
        "--counters", action="store_true", help="also print OpenVINO's per-node time by kind for each OpenVINO runner (latency part)"
    )
    parser.add_argument("--only", default="", help="run only the networks whose name contains this text")
    emulation = parser.add_mutually_exclusive_group()
    emulation.add_argument(
        "--emulate-avx2",
        action="store_const",
        const="avx2",
        dest="emulate",
        help="cap OpenVINO, its oneDNN, torch and MKL at AVX2, as on an AVX2 CPU without AVX-512/VNNI (the caches, "
        "clocks and core count stay this machine's)",
    )
    emulation.add_argument(
        "--emulate-avx512-vnni",
        action="store_const",
        const="avx512_vnni",
        dest="emulate",
        help="cap OpenVINO and its oneDNN at AVX-512 with VNNI, without bf16 or AMX (a Cascade Lake Xeon)",
    )
    args = parser.parse_args()
    caps = EMULATED_CPUS.get(args.emulate, {})
    if any(os.environ.get(k) != v for k, v in caps.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **caps})
    if args.rounds is None:  # --quick's defaults only where the option was not given
        args.rounds = 2 if args.quick else 5
    if args.bits is None:
        args.bits = [4] if args.quick else [8, 4]
    torch.set_num_threads(args.threads)
    emulated = (
        f"; EMULATED {args.emulate.upper()} ({' '.join(f'{k}={v}' for k, v in caps.items())}; ONNX Runtime's own "
        "kernels are not capped)"
        if caps
        else ""
    )
    print(
        f"CPU: {cpu_summary()}; torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}){emulated}; "
        f"{args.threads} threads for torch, OpenVINO and ONNX Runtime alike"
    )
    import openvino as ov

    default = float_precision_for(ov.Core())
    print(f"OpenVINO {ov.__version__}: float parts by default in {default} on this CPU")
    if caps and default == "bf16":
        # an OpenVINO that ignores OV_CPU_MAX_ISA: bf16 without bf16 kernels gave NaN, so run f32
        print("WARNING: OpenVINO ignored OV_CPU_MAX_ISA, so its own kernels are not capped; float parts forced to f32")
        DEFAULT_PRECISION = "f32"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = [] if args.skip_latency else latency(args, work)
        if not args.skip_dice:
            rows += dice(args, work)
    if args.json:
        from monai_effq.utils.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(rows, indent=2))
    print("\nratios are against torch fp32 eager and OpenVINO running the FP model with its defaults, measured in the same run", file=sys.stderr)


if __name__ == "__main__":
    main()
