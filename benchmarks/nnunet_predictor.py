"""nnU-Net v2's own inference running a quantized fold ensemble: Dice and label agreement against FP.

Needs ``nnunetv2`` (``pip install nnunetv2``; not a monai-effq dependency). On synthetic data in
nnU-Net's raw layout (spheres in noise, NIfTI, anisotropic spacing) the script runs nnU-Net's own
fingerprint, planning and 3d_fullres preprocessing, trains each fold's network briefly (a plain loop
on the preprocessed cases, written as nnU-Net writes ``checkpoint_final.pth``), and then:

1. ``nnUNetPredictor.initialize_from_trained_model_folder`` and ``predict_from_files_sequential`` on
   the held-out cases: the FP baseline (preprocessing, sliding windows, mirroring, resampling, export),
   in torch and with each FP fold exported to ONNX and run by OpenVINO with its default settings
   (what a user gets without quantizing);
2. :func:`monai_effq.apps.nnunet_calibration_windows` on one training case and
   :func:`monai_effq.apps.quantize_nnunet_predictor` (every fold, one calibration volume);
3. the same predictor call again, now running the quantized folds (fake-quant, in torch);
4. :func:`monai_effq.apps.deploy_nnunet_predictor`: each fold exported as an int8 ONNX file at the
   patch size, and the same predictor call running them in OpenVINO (default settings);
5. a cascade stage's calibration input, checked against nnU-Net's own: the plans given a
   ``3d_cascade_fullres`` configuration after ``3d_lowres`` (no such stage is trained; a training
   case's label stands in for its prediction), :func:`monai_effq.apps.nnunet_calibration_windows`
   with ``previous_stage_segmentations`` must build the volume nnU-Net's ``PreprocessAdapter`` feeds
   that stage's network (images, then one channel per foreground label).

Printed: the CPU and OpenVINO's float precision, each fold's quantization and export time, each
prediction's time (the fastest of ``--passes`` passes over the held-out cases: the first pass also
compiles OpenVINO's models) as a ratio of the FP one in torch, int8 OpenVINO's also against FP OpenVINO (the fake-quant network computes in float and is not
faster; the speed comes from the int8 runtime), and per case the Dice against the label of each
prediction and the share of voxels where the quantized ones agree with FP.

Usage::

    python benchmarks/nnunet_predictor.py                  # 2 folds, W4A8 (~2 min on 2 cores)
    python benchmarks/nnunet_predictor.py --weight_bits 2 --folds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from machine import cpu_summary

SHAPE = (48, 48, 40)
SPACING = (1.5, 1.0, 1.0)
DATASET = "Dataset501_Spheres"


def _write_raw(raw: Path, cases: int, seed: int = 0) -> None:
    """``cases`` NIfTI images with their labels in nnU-Net's raw layout (``imagesTr``, ``labelsTr``, ``dataset.json``)."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    grid = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    affine = np.diag([*SPACING, 1.0])
    for i in range(cases):
        centre, radius = rng.uniform(16, 32, 3), rng.uniform(8, 13)
        label = (sum((g - c) ** 2 for g, c in zip(grid, centre)) < radius**2).astype(np.uint8)
        image = (label * 100 + rng.normal(0, 20, SHAPE)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, affine), raw / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), raw / "labelsTr" / f"case_{i:03d}.nii.gz")
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "sphere": 1}, "numTraining": cases, "file_ending": ".nii.gz"}
    (raw / "dataset.json").write_text(json.dumps(meta))


def _train_folds(preprocessed: Path, model: Path, folds: int, held_out: list[int], steps: int) -> None:
    """Each fold's network trained ``steps`` steps on the preprocessed training cases it does not hold out,
    saved as nnU-Net saves a trained fold."""
    import torch
    import torch.nn.functional as F
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration("3d_fullres")
    folder = preprocessed / configuration.data_identifier
    dataset = infer_dataset_class(str(folder))(str(folder))
    cases = [c for i, c in enumerate(sorted(dataset.identifiers)) if i not in held_out]
    model.mkdir(parents=True)
    shutil.copy(preprocessed / "dataset.json", model / "dataset.json")
    shutil.copy(preprocessed / "nnUNetPlans.json", model / "plans.json")
    for fold in range(folds):
        torch.manual_seed(fold)
        network = nnUNetTrainer.build_network_architecture(plans_manager, configuration, 1, 2, enable_deep_supervision=False)
        optimiser = torch.optim.Adam(network.parameters(), 3e-3)
        mine = [c for i, c in enumerate(cases) if i % folds != fold] or cases
        for step in range(steps):
            data, seg, _, _ = dataset.load_case(mine[step % len(mine)])
            x = torch.from_numpy(np.asarray(data))[None].float()
            y = torch.from_numpy(np.asarray(seg))[None, 0].long().clamp(min=0)
            logits = network(x)
            p, t = logits.softmax(1)[:, 1], (y == 1).float()
            loss = F.cross_entropy(logits, y) + 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        print(f"fold {fold}: {steps} training steps, last loss {float(loss.detach()):.3f}")
        (model / f"fold_{fold}").mkdir()
        checkpoint = {
            "network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
            "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2),
        }  # fmt: skip
        torch.save(checkpoint, model / f"fold_{fold}" / "checkpoint_final.pth")


