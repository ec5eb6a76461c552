"""Command line for nnU-Net v2 model folders: quantize the folds once, then predict with them.

nnU-Net's own ``nnUNetv2_predict`` builds an FP predictor from the model folder. These two commands
give its users the quantized folds without writing Python (``effq-nnunet``, installed with
monai-effq, is ``python -m monai_effq.apps.nnunet_cli``)::

    effq-nnunet quantize -m MODEL_FOLDER -i imagesTr -o quantized_w4a8 -f 0 1 2 3 4
    effq-nnunet predict -q quantized_w4a8 -i imagesTs -o predictions --runtime openvino

``quantize`` builds nnU-Net's predictor from the model folder, preprocesses the first ``--cases``
cases of the image folder (nnU-Net's raw naming, ``<case>_<channel:04d><file_ending>``) as the
predictor does, quantizes every fold on them (:func:`~monai_effq.apps.quantize_nnunet_predictor`) and
writes one checkpoint per fold, then, last, ``nnunet_quantized.json``, which names the model folder,
the folds, the checkpoint and the settings: a run that stopped early leaves no such file, and
``predict`` refuses the folder. ``predict`` builds the predictor from the same model folder, loads the
quantized folds into it (:func:`~monai_effq.apps.load_nnunet_predictor`), for ``--runtime openvino`` or
``onnxruntime`` exports them as int8 ONNX files (``fold_<fold>.onnx``) into the quantized folder (or
``--onnx_dir``), where a later ``predict`` runs them again without exporting
(:func:`~monai_effq.apps.deploy_nnunet_predictor`), and runs nnU-Net's ``predict_from_files``.

The flags are ``nnUNetv2_predict``'s where they mean the same (``-i``, ``-o``, ``-f``, ``-chk``,
``-device``, ``-step_size``, ``--disable_tta``, ``--save_probabilities``, ``--continue_prediction``,
``-npp``, ``-nps``, ``-num_parts``, ``-part_id``, ``-prev_stage_predictions``, ``--disable_progress_bar``),
except that ``-device`` defaults to ``cpu``; its ``--not_on_device`` has no counterpart here. ``-chk`` is
``quantize``'s (``predict`` runs the folds quantized from that checkpoint); ``predict -f`` picks some of the
quantized folds, as ``nnUNetv2_predict -f`` picks trained ones. A cascade
stage (``3d_cascade_fullres``) reads the previous stage's segmentation: ``quantize
-prev_stage_predictions`` names the folder of that stage's predictions of the calibration cases, and
``predict -prev_stage_predictions`` that of the images to segment, as ``nnUNetv2_predict`` takes it. ``predict -m`` points at the model folder where it has moved since ``quantize``
(another machine, a container's mount).

nnunetv2 is not a monai-effq dependency: install it beside monai-effq. A user-input error, or a
command line the parser cannot read, ends the command with one line on stderr, ``error: ...``, and
status 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import pickle
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from monai_effq.apps.nnunet import (
    deploy_nnunet_predictor,
    load_nnunet_predictor,
    nnunet_calibration_windows,
    quantize_nnunet_predictor,
)
from monai_effq.ptq.checkpoint import load_quantized_result, save_quantized
from monai_effq.ptq.config import EfficientQConfig
from monai_effq.ptq.prepare import available_device
from monai_effq.utils.errors import DEBUG_ENV, MissingExtraError, MissingInputError, OutputExistsError, UserInputError, debugging
from monai_effq.utils.io import atomic_write_text

__all__ = ["MANIFEST", "calibration_cases", "input_channels", "main", "new_predictor"]

MANIFEST = "nnunet_quantized.json"
"""The file ``quantize`` writes last into its output folder, and ``predict`` reads."""

_FORMAT = 1

logger = logging.getLogger("monai_effq")


def new_predictor(
    model_folder: str | Path,
    folds: Sequence[int | str],
    checkpoint_name: str,
    device: torch.device,
    mirroring: bool,
    step_size: float = 0.5,
    progress: bool = False,
) -> Any:
    """nnU-Net's ``nnUNetPredictor``, initialised from a trained model folder.

    Args:
        model_folder: the training output folder (``.../nnUNetTrainer__nnUNetPlans__3d_fullres``).
        folds: the folds to use (``fold_<f>`` sub-folders).
        checkpoint_name: the checkpoint file in each fold folder.
        device: the device the predictor runs on (checked to exist).
        mirroring: test-time mirroring, as ``nnUNetv2_predict`` does unless ``--disable_tta``.
        step_size: the sliding window's step as a fraction of the patch size.
        progress: nnU-Net's progress bars.

    Returns:
        the initialised predictor.

    Raises:
        MissingExtraError: when nnunetv2 is not installed.
        MissingInputError: when the folder lacks nnU-Net's plans, dataset description or a fold's checkpoint.
        UserInputError: when nnU-Net cannot read the folder's plans or dataset description, or cannot load a
            fold's checkpoint (a damaged file).
    """
    folder = Path(model_folder)
    for name in ("plans.json", "dataset.json", *(f"fold_{f}/{checkpoint_name}" for f in folds)):
        if not (folder / name).is_file():
            raise MissingInputError(
                f"{folder / name} does not exist: give -m the nnU-Net training output folder (it holds plans.json, "
                "dataset.json and fold_<f>/ with the checkpoint), and -f only folds that were trained."
            )
    try:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    except ImportError as error:
        raise MissingExtraError(
            f"the nnU-Net commands need nnunetv2, which is not installed ({error}): `pip install nnunetv2` beside monai-effq."
        ) from error
    predictor = nnUNetPredictor(
        tile_step_size=step_size, device=device, use_mirroring=mirroring, perform_everything_on_device=device.type == "cuda",
        allow_tqdm=progress,
    )
    try:
        predictor.initialize_from_trained_model_folder(str(folder), use_folds=tuple(folds), checkpoint_name=checkpoint_name)
    except (ValueError, KeyError) as error:  # json's decode error is a ValueError
        raise UserInputError(
            f"nnU-Net could not read the model folder {folder} ({type(error).__name__}: {error}): its plans.json and "
            "dataset.json must be the ones nnU-Net wrote when it trained the model."
        ) from error
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        if isinstance(error, torch.OutOfMemoryError):
            raise
        # torch.load of a checkpoint cut short (a copy interrupted, a training killed while it saved), or one whose
        # trainer class nnU-Net cannot find here
        raise UserInputError(
            f"nnU-Net could not load fold(s) {list(folds)} of {folder} ({type(error).__name__}: {error}): a fold's "
            f"{checkpoint_name} may be damaged (copied in part, or saved by a run that was killed): copy it again or train "
            "that fold again; a trainer class of your own must be importable here, as nnUNetv2_predict needs it."
        ) from error
    return predictor


def input_channels(dataset: dict[str, Any]) -> int:
    """The input channels of an nnU-Net dataset description, as nnU-Net counts them.

    Args:
        dataset: the model folder's ``dataset.json``, as the predictor read it.

    Returns:
        the number of ``channel_names`` (``modality`` in descriptions of nnU-Net v1's time).

    Raises:
        UserInputError: when it names neither.
    """
    channels = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise UserInputError(
            "the model folder's dataset.json names no input channels (neither 'channel_names' nor 'modality'): give -m "
            "the folder nnU-Net trained, whose dataset.json it copied there."
        )
    return len(channels)


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserInputError(f"--device must be a torch device name such as 'cpu', 'cuda' or 'cuda:0', got {name!r}.") from None
    return available_device(device)


def _output_folder(path: str | Path, flag: str) -> Path:
    """``path``, checked before any work starts to be a folder or nothing yet (it is made when written to)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"{flag} {folder} is a file, not a folder: give {flag} a folder (it is made if missing).")
    return folder


