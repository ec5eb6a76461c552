"""Standard MONAI preprocessing for the BraTS and LiTS datasets in either of their layouts.

:func:`brats_transforms` turns a case into a 4-channel MRI image (FLAIR, T1, T1gd, T2) and a
3-channel float label (TC, WT, ET; multi-label, for sigmoid outputs). :func:`lits_transforms` turns
a case into a 1-channel windowed CT image and a 1-channel integer label (0 background, 1 liver,
2 tumour; multi-class, for softmax outputs).

The label conventions differ between releases (``docs/monai-notes.md``): native BraTS uses
1 necrotic core, 2 oedema, 4 enhancing, the Decathlon uses 1 oedema, 2 non-enhancing, 3 enhancing.
MONAI's ``ConvertToMultiChannelBasedOnBratsClassesd(et_label=3)`` counts Decathlon oedema as core,
hence :class:`ConvertMsdBratsLabelsd`. :class:`CheckLabelRanged` stops a case with the wrong
convention (or a corrupt label) before it silently trains or calibrates on nonsense.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import ITKReader, MetaTensor
from monai.transforms import (
    Compose,
    ConvertToMultiChannelBasedOnBratsClassesd,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandSpatialCropd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
    Transform,
)
from monai.utils import TransformBackends

from monai_effq.data.dicom_seg import BRATS2023_SEG_LABELS, BRATS_MSD_SEG_LABELS, BRATS_NATIVE_SEG_LABELS, LITS_SEG_LABELS, SegLabels, read_seg_labels
from monai_effq.data.rtstruct import dicom_label_kind, read_rtstruct_labels
from monai_effq.data.images import dicom_series_files, image_error_reason
from monai_effq.data.layouts import NIFTI_SUFFIXES, DatasetError, check_nifti
from monai_effq.utils.errors import MissingExtraError, UserInputError, all_finite

__all__ = [
    "BRATS_NATIVE_LABELS",
    "BRATS_MSD_LABELS",
    "BRATS2023_LABELS",
    "LITS_LABELS",
    "BRATS_CHANNELS",
    "LITS_CLASSES",
    "ConvertMsdBratsLabels",
    "ConvertMsdBratsLabelsd",
    "ConvertBrats2023Labels",
    "ConvertBrats2023Labelsd",
    "CheckLabelRange",
    "CheckLabelRanged",
    "brats_transforms",
    "lits_transforms",
    "CheckFinited",
    "LoadImageFilesd",
]

BRATS_NATIVE_LABELS = (0, 1, 2, 4)
"""Native BraTS 2018-2021: background, necrotic/non-enhancing core, oedema, enhancing tumour."""
BRATS_MSD_LABELS = (0, 1, 2, 3)
"""Decathlon Task01: background, oedema, non-enhancing tumour, enhancing tumour."""
BRATS2023_LABELS = (0, 1, 2, 3)
"""BraTS 2023: background, necrotic core (NCR), oedema (SNFH), enhancing tumour (ET). The values of the
Decathlon's, with another meaning: the layout, not the values, tells them apart."""
LITS_LABELS = (0, 1, 2)
"""LiTS and Decathlon Task03: background, liver, tumour."""
BRATS_CHANNELS = ("TC", "WT", "ET")
"""Channels of the label produced by :func:`brats_transforms`."""
LITS_CLASSES = ("background", "liver", "tumour")
"""Classes of the label produced by :func:`lits_transforms`."""

_KEYS = ("image", "label")
# the metadata key under which LoadImageFilesd lists the files of an image stacked from several, one per channel
_CHANNEL_FILES = "effq_channel_files"
_BRATS_LAYOUTS = {"native": "native", "brats": "native", "msd": "msd", "brats2023": "brats2023"}
# LiTS' body crop keeps the voxels above this many HU: air (about -1000) goes, fat (about -100) and soft tissue stay
_BODY_HU = -500.0


def _source_name(data: Mapping[Hashable, Any], key: Hashable, value: Any) -> str:
    """The file a value was loaded from, for error messages (MetaTensor meta or a ``*_meta_dict``)."""
    meta = value.meta if isinstance(value, MetaTensor) else data.get(f"{key}_meta_dict", {})
    name = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    if isinstance(name, (list, tuple)):
        name = ", ".join(str(n) for n in name)
    return str(name) if name else f"<{key} in memory>"


