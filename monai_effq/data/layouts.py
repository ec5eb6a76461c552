"""Dataset lists for the on-disk layouts of the public 3D segmentation datasets.

Each function returns a list of dicts ready for a MONAI ``Dataset`` (``{"image": ..., "label": ...}``
with absolute paths as strings). Four layouts are understood:

- ``"msd"``: a Medical Segmentation Decathlon task folder, ``<dataset_dir>/dataset.json`` whose
  ``"training"`` entries name ``./imagesTr/x.nii.gz`` and ``./labelsTr/x.nii.gz``
  (e.g. ``Task01_BrainTumour``, ``Task03_Liver``).
- ``"brats"``: the BraTS 2020 (and 2021) release, one folder per case,
  ``BraTS20_Training_XXX/BraTS20_Training_XXX_{flair,t1,t1ce,t2,seg}.nii.gz``; the image entry is the
  list of the four contrasts in the Decathlon channel order (FLAIR, T1, T1gd, T2).
- ``"brats2023"``: the BraTS 2023 releases (``BraTS-GLI``, and ``MEN``, ``MET``, ``PED``, ``SSA`` alike), one
  folder per case, ``BraTS-GLI-XXXXX-XXX/BraTS-GLI-XXXXX-XXX-{t2f,t1n,t1c,t2w,seg}.nii.gz``; the same
  channel order (T2-FLAIR, native T1, contrast T1, T2) and their own label convention.
- ``"lits"``: the LiTS release, ``volume-N.nii`` and ``segmentation-N.nii`` paired by ``N``, in one
  folder or spread over sub-folders (``Training Batch 1/``, ``Training Batch 2/``).

Anything missing or malformed raises :class:`DatasetError` with a one-line message that names the
file and says what was expected.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import load_decathlon_datalist

from monai_effq.utils.errors import UserInputError

logger = logging.getLogger("monai_effq")

__all__ = [
    "DatasetError",
    "LAYOUTS",
    "BRATS_MODALITIES",
    "BRATS2023_MODALITIES",
    "NIFTI_SUFFIXES",
    "detect_layout",
    "resolve_layout",
    "msd_datalist",
    "brats_datalist",
    "brats2023_datalist",
    "lits_datalist",
    "load_datalist",
    "split_datalist",
    "check_nifti",
    "check_nifti_volume",
    "validate_datalist",
    "check_image_channels",
    "image_channels",
]

LAYOUTS = ("msd", "brats", "brats2023", "lits")
"""Layout names accepted by :func:`load_datalist` (besides ``"auto"`` and ``"native"``)."""

BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")
"""BraTS file suffixes in channel order; the same order as Decathlon Task01 (FLAIR, T1w, T1gd, T2w)."""
BRATS2023_MODALITIES = ("t2f", "t1n", "t1c", "t2w")
"""BraTS 2023 file suffixes in the same channel order: T2-FLAIR, native T1, contrast-enhanced T1, T2."""

NIFTI_SUFFIXES = (".nii.gz", ".nii")

_DATASETS = ("brats", "lits")
_DATASET_OF_LAYOUT = {"brats": "brats", "brats2023": "brats", "lits": "lits"}
# archives copied through other systems may upper-case a name's extension (VOLUME-0.NII): matched case-blind
_LITS_VOLUME = re.compile(r"^volume-(\d+)\.nii(\.gz)?$", re.IGNORECASE)
_LITS_SEGMENTATION = re.compile(r"^segmentation-(\d+)\.nii(\.gz)?$", re.IGNORECASE)

_MSD_EXPECTED = "a Decathlon folder: dataset.json beside imagesTr/ and labelsTr/"
_BRATS_EXPECTED = (
    "BraTS folders BraTS20_Training_XXX/ holding BraTS20_Training_XXX_{flair,t1,t1ce,t2,seg}.nii.gz (or .nii)"
)
_BRATS2023_EXPECTED = "BraTS 2023 folders BraTS-GLI-XXXXX-XXX/ holding BraTS-GLI-XXXXX-XXX-{t2f,t1n,t1c,t2w,seg}.nii.gz"
_LITS_EXPECTED = "LiTS files volume-N.nii and segmentation-N.nii (or .nii.gz), in the folder or its sub-folders"
# --dataset_dir takes labelled releases only (train, quantize and evaluate need the labels; inference segments the
# validation split of the same list), so a test or validation release without them is segmented from a datalist
_UNLABELLED = "to segment unlabelled images, pass them to inference with --datalist"


class DatasetError(UserInputError):
    """A dataset folder, list or file is missing, malformed or unreadable.

    The message is one line: it names the offending file or folder and says what was expected.
    """


def _as_dir(dataset_dir: str | os.PathLike) -> Path:
    path = Path(dataset_dir).expanduser().resolve()
    if not path.is_dir():
        raise DatasetError(f"dataset folder {path} does not exist or is not a folder.")
    return path


def _is_nifti(name: str) -> bool:
    """Whether a file name ends as a NIfTI file's, in any case (``.nii``, ``.nii.gz``, ``.NII.GZ``)."""
    return name.lower().endswith(NIFTI_SUFFIXES)