def calibration_cases(folder: str | Path, file_ending: str, channels: int, count: int) -> list[list[Path]]:
    """The first ``count`` cases of a folder in nnU-Net's raw naming, each as its channel files.

    Args:
        folder: an image folder such as ``imagesTr`` (``<case>_<channel:04d><file_ending>``).
        file_ending: the dataset's ``file_ending`` (``".nii.gz"``).
        channels: the dataset's number of input channels.
        count: how many cases, in sorted case order.

    Returns:
        one list of channel files per case.

    Raises:
        MissingInputError: when the folder does not exist or holds no file of that naming.
        UserInputError: when a case lacks one of its channel files.
    """
    if count < 1:
        raise UserInputError(f"--cases must be at least 1, got {count}.")
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError(f"calibration image folder {folder} does not exist or is not a folder: give -i a folder such as imagesTr.")
    pattern = re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{4}}){re.escape(file_ending)}$")
    found: dict[str, set[int]] = {}
    for path in folder.iterdir():
        match = pattern.match(path.name)
        if match:
            found.setdefault(match["case"], set()).add(int(match["channel"]))
    if not found:
        raise MissingInputError(
            f"{folder} holds no image named <case>_<channel:04d>{file_ending} (nnU-Net's raw naming, e.g. case_000_0000{file_ending})."
        )
    cases = []
    for case in sorted(found)[:count]:
        missing = sorted(set(range(channels)) - found[case])
        if missing:
            raise UserInputError(
                f"calibration case {case} in {folder} lacks channel {missing[0]} ({case}_{missing[0]:04d}{file_ending}): "
                f"the model reads {channels} channel(s), one file each."
            )
        cases.append([folder / f"{case}_{c:04d}{file_ending}" for c in range(channels)])
    if len(cases) < count:
        logger.warning("%s holds %d case(s), fewer than the %d asked for: calibrating on those", folder, len(cases), count)
    return cases


