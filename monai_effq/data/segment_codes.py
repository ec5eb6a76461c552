"""What a bundle's output channels are, coded as a DICOM SEG or RTSTRUCT codes its segments.

A model-zoo bundle names its output channels in ``metadata.json``
(``network_data_format.outputs.pred.channel_def``: ``{"0": "background", "1": "spleen"}``), but a
DICOM SEG must also code each segment: a segmented property category and type, SNOMED CT concepts
mostly, so that a viewer or a registry knows a segment is the spleen whatever its label says. The
codes are looked up in the DICOM context groups that pydicom ships (PS3.16: CID 7150 for the
categories, and for each category its own group of types, CID 7191 to 7198), by the words of the
name: ``"spleen"`` is the anatomical structure Spleen, ``"kidney_left"`` the Kidney with laterality
Left, ``"vertebrae_L5"`` the L5Vertebra, ``"liver tumour"`` a Neoplasm in the Liver, ``"enhancing
tumor"`` an EnhancingLesion. A name found in none is coded as 3D Slicer codes a segment it does not
know (Tissue), with a warning; the user's own codes take precedence over either.
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from monai_effq.data.dicom_seg import Segment, require_highdicom
from monai_effq.utils.errors import UserInputError
from monai_effq.utils.imports import deferred_import

codes, _ = deferred_import("pydicom.sr.codedict", name="codes")
cid_names, _ = deferred_import("pydicom.sr._cid_dict", name="name_for_cid")

__all__ = ["GENERIC_CODES", "channel_segments", "coded_segment", "segment_for_name"]

logger = logging.getLogger(__name__)

GENERIC_CODES = ("Tissue", "Tissue")
"""Category and type of a segment whose name is in no context group, as 3D Slicer codes a segment it does not know."""

# channel names that mark the background of a label map, which is no segment
_BACKGROUND = frozenset({"background", "bg", "_background_"})
# British spellings, as BraTS and LiTS write them, of words the context groups spell the American way
_SPELLING = {"tumour": "tumor", "oedema": "edema", "haemorrhage": "hemorrhage", "oesophagus": "esophagus", "haematoma": "hematoma"}
# ordinals as the context groups spell them ("3rd Ventricle" is the ThirdVentricle)
_SPELLING.update({"1st": "first", "2nd": "second", "3rd": "third", "4th": "fourth", "5th": "fifth"})
# words naming an abnormal structure that its context group (CID 7194) names otherwise
_ABNORMAL = {"tumor": "Neoplasm", "cancer": "Neoplasm", "carcinoma": "Neoplasm", "metastasis": "NeoplasmSecondary", "metastases": "NeoplasmSecondary"}
_LATERALITY = {"left": "Left", "right": "Right"}
# Latin and colloquial words (TotalSegmentator's) in the groups' English, tried only for a name the groups
# lack as written: "inferior_vena_cava" is the InferiorVenaCava, "iliac_vena_left" the IliacVein, Left
_LOWER_LIMB_MUSCLE = ("muscle", "of", "lower", "limb")
_IN_ENGLISH: dict[tuple[str, ...], tuple[str, ...]] = {
    ("clavicula",): ("clavicle",),
    ("vena",): ("vein",),
    ("bowel",): ("intestine",),
    ("thyroid", "gland"): ("thyroid",),
    ("atrial", "appendage"): ("auricular", "appendage"),
    ("brachiocephalic", "trunk"): ("innominate", "artery"),
    ("brachiocephalic", "vein"): ("innominate", "vein"),
    # the deep (autochthonous) back muscles: the groups code the erector spinae, their bulk, and its parts only
    ("autochthon",): ("erector", "spinae", "muscle"),
    # muscles of the hip, which the groups code only as what Terminologia Anatomica files them under
    ("gluteus", "maximus"): _LOWER_LIMB_MUSCLE,
    ("gluteus", "medius"): _LOWER_LIMB_MUSCLE,
    ("gluteus", "minimus"): _LOWER_LIMB_MUSCLE,
    ("iliopsoas",): _LOWER_LIMB_MUSCLE,
}
_IN_ENGLISH_LONGEST_FIRST = sorted(_IN_ENGLISH, key=len, reverse=True)
# words whose structures a name counts ("rib_left_1", "lung nodules 2"): the number is the label's, the code the kind's.
# Elsewhere a number means something no code here has ("ventricle_3" is no heart chamber, "liver 4" a liver segment)
_COUNTED = frozenset({"rib", "lesion", "nodule", "tumor", "metastasis", "metastases", "mass", "cyst"})
# abnormal-structure types that name no abnormality, and words that deny or join one ("non tumor", "liver and tumor")
_NOT_ABNORMAL = frozenset({"Normal", "Background"})
_NEGATING = frozenset({"non", "no", "not", "free", "without", "and", "or"})
# words after an abnormality that name a part of it, not something else ("tumor core", BraTS' TC)
_PART = frozenset({"core", "region", "area", "mask", "label", "segment", "segmentation"})
# words naming a part of a structure, which the last words of a name may not be taken for alone
# ("pancreas head" is no Head, the body part)
_STRUCTURE_PART = frozenset({"head", "neck", "body", "tail", "wall", "lobe", "base", "apex", "root", "segment", "cortex"})
# where a type is in two groups, the anatomical meaning first, then tissue ("tissue" the Tissue, not a spatial concept)
_PRECEDENCE = ("AnatomicalStructure", "Tissue", "MorphologicallyAbnormalStructure")


@functools.lru_cache(maxsize=1)
def _type_groups() -> tuple[tuple[str, dict[str, str]], ...]:
    """Each segmented property category (CID 7150) with its own types by lower-case keyword.

    Returns:
        ``(category keyword, {lower-case type keyword: type keyword})``, anatomical structures first,
        so that a name in two groups takes the anatomical meaning.
    """
    by_name = {name.lower(): cid for cid, name in cid_names.items()}
    writable = set(codes.cid7151.dir())  # the group the SEG writer codes types from (Segment.concepts)
    groups = []
    for category in codes.cid7150.dir():
        cid = by_name.get(f"{category.lower()}segmentationpropertytype")
        if cid is not None:
            keywords = [k for k in getattr(codes, f"cid{cid}").dir() if k in writable]
            groups.append((category, {k.lower(): k for k in keywords}))
    groups.sort(key=lambda group: _PRECEDENCE.index(group[0]) if group[0] in _PRECEDENCE else len(_PRECEDENCE))
    return tuple(groups)


@functools.lru_cache(maxsize=1)
def _regions() -> dict[str, str]:
    """Anatomic regions (CID 4) by lower-case keyword."""
    return {k.lower(): k for k in codes.cid4.dir()}


def _words(name: str) -> list[str]:
    """The lower-case words of a name, split at separators and case changes, in American spelling."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)
    return [_SPELLING.get(w, w) for w in re.split(r"[^0-9a-zA-Z]+", spaced.lower()) if w]


