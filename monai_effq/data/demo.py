"""Deterministic synthetic BraTS-like and LiTS-like volumes, written as real NIfTI files.

The demo data stand in for the public datasets (which cannot be downloaded here) in tests, examples
and quick benchmarks. They are small, fast to make, and shaped so that a small CPU-trained
SegResNet learns them: every case holds every label, with regions several voxels across.

- BraTS-like MRI: a skull-stripped brain (background exactly 0) with cortex, white matter and CSF
  ventricles, four contrasts (FLAIR, T1, T1ce, T2) whose intensities differ per tissue, and a glioma
  made of necrotic core (native label 1), enhancing rim (4, bright on T1ce) and oedema (2, bright on
  FLAIR and T2), under Gaussian noise and a smooth multiplicative bias field.
- LiTS-like CT in Hounsfield units: air around an elliptical body with fat, muscle, bowel, aorta and
  spine (bone +300 to +900), a liver (+60, label 1) on the patient's right with one to three
  hypodense lesions (about +20, label 2), under about 12 HU of noise.

Case ``i`` depends only on ``(seed, i)``: the same seed gives identical arrays (and identical files,
since nibabel writes gzip without a time stamp), whatever ``n_cases`` is. Each file is written under
a hidden temporary name in its folder and moved into place, so an interrupted run never leaves a
half-written volume under a real name; the Decathlon ``dataset.json`` is written last.

Command line::

    python -m monai_effq.data.demo --dataset brats --layout native --out /tmp/brats --n-cases 6
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from monai_effq.utils.io import atomic_write, atomic_write_text

__all__ = [
    "MSD_TASKS",
    "make_brats_demo",
    "make_lits_demo",
    "make_msd_demo",
    "synth_brats_case",
    "synth_lits_case",
    "main",
]

MSD_TASKS = ("Task01_BrainTumour", "Task03_Liver")
"""Decathlon tasks :func:`make_msd_demo` can imitate."""

_MIN_SIZE = 32  # below this the tumour parts shrink to a voxel or two and stop being learnable

# Intensities per tissue: background, CSF, grey matter, white matter, oedema, necrosis, enhancing.
# Ordered like BraTS: oedema is the brightest thing on FLAIR, the rim on T1ce, CSF on T2.
_BG, _CSF, _GM, _WM, _OEDEMA, _NECROSIS, _ENHANCING = range(7)
_MRI_TABLE = {
    "flair": (0.0, 90.0, 460.0, 360.0, 820.0, 300.0, 520.0),
    "t1": (0.0, 160.0, 420.0, 560.0, 330.0, 210.0, 460.0),
    "t1ce": (0.0, 160.0, 440.0, 560.0, 340.0, 190.0, 1100.0),
    "t2": (0.0, 1100.0, 460.0, 300.0, 860.0, 920.0, 560.0),
}
_BRATS_LABELS = {_OEDEMA: 2, _NECROSIS: 1, _ENHANCING: 4}
_NATIVE_TO_MSD_BRATS = {1: 2, 2: 1, 4: 3}  # necrotic -> non-enhancing, oedema -> oedema, enhancing

_MSD_META = {
    "Task01_BrainTumour": {
        "name": "BRATS",
        "description": "Synthetic gliomas (monai_effq demo) in the Decathlon Task01 layout",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
    },
    "Task03_Liver": {
        "name": "LiTS",
        "description": "Synthetic liver and liver tumours (monai_effq demo) in the Decathlon Task03 layout",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
    },
}


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3 or any(int(s) != s or s < _MIN_SIZE for s in shape):
        raise ValueError(f"shape must be three integers of at least {_MIN_SIZE}, got {tuple(shape)!r}.")
    return int(shape[0]), int(shape[1]), int(shape[2])


def _check_args(n_cases: int, shape: Sequence[int], seed: int, spacing: Sequence[float]) -> None:
    if isinstance(n_cases, bool) or not isinstance(n_cases, int) or n_cases < 1:
        raise ValueError(f"n_cases must be a positive integer, got {n_cases!r}.")
    _check_shape(shape)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    if len(spacing) != 3 or any(not s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive numbers (mm), got {tuple(spacing)!r}.")


def _case_rng(seed: int, index: int, salt: int) -> np.random.Generator:
    # one stream per (seed, case, dataset): case i is the same whether 3 or 30 cases are made
    if seed < 0 or index < 0:
        raise ValueError(f"seed and case index must be non-negative, got seed={seed}, index={index}.")
    return np.random.default_rng([seed, index, salt])


def _affine(spacing: Sequence[float]) -> np.ndarray:
    # LPS-like storage as in the BraTS and LiTS releases (x and y flipped against RAS), so that
    # pipelines have to get Orientationd right on the demo data too
    return np.diag([-float(spacing[0]), -float(spacing[1]), float(spacing[2]), 1.0])


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-variance smooth noise with about ``cells`` blobs along each axis.

    Random values on a coarse lattice are spread with Gaussian weights along each axis in turn,
    which is separable and far cheaper than filtering a full-size volume.
    """
    coarse = rng.standard_normal((cells + 2,) * 3)
    out = coarse
    for axis, n in enumerate(shape):
        nodes = np.linspace(-0.5 / cells, 1.0 + 0.5 / cells, cells + 2)
        pos = np.linspace(0.0, 1.0, n)
        weights = np.exp(-0.5 * ((pos[:, None] - nodes[None, :]) * cells) ** 2)
        weights /= weights.sum(axis=1, keepdims=True)
        out = np.moveaxis(np.tensordot(weights, np.moveaxis(out, axis, 0), axes=(1, 0)), 0, axis)
    out -= out.mean()
    return out / (out.std() + 1e-12)