def _config(args: argparse.Namespace) -> EfficientQConfig:
    settings = {"weight_bits": args.weight_bits, "act_bits": args.act_bits, "method": args.method, "device": args.device}
    return EfficientQConfig.from_dict({k: v for k, v in settings.items() if v is not None})


def _quantize(args: argparse.Namespace) -> None:
    out = Path(args.output)
    if (out / MANIFEST).exists() and not args.overwrite:
        raise OutputExistsError(f"{out / MANIFEST} exists: give another -o, or --overwrite to quantize into it again.")
    _each_once(args.folds)
    config = _config(args)
    device = _device(args.device)
    _output_folder(out, "-o")
    predictor = new_predictor(args.model, args.folds, args.checkpoint, device, mirroring=True, progress=not args.disable_progress_bar)
    dataset = predictor.dataset_json
    cases = calibration_cases(args.input, dataset["file_ending"], input_channels(dataset), args.cases)
    previous = _previous_stage_folder(predictor, args.prev_stage_predictions, "quantize")
    if previous is not None:  # nnU-Net names a case's segmentation <case><file_ending>
        ending = dataset["file_ending"]
        previous = [previous / f"{_case_id(case[0].name, ending)}{ending}" for case in cases]
    windows = nnunet_calibration_windows(predictor, cases, previous_stage_segmentations=previous)
    results = quantize_nnunet_predictor(predictor, windows, config, progress=not args.disable_progress_bar)
    (out / MANIFEST).unlink(missing_ok=True)  # a folder being rewritten is not a finished one
    checkpoints = []
    for fold, result in zip(args.folds, results):
        checkpoints.append(f"fold_{fold}.pt")
        save_quantized(result, out / checkpoints[-1])
        print(f"fold {fold}: {result.report.summary()}")
    manifest = {
        "format": _FORMAT,
        "model_folder": str(Path(args.model).resolve()),
        "folds": list(args.folds),
        "checkpoint_name": args.checkpoint,
        "checkpoints": checkpoints,
        "config": config.to_dict(),
        "calibration": [[str(p.resolve()) for p in case] for case in cases],
    }
    if previous is not None:
        manifest["calibration_previous_stage"] = [str(p.resolve()) for p in previous]
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {len(checkpoints)} quantized folds and {MANIFEST} to {out}")


def _case_id(name: str, file_ending: str) -> str:
    """The case of a raw image file name, ``<case>_<channel:04d><file_ending>``, as nnU-Net cuts it."""
    return name[: -(len(file_ending) + 5)]


def _previous_stage_folder(predictor: Any, folder: str | None, command: str) -> Path | None:
    """The ``-prev_stage_predictions`` folder, which a cascade stage needs and no other configuration reads."""
    stage = getattr(predictor.configuration_manager, "previous_stage_name", None)
    if not stage:
        if folder is not None:
            raise UserInputError("-prev_stage_predictions is read by a cascade stage only, and this model is not one: leave it out.")
        return None
    if folder is None:
        raise UserInputError(
            f"this model is a cascade stage after {stage!r}: give {command} -prev_stage_predictions, the folder of that stage's "
            "predictions of these images (nnUNetv2_predict ... -c " + stage + ")."
        )
    if not Path(folder).is_dir():
        raise MissingInputError(f"-prev_stage_predictions folder {folder} does not exist or is not a folder: predict the images with the {stage!r} stage first.")
    return Path(folder)


def _manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise MissingInputError(
            f"{path} does not exist: give -q the folder `python -m monai_effq.apps.nnunet_cli quantize` wrote "
            "(a run that stopped before it finished writes no such file: run it again)."
        )
    try:
        manifest = json.loads(path.read_text())
        keys = ("model_folder", "folds", "checkpoint_name", "checkpoints")
        if manifest.get("format") != _FORMAT or any(key not in manifest for key in keys):
            raise ValueError(f"format {manifest.get('format')!r} or keys missing")
    except (ValueError, AttributeError) as error:
        raise UserInputError(f"{path} is not a quantized nnU-Net folder's description ({error}): quantize into a new folder.") from error
    return manifest


