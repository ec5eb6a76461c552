"""A bundle's channel names become the coded segments of a DICOM SEG, from the standard's context groups."""

import logging

import pytest

from monai_effq.data.dicom_seg import Segment
from monai_effq.data.segment_codes import GENERIC_CODES, channel_segments, coded_segment, segment_for_name
from monai_effq.utils.errors import UserInputError

pytest.importorskip("highdicom")


@pytest.mark.parametrize(
    "name, category, kind, region, modifier",
    [
        ("spleen", "AnatomicalStructure", "Spleen", None, None),  # spleen_ct_segmentation
        ("kidney_left", "AnatomicalStructure", "Kidney", None, "Left"),  # TotalSegmentator's names
        ("Right Kidney", "AnatomicalStructure", "Kidney", None, "Right"),
        ("vertebrae_L5", "AnatomicalStructure", "L5Vertebra", None, None),
        ("inferior_vena_cava", "AnatomicalStructure", "InferiorVenaCava", None, None),
        ("tumor", "MorphologicallyAbnormalStructure", "Neoplasm", None, None),  # lits_effq
        ("liver tumour", "MorphologicallyAbnormalStructure", "Neoplasm", "Liver", None),
        ("lung nodules", "MorphologicallyAbnormalStructure", "Nodule", "Lung", None),
        ("enhancing tumor", "MorphologicallyAbnormalStructure", "EnhancingLesion", None, None),  # brats_mri_segmentation
        ("peritumoral oedema", "MorphologicallyAbnormalStructure", "Edema", None, None),
        ("tumor core", "MorphologicallyAbnormalStructure", "Neoplasm", None, None),
        # a sided structure of its own keeps its own code, not a side of another
        ("left ventricle", "AnatomicalStructure", "LeftVentricle", None, None),
        ("ventricle_left", "AnatomicalStructure", "LeftVentricle", None, None),
        ("right coronary artery", "AnatomicalStructure", "RightCoronaryArtery", None, None),
        ("tissue", "Tissue", "Tissue", None, None),
        # TotalSegmentator names its structures organ first
        ("heart_ventricle_left", "AnatomicalStructure", "LeftVentricle", None, None),
        ("lung_upper_lobe_left", "AnatomicalStructure", "UpperLobeOfLung", None, "Left"),
        ("lung_middle_lobe_right", "AnatomicalStructure", "MiddleLobeOfRightLung", None, None),
        ("urinary_bladder", "AnatomicalStructure", "Bladder", None, None),  # the structure its last word names
        ("Left-Lateral-Ventricle", "AnatomicalStructure", "LateralVentricle", None, "Left"),  # FreeSurfer's: no heart chamber
        ("3rd Ventricle", "AnatomicalStructure", "ThirdVentricle", None, None),
        # Latin and colloquial words, tried when the name as written is in no group
        ("clavicula_left", "AnatomicalStructure", "Clavicle", None, "Left"),
        ("iliac_vena_right", "AnatomicalStructure", "IliacVein", None, "Right"),
        ("small_bowel", "AnatomicalStructure", "SmallIntestine", None, None),
        ("thyroid_gland", "AnatomicalStructure", "Thyroid", None, None),
        ("brachiocephalic_vein_left", "AnatomicalStructure", "InnominateVein", None, "Left"),  # not any Vein
        ("atrial_appendage_left", "AnatomicalStructure", "LeftAuricularAppendage", None, None),
        ("autochthon_right", "AnatomicalStructure", "ErectorSpinaeMuscle", None, "Right"),
        ("gluteus_medius_left", "AnatomicalStructure", "MuscleOfLowerLimb", None, "Left"),
        ("iliopsoas_right", "AnatomicalStructure", "MuscleOfLowerLimb", None, "Right"),
        # a number counts structures of one kind: the label keeps it, the code is the kind's
        ("rib_right_12", "AnatomicalStructure", "Rib", None, "Right"),
        ("lung nodules 2", "MorphologicallyAbnormalStructure", "Nodule", "Lung", None),
    ],
)
def test_a_channel_name_is_coded_by_the_context_group_that_lists_it(name, category, kind, region, modifier):
    segment = segment_for_name(name)
    assert segment == Segment(name, category, kind, region, modifier)
    assert segment.concepts()["segmented_property_type"].meaning  # a code the SEG writer can look up


# TotalSegmentator's 104 structures (its "total" task, as the model zoo's wholeBody_ct_segmentation names its channels)
TOTALSEGMENTATOR = [
    *"spleen kidney_right kidney_left gallbladder liver stomach aorta inferior_vena_cava portal_vein_and_splenic_vein".split(),
    *"pancreas adrenal_gland_right adrenal_gland_left lung_upper_lobe_left lung_lower_lobe_left lung_upper_lobe_right".split(),
    *"lung_middle_lobe_right lung_lower_lobe_right".split(),
    *(f"vertebrae_{v}" for v in [*(f"L{i}" for i in range(5, 0, -1)), *(f"T{i}" for i in range(12, 0, -1)), *(f"C{i}" for i in range(7, 0, -1))]),
    *"esophagus trachea heart_myocardium heart_atrium_left heart_ventricle_left heart_atrium_right heart_ventricle_right".split(),
    *"pulmonary_artery brain iliac_artery_left iliac_artery_right iliac_vena_left iliac_vena_right small_bowel duodenum colon".split(),
    *(f"rib_{side}_{i}" for side in ("left", "right") for i in range(1, 13)),
    *"humerus_left humerus_right scapula_left scapula_right clavicula_left clavicula_right femur_left femur_right".split(),
    *"hip_left hip_right sacrum face gluteus_maximus_left gluteus_maximus_right gluteus_medius_left gluteus_medius_right".split(),
    *"gluteus_minimus_left gluteus_minimus_right autochthon_left autochthon_right iliopsoas_left iliopsoas_right urinary_bladder".split(),
]


