"""MONAI networks beyond the bundles' two: each one quantized, exported to ONNX and run by OpenVINO and
ONNX Runtime, to show which architectures the whole path takes and what each step did.

Every network gets random weights (BatchNorm statistics drawn too, so that folding them changes
something), one random calibration volume and EfficientQ W8A8. Printed per network: seconds to
quantize and to export; the BatchNorms folded and left unfolded; how the export went (torch.export
with every axis dynamic, with its spatial axes fixed, or traced by the TorchScript exporter); the
fake-quant network's rel-L2 from FP; each runtime's rel-L2 from the fake-quant network and the share
of voxels where its labels (argmax) equal the fake-quant network's. Random weights say whether the
path works and the runtimes compute the fake-quant network, not how accurate a trained network would
be (``benchmarks/accuracy.py`` measures that on real data). The CPU's flags are printed first;
OpenVINO runs its float parts in f32 here so that the figures do not depend on the CPU kind.

Usage::

    python benchmarks/networks.py                      # every network (~4 min on 2 cores)
    python benchmarks/networks.py --only DynUNet DiNTS

With ``dynamic_network_architectures`` installed (``pip install --no-deps dynamic_network_architectures``)
nnU-Net v2's PlainConvUNet and ResidualEncoderUNet are measured too: their blocks hold each layer under
two names, which the quantizer must replace under both.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from machine import cpu_summary


def _networks() -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    """Name -> (constructor, calibration shape) of the networks measured."""
    from monai.networks import nets

    def dints() -> nn.Module:
        space = nets.TopologyInstance(channel_mul=0.25, num_blocks=4, num_depths=3, use_downsample=True, spatial_dims=3)
        return nets.DiNTS(dints_space=space, in_channels=1, num_classes=2, use_downsample=True)

    cube = (1, 1, 32, 32, 32)
    return {
        **_nnunet_networks(cube),
        "UNet": (lambda: nets.UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=2, norm="batch"), cube),
        "SegResNet": (lambda: nets.SegResNet(3, init_filters=8, in_channels=1, out_channels=2), cube),
        "SegResNetDS": (lambda: nets.SegResNetDS(3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 2, 2)), cube),
        "DynUNet": (
            lambda: nets.DynUNet(3, 1, 3, [3, 3, 3, 3], [1, 2, 2, 2], [2, 2, 2], filters=[8, 16, 32, 32]), cube
        ),
        "DynUNet deep supervision": (
            lambda: nets.DynUNet(
                3, 1, 3, [3, 3, 3], [1, 2, 2], [2, 2], filters=[8, 16, 32], norm_name="batch", deep_supervision=True, deep_supr_num=1
            ),
            cube,
        ),
        "BasicUNet": (lambda: nets.BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4)), cube),
        "AttentionUnet": (lambda: nets.AttentionUnet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2)), cube),
        "HighResNet": (lambda: nets.HighResNet(3, 1, 2), (1, 1, 24, 24, 24)),
        "UNETR": (
            lambda: nets.UNETR(1, 2, img_size=(32, 32, 32), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4), cube
        ),
        "DiNTS": (dints, cube),
    }


def _nnunet_networks(cube: tuple[int, ...]) -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    """nnU-Net v2's two U-Nets as its 3d_fullres plans build them (instance norm, leaky ReLU), where
    ``dynamic_network_architectures`` is installed (``pip install --no-deps dynamic_network_architectures``:
    its U-Nets need only torch; its declared timm would pull a torchvision)."""
    try:
        from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
    except ImportError:
        return {}
    common = {
        "input_channels": 1, "n_stages": 4, "features_per_stage": [8, 16, 32, 64], "conv_op": nn.Conv3d, "kernel_sizes": 3,
        "strides": [1, 2, 2, 2], "num_classes": 3, "conv_bias": True, "norm_op": nn.InstanceNorm3d,
        "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "nonlin": nn.LeakyReLU, "nonlin_kwargs": {"inplace": True},
    }  # fmt: skip
    return {
        "nnU-Net PlainConvUNet": (lambda: PlainConvUNet(n_conv_per_stage=2, n_conv_per_stage_decoder=2, **common), cube),
        "nnU-Net ResidualEncoderUNet": (
            lambda: ResidualEncoderUNet(n_blocks_per_stage=[1, 2, 2, 2], n_conv_per_stage_decoder=1, **common), cube
        ),
    }


def _randomise_batchnorms(net: nn.Module, generator: torch.Generator) -> None:
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=generator) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) * 1.5 + 0.5)


def _export_route(caught: list[warnings.WarningMessage]) -> str:
    text = " ".join(str(w.message) for w in caught)
    if "traced with PyTorch's TorchScript exporter" in text:
        return "traced (TorchScript)"
    if "fixes the size of its input" in text:
        return "torch.export, spatial axes fixed"
    return "torch.export, all axes dynamic"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def measure(name: str, make: Callable[[], nn.Module], shape: tuple[int, ...], folder: Path) -> dict[str, str]:
    """Quantize, export and run one network; its row of printed figures."""
    from monai_effq import EfficientQConfig, export_onnx, quantize
    from monai_effq.deploy import OnnxRuntimeNetwork, OpenVINONetwork

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = make().eval()
    with torch.no_grad():
        _randomise_batchnorms(net, generator)
    x = torch.rand(shape, generator=generator)
    batchnorms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    start = time.perf_counter()
    result = quantize(net, x, EfficientQConfig(weight_bits=8, act_bits=8), progress=False)
    quantize_s = time.perf_counter() - start
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_onnx(result, folder / f"{name.replace(' ', '_')}.onnx", x)
    export_s = time.perf_counter() - start
    with torch.no_grad():
        fp, fake = net(x), result.network(x)
    row = {
        "network": name,
        "quantize s": f"{quantize_s:.1f}",
        "export s": f"{export_s:.1f}",
        "BN folded / kept": f"{len(result.folded)} / {batchnorms - len(result.folded)}",
        "export": _export_route(caught),
        "fake-quant vs FP": f"{_rel(fake, fp):.4f}",
    }
    for label, runtime in (("OpenVINO", OpenVINONetwork(path, precision="f32")), ("ONNX Runtime", OnnxRuntimeNetwork(path))):
        with torch.no_grad():
            out = runtime(x)
        labels = float((out.argmax(1) == fake.argmax(1)).float().mean())
        row[label] = f"{_rel(out, fake):.4f} / {labels:.4f}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", help="network names to measure (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the pipeline's notes on small calibration samples, not figures
    networks = _networks()
    chosen = args.only or list(networks)
    unknown = [n for n in chosen if n not in networks]
    if unknown:
        parser.error(f"unknown network(s) {unknown}; choose from {list(networks)}")
    print(cpu_summary())
    print("W8A8 EfficientQ, random weights, one random calibration volume; runtimes: rel-L2 from fake-quant / labels equal; "
          "OpenVINO with f32 float parts (fixed, so the comparison with torch is of the integer path alone), ONNX Runtime in f32")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            make, shape = networks[name]
            try:
                rows.append(measure(name, make, shape, Path(tmp)))
            except Exception as e:  # one architecture's failure is a finding, not the end of the table
                rows.append({"network": name, "export": f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}"})
            print(" | ".join(rows[-1].values()), flush=True)
    columns = ["network", "quantize s", "export s", "BN folded / kept", "export", "fake-quant vs FP", "OpenVINO", "ONNX Runtime"]
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row.get(c, "") for c in columns) + " |")


if __name__ == "__main__":
    main()