def _singular(word: str) -> str:
    if word.endswith("ae"):  # vertebrae
        return word[:-1]
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _keywords(words: Sequence[str]) -> list[str]:
    """Lower-case keyword forms of ``words`` to look up: as written, in the singular, with numbered words first
    (``vertebrae L5`` is the ``L5Vertebra``)."""
    forms: list[str] = []
    for variant in (list(words), [_singular(w) for w in words]):
        numbered = sorted(variant, key=lambda w: not any(c.isdigit() for c in w))
        for order in (variant, numbered):
            form = "".join(order)
            if form and form not in forms:
                forms.append(form)
    return forms


def _find_type(words: Sequence[str], categories: Sequence[str] | None = None) -> tuple[str, str] | None:
    """The first ``(category, type)`` whose type keyword is a form of ``words``."""
    for form in _keywords(words):
        for category, types in _type_groups():
            if (categories is None or category in categories) and form in types:
                return category, types[form]
    return None


def segment_for_name(name: str) -> Segment | None:
    """The coded segment a channel name means, looked up in the context groups pydicom ships.

    The name is looked up as written first; then, if no group has it, with the Latin and colloquial words
    of :data:`_IN_ENGLISH` in the groups' English (TotalSegmentator's ``clavicula_left`` is the Clavicle,
    Left; ``small_bowel`` the SmallIntestine); then without a final number that counts structures of a
    kind (``rib_left_1`` is a Rib, Left: the label keeps the number, which no group codes). Only when all
    three fail is a name coded as the structure its last words name (``urinary_bladder``, the Bladder), so
    that ``brachiocephalic_vein_left`` is the InnominateVein, not any Vein.

    Args:
        name: the channel's name, e.g. ``"spleen"``, ``"kidney_left"``, ``"liver tumour"``.

    Returns:
        the segment labelled ``name``, or None when no context group has it.
    """
    require_highdicom()
    words = _words(name)
    english = _in_english(words)
    variants = [words]
    for variant in (english, _uncounted(english)):
        if variant not in variants:
            variants.append(variant)
    for by_last_words in (False, True):
        for variant in variants:
            segment = _segment_for_words(name, variant, by_last_words)
            if segment is not None:
                return segment
    return None