def test_of_totalsegmentators_104_structures_only_a_pair_of_veins_and_the_myocardium_are_coded_generically():
    assert len(set(TOTALSEGMENTATOR)) == 104
    segments = {name: segment_for_name(name) for name in TOTALSEGMENTATOR}
    assert [name for name, segment in segments.items() if segment is None] == ["portal_vein_and_splenic_vein", "heart_myocardium"]
    ribs = {name: (s.property_type, s.modifier) for name, s in segments.items() if name.startswith("rib_")}
    assert ribs == {name: ("Rib", name.split("_")[1].capitalize()) for name in ribs} and len(ribs) == 24
    hip_muscles = {name: (s.property_type, s.modifier) for name, s in segments.items() if name.startswith(("gluteus", "iliopsoas"))}
    assert hip_muscles == {name: ("MuscleOfLowerLimb", name.rsplit("_", 1)[1].capitalize()) for name in hip_muscles} and len(hip_muscles) == 8


@pytest.mark.parametrize("name", ["ventricle_3", "liver 4", "background 1", "normal 1", "tumor 3 liver", "cervical vertebra 1", "tooth 11"])
def test_a_number_that_does_not_count_structures_of_one_kind_is_not_dropped(name):
    assert segment_for_name(name) is None  # no heart chamber, whole liver, background, normal tissue, organ, any vertebra or tooth


def test_a_name_no_group_lists_is_coded_generically_with_a_warning_and_the_users_codes_come_first(caplog):
    channels = {"0": "background", "1": "portal_vein_and_splenic_vein", "2": "spleen"}
    assert segment_for_name(channels["1"]) is None
    with caplog.at_level(logging.WARNING):
        generic, spleen = channel_segments(channels)
    assert (generic.category, generic.property_type) == GENERIC_CODES and spleen.property_type == "Spleen"
    assert "['portal_vein_and_splenic_vein'] are in no DICOM context group" in caplog.text and "seg_codes" in caplog.text
    given = {"portal_vein_and_splenic_vein": ["AnatomicalStructure", "portalvein"], "spleen": ["AnatomicalStructure", "Spleen", "Abdomen"]}
    vein, spleen = channel_segments(channels, given)
    assert vein == Segment("portal_vein_and_splenic_vein", "AnatomicalStructure", "PortalVein")
    assert spleen.region == "Abdomen"


def test_a_background_at_channel_0_is_no_segment_and_overlapping_channels_each_are_one():
    assert [s.label for s in channel_segments({0: "background", 1: "liver", 2: "tumor"})] == ["liver", "tumor"]
    brats = channel_segments({"0": "tumor core", "1": "whole tumor", "2": "enhancing tumor"})
    assert [s.property_type for s in brats] == ["Neoplasm", "Neoplasm", "EnhancingLesion"]


@pytest.mark.parametrize(
    "channels, given, message",
    [
        ({"1": "liver"}, None, r"must name channels 0, 1, 2"),
        ({"a": "liver"}, None, r"is not numbered by channel"),
        ({"0": "background", "1": ""}, None, r"must name channels 0, 1, 2"),
        ({"0": "liver"}, {"tumor": ["MorphologicallyAbnormalStructure", "Neoplasm"]}, r"codes \['tumor'\], which are not among the output channels \['liver'\]"),
        ({"0": "liver"}, {"liver": ["AnatomicalStructur", "Liver"]}, r"'AnatomicalStructur' is not a segmentation category \(CID 7150\) \(close: AnatomicalStructure\)"),
        ({"0": "liver"}, {"liver": ["AnatomicalStructure", "Livr"]}, r"'Livr' is not a type of AnatomicalStructure \(close: Liver\)"),
        ({"0": "liver"}, {"liver": ["AnatomicalStructure", "Liver", "Abdomn"]}, r"'Abdomn' is not an anatomic region \(CID 4\) \(close: Abdomen,"),
        ({"0": "liver"}, {"liver": "Liver"}, r"seg_codes for 'liver' is 'Liver': give seg_codes as \{channel name: \[category, type\]"),
    ],
)
def test_channels_or_codes_that_cannot_be_coded_are_named_with_what_to_give(channels, given, message):
    with pytest.raises(UserInputError, match=message):
        channel_segments(channels, given)


def test_the_users_codes_are_checked_as_given_alone():
    assert coded_segment("gtv", ["MorphologicallyAbnormalStructure", "Neoplasm", "Brain"]).region == "Brain"


@pytest.mark.parametrize("name", ["liver and tumor", "tumor-free liver", "non tumor", "normal appearing white matter", "background liver", "tumor bed"])
def test_a_name_that_only_mentions_an_abnormality_is_not_coded_as_one(name):
    segment = segment_for_name(name)
    assert segment is None or segment.category == "AnatomicalStructure", segment  # the white matter, the liver


@pytest.mark.parametrize("name", ["pancreas_head", "femoral_head", "prostate/uterus", "myocardium_of_the_left_ventricle", "left_lobe_of_liver"])
def test_a_part_or_a_pair_of_structures_is_not_coded_as_the_structure_its_last_words_name(name):
    assert segment_for_name(name) is None  # not the Head (of the body), the Uterus, the Ventricle or the Liver


def test_every_type_the_lookup_can_give_is_one_the_seg_writer_codes():
    from monai_effq.data.segment_codes import _type_groups

    for category, types in _type_groups():
        for kind in types.values():
            assert Segment(kind, category, kind).concepts()["segmented_property_type"].value