def _refuse_broken_link(path: Path) -> None:
    """Refuse a link whose target is gone (a batch or case on a disk that is not mounted): skipped, its cases
    would be left out of the list and the split without a word."""
    if path.is_symlink() and not path.exists():
        raise DatasetError(
            f"{path} is a link to {os.readlink(path)}, which does not exist: mount the disk it points to, or remove the link."
        )


def _find_nifti(folder: Path, stem: str) -> Path | None:
    """Return ``folder/stem.nii.gz`` or ``folder/stem.nii``, whichever exists (``.nii.gz`` first; names
    whose case differs, such as ``STEM.NII.GZ``, are found too)."""
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    wanted = {f"{stem}{suffix}".lower(): i for i, suffix in enumerate(NIFTI_SUFFIXES)}
    found = sorted((wanted[f.name.lower()], f) for f in folder.iterdir() if f.name.lower() in wanted and f.is_file())
    return found[0][1] if found else None


def _brats_label(case: Path, separator: str) -> Path | None:
    """A BraTS case folder's segmentation: ``<case><separator>seg.nii[.gz]``, else the one NIfTI file whose name
    holds ``seg`` (BraTS 2020's case 355 ships ``W39_1998.09.19_Segm.nii``), else ``None``.

    The second is none of the case's contrasts or a file made from one (a mask an inference run wrote beside
    its image, ``<case>_flair_seg.nii.gz``, is no ground truth) nor a macOS ``._`` copy.

    Raises:
        DatasetError: when several files could be the segmentation, naming them.
    """
    found = _find_nifti(case, f"{case.name}{separator}seg")
    if found is not None:
        return found
    contrasts = tuple(f"{case.name}{separator}{m}".lower() for m in (*BRATS_MODALITIES, *BRATS2023_MODALITIES))
    named = [
        f
        for f in case.iterdir()
        if "seg" in f.name.lower()
        and _is_nifti(f.name)
        and not f.name.startswith(".")
        and not f.name.lower().startswith(contrasts)
        and f.is_file()
    ]
    if len(named) > 1:
        raise DatasetError(
            f"BraTS case {case.name} has no {case.name}{separator}seg.nii.gz and several files that could be its "
            f"segmentation ({', '.join(sorted(f.name for f in named))}): rename the one that is to "
            f"{case.name}{separator}seg.nii.gz, or move the others out."
        )
    if named:
        logger.warning("BraTS case %s: its segmentation is taken to be %s", case.name, named[0].name)
        return named[0]
    return None


def _brats_case_dirs(root: Path, separator: str = "_") -> list[Path]:
    """Case folders (``BraTS*`` holding NIfTI files named ``<folder><separator><part>``) directly in ``root``
    or one level below it: ``"_"`` for the 2020 release, ``"-"`` for 2023's.

    The official archives unpack into ``MICCAI_BraTS2020_TrainingData/``, so users often point at the
    parent folder: looking one level down saves them a confusing "no cases" error. Where the validation
    archive was unpacked beside it, the sub-folders whose cases have no segmentation are left out.
    """

    def cases_in(folder: Path) -> list[Path]:
        cases = []
        for d in folder.iterdir():
            if not d.name.lower().startswith("brats"):
                continue
            _refuse_broken_link(d)
            prefix = f"{d.name}{separator}".lower()
            if d.is_dir() and any(f.name.lower().startswith(prefix) and _is_nifti(f.name) for f in d.iterdir()):
                cases.append(d)
        return sorted(cases)

    found = cases_in(root)
    if found:
        return found
    below = {sub: cases_in(sub) for sub in sorted(d for d in root.iterdir() if d.is_dir())}
    below = {sub: cases for sub, cases in below.items() if cases}
    labelled = {sub: cases for sub, cases in below.items() if any(_brats_label(c, separator) is not None for c in cases)}
    if labelled and len(labelled) < len(below):
        left_out = ", ".join(sub.name for sub in below if sub not in labelled)
        logger.info("%s: leaving out %s, whose cases have no segmentation (a validation release)", root, left_out)
        below = labelled
    return [case for cases in below.values() for case in cases]