def _in_english(words: Sequence[str]) -> list[str]:
    """``words`` with the Latin and colloquial phrases of :data:`_IN_ENGLISH` replaced, longest first."""
    out, i = [], 0
    while i < len(words):
        phrase = next((p for p in _IN_ENGLISH_LONGEST_FIRST if tuple(words[i : i + len(p)]) == p), None)
        out += _IN_ENGLISH[phrase] if phrase else [words[i]]
        i += len(phrase) if phrase else 1
    return out


def _uncounted(words: list[str]) -> list[str]:
    """``words`` without a final number (a side may follow it) after a word of :data:`_COUNTED`."""
    unsided = [i for i, w in enumerate(words) if w not in _LATERALITY]
    counted = len(unsided) > 1 and {words[unsided[-2]], _singular(words[unsided[-2]])} & _COUNTED
    if counted and words[unsided[-1]].isdigit():
        return words[: unsided[-1]] + words[unsided[-1] + 1 :]
    return words


def _segment_for_words(name: str, words: list[str], by_last_words: bool) -> Segment | None:
    """The segment labelled ``name`` whose words are ``words``, or None (:func:`segment_for_name`); with
    ``by_last_words``, also the structure its last words name."""
    sides = [w for w in words if w in _LATERALITY]
    unsided = [w for w in words if w not in _LATERALITY]
    anatomy = ["AnatomicalStructure"]
    # a sided structure of its own first ("left ventricle", "ventricle_left": the LeftVentricle)
    found = _find_type(words) or (_find_type(sides + unsided) if sides else None)
    if found is not None:
        return Segment(name, *found)
    # then a structure with its side as a modifier ("kidney_left": the Kidney, Left)
    found = _find_type(unsided)
    if found is None and len(unsided) > 1 and _find_type(unsided[:1], anatomy):
        # the organ first, as TotalSegmentator names: "heart_ventricle_left" is the LeftVentricle,
        # "lung_middle_lobe_right" the MiddleLobeOfRightLung, "lung_upper_lobe_left" the UpperLobeOfLung, Left
        organ, rest = unsided[0], unsided[1:]
        for form in ([*sides, *rest], [*rest, "of", *sides, organ]) if sides else ():
            found = found or _find_type(form, anatomy)
        if found is not None:
            return Segment(name, *found)
        found = _find_type([*rest, "of", organ], anatomy)
    if found is None and "tumor" in unsided and len(unsided) > 1:  # "enhancing tumor" is the EnhancingLesion
        found = _find_type(["lesion" if w == "tumor" else w for w in unsided], ["MorphologicallyAbnormalStructure"])
    if found is None:
        abnormal = _abnormal_in_region(name, unsided)
        if abnormal is not None:
            return abnormal
        found = _named_by_last_words(unsided) if by_last_words else None
    if found is None:
        return None
    sided = found[0] == "AnatomicalStructure" and len(sides) == 1
    return Segment(name, *found, modifier=_LATERALITY[sides[0]] if sided else None)


def _named_by_last_words(words: Sequence[str]) -> tuple[str, str] | None:
    """The structure the last words of a name name, where the words before only qualify it (``urinary bladder``
    is the Bladder), not where they name a structure themselves (``prostate/uterus``), relate (``of``, ``and``,
    ``non``) or number it, nor where the last word is a part (``pancreas head``)."""
    if not words or words[-1] in _STRUCTURE_PART:
        return None
    for k in range(1, len(words)):
        dropped = words[:k]
        if _NEGATING.intersection(dropped) or {"of", "the"}.intersection(dropped) or any(c.isdigit() for w in dropped for c in w):
            return None
        if any(_find_type([w], ["AnatomicalStructure"]) for w in dropped):
            return None
        found = _find_type(words[k:], ["AnatomicalStructure"])
        if found is not None:
            return found
    return None


def _abnormal_in_region(name: str, words: Sequence[str]) -> Segment | None:
    """``"liver tumor"``: the abnormality its last word names (``"tumor core"``: but for the part), in the region
    the words before it name, if they do.

    A side is left out: it would be the region's, which highdicom cannot code, not the abnormality's.
    """
    words = list(words)
    while len(words) > 1 and words[-1] in _PART:
        words.pop()
    if not words or _NEGATING.intersection(words):
        return None
    abnormal = dict(_type_groups()).get("MorphologicallyAbnormalStructure", {})
    kind = _ABNORMAL.get(words[-1]) or abnormal.get(_singular(words[-1]))
    if kind is None or kind in _NOT_ABNORMAL:
        return None
    region = next((_regions()[f] for f in _keywords(words[:-1]) if f in _regions()), None)
    return Segment(name, "MorphologicallyAbnormalStructure", kind, region)