def _cascade_input(model: Path, raw: Path, case: str) -> str:
    """Step 5 of the module docstring: one line saying whether the two volumes are equal."""
    import torch
    from nnunetv2.inference.data_iterators import PreprocessAdapter
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    import monai_effq.apps.nnunet as app

    plans = json.loads((model / "plans.json").read_text())
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration("3d_cascade_fullres")
    dataset = json.loads((model / "dataset.json").read_text())
    labels = plans_manager.get_label_manager(dataset)
    channels = len(dataset["channel_names"]) + len(labels.foreground_labels)
    predictor = argparse.Namespace(  # what nnUNetPredictor holds once initialised from a cascade stage's folder
        network=torch.nn.Conv3d(channels, 2, 1), list_of_parameters=[{}], plans_manager=plans_manager,
        configuration_manager=configuration, dataset_json=dataset, label_manager=labels,
    )
    files, previous = [[str(raw / "imagesTr" / f"{case}_0000.nii.gz")]], [str(raw / "labelsTr" / f"{case}.nii.gz")]
    volumes = []
    cut = app.calibration_windows
    app.calibration_windows = lambda found, patch, overlap: volumes.extend(found) or cut(found, patch, overlap)
    try:
        app.nnunet_calibration_windows(predictor, files, previous_stage_segmentations=previous)
    finally:
        app.calibration_windows = cut
    adapter = PreprocessAdapter(files, previous, configuration.preprocessor_class(verbose=False), None, plans_manager, dataset, configuration)
    theirs = adapter.generate_train_batch()["data"].float()
    same = len(volumes) == 1 and volumes[0].shape == theirs.shape and torch.equal(volumes[0], theirs)
    return (f"cascade stage input ({case}, its label as the previous stage's prediction): ours {tuple(volumes[0].shape)}, "
            f"nnU-Net's PreprocessAdapter {tuple(theirs.shape)}, equal: {same}")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", type=int, default=2, help="folds trained and ensembled (default 2)")
    parser.add_argument("--cases", type=int, default=8, help="synthetic training cases (default 8; the last 2 are held out)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per fold (default 60)")
    parser.add_argument("--weight_bits", type=int, default=4)
    parser.add_argument("--act_bits", type=int, default=8)
    parser.add_argument("--passes", type=int, default=2, help="passes over the held-out cases per runner; the fastest is shown (default 2)")
    parser.add_argument("--no_mirroring", action="store_true", help="predict without nnU-Net's test-time mirroring")
    parser.add_argument("--work", type=Path, default=None, help="folder for the nnU-Net folders (default: a temporary one)")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="nnunet_predictor_"))
    folders = {"nnUNet_raw": work / "raw", "nnUNet_preprocessed": work / "preprocessed", "nnUNet_results": work / "results"}
    os.environ.update({k: str(v) for k, v in folders.items()})  # nnU-Net reads them when it is imported
    import nnunetv2
    import torch
    from importlib.metadata import version

    from monai_effq import EfficientQConfig, export_onnx
    from monai_effq.apps import FoldEnsemble, deploy_nnunet_predictor, nnunet_calibration_windows, quantize_nnunet_predictor
    from monai_effq.deploy.runtime import OpenVINONetwork

    print(f"CPU: {cpu_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads; nnunetv2 {version('nnunetv2')}")
    del nnunetv2
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    raw = folders["nnUNet_raw"] / DATASET
    _write_raw(raw, args.cases)
    extract_fingerprints([501], num_processes=1)
    plan_experiments([501])
    preprocess([501], configurations=("3d_fullres",), num_processes=(1,))
    held_out = list(range(args.cases - 2, args.cases))
    model = folders["nnUNet_results"] / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    _train_folds(folders["nnUNet_preprocessed"] / DATASET, model, args.folds, held_out, args.steps)

    predictor = nnUNetPredictor(use_mirroring=not args.no_mirroring, device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), use_folds=tuple(range(args.folds)))
    cases = [[str(raw / "imagesTr" / f"case_{i:03d}_0000.nii.gz")] for i in held_out]
    seconds = {}

    def timed(name: str) -> None:
        """The predictor on the held-out cases, written to ``work/name``; the fastest of ``--passes`` passes."""
        (work / name).mkdir()
        passes = []
        for _ in range(args.passes):  # the first also compiles OpenVINO's models at the patch size
            start = time.perf_counter()
            predictor.predict_from_files_sequential(cases, str(work / name), save_probabilities=False, overwrite=True)
            passes.append(time.perf_counter() - start)
        seconds[name] = min(passes)

    def precisions() -> str:
        return "/".join(sorted({str(fold.chosen_precision) for fold in predictor.network.folds}))

    timed("fp")

    # the FP folds exported to ONNX and run by OpenVINO with its defaults: what a user gets without quantizing
    fp_network, fp_folds = predictor.network, predictor.list_of_parameters
    example = torch.zeros(1, 1, *predictor.configuration_manager.patch_size)
    (work / "onnx_fp").mkdir()
    files = []
    for fold, weights in enumerate(fp_folds):
        fp_network.load_state_dict(weights)
        files.append(export_onnx(fp_network, work / "onnx_fp" / f"fold_{fold}.onnx", example, dynamic_spatial=False, require_quantized=False))
    predictor.network, predictor.list_of_parameters = FoldEnsemble([OpenVINONetwork(f) for f in files]), [{}]
    timed("openvino_fp")
    fp_precision = precisions()

    predictor.network, predictor.list_of_parameters = fp_network, fp_folds
    windows = nnunet_calibration_windows(predictor, [[str(raw / "imagesTr" / "case_000_0000.nii.gz")]])
    config = EfficientQConfig(weight_bits=args.weight_bits, act_bits=args.act_bits)
    results = quantize_nnunet_predictor(predictor, windows, config, progress=False)
    print(f"calibration: {windows.shape[0]} window(s) of {tuple(windows.shape[2:])} from one case")
    for fold, result in enumerate(results):
        print(f"fold {fold}: {result.report.summary()}")
    timed("quantized")

    start = time.perf_counter()
    paths = deploy_nnunet_predictor(predictor, results, work / "onnx", "openvino")
    sizes = ", ".join(f"{p.stat().st_size / 2**20:.2f}" for p in paths)
    print(f"export: {len(paths)} int8 ONNX files ({sizes} MiB) in {time.perf_counter() - start:.1f} s")
    timed("openvino")
    runs = tuple(seconds)

    import nibabel as nib

    print(f"W{args.weight_bits}A{args.act_bits}, {args.folds} folds, mirroring {'off' if args.no_mirroring else 'on'}; "
          f"OpenVINO float parts: FP {fp_precision}, int8 {precisions()}; prediction of {len(cases)} cases, fastest of {args.passes} passes:")
    labels = {"fp": "FP, torch", "openvino_fp": "FP, OpenVINO", "quantized": "fake-quant, torch", "openvino": "int8, OpenVINO"}
    for name in runs:
        against_ov = f"  {seconds['openvino_fp'] / seconds[name]:5.2f}x FP OpenVINO's" if name == "openvino" else ""
        print(f"  {labels[name]:18} {seconds[name]:6.1f} s  {seconds['fp'] / seconds[name]:5.2f}x FP torch's speed{against_ov}")
    print(f"{'case':10}" + "".join(f"{'Dice ' + labels[n]:>26}" for n in runs) + "".join(f"{'= FP: ' + labels[n]:>26}" for n in runs[1:]))
    for i in held_out:
        label = nib.load(raw / "labelsTr" / f"case_{i:03d}.nii.gz").get_fdata() > 0
        masks = {name: nib.load(work / name / f"case_{i:03d}.nii.gz").get_fdata() > 0 for name in runs}
        print(f"case_{i:03d}  " + "".join(f"{_dice(masks[n], label):26.4f}" for n in runs)
              + "".join(f"{float((masks[n] == masks['fp']).mean()):26.4%}" for n in runs[1:]))  # fmt: skip
    print(_cascade_input(model, raw, "case_000"))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