def _files_below(root: Path, pattern: str) -> list[Path]:
    """The files matching ``pattern`` anywhere below ``root``, sorted: also in linked folders (a batch on another
    disk), each folder once (``Path.rglob`` does not follow links)."""
    seen: set[str] = set()
    found = []

    def unreadable(error: OSError) -> None:
        raise DatasetError(f"cannot read folder {error.filename} ({error.strerror}) below {root}: give this user access to it, or move it out.")

    for folder, subfolders, files in os.walk(root, followlinks=True, onerror=unreadable):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up, or two links to one folder
            subfolders[:] = []
            continue
        seen.add(real)
        for name in (*subfolders, *files):  # os.walk lists a link to nothing as a file and never enters it
            _refuse_broken_link(Path(folder) / name)
        found += [Path(folder) / name for name in files if fnmatch.fnmatchcase(name.lower(), pattern.lower())]
    return sorted(found)


def _lits_files(root: Path) -> tuple[dict[int, Path], dict[int, Path]]:
    volumes: dict[int, Path] = {}
    segmentations: dict[int, Path] = {}
    for path in _files_below(root, "*.nii*"):
        for pattern, found in ((_LITS_VOLUME, volumes), (_LITS_SEGMENTATION, segmentations)):
            match = pattern.match(path.name)
            if match is None:
                continue
            index = int(match.group(1))
            if index in found:
                raise DatasetError(
                    f"LiTS case {index} appears twice, as {found[index]} and {path}; keep one of them."
                )
            found[index] = path
    return volumes, segmentations


def detect_layout(dataset_dir: str | os.PathLike) -> str:
    """Guess the layout of a dataset folder.

    ``dataset.json`` means a Decathlon task, ``BraTS*`` case folders mean a BraTS release (2020's files
    ``<case>_flair.nii.gz``, 2023's ``<case>-t2f.nii.gz``), and ``volume-N.nii`` files (anywhere below)
    mean the LiTS release, checked in that order.

    Args:
        dataset_dir: the dataset folder.

    Returns:
        one of ``"msd"``, ``"brats"``, ``"brats2023"``, ``"lits"``.

    Raises:
        DatasetError: when the folder does not exist or matches none of the layouts.
    """
    root = _as_dir(dataset_dir)
    if (root / "dataset.json").is_file():
        return "msd"
    brats = _brats_release(root)
    if brats is not None:
        return brats
    if any(_LITS_VOLUME.match(p.name) for p in _files_below(root, "volume-*.nii*")):
        return "lits"
    test_volume = next((p for p in _files_below(root, "test-volume-*.nii*") if _LITS_VOLUME.match(p.name[5:])), None)
    if test_volume is not None:
        # LiTS' test release names its volumes test-volume-N and ships no segmentations
        raise DatasetError(
            f"{root} holds LiTS' unlabelled test release ({test_volume.name}, ...), which --dataset_dir does not take: "
            f"{_UNLABELLED} \"[{{'image': '{test_volume}'}}]\"."
        )
    raise DatasetError(
        f"could not recognise the dataset layout of {root}: expected dataset.json (Decathlon), "
        f"{_BRATS_EXPECTED}, {_BRATS2023_EXPECTED}, or {_LITS_EXPECTED}."
    )


def _brats_release(root: Path) -> str | None:
    """``"brats"`` or ``"brats2023"``: the BraTS release whose case folders ``root`` holds, else ``None``.

    Raises:
        DatasetError: when it holds case folders of both releases, whose labels mean different things.
    """
    found = {layout: _brats_case_dirs(root, separator) for layout, separator in (("brats", "_"), ("brats2023", "-"))}
    if found["brats"] and found["brats2023"]:
        raise DatasetError(
            f"{root} holds BraTS cases of two releases, {found['brats'][0]} (2020's file names, labels 1, 2, 4) and "
            f"{found['brats2023'][0]} (2023's, labels 1, 2, 3 with another meaning): put each release in a folder of its own."
        )
    return next((layout for layout, cases in found.items() if cases), None)


