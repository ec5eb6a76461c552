"""Masks of any bundle written back into the archive: DICOM SEG or RTSTRUCT beside the bundle's own files.

A model-zoo bundle's inference saves its masks as NIfTI through the ``SaveImaged`` at the end of its
post-processing, which knows nothing of DICOM. :class:`DicomMaskSaver` also writes each case's mask
as a DICOM SEG (for the archive and its viewers) or an RTSTRUCT (for a planning system) on the DICOM
series it was computed on, with the segments named and coded from the bundle's own output channels
(``metadata.json``'s ``channel_def``, through :func:`monai_effq.data.segment_codes.channel_segments`).
It runs after the bundle's post-processing, so it saves what the bundle saves: the mask inverted
onto the series' grid.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from monai.data import decollate_batch
from monai.transforms import SaveImaged
from monai.utils import IgniteInfo, min_version, optional_import

from monai_effq.data.dicom_seg import DicomSegWriter, require_highdicom, require_series_folder
from monai_effq.data.rtstruct import RtStructWriter, require_skimage
from monai_effq.data.segment_codes import channel_segments
from monai_effq.data.writers import inference_masks, mask_name_formatter
from monai_effq.utils.errors import MissingInputError, UserInputError
from monai_effq.utils.io import check_writable

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["DICOM_MASK_FORMATS", "DicomMaskSaver", "output_channels"]

DICOM_MASK_FORMATS = {"dicom_seg": ("seg", DicomSegWriter, "a DICOM SEG"), "rtstruct": ("rtstruct", RtStructWriter, "an RTSTRUCT")}
"""Each DICOM mask format: the file name's ending (``<series>_seg.dcm``), its writer and what it is called."""


