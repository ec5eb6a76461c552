"""A BraTS 2020 folder rewritten as the BraTS 2023 releases lay out and label the same cases."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

# 2020 file suffix -> 2023 file suffix
RENAMED = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w", "seg": "seg"}


def as_brats2023(src: Path, dest: Path) -> Path:
    """Write each ``BraTS20_Training_XXX`` case of ``src`` to ``dest/BraTS-GLI-00XXX-000/BraTS-GLI-00XXX-000-<part>.nii.gz``,
    its label's enhancing tumour 4 written as 2023's 3 (1 necrotic core and 2 oedema are the same values)."""
    for case in sorted(d for d in src.iterdir() if d.is_dir() and d.name.startswith("BraTS20_")):
        name = f"BraTS-GLI-{int(case.name.rsplit('_', 1)[1]):05d}-000"
        (dest / name).mkdir(parents=True)
        for old, new in RENAMED.items():
            image = nib.load(str(next(case.glob(f"{case.name}_{old}.nii*"))))
            data = np.asarray(image.dataobj)
            if old == "seg":
                assert set(np.unique(data).tolist()) <= {0, 1, 2, 4}
                data = np.where(data == 4, 3, data).astype(data.dtype)
            nib.save(nib.Nifti1Image(data, image.affine, image.header), str(dest / name / f"{name}-{new}.nii.gz"))
    return dest