class ConvertMsdBratsLabels(Transform):
    """Convert a Decathlon Task01 label map to 3 channels TC, WT, ET.

    Decathlon labels are 1 oedema, 2 non-enhancing tumour, 3 enhancing tumour, so
    TC = 2 | 3, WT = 1 | 2 | 3, ET = 3. A leading channel of size 1 is dropped first.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]
    # the label values of the tumour core; WT is every tumour label, ET label 3 in both conventions
    core: tuple[int, ...] = (2, 3)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Split a label map into the three nested tumour regions.

        Args:
            img: label map, ``(H, W, D)`` or ``(1, H, W, D)``.

        Returns:
            boolean ``(3, H, W, D)`` array or tensor, of the input's kind.
        """
        if img.ndim == 4 and img.shape[0] == 1:
            img = img[0]
        core = (img == self.core[0]) | (img == self.core[1])
        result = [core, (img == 1) | (img == 2) | (img == 3), img == 3]
        return torch.stack(result, dim=0) if isinstance(img, torch.Tensor) else np.stack(result, axis=0)


class ConvertBrats2023Labels(ConvertMsdBratsLabels):
    """Convert a BraTS 2023 label map to 3 channels TC, WT, ET.

    BraTS 2023 labels are 1 necrotic core, 2 oedema, 3 enhancing tumour (the Decathlon's values, with
    1 and 2 the other way round), so TC = 1 | 3, WT = 1 | 2 | 3, ET = 3.
    """

    core = (1, 3)


class ConvertMsdBratsLabelsd(MapTransform):
    """Dictionary version of :class:`ConvertMsdBratsLabels`.

    Args:
        keys: keys of the label maps to convert.
        allow_missing_keys: do not raise when a key is absent.
    """

    backend = ConvertMsdBratsLabels.backend
    converter_class: type[ConvertMsdBratsLabels] = ConvertMsdBratsLabels

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = self.converter_class()

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


class ConvertBrats2023Labelsd(ConvertMsdBratsLabelsd):
    """Dictionary version of :class:`ConvertBrats2023Labels`.

    Args:
        keys: keys of the label maps to convert.
        allow_missing_keys: do not raise when a key is absent.
    """

    converter_class = ConvertBrats2023Labels


@dataclass(frozen=True)
class CheckLabelRange(Transform):
    """Raise :class:`DatasetError` when a label map holds values outside an allowed set.

    Args:
        allowed: the label values that may occur.
        source: the file name to report (the dictionary version fills it in per case).
    """

    allowed: tuple[int, ...]
    source: str = "<label in memory>"

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Check the values of a label map.

        Args:
            img: label map.

        Returns:
            ``img`` unchanged.

        Raises:
            DatasetError: naming ``source``, the unexpected values and the allowed set.
        """
        values = torch.unique(img).tolist() if isinstance(img, torch.Tensor) else np.unique(img).tolist()
        bad = [v for v in values if v not in self.allowed]  # 0.5 is "not in" (0, 1): non-integers fail too
        if bad:
            # every digit a float32 label holds: 1.9999999 printed as "2" would look allowed
            shown = ", ".join(f"{v:.9g}" for v in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
            fractional = [v for v in bad if float(v) != round(float(v))]
            hint = (
                "; it holds non-integer values: round the label, or resample it with nearest-neighbour interpolation"
                if fractional
                else "; check the dataset and layout (label convention)"
            )
            raise DatasetError(
                f"label file {self.source} has values {{{shown}}} outside the allowed set "
                f"{{{', '.join(str(a) for a in self.allowed)}}}{hint}."
            )
        return img


class CheckLabelRanged(MapTransform):
    """Dictionary version of :class:`CheckLabelRange`; names the file from the loaded metadata.

    Args:
        keys: keys of the label maps to check.
        allowed: the label values that may occur, e.g. ``(0, 1, 2, 4)`` for native BraTS,
            ``(0, 1, 2, 3)`` for Decathlon BraTS, ``(0, 1, 2)`` for LiTS.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection, allowed: Iterable[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.allowed = tuple(sorted(int(a) for a in allowed))

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        """Check each label of a case.

        Args:
            data: the case dict.

        Returns:
            a shallow copy of ``data``, values unchanged.

        Raises:
            DatasetError: when a label holds a value outside ``allowed``, naming its file.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            CheckLabelRange(self.allowed, _source_name(d, key, d[key]))(d[key])
        return d


class CheckFinited(MapTransform):
    """Refuse images that hold NaN or Inf voxels, naming the file (no network or runtime flags them).

    For an image stacked from several files (BraTS' contrasts), the file of the first channel that holds
    them is named, from the list :class:`LoadImageFilesd` keeps in the metadata; the list is removed
    here, so it never reaches a batch.

    Args:
        keys: keys of the images to check.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        """A shallow copy of the case dict, after checking its images (:class:`DatasetError` names a bad file)."""
        d = dict(data)
        for key in self.key_iterator(d):
            files = d[key].meta.pop(_CHANNEL_FILES, None) if isinstance(d[key], MetaTensor) else None
            values = torch.as_tensor(d[key])
            # one reduction per image; the voxel count (a mask as large as the image) only when it fails
            if values.is_floating_point() and not all_finite(values.as_subclass(torch.Tensor)):
                bad = ~torch.isfinite(values.as_subclass(torch.Tensor))
                source = _source_name(d, key, d[key])
                if files is not None and len(files) == bad.shape[0]:  # one channel per file, channel first
                    per_file = bad.flatten(1).sum(1)
                    channel = int(torch.nonzero(per_file)[0])
                    source, count = files[channel], int(per_file[channel])
                else:
                    count = int(bad.sum())
                raise DatasetError(
                    f"image {source} holds {count} NaN or Inf voxel(s): fix or re-export the file, or leave the case out."
                )
        return d


class _Pipeline(Compose):
    """A Compose that lets :class:`DatasetError` (and a missing extra's error) through unwrapped.

    MONAI re-raises every error inside a Compose as ``RuntimeError("applying transform ...")``;
    a bad dataset should surface as the DatasetError that names the file, from ``pipeline(case)``
    and from ``Dataset(...)[i]`` or ``CacheDataset(...)`` alike (they call the Compose itself), and
    a label that needs the ``dicom`` extra as the error saying what to install.
    """

    def __call__(
        self, input_: Any, start: int = 0, end: int | None = None, threading: bool = False, lazy: bool | None = None
    ) -> Any:
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        except RuntimeError as e:
            cause: BaseException | None = e
            while cause is not None and not isinstance(cause, (DatasetError, MissingExtraError)):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from None


@dataclass(frozen=True)
class _Above:
    """``x > threshold``; a picklable ``select_fn`` (lambdas break multi-process data loading)."""

    threshold: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x > self.threshold


class _CheckLabelGrid(MapTransform):
    """Refuse a case whose label has another spatial shape than its image, naming both files.

    The bundles check this from the headers before they run (``validate_datalist``); a datalist of the
    user's own given to these transforms is not, and MONAI's padding and cropping would then align
    label and image by their corners, training or scoring on a label that lies beside its anatomy.
    """

    def __init__(self) -> None:
        super().__init__(keys="label", allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> Mapping[Hashable, NdarrayOrTensor]:
        """``data`` unchanged, when its label (if any) has its image's spatial shape.

        Raises:
            DatasetError: naming the label and image files and their shapes.
        """
        for key in self.key_iterator(data):
            label, image = tuple(data[key].shape[1:]), tuple(data["image"].shape[1:])
            if label != image:
                raise DatasetError(
                    f"label {_source_name(data, key, data[key])} is {'x'.join(map(str, label))} voxels but its image "
                    f"{_source_name(data, 'image', data['image'])} is {'x'.join(map(str, image))}: image and label must be "
                    "on the same grid (export the label from the image, or resample it onto the image with "
                    "nearest-neighbour interpolation)."
                )
        return data


class _CheckBodyFound(MapTransform):
    """Refuse an image that the body crop (voxels above ``threshold`` HU) left empty, naming its file.

    MONAI's ``CropForegroundd`` crops an image without such a voxel to nothing, and does not say so:
    inference would then write an all-background mask, and calibration fail inside torch. Such a CT is
    usually not in Hounsfield units (a rescale intercept applied twice, or not at all).

    Args:
        threshold: the body crop's threshold in HU, for the message.
    """

    def __init__(self, threshold: float) -> None:
        super().__init__(keys="image")
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> Mapping[Hashable, NdarrayOrTensor]:
        """``data`` unchanged, when its image kept a voxel.

        Raises:
            DatasetError: naming the image's file and the units to check.
        """
        for key in self.key_iterator(data):
            if 0 in tuple(data[key].shape):
                raise DatasetError(
                    f"image {_source_name(data, key, data[key])} has no voxel above {self.threshold:g} HU, so the body crop "
                    "left nothing: is it a CT in Hounsfield units (check its rescale slope and intercept)?"
                )
        return data


def _roi(roi_size: Sequence[int] | None, train: bool, with_label: bool = True) -> tuple[int, int, int] | None:
    if not train:
        return None
    if not with_label:
        raise ValueError("train=True crops around the label: it needs with_label=True.")
    if roi_size is None or len(roi_size) != 3 or any(int(r) < 1 for r in roi_size):
        raise UserInputError(f"train=True needs roi_size as three positive integers, got {roi_size!r}.")
    return tuple(int(r) for r in roi_size)  # type: ignore[return-value]


def _keys(with_label: bool) -> dict[str, Any]:
    """The ``keys``/``allow_missing_keys`` arguments of every step that handles image and label.

    Without the label every step names ``"image"`` alone: MONAI Label swaps each ``LoadImaged`` of a
    bundle's inference preprocessing for its own loader, which loads every key it names whether the
    case has it or not (``allow_missing_keys`` is ignored there).
    """
    return {"keys": _KEYS, "allow_missing_keys": True} if with_label else {"keys": ("image",)}


class LoadImageFilesd(LoadImaged):
    """MONAI's ``LoadImaged`` that names the file it cannot read.

    A truncated ``.nii.gz`` passes a header check and fails only when its data is decoded, deep in a
    transform wrapper; this raises :class:`DatasetError` naming the file instead (the wrapper keeps
    it as the cause). A folder, which MONAI reads as a DICOM series, must hold one series: with
    several, MONAI's reader would warn and segment the first it lists. Series are read by ITK
    whatever other DICOM readers are installed (the checks, and the mask's DICOM SEG, follow its
    slice order and geometry).

    A label given as a DICOM SEG file (as an archive, OHIF or MONAI Label store annotations) or as an
    RTSTRUCT (a radiotherapy plan's contours) is read onto the grid of the image loaded beside it,
    which must come from the series the labels were drawn on, and painted in the dataset's label
    convention (``seg_labels``).

    Args:
        args: as ``LoadImaged``.
        seg_labels: how a DICOM SEG's segments (an RTSTRUCT's ROIs) become this dataset's labels (e.g.
            :data:`~monai_effq.data.dicom_seg.LITS_SEG_LABELS`); None refuses SEG labels.
        kwargs: as ``LoadImaged``.
    """

    def __init__(self, *args: Any, seg_labels: SegLabels | None = None, **kwargs: Any) -> None:
        with _quiet_gpu_dicom_reader():
            super().__init__(*args, **kwargs)
        self.seg_labels = seg_labels

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        kinds = {key: dicom_label_kind(data[key]) for key in self.key_iterator(dict(data))}
        segs = {key: data[key] for key, kind in kinds.items() if kind}
        if not segs:
            return self._load(data, reader)
        if self.seg_labels is None:
            key, path = next(iter(segs.items()))
            raise DatasetError(
                f"{path} is {kinds[key]}, which this loader cannot turn into labels: use the dataset's "
                "preprocessing (brats_transforms, lits_transforms), which knows its label convention, or NIfTI labels."
            )
        # the other keys loaded by a shallow copy that may miss the SEG's keys (this loader may be shared by threads)
        others = copy.copy(self)
        others.allow_missing_keys = True
        out = others._load({k: v for k, v in data.items() if k not in segs}, reader)
        reference = next((k for k in self.keys if k not in segs and isinstance(out.get(k), MetaTensor)), None)
        for key, path in segs.items():
            out[key] = self._seg_label(path, kinds[key].split(" ", 1)[1], out.get(reference), data.get(reference))
        return out

    def _seg_label(self, path: str | os.PathLike, kind: str, image: MetaTensor | None, source: Any) -> MetaTensor:
        """The SEG (``kind`` ``"DICOM SEG"``) or RTSTRUCT at ``path`` as labels on the grid of ``image``, loaded from
        ``source``, with its metadata (a label without channel axis)."""
        folders = list(source) if isinstance(source, (list, tuple)) else [source]
        if image is None or not all(isinstance(f, (str, os.PathLike)) and Path(f).is_dir() for f in folders):
            raise DatasetError(
                f"{kind} label {path} needs its image read from the DICOM series it segments, but the image is "
                f"{source or 'not loaded'}: give the series folder as the image, or the label as NIfTI."
            )
        affine = image.affine.detach().cpu().numpy()
        read = read_seg_labels if kind == "DICOM SEG" else read_rtstruct_labels
        # a multi-contrast case's series are stacked as one image on one grid: the labels may lie on any of them
        labels = read(path, folders, affine, image.shape[-3:], self.seg_labels, str(image.meta.get("space", "RAS")))
        meta = {**image.meta, "filename_or_obj": str(path), "original_channel_dim": "no_channel"}
        return MetaTensor(torch.from_numpy(labels), affine=image.affine.clone(), meta=meta)

    def _load(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        """``LoadImaged`` on ``data``, series read by ITK, a failure named by its file."""
        paths = []
        for key in self.key_iterator(dict(data)):
            value = data[key]
            paths.extend(value if isinstance(value, (list, tuple)) else [value])
        folders = [p for p in paths if isinstance(p, (str, os.PathLike)) and Path(p).is_dir()]
        for path in folders:
            dicom_series_files(path)
        if reader is None and folders and len(folders) == len(paths):
            reader = ITKReader()
        try:
            out = super().__call__(data, reader)
        except Exception as e:  # the readers raise many unrelated types
            for path in paths:
                if isinstance(path, (str, os.PathLike)) and str(path).endswith(NIFTI_SUFFIXES):
                    check_nifti(path, read_data=True)  # raises naming the file when it is the bad one
            raise DatasetError(
                f"cannot read image file(s) {[str(p) for p in paths]}: {image_error_reason(e)}; re-export or remove them."
            ) from e
        for key in self.key_iterator(dict(data)):
            # MONAI's metadata names only the first of the files stacked as channels: CheckFinited names the bad one
            files = data[key]
            if isinstance(files, (list, tuple)) and len(files) > 1 and isinstance(out.get(key), MetaTensor):
                out[key].meta[_CHANNEL_FILES] = [str(f) for f in files]
        return out


@contextlib.contextmanager
def _quiet_gpu_dicom_reader() -> Iterator[None]:
    """Silence MONAI's GPU DICOM reader while ``LoadImage`` builds its readers.

    MONAI 1.6 builds every reader it knows, and where pydicom is installed (the ``dicom`` extra)
    its nvImageCodec reader warns twice that it cannot use the GPU decoder: noise in every run,
    since DICOM series are read here by ITK.
    """
    plugin = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = plugin.level
    plugin.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            yield
    finally:
        plugin.setLevel(level)


def _loading(check: Transform | None, with_label: bool, seg_labels: SegLabels | None = None) -> list[Transform]:
    both = _keys(with_label)
    # Nibabel explicitly for NIfTI: with ITK also installed, MONAI's reader choice would depend on
    # registration order, and ITK treats the Decathlon's 4D image differently. Other formats (NRRD,
    # MetaImage from 3D Slicer or MONAI Label clients) fall through to MONAI's ITKReader.
    steps: list[Transform] = [
        LoadImageFilesd(**both, reader="NibabelReader", image_only=True, seg_labels=seg_labels),
        EnsureChannelFirstd(**both),
        CheckFinited(keys=("image",)),
    ]
    if check is not None and with_label:
        steps.append(check)
    # labels=None: axis names from the MetaTensor's space (RAS for nibabel); also silences a MONAI 1.5+ warning
    steps.append(Orientationd(**both, axcodes="RAS", labels=None))
    if with_label:  # in RAS: a label stored in another axis order than its image has the image's shape there
        steps.append(_CheckLabelGrid())
    return steps


def brats_transforms(
    layout: str,
    train: bool,
    roi_size: Sequence[int] | None = (96, 96, 96),
    pixdim: Sequence[float] | None = None,
    check_labels: bool = True,
    with_label: bool = True,
    seg_segments: Mapping[str | int, int] | None = None,
) -> Compose:
    """Preprocessing for BraTS cases from :func:`monai_effq.data.load_datalist`.

    Loads the four contrasts as channels (the native layout's four files, or the Decathlon's 4D
    image, both in the order FLAIR, T1, T1gd, T2), converts the label to TC/WT/ET with the right
    convention for the layout, reorients to RAS, optionally resamples, and z-scores each contrast
    over the brain (non-zero voxels). Training adds a random ``roi_size`` crop and flips.

    Args:
        layout: ``"native"`` (or ``"brats"``) for the BraTS 2018-2021 releases (labels 1, 2, 4), ``"msd"`` for
            Decathlon Task01 (1 oedema, 2 non-enhancing, 3 enhancing), ``"brats2023"`` for the BraTS 2023
            releases (1 necrotic core, 2 oedema, 3 enhancing).
        train: add the random crop and flips.
        roi_size: crop size for training (padded first if the volume is smaller); unused when
            ``train`` is False, where whole volumes suit sliding-window inference.
        pixdim: voxel size in mm to resample to, or None to keep the files' spacing.
        check_labels: raise :class:`DatasetError` on label values outside the layout's convention.
        with_label: ``False`` for inference: every step handles ``"image"`` alone (MONAI Label loads
            every key that ``LoadImaged`` names).
        seg_segments: for labels given as DICOM SEG whose segments are not named as the bundles write them
            (``tumour core``, ``whole tumour``, ``enhancing tumour``): segment label or number -> label value
            in the layout's convention, painted in this order, e.g. ``{"NCR": 1, "ED": 2, "ET": 4}`` (native).

    Returns:
        a Compose mapping a case dict to ``{"image": (4, H, W, D) float32, "label": (3, H, W, D)
        float32}`` MetaTensors; applying it raises :class:`DatasetError` on an out-of-range label.

    Raises:
        ValueError: on an unknown ``layout``, ``train=True`` without a valid ``roi_size``, or a
            ``seg_segments`` value outside the layout's labels.
    """
    if layout not in _BRATS_LAYOUTS:
        raise ValueError(f"layout must be 'native', 'msd' or 'brats2023' for BraTS, got {layout!r}.")
    convention = _BRATS_LAYOUTS[layout]
    roi = _roi(roi_size, train, with_label)
    labels = {"native": BRATS_NATIVE_LABELS, "msd": BRATS_MSD_LABELS, "brats2023": BRATS2023_LABELS}[convention]
    check = CheckLabelRanged("label", labels, allow_missing_keys=True) if check_labels else None
    both = _keys(with_label)
    if seg_segments is not None:
        seg_labels = SegLabels.from_mapping(seg_segments, labels)
    else:
        seg_labels = {"native": BRATS_NATIVE_SEG_LABELS, "msd": BRATS_MSD_SEG_LABELS, "brats2023": BRATS2023_SEG_LABELS}[convention]
    steps = _loading(check, with_label, seg_labels)
    if with_label:
        steps += [
            {
                "native": ConvertToMultiChannelBasedOnBratsClassesd,
                "msd": ConvertMsdBratsLabelsd,
                "brats2023": ConvertBrats2023Labelsd,
            }[convention](keys="label", allow_missing_keys=True),
            EnsureTyped(keys="label", allow_missing_keys=True, dtype=torch.float32),  # the converters give booleans
        ]
    if pixdim is not None:
        steps.append(Spacingd(**both, pixdim=tuple(pixdim), mode=("bilinear", "nearest")[: len(both["keys"])]))
    steps.append(NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True))
    if roi is not None:
        steps += [
            SpatialPadd(**both, spatial_size=roi),  # so that every crop, hence every batch, is roi-sized
            RandSpatialCropd(**both, roi_size=roi, random_size=False),
            *(RandFlipd(**both, prob=0.5, spatial_axis=axis) for axis in range(3)),
        ]
    steps.append(EnsureTyped(**both, dtype=torch.float32))
    return _Pipeline(steps)


def lits_transforms(
    train: bool,
    roi_size: Sequence[int] | None = None,
    pixdim: Sequence[float] | None = None,
    a_min: float = -21.0,
    a_max: float = 189.0,
    num_samples: int = 1,
    label_dtype: torch.dtype = torch.int64,
    check_labels: bool = True,
    with_label: bool = True,
    seg_segments: Mapping[str | int, int] | None = None,
) -> Compose:
    """Preprocessing for LiTS / Decathlon Task03 cases (both layouts hold the same kind of files).

    Reorients to RAS, crops to the body (HU above -500, so air at about -1000 HU goes; done on the
    raw HU, before windowing, which would map air and fat alike to 0), optionally resamples, and
    windows ``[a_min, a_max]`` HU to ``[0, 1]``. Training adds a crop centred on foreground or
    background with equal odds; no flips, since the liver's side is anatomy the network should use.

    Args:
        train: add the random crops.
        roi_size: crop size for training; required when ``train`` is True.
        pixdim: voxel size in mm to resample to, or None to keep the files' spacing.
        a_min: lower bound of the HU window.
        a_max: upper bound of the HU window.
        num_samples: crops per case in training.
        label_dtype: dtype of the output label.
        check_labels: raise :class:`DatasetError` on label values other than 0, 1, 2.
        with_label: ``False`` for inference: every step handles ``"image"`` alone (MONAI Label loads
            every key that ``LoadImaged`` names).
        seg_segments: for labels given as DICOM SEG whose segments are not named ``liver`` and ``liver
            tumour``: segment label or number -> label value, painted in this order, e.g.
            ``{"Segment_1": 1, "Segment_2": 2}`` as 3D Slicer names them.

    Returns:
        a Compose mapping a case dict to ``{"image": (1, H, W, D) float32 in [0, 1], "label":
        (1, H, W, D) label_dtype}``; with ``train`` it returns a list of ``num_samples`` such dicts
        (MONAI's convention for multi-sample crops; ``monai.data.DataLoader`` flattens it).
        Applying it raises :class:`DatasetError` on an out-of-range label, or on an image without a voxel
        above -500 HU (not a CT in Hounsfield units), which the body crop would leave empty.

    Raises:
        ValueError: when ``train=True`` without a valid ``roi_size``, ``a_min >= a_max``, or a
            ``seg_segments`` value is not 1 or 2.
    """
    if not a_min < a_max:
        raise ValueError(f"a_min must be below a_max, got a_min={a_min}, a_max={a_max}.")
    roi = _roi(roi_size, train, with_label)
    both = _keys(with_label)
    seg_labels = LITS_SEG_LABELS if seg_segments is None else SegLabels.from_mapping(seg_segments, LITS_LABELS)
    steps = _loading(CheckLabelRanged("label", LITS_LABELS, allow_missing_keys=True) if check_labels else None, with_label, seg_labels)
    steps += [
        CropForegroundd(
            **both,
            source_key="image",
            select_fn=_Above(_BODY_HU),
            allow_smaller=True,
            start_coord_key=None,
            end_coord_key=None,
        ),
        _CheckBodyFound(_BODY_HU),
    ]
    if pixdim is not None:
        steps.append(Spacingd(**both, pixdim=tuple(pixdim), mode=("bilinear", "nearest")[: len(both["keys"])]))
    steps.append(ScaleIntensityRanged(keys="image", a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True))
    if roi is not None:
        steps += [
            SpatialPadd(**both, spatial_size=roi),
            RandCropByPosNegLabeld(**both, label_key="label", spatial_size=roi, pos=1.0, neg=1.0, num_samples=num_samples),
        ]
    steps.append(EnsureTyped(keys="image", dtype=torch.float32))
    if with_label:
        steps.append(EnsureTyped(keys="label", allow_missing_keys=True, dtype=label_dtype))
    return _Pipeline(steps)