def _each_once(folds: Sequence[int | str]) -> None:
    """Refuse a fold given twice to ``-f``: quantized twice, its files would clash where they are deployed."""
    names = [str(f) for f in folds]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated is not None:
        raise UserInputError(f"-f names fold {repeated} more than once: give each fold once (-f 0 1 2 3 4).")


def _chosen_folds(manifest: dict[str, Any], chosen: Sequence[int | str] | None, folder: Path) -> tuple[list, list[str]]:
    """The folds ``predict -f`` picks from those ``quantize`` wrote (all of them without ``-f``), with their checkpoints."""
    folds, checkpoints = list(manifest["folds"]), list(manifest["checkpoints"])
    if chosen is None:
        return folds, checkpoints
    names = [str(f) for f in folds]
    for fold in chosen:
        if str(fold) not in names:
            raise UserInputError(f"-f {fold} is not a fold of {folder}, which holds folds {' '.join(names)}: give -f folds that quantize wrote.")
    _each_once(chosen)
    picked = [names.index(str(f)) for f in chosen]
    return [folds[i] for i in picked], [checkpoints[i] for i in picked]


def _predict(args: argparse.Namespace) -> None:
    if not 0 <= args.part_id < args.num_parts:
        raise UserInputError(
            f"-part_id {args.part_id} is not one of the {args.num_parts} parts (0 to {args.num_parts - 1}): give each of the "
            "-num_parts commands its own -part_id, counted from 0."
        )
    folder = Path(args.quantized)
    manifest = _manifest(folder)
    folds, checkpoints = _chosen_folds(manifest, args.folds, folder)
    if args.onnx_dir is not None:
        _output_folder(args.onnx_dir, "--onnx_dir")
    if not Path(args.input).is_dir():
        raise MissingInputError(f"image folder {args.input} does not exist or is not a folder: give -i the raw images to segment.")
    device = _device(args.device)
    output = _output_folder(args.output, "-o")
    model = args.model or manifest["model_folder"]
    if args.model is None and not Path(model).is_dir():  # a folder given with -m is checked as quantize checks it
        raise MissingInputError(
            f"the model folder {model} that {folder / MANIFEST} names does not exist here: give predict -m the folder it "
            "was moved to (the nnU-Net training output folder the folds were quantized from)."
        )
    predictor = new_predictor(
        model, folds, manifest["checkpoint_name"], device, mirroring=not args.disable_tta,
        step_size=args.step_size, progress=not args.disable_progress_bar,
    )
    previous = _previous_stage_folder(predictor, args.prev_stage_predictions, "predict")
    if previous is not None:  # nnU-Net's workers would stop mid-run on a missing one, with a traceback
        ending = predictor.dataset_json["file_ending"]
        # the cases of this part as nnU-Net lists them (<case>_<4-digit channel><ending>), less those that
        # --continue_prediction skips (their segmentation, and probabilities if asked, exist)
        found = sorted({_case_id(p.name, ending) for p in Path(args.input).iterdir() if p.name.endswith(ending)})
        done = (lambda c: (output / f"{c}{ending}").is_file() and (not args.save_probabilities or (output / f"{c}.npz").is_file()))
        cases = [c for c in found[args.part_id :: args.num_parts] if not (args.continue_prediction and done(c))]
        missing = [c for c in cases if not (previous / f"{c}{ending}").is_file()]
        if missing:
            raise MissingInputError(
                f"{previous / (missing[0] + ending)} does not exist ({len(missing)} case(s) of {args.input} lack a previous-stage "
                "segmentation): predict every image with the previous stage into -prev_stage_predictions first."
            )
    # each checkpoint loads onto a fresh FP copy of the predictor's network (load_quantized_result checks the architecture)
    results = [load_quantized_result(folder / name, copy.deepcopy(predictor.network)) for name in checkpoints]
    load_nnunet_predictor(predictor, results)
    if args.runtime != "torch":
        onnx_dir = args.onnx_dir or folder / f"onnx_{args.runtime}"
        deploy_nnunet_predictor(predictor, results, onnx_dir, runtime=args.runtime, fold_names=folds)
    predictor.predict_from_files(
        str(args.input), str(output), save_probabilities=args.save_probabilities, overwrite=not args.continue_prediction,
        num_processes_preprocessing=args.npp, num_processes_segmentation_export=args.nps,
        num_parts=args.num_parts, part_id=args.part_id, folder_with_segs_from_prev_stage=None if previous is None else str(previous),
    )


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors end the command as every other user-input error does: one line, status 1."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"error: {message} (see `{self.prog} --help`)\n")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _step_size(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:  # nnU-Net's sliding window asserts it, once the first case is segmented
        raise argparse.ArgumentTypeError(f"must be in (0, 1], a fraction of the patch size, got {value}")
    return value