def coded_segment(name: str, given: Sequence[str], setting: str = "seg_codes") -> Segment:
    """The segment a user codes by keywords of the context groups.

    Args:
        name: the channel's name, the segment's label.
        given: ``[category, type]`` or ``[category, type, region]`` keywords, e.g.
            ``["AnatomicalStructure", "PortalVein"]``.
        setting: the setting's name, for the error.

    Returns:
        the segment.

    Raises:
        UserInputError: for another length, or a keyword that is not in its context group (naming close ones).
    """
    require_highdicom()
    how = f"give {setting} as {{channel name: [category, type] or [category, type, region]}}, e.g. {{'portal vein': ['AnatomicalStructure', 'PortalVein']}}"
    if isinstance(given, str) or not isinstance(given, Sequence) or len(given) not in (2, 3):
        raise UserInputError(f"{setting} for {name!r} is {given!r}: {how}.")
    groups = dict(_type_groups())
    category, kind, *region = (str(k) for k in given)
    if category not in groups:
        raise UserInputError(f"{setting} for {name!r}: {category!r} is not a segmentation category (CID 7150){_close(category, groups)}: {how}.")
    types = groups[category]
    if kind.lower() not in types:
        raise UserInputError(f"{setting} for {name!r}: {kind!r} is not a type of {category}{_close(kind, types.values())}: {how}.")
    if region and region[0].lower() not in _regions():
        raise UserInputError(f"{setting} for {name!r}: {region[0]!r} is not an anatomic region (CID 4){_close(region[0], _regions().values())}: {how}.")
    return Segment(name, category, types[kind.lower()], _regions()[region[0].lower()] if region else None)


def channel_segments(
    channel_def: Mapping[str | int, str], given: Mapping[str, Sequence[str]] | None = None, setting: str = "seg_codes"
) -> tuple[Segment, ...]:
    """The coded segments of a bundle's output channels, as a DICOM SEG or RTSTRUCT writer takes them.

    Args:
        channel_def: channel or label value -> name, as ``metadata.json`` gives it; a background at 0
            (``"background"``) is no segment, and then the mask is a label map whose value ``k`` is
            the ``k``-th segment.
        given: the user's codes by channel name (:func:`coded_segment`), taking precedence over the lookup.
        setting: the setting ``given`` comes from, for errors and the warning.

    Returns:
        one segment for each channel but the background, in channel order.

    Raises:
        UserInputError: for a channel_def that is empty or not numbered 0, 1, ..., codes given for a
            channel it lacks, or codes that are not keywords of their context groups.
    """
    how = "give the bundle's output channels as {'0': 'background', '1': 'spleen'} (metadata.json's channel_def)"
    try:
        numbered = sorted((int(k), v) for k, v in dict(channel_def).items())
    except (TypeError, ValueError):
        raise UserInputError(f"channel_def {channel_def!r} is not numbered by channel: {how}.") from None
    if not numbered or [k for k, _ in numbered] != list(range(len(numbered))) or not all(isinstance(v, str) and v.strip() for _, v in numbered):
        raise UserInputError(f"channel_def {channel_def!r} must name channels 0, 1, 2, ...: {how}.")
    names = [v.strip() for _, v in numbered]
    if names[0].lower() in _BACKGROUND:
        names = names[1:]
    given = dict(given or {})
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise UserInputError(f"{setting} codes {unknown}, which are not among the output channels {names}: use their names as channel_def gives them.")
    segments, generic = [], []
    for name in names:
        segment = coded_segment(name, given[name], setting) if name in given else segment_for_name(name)
        if segment is None:
            generic.append(name)
            segment = Segment(name, *GENERIC_CODES)
        segments.append(segment)
    if generic:
        logger.warning(
            f"output channels {generic} are in no DICOM context group by name, so their segments are coded as generic "
            f"{GENERIC_CODES[0]}; {setting} gives their codes, e.g. {{{generic[0]!r}: ['AnatomicalStructure', '<type>']}}."
        )
    return tuple(segments)


def _close(word: str, choices: Any) -> str:
    near = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f" (close: {', '.join(near)})" if near else ""