def resolve_layout(dataset_dir: str | os.PathLike, layout: str = "auto", dataset: str | None = None) -> str:
    """The layout :func:`load_datalist` reads ``dataset_dir`` in: ``layout`` itself, or what ``"auto"`` and ``"native"`` mean there.

    ``"auto"`` detects the layout (:func:`detect_layout`); ``"native"`` is the dataset's own release,
    for BraTS the one whose file names the folder holds. Preprocessing reads the BraTS label convention
    from the same answer.

    Args:
        dataset_dir: the dataset folder.
        layout: ``"auto"``, ``"native"`` or one of :data:`LAYOUTS`.
        dataset: ``"brats"`` or ``"lits"``, or None. ``"native"`` needs it; with ``"auto"`` it must agree with a
            detected native layout.

    Returns:
        one of :data:`LAYOUTS`.

    Raises:
        UserInputError: for an unknown ``layout`` or ``dataset``, or ``"native"`` without ``dataset``.
        DatasetError: when the folder does not exist, matches no layout, or contradicts ``dataset``.
    """
    if dataset is not None and dataset not in _DATASETS:
        raise UserInputError(f"dataset must be one of {_DATASETS} or None, got {dataset!r}.")
    if layout == "native":
        if dataset is None:
            raise UserInputError("layout='native' needs dataset='brats' or dataset='lits'.")
        if dataset == "lits":
            return "lits"
        root = _as_dir(dataset_dir)
        release = _brats_release(root)
        if release is None:
            raise DatasetError(f"no BraTS cases found in {root}; looked for {_BRATS_EXPECTED}, or {_BRATS2023_EXPECTED}.")
        return release
    if layout == "auto":
        found = detect_layout(dataset_dir)
        if dataset is not None and found != "msd" and _DATASET_OF_LAYOUT[found] != dataset:
            raise DatasetError(
                f"{Path(dataset_dir).resolve()} looks like the {found!r} layout, but dataset={dataset!r} was asked for."
            )
        return found
    if layout not in LAYOUTS:
        raise UserInputError(f"layout must be 'auto', 'native' or one of {LAYOUTS}, got {layout!r}.")
    return layout