def _fold(text: str) -> int | str:
    return "all" if text == "all" else int(text)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m monai_effq.apps.nnunet_cli", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    q = commands.add_parser("quantize", help="quantize the folds of an nnU-Net model folder on a few raw cases")
    q.add_argument("-m", "--model", required=True, help="nnU-Net training output folder (holds plans.json, dataset.json, fold_<f>/)")
    q.add_argument("-i", "--input", required=True, help="raw image folder in nnU-Net naming (e.g. imagesTr) to calibrate on")
    q.add_argument("-o", "--output", required=True, help="folder for the quantized folds")
    q.add_argument("-f", "--folds", nargs="+", default=[0, 1, 2, 3, 4], type=_fold, help="folds (default 0 1 2 3 4; 'all' for fold_all)")
    q.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint file in each fold folder")
    q.add_argument("--cases", type=_positive, default=1, help="calibration cases, the first in sorted order (default 1)")
    q.add_argument("--weight_bits", type=int, help="weight bits, 2-8 (default 4)")
    q.add_argument("--act_bits", type=int, help="activation bits, 2-8 (default 8)")
    q.add_argument("--method", help="solver method (default efficientq)")
    q.add_argument("-device", "--device", default="cpu", help="device the folds are quantized on (default cpu)")
    q.add_argument("--overwrite", action="store_true", help="quantize into a folder that already holds quantized folds")
    q.add_argument("-prev_stage_predictions", help="a cascade stage's calibration: the previous stage's predictions of -i's cases")
    q.add_argument("--disable_progress_bar", action="store_true", help="no progress bars")
    p = commands.add_parser("predict", help="segment raw images with the quantized folds, through nnU-Net's predictor")
    p.add_argument("-q", "--quantized", required=True, help="the folder `quantize` wrote")
    p.add_argument("-i", "--input", required=True, help="raw image folder in nnU-Net naming")
    p.add_argument("-o", "--output", required=True, help="folder for the segmentations")
    p.add_argument("-m", "--model", help="the nnU-Net model folder, where it is no longer where quantize read it")
    p.add_argument("-f", "--folds", nargs="+", type=_fold, help="predict with these of the quantized folds (default: all of them)")
    p.add_argument("--runtime", choices=("torch", "openvino", "onnxruntime"), default="torch",
                   help="torch: the fake-quant network; openvino/onnxruntime: int8 ONNX files (default torch)")
    p.add_argument("--onnx_dir", help="folder for the int8 ONNX files (default: onnx_<runtime> in the quantized folder)")
    p.add_argument("-device", "--device", default="cpu", help="device for the torch runtime (default cpu)")
    p.add_argument("-step_size", type=_step_size, default=0.5, help="sliding-window step as a fraction of the patch size (default 0.5)")
    p.add_argument("--disable_tta", action="store_true", help="no test-time mirroring (faster)")
    p.add_argument("--save_probabilities", action="store_true", help="also write the softmax outputs")
    p.add_argument("--continue_prediction", action="store_true", help="skip cases whose segmentation exists")
    p.add_argument("-npp", type=_positive, default=3, help="preprocessing processes (default 3)")
    p.add_argument("-nps", type=_positive, default=3, help="segmentation export processes (default 3)")
    p.add_argument("-prev_stage_predictions", help="a cascade stage: the folder of the previous stage's predictions of -i's images")
    p.add_argument("-num_parts", type=_positive, default=1,
                   help="split the cases into this many parts, one per command (e.g. one per GPU or machine; default 1)")
    p.add_argument("-part_id", type=int, default=0, help="the part this command segments, 0 to num_parts - 1 (default 0)")
    p.add_argument("--disable_progress_bar", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command.

    Args:
        argv: the command-line arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        the exit status: 0, or 1 after a user-input error reported as one line on stderr
        (``MONAI_EFFQ_DEBUG=1`` raises it with its traceback instead). A command line the parser
        cannot read also ends with one line and status 1 (``SystemExit``).
    """
    args = _parser().parse_args(argv)
    try:
        (_quantize if args.command == "quantize" else _predict)(args)
    except UserInputError as error:
        if debugging():
            raise
        print(f"error: {error} (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