def output_channels(metadata_file: str | os.PathLike, key: str = "pred") -> dict[str, str]:
    """A bundle's output channels by number, as its ``metadata.json`` names them.

    Args:
        metadata_file: the bundle's ``configs/metadata.json``.
        key: the output's name under ``network_data_format.outputs``.

    Returns:
        ``channel_def``, e.g. ``{"0": "background", "1": "spleen"}``.

    Raises:
        MissingInputError: when the file does not exist.
        UserInputError: when it is not JSON or does not name the output's channels.
    """
    how = "or give the channels as --channel_def \"{'0': 'background', '1': 'spleen'}\""
    if not os.path.isfile(metadata_file):
        raise MissingInputError(f"the bundle's metadata {metadata_file} does not exist: it names the output channels the DICOM masks code, {how}.")
    try:
        with open(metadata_file, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserInputError(f"cannot read the bundle's metadata {metadata_file} ({e}): mend the file, {how}.") from e
    channels = meta
    for part in ("network_data_format", "outputs", key, "channel_def"):
        channels = channels.get(part) if isinstance(channels, Mapping) else None
    if not isinstance(channels, Mapping) or not channels:
        raise UserInputError(f"the bundle's metadata {metadata_file} has no network_data_format.outputs.{key}.channel_def naming the output channels: add it, {how}.")
    return {str(k): v for k, v in channels.items()}


class DicomMaskSaver:
    """Write each case's mask as a DICOM SEG or RTSTRUCT on the DICOM series it was computed on.

    Attached to an evaluator, it saves ``key`` of each case of ``engine.state.output`` once the bundle's
    post-processing has run, to ``<output_dir>/<series folder name>_seg.dcm`` (``_rtstruct.dcm``).
    Each image must be a DICOM series folder and the mask be on its grid (``Invertd``), as
    :class:`monai_effq.data.DicomSegWriter` requires; a label map's value ``k`` is the ``k``-th channel
    after the background, else each channel is a segment (a one-hot mask's background channel is left
    out). Where the evaluator's dataset lists its cases (``[{"image": ...}]``, as the zoo's do), they are
    checked when it is attached: each image a folder, no two folders of one name (their masks would
    take one file). With ``mask_format="nifti"`` it attaches nothing: the
    bundle's own ``SaveImaged`` writes those.

    Example::

        DicomMaskSaver("dicom_seg", output_dir="eval", metadata_file="configs/metadata.json").attach(evaluator)

    Args:
        mask_format: ``"nifti"`` (nothing more), ``"dicom_seg"`` or ``"rtstruct"`` (the ``dicom`` extra).
        output_dir: the folder the masks go to.
        channel_def: the output channels by number; None: ``metadata_file``'s.
        metadata_file: the bundle's ``metadata.json``, read when ``channel_def`` is None.
        seg_codes: codes by channel name for channels whose names the lookup does not know or codes
            otherwise (:func:`monai_effq.data.segment_codes.coded_segment`).
        algorithm: the algorithm's name recorded in the SEG or RTSTRUCT.
        key: the prediction's key in the engine's output.

    Raises:
        UserInputError: for another mask format.
    """

    def __init__(
        self,
        mask_format: str = "nifti",
        output_dir: str | os.PathLike = "./eval",
        channel_def: Mapping[str | int, str] | None = None,
        metadata_file: str | os.PathLike | None = None,
        seg_codes: Mapping[str, Sequence[str]] | None = None,
        algorithm: str = "monai-effq",
        key: str = "pred",
    ) -> None:
        if mask_format != "nifti" and mask_format not in DICOM_MASK_FORMATS:
            raise UserInputError(f"mask_format must be 'nifti', 'dicom_seg' or 'rtstruct', got {mask_format!r}.")
        self.mask_format = mask_format
        self.output_dir = output_dir
        self.channel_def = channel_def
        self.metadata_file = metadata_file
        self.seg_codes = seg_codes
        self.algorithm = algorithm
        self.key = key
        self.saver: SaveImaged | None = None
        self.one_hot_channels = 0  # a mask of this many channels carries the background first

    def attach(self, engine: Engine) -> None:
        """Code the segments and save each case's mask once the engine has post-processed it.

        Args:
            engine: the evaluator.

        Raises:
            MissingExtraError: without the ``dicom`` extra.
            MissingInputError, UserInputError: when the channels cannot be read or coded (:func:`output_channels`,
                :func:`monai_effq.data.segment_codes.channel_segments`).
            MissingInputError, DatasetError, UserInputError: for a case whose image is missing or not a
                folder, or two cases whose masks would take one name (:func:`monai_effq.data.inference_masks`).
            OutputWriteError: when ``output_dir`` could not be written (:func:`monai_effq.utils.io.check_writable`).
        """
        if self.mask_format == "nifti":
            return
        require_highdicom()
        if self.mask_format == "rtstruct":
            require_skimage()
        channels = self.channel_def if self.channel_def is not None else output_channels(self.metadata_file or "configs/metadata.json", self.key)
        segments = channel_segments(channels, self.seg_codes)
        if len(channels) == len(segments) + 1:  # a label map has one channel, so a mask of these many is one-hot
            self.one_hot_channels = len(channels)
        check_writable(self.output_dir)  # before any case runs; MONAI's SaveImaged would fail on the first mask
        postfix, writer, kind = DICOM_MASK_FORMATS[self.mask_format]
        cases = getattr(getattr(getattr(engine, "data_loader", None), "dataset", None), "data", None)
        if isinstance(cases, Sequence) and cases and all(isinstance(c, Mapping) and "image" in c for c in cases):
            # before the first case runs, where the bundle's dataset lists them as the zoo's do
            inference_masks(cases, self.output_dir, postfix, ".dcm")
            for case in cases:
                image = case["image"]
                require_series_folder(image[0] if isinstance(image, (list, tuple)) else image, kind)
        self.saver = SaveImaged(
            keys=self.key,
            output_dir=self.output_dir,
            output_postfix=postfix,
            output_ext=".dcm",
            resample=False,
            separate_folder=False,
            print_log=False,
            writer=functools.partial(writer, segments=segments, algorithm=self.algorithm),
            output_name_formatter=mask_name_formatter,
        )
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Save the mask of each case of the engine's output.

        Args:
            engine: the evaluator, after an iteration.
        """
        output = engine.state.output
        for case in output if isinstance(output, (list, tuple)) else decollate_batch(output):
            pred = case[self.key]
            if self.one_hot_channels and pred.shape[0] == self.one_hot_channels:
                case = {**case, self.key: pred[1:]}  # AsDiscreted(to_onehot=...) keeps the background channel
            self.saver(case)
