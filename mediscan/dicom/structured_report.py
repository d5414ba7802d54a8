"""The Structured Report MediScan stores back into the study, one per analysed series.

A Comprehensive SR whose content tree holds (relationship CONTAINS unless said otherwise):

* the finding's anatomic region -- ``Finding site`` (SCT 363698007) = a SNOMED CT body structure where the
  class has one (:data:`REGION_CODES`: lung, heart, brain, bone), else the class in the private scheme
  ``99MEDISCAN`` (code = the class name in capitals);
* every class's calibrated probability (NUM, unit UCUM "1"), averaged over the analysed instances;
* the verdict (CODE) and its reason (TEXT), and "NOT FOR DIAGNOSTIC USE";
* the header check (CODE: agrees / disagrees / no_header / not_mapped) and the header value it read;
* how many instances were analysed and, when the modality gate stopped some (``MS-GATED``), how many it
  stopped; a series it stopped entirely has no finding site, no probabilities and no header check, only
  the verdict ``out_of_scope`` and the gate's sentence as its reason;
* the algorithm identification (HAS OBS CONTEXT): name (DCM 111001), version (DCM 111003) and the
  checkpoint's sha256 as its parameter (DCM 111002); the source series (DCM 112002) and how many of its
  instances were analysed.

Concepts without a standard code use ``99MEDISCAN`` (declared in the Coding Scheme Identification
Sequence); their codes are the ``MS-*`` names below, and they are this module's documentation.
"""
from __future__ import annotations

from dataclasses import dataclass

from mediscan.dicom.uids import MANUFACTURER

__all__ = ["PRIVATE_SCHEME", "REGION_CODES", "SeriesFinding", "region_code", "structured_report", "with_type2"]

PRIVATE_SCHEME = "99MEDISCAN"
#: SNOMED CT body structures of the classes that have one.
REGION_CODES = {
    "lungs": ("39607008", "Lung structure"), "lung": ("39607008", "Lung structure"),
    "heart": ("80891009", "Heart structure"),
    "brain": ("12738006", "Brain structure"),
    "bone": ("272673000", "Bone structure"), "bones": ("272673000", "Bone structure"),
}
SERIES_NUMBER = 9902


@dataclass(frozen=True)
class SeriesFinding:
    """The answer for one series, as the SR and the SC report it. ``top_class`` and ``header_status`` are
    ``None`` (and ``probabilities`` empty) when the modality gate stopped every instance: there is no class
    to report or to check against the header; ``gated`` counts the instances the gate stopped."""

    top_class: str | None
    probabilities: dict[str, float]
    verdict: str
    verdict_reason: str
    header_status: str | None
    header_value: str
    analysed: int
    source_series_uid: str
    gated: int = 0


#: Type 2 attributes of the Patient and General Study modules that highdicom copies from the source: a
#: source that lacks one gets it empty (as the standard allows), never invented.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def with_type2(ds):
    """A copy of ``ds`` without pixel data, with the Type 2 patient/study attributes present (empty when the
    source has none)."""
    from pydicom.dataset import Dataset

    out = Dataset()
    for element in ds:
        if element.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            out.add(element)
    for keyword in _TYPE2:
        if keyword not in out:
            setattr(out, keyword, None)
    return out


def _code(value: str, meaning: str, scheme: str = PRIVATE_SCHEME):
    from highdicom.sr import CodedConcept
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning[:64])


def region_code(class_name: str):
    """The coded anatomic region of a class (SNOMED CT where it has one, else the private scheme)."""
    known = REGION_CODES.get(class_name.lower())
    if known:
        return _code(known[0], known[1], "SCT")
    return _code(class_name.upper()[:16], class_name)


def _count(value: str, meaning: str, number: int):
    from highdicom.sr import NumContentItem
    return NumContentItem(_code(value, meaning), float(number), _code("1", "no units", "UCUM"),
                          relationship_type="CONTAINS")


def _items(finding: SeriesFinding, algorithm: tuple[str, str, str]) -> list:
    from highdicom.sr import CodeContentItem, NumContentItem, TextContentItem, UIDRefContentItem

    contains, context = "CONTAINS", "HAS OBS CONTEXT"
    name, version, sha = algorithm
    items = [
        TextContentItem(_code("111001", "Algorithm Name", "DCM"), name, context),
        TextContentItem(_code("111003", "Algorithm Version", "DCM"), version, context),
        TextContentItem(_code("111002", "Algorithm Parameters", "DCM"), f"checkpoint sha256 {sha}", context),
        UIDRefContentItem(_code("112002", "Series Instance UID", "DCM"), finding.source_series_uid, context),
    ]
    if finding.top_class is not None:  # None: the modality gate stopped the series, there is no finding
        items.append(CodeContentItem(_code("363698007", "Finding site", "SCT"), region_code(finding.top_class),
                                     contains))
    for cls, prob in finding.probabilities.items():
        items.append(NumContentItem(_code(f"MS-P-{cls.upper()}"[:16], f"Probability of {cls}"), float(prob),
                                    _code("1", "no units", "UCUM"), relationship_type=contains))
    items += [
        CodeContentItem(_code("MS-VERDICT", "Verdict"), _code(finding.verdict.upper(), finding.verdict), contains),
        TextContentItem(_code("MS-REASON", "Verdict reason"), finding.verdict_reason, contains),
    ]
    if finding.header_status is not None:
        items += [CodeContentItem(_code("MS-HEADER", "Header check"),
                                  _code(finding.header_status.upper(), finding.header_status), contains),
                  TextContentItem(_code("MS-HEADER-VALUE", "Header value checked"), finding.header_value or "(none)",
                                  contains)]
    items.append(_count("MS-ANALYSED", "Instances analysed", finding.analysed))
    if finding.gated:
        items.append(_count("MS-GATED", "Instances stopped by modality gate", finding.gated))
    items.append(TextContentItem(_code("MS-NOTICE", "Notice"), "NOT FOR DIAGNOSTIC USE", contains))
    return items


def structured_report(evidence: list, finding: SeriesFinding, *, series_uid: str, instance_uid: str,
                      algorithm: tuple[str, str, str], description: str):
    """A highdicom ``ComprehensiveSR`` of ``finding`` in the study of ``evidence`` (the analysed source
    instances' datasets, pixel data not needed); ``algorithm`` is (name, version, checkpoint sha256)."""
    from highdicom.sr import ComprehensiveSR, ContainerContentItem
    from pydicom.dataset import Dataset

    root = ContainerContentItem(_code("MS-REPORT", "MediScan organ classification"))
    root.ContentSequence = _items(finding, algorithm)
    sr = ComprehensiveSR(evidence=[with_type2(ds) for ds in evidence], content=root, series_instance_uid=series_uid,
                         series_number=SERIES_NUMBER, sop_instance_uid=instance_uid, instance_number=1,
                         manufacturer=MANUFACTURER, is_complete=True)
    sr.SeriesDescription = description[:64]
    sr.SoftwareVersions = algorithm[1][:64]
    scheme = Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "MediScan private codes"
    scheme.CodingSchemeResponsibleOrganization = "MediScan project"
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr
