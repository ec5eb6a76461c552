"""Dataset lists, preprocessing and synthetic demo data for BraTS and LiTS in their native and Decathlon layouts.

The transforms and the demo generator are imported on first use: importing MONAI takes seconds that
the dataset lists do not need, and ``python -m monai_effq.data.demo`` must not find its own module
already imported by this package (runpy warns about that).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from monai_effq.data.layouts import (
    BRATS2023_MODALITIES,
    BRATS_MODALITIES,
    LAYOUTS,
    NIFTI_SUFFIXES,
    DatasetError,
    brats2023_datalist,
    brats_datalist,
    check_image_channels,
    check_nifti,
    check_nifti_volume,
    detect_layout,
    image_channels,
    lits_datalist,
    load_datalist,
    msd_datalist,
    resolve_layout,
    split_datalist,
    validate_datalist,
)

if TYPE_CHECKING:
    from monai_effq.data.calibration import calibration_windows
    from monai_effq.data.demo import (
        MSD_TASKS,
        make_brats_demo,
        make_lits_demo,
        make_msd_demo,
        synth_brats_case,
        synth_lits_case,
    )
    from monai_effq.data.transforms import (
        BRATS_CHANNELS,
        BRATS2023_LABELS,
        BRATS_MSD_LABELS,
        BRATS_NATIVE_LABELS,
        LITS_CLASSES,
        LITS_LABELS,
        CheckLabelRange,
        CheckLabelRanged,
        ConvertMsdBratsLabels,
        ConvertBrats2023Labels,
        ConvertBrats2023Labelsd,
        ConvertMsdBratsLabelsd,
        CheckFinited,
        LoadImageFilesd,
        brats_transforms,
        lits_transforms,
    )
    from monai_effq.data.images import check_case_grids, check_image, dicom_series_files, image_error_reason
    from monai_effq.data.writers import AtomicNibabelWriter, inference_masks, mask_name_formatter, mask_subject
    from monai_effq.data.dicom_seg import (
        BRATS2023_SEG_LABELS,
        BRATS_MSD_SEG_LABELS,
        BRATS_NATIVE_SEG_LABELS,
        BRATS_SEGMENTS,
        LITS_SEG_LABELS,
        LITS_SEGMENTS,
        DicomSegWriter,
        Segment,
        SegLabels,
        check_seg_source,
        is_dicom_seg,
        read_seg_labels,
    )
    from monai_effq.data.rtstruct import RtStructWriter, is_rtstruct, read_rtstruct_labels
    from monai_effq.data.segment_codes import channel_segments, coded_segment, segment_for_name

# public names served by __getattr__ below, and the module each comes from
_LAZY: dict[str, str] = {
    "calibration_windows": "monai_effq.data.calibration",
    **dict.fromkeys(
        (
            "MSD_TASKS",
            "make_brats_demo",
            "make_lits_demo",
            "make_msd_demo",
            "synth_brats_case",
            "synth_lits_case",
        ),
        "monai_effq.data.demo",
    ),
    **dict.fromkeys(
        (
            "BRATS_CHANNELS",
            "BRATS_MSD_LABELS",
            "BRATS_NATIVE_LABELS",
            "BRATS2023_LABELS",
            "LITS_CLASSES",
            "LITS_LABELS",
            "CheckLabelRange",
            "CheckLabelRanged",
            "ConvertMsdBratsLabels",
            "ConvertMsdBratsLabelsd",
            "ConvertBrats2023Labels",
            "ConvertBrats2023Labelsd",
            "CheckFinited",
            "LoadImageFilesd",
            "brats_transforms",
            "lits_transforms",
        ),
        "monai_effq.data.transforms",
    ),
    **dict.fromkeys(("AtomicNibabelWriter", "inference_masks", "mask_name_formatter", "mask_subject"), "monai_effq.data.writers"),
    **dict.fromkeys(("check_image", "check_case_grids", "dicom_series_files", "image_error_reason"), "monai_effq.data.images"),
    **dict.fromkeys(
        (
            "BRATS_SEGMENTS",
            "LITS_SEGMENTS",
            "DicomSegWriter",
            "Segment",
            "check_seg_source",
            "SegLabels",
            "LITS_SEG_LABELS",
            "BRATS_NATIVE_SEG_LABELS",
            "BRATS_MSD_SEG_LABELS",
            "BRATS2023_SEG_LABELS",
            "is_dicom_seg",
            "read_seg_labels",
        ),
        "monai_effq.data.dicom_seg",
    ),
    **dict.fromkeys(("RtStructWriter", "is_rtstruct", "read_rtstruct_labels"), "monai_effq.data.rtstruct"),
    **dict.fromkeys(("channel_segments", "coded_segment", "segment_for_name"), "monai_effq.data.segment_codes"),
}

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
    "check_image",
    "check_case_grids",
    "dicom_series_files",
    "image_error_reason",
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
    "CheckFinited",
    "LoadImageFilesd",
    "brats_transforms",
    "lits_transforms",
    "MSD_TASKS",
    "make_brats_demo",
    "make_lits_demo",
    "make_msd_demo",
    "synth_brats_case",
    "synth_lits_case",
    "calibration_windows",
    "AtomicNibabelWriter",
    "inference_masks",
    "mask_name_formatter",
    "mask_subject",
    "DicomSegWriter",
    "Segment",
    "BRATS_SEGMENTS",
    "LITS_SEGMENTS",
    "check_seg_source",
    "SegLabels",
    "LITS_SEG_LABELS",
    "BRATS_NATIVE_SEG_LABELS",
    "BRATS_MSD_SEG_LABELS",
    "BRATS2023_SEG_LABELS",
    "is_dicom_seg",
    "read_seg_labels",
    "RtStructWriter",
    "is_rtstruct",
    "read_rtstruct_labels",
    "channel_segments",
    "coded_segment",
    "segment_for_name",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