def _msd_file(json_path: Path, value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{json_path}: {where} must be a relative file path string, got {value!r}.")
    if not Path(value).exists():  # a folder is a DICOM series
        raise DatasetError(f"missing file {value} listed in {json_path} ({where}); expected {_MSD_EXPECTED}.")
    return value


def msd_datalist(dataset_dir: str | os.PathLike, section: str = "training") -> list[dict[str, Any]]:
    """Read a Decathlon ``dataset.json`` section with MONAI's ``load_decathlon_datalist``, checking what it lists.

    Args:
        dataset_dir: the task folder holding ``dataset.json``.
        section: ``"training"`` (image and label per case) or ``"test"`` (image only; the Decathlon
            lists test images as bare paths).

    Returns:
        ``[{"image": abs path, "label": abs path}, ...]`` (no ``"label"`` for ``"test"``).

    Raises:
        DatasetError: when ``dataset.json`` is missing, not JSON, lacks the section, the section is
            empty or not a list of cases, or an entry names a file that does not exist.
    """
    root = _as_dir(dataset_dir)
    json_path = root / "dataset.json"
    if not json_path.is_file():
        raise DatasetError(f"missing {json_path}; expected {_MSD_EXPECTED}.")
    entry_form = '{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}'
    try:
        datalist = load_decathlon_datalist(json_path, is_segmentation=True, data_list_key=section, base_dir=root)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot parse {json_path}: {e}; expected a Decathlon dataset.json.") from e
    except ValueError as e:  # MONAI's "Data list <section> not specified"
        raise DatasetError(f"{json_path} has no {section!r} section; expected a Decathlon dataset.json.") from e
    except IndexError:  # MONAI reads an empty "test" list's first entry
        datalist = []
    except TypeError as e:  # not a JSON object, or a section that is not a list of dicts
        raise DatasetError(f"{json_path}: {section!r} must list entries like {entry_form} ({str(e).rstrip('.')}).") from e
    if not datalist:
        raise DatasetError(f"{json_path} lists no cases under {section!r}; expected entries like {entry_form}.")
    for i, item in enumerate(datalist):
        where = f"{section}[{i}]"
        if "image" not in item:
            raise DatasetError(f"{json_path}: {where} must be a dict with an 'image' key, got {item!r}.")
        if isinstance(item["image"], list) and item["image"]:  # a case's contrasts, each a file or a DICOM series
            for k, image in enumerate(item["image"]):
                _msd_file(json_path, image, f"{where}.image[{k}]")
        else:
            _msd_file(json_path, item["image"], f"{where}.image")
        if "label" in item:
            _msd_file(json_path, item["label"], f"{where}.label")
        elif section == "training":
            raise DatasetError(f"{json_path}: {where} has no 'label'; training entries need one.")
    return datalist


def _brats_cases(root: Path, modalities: Sequence[str], separator: str, expected: str) -> list[dict[str, Any]]:
    """The cases of a BraTS release folder whose files are ``<case><separator><part>.nii.gz``."""
    cases = _brats_case_dirs(root, separator)
    if not cases:
        raise DatasetError(f"no BraTS cases found in {root}; looked for {expected}.")
    datalist: list[dict[str, Any]] = []
    for case in cases:
        paths: dict[str, str] = {}
        for part in (*modalities, "seg"):
            found = _brats_label(case, separator) if part == "seg" else _find_nifti(case, f"{case.name}{separator}{part}")
            if found is None:
                unlabelled = (
                    f"; {_UNLABELLED} \"[{{'image': {[f'{case.name}{separator}{m}.nii.gz' for m in modalities]}}}]\" (each "
                    "file's full path, one entry per case)"
                    if part == "seg"
                    else ""
                )
                raise DatasetError(
                    f"BraTS case {case.name} has no {part!r} file: expected {case / f'{case.name}{separator}{part}.nii.gz'} "
                    f"(or .nii){unlabelled}."
                )
            paths[part] = str(found)
        datalist.append({"image": [paths[m] for m in modalities], "label": paths["seg"]})
    return datalist


def brats_datalist(dataset_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """List a BraTS 2020 (or 2021) release folder (one sub-folder per case).

    Args:
        dataset_dir: the folder holding the ``BraTS20_Training_XXX`` case folders (or the folder
            just above it).

    Returns:
        ``[{"image": [flair, t1, t1ce, t2], "label": seg}, ...]`` with absolute paths, sorted by case.

    Raises:
        DatasetError: when no case folder is found, or a case lacks a contrast or its segmentation.
    """
    return _brats_cases(_as_dir(dataset_dir), BRATS_MODALITIES, "_", _BRATS_EXPECTED)


def brats2023_datalist(dataset_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """List a BraTS 2023 release folder (one sub-folder per case, files named ``<case>-<part>.nii.gz``).

    Args:
        dataset_dir: the folder holding the ``BraTS-GLI-XXXXX-XXX`` case folders (or the folder just above it).

    Returns:
        ``[{"image": [t2f, t1n, t1c, t2w], "label": seg}, ...]`` with absolute paths, sorted by case: the
        channel order of the 2020 release and the Decathlon (FLAIR, T1, T1gd, T2).

    Raises:
        DatasetError: when no case folder is found, or a case lacks a contrast or its segmentation.
    """
    return _brats_cases(_as_dir(dataset_dir), BRATS2023_MODALITIES, "-", _BRATS2023_EXPECTED)


def lits_datalist(dataset_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """List a LiTS release folder, pairing ``volume-N`` with ``segmentation-N`` wherever they sit below it.

    Args:
        dataset_dir: the folder holding (possibly in sub-folders) the LiTS files.

    Returns:
        ``[{"image": volume, "label": segmentation}, ...]`` with absolute paths, sorted by ``N``.

    Raises:
        DatasetError: when no volume is found, a volume has no segmentation (or the reverse), or a
            case number appears twice.
    """
    root = _as_dir(dataset_dir)
    volumes, segmentations = _lits_files(root)
    if not volumes and not segmentations:
        raise DatasetError(f"no LiTS cases found in {root}; looked for {_LITS_EXPECTED}.")
    for index, volume in volumes.items():
        if index not in segmentations:
            raise DatasetError(
                f"LiTS volume {volume} has no segmentation: expected segmentation-{index}.nii (or .nii.gz) "
                f"under {root}; {_UNLABELLED} \"[{{'image': '{volume}'}}]\"."
            )
    for index, segmentation in segmentations.items():
        if index not in volumes:
            raise DatasetError(
                f"LiTS segmentation {segmentation} has no volume: expected volume-{index}.nii (or .nii.gz) "
                f"under {root}."
            )
    return [{"image": str(volumes[i]), "label": str(segmentations[i])} for i in sorted(volumes)]


# the labels a Decathlon task of each dataset declares in its dataset.json (Task01_BrainTumour, Task03_Liver)
_MSD_LABELS = {
    "brats": ("background", "edema", "non-enhancing tumor", "enhancing tumour"),
    "lits": ("background", "liver", "cancer"),
}
_MSD_TASKS = {"brats": "Task01_BrainTumour", "lits": "Task03_Liver"}


def _check_msd_labels(dataset_dir: str | os.PathLike, dataset: str) -> None:
    """Refuse a Decathlon folder whose ``dataset.json`` declares another number of labels than the dataset's task.

    Another task's labels can all lie in the range the dataset's label check allows (Task09_Spleen's 0 and 1
    in LiTS' 0 to 2), so its cases would train or calibrate the network as if they were the dataset's.
    A ``dataset.json`` without ``labels`` is taken as it is.
    """
    json_path = _as_dir(dataset_dir) / "dataset.json"
    try:
        labels = json.loads(json_path.read_text(encoding="utf-8")).get("labels")
    except (OSError, ValueError, AttributeError):
        return  # msd_datalist has named what is wrong with the file
    expected = _MSD_LABELS[dataset]
    if isinstance(labels, dict) and len(labels) != len(expected):
        raise DatasetError(
            f"{json_path} declares {len(labels)} labels ({', '.join(map(str, labels.values()))}) where a {dataset} network "
            f"segments {len(expected)} ({', '.join(expected)}): it is another task's dataset. Point --dataset_dir at a "
            f"{_MSD_TASKS[dataset]} folder, or use a network made for this task."
        )


def load_datalist(
    dataset_dir: str | os.PathLike,
    layout: str = "auto",
    dataset: str | None = None,
    section: str = "training",
    check_headers: bool = False,
) -> list[dict[str, Any]]:
    """List the cases of a dataset folder in any supported layout.

    Args:
        dataset_dir: the dataset folder.
        layout: ``"auto"`` (detect), ``"msd"``, ``"brats"``, ``"brats2023"``, ``"lits"``, or ``"native"``
            (the dataset's own release layout, which needs ``dataset``; for BraTS the release whose
            file names the folder holds).
        dataset: ``"brats"`` or ``"lits"``, or None. With ``"native"`` it picks the layout; with a
            detected native layout it must agree with what was found.
        section: the ``dataset.json`` section for the Decathlon layout; the native releases only
            have ``"training"``.
        check_headers: also open every file's NIfTI header (see :func:`validate_datalist`).

    Returns:
        a list of ``{"image": ..., "label": ...}`` dicts with absolute paths.

    Raises:
        ValueError: when ``layout`` or ``dataset`` is not a known name.
        DatasetError: when the folder does not match the layout, is empty, or names missing or
            unreadable files, or a Decathlon ``dataset.json`` declares another number of labels than
            ``dataset``'s task.
    """
    layout = resolve_layout(dataset_dir, layout, dataset)
    if layout == "msd":
        datalist = msd_datalist(dataset_dir, section=section)
        if dataset in _MSD_LABELS:
            _check_msd_labels(dataset_dir, dataset)
    else:
        if section != "training":
            raise UserInputError(f"the {layout!r} layout only has a 'training' section, got section={section!r}.")
        listers = {"brats": brats_datalist, "brats2023": brats2023_datalist, "lits": lits_datalist}
        datalist = listers[layout](dataset_dir)
    if check_headers:
        validate_datalist(datalist, read_data=False)
    return datalist


def split_datalist(
    datalist: Sequence[dict[str, Any]], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split cases into training and validation sets, deterministically for a given seed.

    Args:
        datalist: the cases.
        val_fraction: the share of cases for validation, in ``(0, 1)``; rounded, then clamped so that
            both sets keep at least one case.
        seed: seed of the shuffle; the same seed and list give the same split.

    Returns:
        ``(train, val)``, each in the order of ``datalist``.

    Raises:
        ValueError: when ``val_fraction`` is not in ``(0, 1)``.
        DatasetError: when ``datalist`` has fewer than two cases.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserInputError(f"val_fraction must be in (0, 1), got {val_fraction!r}.")
    n = len(datalist)
    if n < 2:
        raise DatasetError(f"cannot split {n} case(s) into training and validation; need at least 2.")
    n_val = min(max(int(round(n * val_fraction)), 1), n - 1)
    # Not MONAI's partition_dataset(ratios=..., shuffle=True): its shuffle draws other validation
    # cases for the same seed, so every bundle's published split (and its demo checkpoints) would change.
    val_idx = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = [datalist[i] for i in range(n) if i not in val_idx]
    val = [datalist[i] for i in range(n) if i in val_idx]
    return train, val


def _other_voxel_counts(label: tuple[int, ...], image: tuple[int, ...]) -> bool:
    """Whether a label's spatial shape cannot be its image's: one stored in another axis order (sizes permuted)
    may be on the image's voxels in the world, which the grid check (:func:`check_label_grid`) decides."""
    return sorted(label) != sorted(image)


def check_nifti(path: str | os.PathLike, read_data: bool = True, role: str = "image") -> tuple[int, ...]:
    """Check that a NIfTI file opens, and optionally that its whole data block decodes to finite values.

    Reading the data is what catches a truncated ``.nii.gz`` (the header alone still parses); a NaN
    voxel found then is named before a workflow writes anything (an inference run met it at its
    case, with the earlier cases' masks written).

    Args:
        path: the NIfTI file.
        read_data: decode the voxel data as well as the header.
        role: what to call the file in a message (``"image"``, ``"label"``).

    Returns:
        the shape from the header.

    Raises:
        DatasetError: when the file is missing, is not NIfTI, or is truncated or corrupt, or (with
            ``read_data``) holds NaN or Inf.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"missing NIfTI file {path}; expected a .nii or .nii.gz file there.")
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        # a truncated gzip stream or a short .nii (memory-mapped: size checked) only fails here
        data = np.asanyarray(img.dataobj) if read_data else None
    except Exception as e:  # nibabel, gzip, zlib and numpy raise many unrelated types here
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatasetError(f"corrupt or unreadable NIfTI file {path}: {reason}; re-export or remove it.") from e
    if data is not None and np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise DatasetError(f"{role} {path} holds {bad} NaN or Inf voxel(s): fix or re-export the file, or leave the case out.")
    return shape


def check_nifti_volume(path: str | os.PathLike, role: str = "image", read_data: bool = False) -> tuple[int, ...]:
    """Check that a NIfTI image or label opens (:func:`check_nifti`) and holds a 3D volume.

    MONAI loads a 2D file as a 2D image, which then fails in a 3D crop or network far from the file, or
    with advice about the window size; a label of several volumes (a one-hot or probability map) or
    with a fifth axis fails inside MONAI's reorientation or one-hot conversion. An image may hold
    several volumes along its fourth axis: they are its channels (the Decathlon's BraTS).

    Args:
        path: the NIfTI file.
        role: ``"image"`` or ``"label"`` (one volume: ``(x, y, z)`` or ``(x, y, z, 1)``).
        read_data: decode the voxel data as well as the header.

    Returns:
        the shape from the header.

    Raises:
        DatasetError: naming the file and its shape when it has fewer than three spatial axes, or is a
            label of more than one volume, or when :func:`check_nifti` refuses it.
    """
    shape = check_nifti(path, read_data=read_data, role=role)
    size = "x".join(map(str, shape))
    if len(shape) < 3:
        raise DatasetError(
            f"{role} {path} has {len(shape)} spatial axes ({size}); monai-effq segments 3D volumes: give the whole "
            f"volume, not a slice (one slice saved as a 3D file is {size}x1)."
        )
    if role == "label" and len(shape) > 3 and shape[3:] != (1,):
        raise DatasetError(
            f"{role} {path} is {size} voxels, not one 3D volume: save one 3D map of class values "
            f"({'x'.join(map(str, shape[:3]))}; e.g. the argmax of a one-hot or probability map)."
        )
    return shape


def image_channels(path: str | os.PathLike) -> int:
    """How many channels MONAI's loader makes of one image, from its header: the volumes of a 4D NIfTI
    file (the Decathlon's BraTS), one for a 3D NIfTI file or a DICOM series folder, the pixel components
    of another format's file (a vector NRRD).

    Args:
        path: a NIfTI file, a DICOM series folder or another file ITK reads.

    Returns:
        the number of channels.

    Raises:
        DatasetError: for a NIfTI file whose header does not read.
    """
    if str(path).endswith(NIFTI_SUFFIXES):
        return _nifti_channels(check_nifti(path, read_data=False))
    if Path(path).is_dir():
        return 1
    from monai_effq.data.images import file_channels  # that module imports this one

    return file_channels(path)


def _nifti_channels(shape: tuple[int, ...]) -> int:
    """A NIfTI file's channels from its shape: one per volume past the three spatial axes."""
    return int(np.prod(shape[3:]))


def _check_channels(what: str, images: Sequence[Any], found: Sequence[int], channels: int) -> None:
    """Refuse a case whose images hold another number of channels than the network takes: MONAI would
    stop at its first convolution with a multi-screen error that names no file."""
    if sum(found) == channels:
        return
    if len(images) > 1:  # name the file that holds more than one volume, where one does
        detail = ", ".join(f"{p}: {n}" for p, n in zip(images, found))
    else:
        detail = str(images[0])
    if channels == 1:
        expected = "one 3D volume per case (a 4D file holds several: keep the one the network was trained on)"
    else:
        expected = (
            f"{channels} 3D images of one grid per case, or one 4D file of {channels} volumes, in the order the "
            "network was trained on"
        )
    raise DatasetError(
        f"{what} ({detail}) holds {sum(found)} image channel(s), but the network takes {channels}: give "
        f"{expected}, and check that this is the dataset the network was made for."
    )


def check_image_channels(images: Any, channels: int, what: str = "image") -> None:
    """Check from the headers that one case's images hold the channels a network takes.

    MONAI's loader makes one channel of a 3D file or a DICOM series folder, one per volume of a 4D
    NIfTI file (the Decathlon's BraTS), and stacks a multi-modal case's files.

    Args:
        images: one image path, or the paths of one multi-modal case.
        channels: the network's input channels.
        what: what the case is, for the message (e.g. ``"calibration case 0"``).

    Raises:
        DatasetError: naming the case's files and their channels, and what to give instead.
    """
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    _check_channels(what, images, [image_channels(p) for p in images], channels)


def validate_datalist(
    datalist: Sequence[Mapping[str, Any]], read_data: bool = False, channels: int | None = None
) -> None:
    """Check every file of a dataset list, and that images and labels share a grid, from the headers.

    Images are NIfTI files or DICOM series folders; a series' label may be a DICOM SEG or RTSTRUCT file
    (placed on the series when it is loaded, so its shape is not compared here), or a NIfTI file of the
    series' shape. A NIfTI case's images must lie on one grid (shape, spacing, orientation and origin in
    their headers) and its label on their shape, spacing and orientation, as
    :func:`~monai_effq.data.images.check_case_grids` checks; labels of another origin are named in one
    warning.

    Args:
        datalist: cases as returned by :func:`load_datalist`; ``"image"`` may be one path or a list.
        read_data: decode every file's voxel data (slow on a full dataset, but finds truncated files).
        channels: the number of input channels of the network the cases are for (a 4D NIfTI file gives
            one per volume, a 3D file or a DICOM series one), or None not to check it.

    Raises:
        DatasetError: naming the first missing, unreadable or mismatched file, a NIfTI image or label that is
            not a 3D volume (:func:`check_nifti_volume`), or the images of a case that hold another number of
            channels than ``channels``.
    """
    # these modules import this one
    from monai_effq.data.dicom_seg import load_seg, series_headers
    from monai_effq.data.images import check_case_grids, check_label_grid, check_series_grids
    from monai_effq.data.rtstruct import dicom_label_kind, load_rtstruct

    moved: list[str] = []  # labels of another origin, for one warning
    if not datalist:
        raise DatasetError("the dataset list is empty; nothing to validate.")
    for i, item in enumerate(datalist):
        if "image" not in item:
            raise DatasetError(f"dataset entry {i} has no 'image' key: {dict(item)!r}.")
        images = item["image"] if isinstance(item["image"], (list, tuple)) else [item["image"]]
        series = [p for p in images if Path(p).is_dir()]
        kind = dicom_label_kind(item["label"]) if "label" in item else None
        if series:
            if len(series) < len(images):
                raise DatasetError(f"dataset entry {i} mixes DICOM series folders and image files: {images}; give one kind.")
            grids = check_series_grids(series)
            for folder in series if kind else ():  # a label on a multi-frame image would stop its run at reading
                series_headers(folder)
            if channels is not None:
                _check_channels(f"dataset entry {i}", images, [1] * len(images), channels)  # a series is one volume
            if "label" in item and not kind:
                shape = check_nifti_volume(item["label"], "label", read_data=read_data)
                if _other_voxel_counts(shape[:3], grids[0][1]):
                    raise DatasetError(
                        f"spatial shape {shape[:3]} of {item['label']} differs from {grids[0][1]} of the DICOM series "
                        f"in {series[0]}; image and label must be on the same grid: export the label from the series "
                        "(or resample it onto the series)."
                    )
                # the slices' positions against the label's header, as for a NIfTI image
                note = check_label_grid(f"the DICOM series in {series[0]}", *grids[0][1:], item["label"])
                moved += [note] if note else []
            elif kind == "a DICOM SEG" and read_data:
                load_seg(item["label"], decode=True)
            elif kind and read_data:
                load_rtstruct(item["label"])
            continue
        if kind:
            raise DatasetError(
                f"dataset entry {i}: label {item['label']} is {kind}, which lies on the DICOM series it segments, but "
                f"the image is {images[0]}: give that series' folder as the image, or the label as NIfTI."
            )
        shapes = {str(p): check_nifti_volume(p, "image", read_data=read_data) for p in images}
        reference_path, reference = next(iter(shapes.items()))
        if "label" in item:
            label_shape = check_nifti_volume(item["label"], "label", read_data=read_data)
            # a Decathlon image is 4D (x, y, z, contrast); only the spatial part must agree
            if _other_voxel_counts(label_shape[:3], reference[:3]):
                raise DatasetError(
                    f"spatial shape {label_shape[:3]} of {item['label']} differs from {reference[:3]} of {reference_path}; "
                    "image and label must be on the same grid."
                )
        if channels is not None:
            _check_channels(f"dataset entry {i}", images, [_nifti_channels(shape) for shape in shapes.values()], channels)
        # the headers alone: a label saved with another affine is otherwise paired with its image silently
        note = check_case_grids(images, item.get("label"))
        moved += [note] if note else []
    if moved:
        logger.warning(
            "%d label(s) differ from their image in origin or rotation only (%s%s): their voxels are paired as stored; save "
            "each with its image's header if other tools read them in world coordinates.",
            len(moved), moved[0], "; ..." if len(moved) > 1 else "",
        )