def _ellipsoid(grid: np.ndarray, center: Sequence[float], semi_axes: Sequence[float]) -> np.ndarray:
    """Normalised ellipsoidal radius: < 1 inside the ellipsoid, 1 on its surface."""
    sq = sum(((grid[k] - center[k]) / semi_axes[k]) ** 2 for k in range(3))
    return np.sqrt(sq)


def _blur(volume: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 smoothing: the partial-volume softening of edges a scanner gives."""
    out = volume
    for axis in range(3):
        padded = np.pad(out, [(1, 1) if a == axis else (0, 0) for a in range(3)], mode="edge")
        lo = np.take(padded, range(0, out.shape[axis]), axis=axis)
        mid = np.take(padded, range(1, out.shape[axis] + 1), axis=axis)
        hi = np.take(padded, range(2, out.shape[axis] + 2), axis=axis)
        out = 0.25 * lo + 0.5 * mid + 0.25 * hi
    return out


def _point_in_ball(rng: np.random.Generator, radius: float) -> np.ndarray:
    while True:
        p = rng.uniform(-radius, radius, 3)
        if np.linalg.norm(p) <= radius:
            return p


def synth_brats_case(seed: int, index: int, shape: Sequence[int] = (64, 64, 48)) -> dict[str, np.ndarray]:
    """Synthesise one BraTS-like case.

    Args:
        seed: dataset seed.
        index: case number; with ``seed`` it fixes the case completely.
        shape: volume shape (x, y, z), each at least 32.

    Returns:
        ``{"flair", "t1", "t1ce", "t2"}`` int16 MRI volumes (0 outside the brain) and ``"seg"``, int16
        with the native BraTS labels {0, 1, 2, 4}, each label present.

    Raises:
        ValueError: on a too-small ``shape`` or a negative ``seed`` or ``index``.
    """
    shape = _check_shape(shape)
    rng = _case_rng(seed, index, salt=1)
    grid = np.indices(shape, dtype=np.float64)
    center = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    semi = np.asarray(shape, dtype=np.float64) * np.array([0.40, 0.45, 0.40]) * rng.uniform(0.93, 1.05, 3)

    r_brain = _ellipsoid(grid, center, semi) + 0.03 * _smooth_field(rng, shape, 3)
    brain = r_brain < 1.0
    tissue = np.full(shape, _BG, dtype=np.int8)
    tissue[brain] = _WM
    # the cortical ribbon folds: its inner edge wanders with a higher-frequency field
    tissue[brain & (r_brain > 0.74 + 0.06 * _smooth_field(rng, shape, 7))] = _GM
    tissue[brain & (r_brain > 0.94)] = _CSF  # subarachnoid CSF lining the skull-stripped surface
    for side in (-1.0, 1.0):  # lateral ventricles, either side of the midline
        v_center = center + np.array([side * 0.07, -0.03, 0.05]) * shape
        v_semi = np.array([0.045, 0.17, 0.09]) * shape * rng.uniform(0.85, 1.15, 3)
        tissue[brain & (_ellipsoid(grid, v_center, v_semi) < 1.0)] = _CSF

    min_side = float(min(shape))
    for _ in range(100):  # re-draw the rare tumour clipped away by the brain edge
        t_center = center + _point_in_ball(rng, 0.45) * semi
        # nested radii, each part at least ~2.5 voxels thick so that small volumes still hold every label
        r_wt = min_side * rng.uniform(0.22, 0.30)
        r_tc = r_wt * rng.uniform(0.50, 0.65)
        r_nc = max(r_tc * rng.uniform(0.50, 0.70), 2.5)
        r_tc = max(r_tc, r_nc + 2.5)
        r_wt = max(r_wt, r_tc + 2.5)
        d_wt = _ellipsoid(grid, t_center, r_wt * rng.uniform(0.8, 1.2, 3)) + 0.15 * _smooth_field(rng, shape, 5)
        d_tc = _ellipsoid(grid, t_center, r_tc * rng.uniform(0.85, 1.15, 3)) + 0.08 * _smooth_field(rng, shape, 5)
        nc_center = t_center + rng.uniform(-0.15, 0.15, 3) * r_nc
        d_nc = _ellipsoid(grid, nc_center, r_nc * rng.uniform(0.85, 1.15, 3)) + 0.1 * _smooth_field(rng, shape, 5)
        with_tumour = tissue.copy()
        with_tumour[brain & (d_wt < 1.0)] = _OEDEMA
        with_tumour[brain & (d_tc < 1.0)] = _ENHANCING
        with_tumour[brain & (d_tc < 1.0) & (d_nc < 1.0)] = _NECROSIS
        if all(np.count_nonzero(with_tumour == t) >= 20 for t in _BRATS_LABELS):
            tissue = with_tumour
            break
    else:  # pragma: no cover - the radii make this unreachable for shapes >= _MIN_SIZE
        raise RuntimeError(f"could not place a tumour in a brain of shape {shape}.")

    seg = np.zeros(shape, dtype=np.int16)
    for t, label in _BRATS_LABELS.items():
        seg[tissue == t] = label

    texture = _smooth_field(rng, shape, 9)  # anatomy: shared by all contrasts
    out: dict[str, np.ndarray] = {}
    for name, table in _MRI_TABLE.items():
        clean = np.asarray(table)[tissue] * (1.0 + 0.04 * texture)
        bias = np.exp(0.12 * _smooth_field(rng, shape, 2))  # coil inhomogeneity differs per sequence
        noisy = _blur(clean) * bias + rng.normal(0.0, 15.0, shape)
        noisy[~brain] = 0.0  # skull-stripped: background is exactly zero, as in BraTS
        out[name] = np.clip(np.rint(noisy), 0, 32767).astype(np.int16)
    out["seg"] = seg
    return out


def synth_lits_case(seed: int, index: int, shape: Sequence[int] = (64, 64, 48)) -> dict[str, np.ndarray]:
    """Synthesise one LiTS-like abdominal CT case.

    Array axes follow the stored (LPS-like) affine: index 0 grows towards the patient's right,
    index 1 towards the back, index 2 towards the head.

    Args:
        seed: dataset seed.
        index: case number; with ``seed`` it fixes the case completely.
        shape: volume shape (x, y, z), each at least 32.

    Returns:
        ``{"ct": int16 HU volume, "seg": int16 labels {0 background, 1 liver, 2 tumour}}``, each label
        present.

    Raises:
        ValueError: on a too-small ``shape`` or a negative ``seed`` or ``index``.
    """
    shape = _check_shape(shape)
    rng = _case_rng(seed, index, salt=3)
    grid = np.indices(shape, dtype=np.float64)
    size = np.asarray(shape, dtype=np.float64)
    center = (size - 1.0) / 2.0

    # body: an elliptical cylinder (wider than deep), slightly wavy and breathing along z
    body_semi = np.array([0.46 * size[0], 0.36 * size[1]]) * rng.uniform(0.92, 1.04, 2)
    z_scale = 1.0 + 0.04 * np.sin(np.linspace(0, np.pi, shape[2]))[None, None, :]
    r_body = np.sqrt(
        ((grid[0] - center[0]) / (body_semi[0] * z_scale)) ** 2
        + ((grid[1] - center[1]) / (body_semi[1] * z_scale)) ** 2
    ) + 0.02 * _smooth_field(rng, shape, 3)
    body = r_body < 1.0

    hu = np.full(shape, -1000.0)
    hu[body] = 40.0  # muscle and solid viscera
    inner = r_body < 0.80
    mesentery = _smooth_field(rng, shape, 6)
    hu[inner & (mesentery > 0.5)] = -90.0  # visceral fat
    hu[body & ~inner] = 45.0  # abdominal wall muscle
    hu[body & (r_body > 0.88 + 0.02 * _smooth_field(rng, shape, 5))] = -100.0  # subcutaneous fat

    # spine at the back of the midline: cortical shell around cancellous bone, canal behind it
    spine_c = np.array([center[0], center[1] + 0.62 * body_semi[1]])
    spine_r = 0.09 * min(size[0], size[1])
    r_spine = np.sqrt((grid[0] - spine_c[0]) ** 2 + (grid[1] - spine_c[1]) ** 2)
    hu[r_spine < spine_r] = 1000.0
    hu[r_spine < 0.7 * spine_r] = 350.0
    canal = np.sqrt((grid[0] - spine_c[0]) ** 2 + (grid[1] - spine_c[1] - 1.4 * spine_r) ** 2) < 0.45 * spine_r
    hu[canal] = 15.0
    aorta_c = spine_c + np.array([-0.9 * spine_r, -1.3 * spine_r])  # in front of the spine, patient's left
    hu[np.sqrt((grid[0] - aorta_c[0]) ** 2 + (grid[1] - aorta_c[1]) ** 2) < 0.5 * spine_r] = 160.0

    # liver: a large smooth blob on the patient's right (high x index with this affine), upper abdomen
    for _ in range(100):
        l_center = center + np.array([0.20, -0.04, 0.08]) * size + rng.uniform(-0.03, 0.03, 3) * size
        l_semi = np.array([0.22, 0.25, 0.36]) * size * rng.uniform(0.9, 1.1, 3)
        d_liver = _ellipsoid(grid, l_center, l_semi) + 0.08 * _smooth_field(rng, shape, 3)
        liver = (d_liver < 1.0) & inner & (r_spine > 1.2 * spine_r)
        deep = np.flatnonzero(liver & (d_liver < 0.55))
        if deep.size == 0:  # pragma: no cover - the liver is always large at these sizes
            continue
        lesions = np.zeros(shape, dtype=bool)
        for _ in range(int(rng.integers(1, 4))):
            c = np.array(np.unravel_index(rng.choice(deep), shape), dtype=np.float64)
            radius = max(min(size) * rng.uniform(0.09, 0.14), 3.0)
            d_les = _ellipsoid(grid, c, radius * rng.uniform(0.85, 1.15, 3)) + 0.1 * _smooth_field(rng, shape, 6)
            lesions |= d_les < 1.0
        lesions &= liver
        if np.count_nonzero(lesions) >= 30:
            break
    else:  # pragma: no cover
        raise RuntimeError(f"could not place a liver lesion in a body of shape {shape}.")

    hu[liver] = 60.0 + 5.0 * _smooth_field(rng, shape, 8)[liver]
    hu[lesions] = rng.uniform(12.0, 28.0) + 6.0 * _smooth_field(rng, shape, 8)[lesions]
    gas = inner & ~liver & (r_spine > 2.5 * spine_r) & (_smooth_field(rng, shape, 8) > 2.2)
    hu[gas] = -850.0  # bowel gas pockets away from liver and spine

    ct = _blur(hu) + rng.normal(0.0, 12.0, shape)
    ct = np.clip(np.rint(ct), -1024, 3071).astype(np.int16)
    seg = np.zeros(shape, dtype=np.int16)
    seg[liver] = 1
    seg[lesions] = 2
    return {"ct": ct, "seg": seg}


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI file atomically (gzipped for ``.nii.gz``, with no time stamp, so reruns give equal bytes)."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    data = img.to_bytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def _save_json(obj: dict, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=4) + "\n")


def make_brats_demo(
    out_dir: str | os.PathLike,
    n_cases: int = 6,
    shape: Sequence[int] = (64, 64, 48),
    seed: int = 0,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> Path:
    """Write BraTS-like cases in the BraTS 2020 release layout.

    Files: ``out_dir/BraTS20_Training_001/BraTS20_Training_001_{flair,t1,t1ce,t2,seg}.nii.gz``, ...
    Existing files of the same names are replaced; other files are left alone.

    Args:
        out_dir: dataset folder to write (created if needed).
        n_cases: number of cases.
        shape: volume shape, each side at least 32.
        seed: dataset seed; the same seed gives identical files.
        spacing: voxel size in mm, stored in the affine.

    Returns:
        ``out_dir`` as a Path, ready for :func:`monai_effq.data.load_datalist`.

    Raises:
        ValueError: on a non-positive ``n_cases``, a too-small ``shape``, a negative ``seed``.
    """
    _check_args(n_cases, shape, seed, spacing)
    root = Path(out_dir)
    affine = _affine(spacing)
    for i in range(n_cases):
        case = synth_brats_case(seed, i, shape)
        name = f"BraTS20_Training_{i + 1:03d}"
        for part, array in case.items():
            _save_nifti(array, affine, root / name / f"{name}_{part}.nii.gz")
    return root


def make_lits_demo(
    out_dir: str | os.PathLike,
    n_cases: int = 6,
    shape: Sequence[int] = (64, 64, 48),
    seed: int = 0,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> Path:
    """Write LiTS-like CT cases in the LiTS release layout.

    Files: ``out_dir/volume-0.nii`` and ``out_dir/segmentation-0.nii``, ... (uncompressed, as released).

    Args:
        out_dir: dataset folder to write (created if needed).
        n_cases: number of cases.
        shape: volume shape, each side at least 32.
        seed: dataset seed; the same seed gives identical files.
        spacing: voxel size in mm, stored in the affine.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ValueError: on a non-positive ``n_cases``, a too-small ``shape``, a negative ``seed``.
    """
    _check_args(n_cases, shape, seed, spacing)
    root = Path(out_dir)
    affine = _affine(spacing)
    for i in range(n_cases):
        case = synth_lits_case(seed, i, shape)
        _save_nifti(case["ct"], affine, root / f"volume-{i}.nii")
        _save_nifti(case["seg"], affine, root / f"segmentation-{i}.nii")
    return root


def make_msd_demo(
    out_dir: str | os.PathLike,
    task: str = "Task01_BrainTumour",
    n_cases: int = 6,
    shape: Sequence[int] = (64, 64, 48),
    seed: int = 0,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> Path:
    """Write the same synthetic cases as the native generators in a Decathlon task layout.

    Case ``i`` holds the same arrays as native case ``i`` of the same seed. For Task01 the four
    contrasts are stacked in one 4D image (FLAIR, T1w, T1gd, T2w) and labels are recoded to the
    Decathlon convention (1 oedema, 2 non-enhancing, 3 enhancing); Task03 keeps 1 liver, 2 tumour.
    ``out_dir`` itself becomes the task folder: ``dataset.json``, ``imagesTr/``, ``labelsTr/``.

    Args:
        out_dir: task folder to write (created if needed).
        task: ``"Task01_BrainTumour"`` or ``"Task03_Liver"`` (``"brats"`` / ``"lits"`` also accepted).
        n_cases: number of cases.
        shape: volume shape, each side at least 32.
        seed: dataset seed; the same seed gives identical files.
        spacing: voxel size in mm, stored in the affine.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ValueError: on an unknown task, or the argument errors of :func:`make_brats_demo`.
    """
    task = {"brats": "Task01_BrainTumour", "lits": "Task03_Liver"}.get(task, task)
    if task not in MSD_TASKS:
        raise ValueError(f"task must be one of {MSD_TASKS}, got {task!r}.")
    _check_args(n_cases, shape, seed, spacing)
    root = Path(out_dir)
    affine = _affine(spacing)
    training = []
    for i in range(n_cases):
        if task == "Task01_BrainTumour":
            case = synth_brats_case(seed, i, shape)
            name = f"BRATS_{i + 1:03d}.nii.gz"
            image = np.stack([case[m] for m in ("flair", "t1", "t1ce", "t2")], axis=-1)
            label = np.zeros_like(case["seg"])
            for native, msd in _NATIVE_TO_MSD_BRATS.items():
                label[case["seg"] == native] = msd
        else:
            case = synth_lits_case(seed, i, shape)
            name = f"liver_{i}.nii.gz"
            image, label = case["ct"], case["seg"]
        _save_nifti(image, affine, root / "imagesTr" / name)
        _save_nifti(label, affine, root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = dict(_MSD_META[task])
    meta.update(
        {
            "reference": "synthetic data generated by monai_effq.data.demo",
            "licence": "CC-BY-SA 4.0",
            "release": f"seed {seed}",
            "numTraining": n_cases,
            "numTest": 0,
            "training": training,
            "test": [],
        }
    )
    _save_json(meta, root / "dataset.json")  # last: a folder with dataset.json is a complete one
    return root


def main(argv: Sequence[str] | None = None) -> Path:
    """Command-line entry point; prints and returns the dataset folder written.

    Args:
        argv: arguments (defaults to ``sys.argv[1:]``).

    Returns:
        the dataset folder.
    """
    parser = argparse.ArgumentParser(
        prog="python -m monai_effq.data.demo",
        description="Write deterministic synthetic BraTS-like or LiTS-like NIfTI data.",
    )
    parser.add_argument("--dataset", choices=("brats", "lits"), required=True)
    parser.add_argument("--layout", choices=("native", "msd"), default="native")
    parser.add_argument("--out", required=True, help="dataset folder to write")
    parser.add_argument("--n-cases", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 64, 48), metavar=("X", "Y", "Z"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("SX", "SY", "SZ"))
    args = parser.parse_args(argv)
    kwargs = {"n_cases": args.n_cases, "shape": tuple(args.shape), "seed": args.seed, "spacing": tuple(args.spacing)}
    try:
        if args.layout == "msd":
            out = make_msd_demo(args.out, task=args.dataset, **kwargs)
        elif args.dataset == "brats":
            out = make_brats_demo(args.out, **kwargs)
        else:
            out = make_lits_demo(args.out, **kwargs)
    except ValueError as e:
        parser.error(str(e))
    print(out)
    return out


if __name__ == "__main__":
    main()
