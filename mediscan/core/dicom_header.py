"""The DICOM header's own claim about what an image shows, and whether the model agrees with it.

A header is a hint, not a truth: ``BodyPartExamined`` is empty on most images and wrong on a sizeable share
of the rest, which is exactly why an organ classifier is worth running. :func:`header_check` compares the
model's class with what the header says, through ONE documented table (:data:`DEFAULT_TABLE`), which users
replace entry by entry with a JSON file (``--header-map FILE`` or ``$MEDISCAN_HEADER_MAP``)::

    {"BodyPartExamined": {"ABDOMEN": ["bone"], "SKULL": []},
     "keywords": {"CXR": ["lungs", "heart"]},
     "Modality": {"BMD": ["bone"]}}

Fields are read in this order, and the first one whose value maps to one of the model's classes decides:

1. ``BodyPartExamined`` (DICOM defined terms: CHEST, HEAD, KNEE, HAND, EXTREMITY ...),
2. ``SeriesDescription``, ``StudyDescription``, ``ProtocolName`` (keyword search, whole words, plural
   included: LUNG matches LUNGS, HEAD does not match HEADER),
3. ``Modality`` (only the few modalities that imply a body part, e.g. BMD: bone densitometry).

The answer is ``agrees`` (the model's class is one the header allows), ``disagrees``, ``not_mapped`` (``BodyPartExamined``
names a body part, but nothing in the table maps it, or any description, to the model's classes) or ``no_header`` (no
such field is filled in), with the field and value it was based on. A chest maps to both ``lungs`` and
``heart``: a chest radiograph shows both, so neither answer contradicts the header.

Only these non-patient fields are read; :class:`DicomHeader` holds no patient name, ID or date.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

__all__ = ["DEFAULT_TABLE", "ENV_HEADER_MAP", "STATUSES", "DicomHeader", "HeaderCheck", "HeaderMapError",
           "HeaderMapping", "default_mapping", "header_check", "summarize"]

ENV_HEADER_MAP = "MEDISCAN_HEADER_MAP"
STATUSES = ("agrees", "disagrees", "no_header", "not_mapped")
_CHEST = ("lungs", "heart")
_BONES = ("EXTREMITY", "UPREXM", "LOWEREXM", "HAND", "FINGER", "THUMB", "WRIST", "FOREARM", "ELBOW", "ARM",
          "HUMERUS", "SHOULDER", "CLAVICLE", "SCAPULA", "FOOT", "TOE", "ANKLE", "CALCANEUS", "HEEL", "LEG",
          "TIBIA", "FIBULA", "KNEE", "PATELLA", "FEMUR", "THIGH", "HIP", "PELVIS", "SPINE", "CSPINE", "TSPINE",
          "LSPINE", "SSPINE", "COCCYX", "SACRUM", "RIB", "JAW", "TMJ", "SKELETON", "BONE")
#: The default table: header value -> the model classes consistent with it.
DEFAULT_TABLE: dict[str, dict[str, tuple[str, ...]]] = {
    "BodyPartExamined": {
        "CHEST": _CHEST, "THORAX": _CHEST, "LUNG": ("lungs",), "HEART": ("heart",),
        "HEAD": ("brain",), "BRAIN": ("brain",), "SKULL": ("brain", "bone"),
        **{term: ("bone",) for term in _BONES},
    },
    "keywords": {
        "CHEST": _CHEST, "THORAX": _CHEST, "THORACIC": _CHEST, "CXR": _CHEST, "LUNG": ("lungs",),
        "PULMONARY": ("lungs",), "HEART": ("heart",), "CARDIAC": ("heart",), "CORONARY": ("heart",),
        "HEAD": ("brain",), "BRAIN": ("brain",), "SKULL": ("brain", "bone"), "NEURO": ("brain",),
        "CEREBRAL": ("brain",), **{term: ("bone",) for term in _BONES},
    },
    "Modality": {"BMD": ("bone",)},
}
_DESCRIPTIONS = ("SeriesDescription", "StudyDescription", "ProtocolName")


class HeaderMapError(ValueError):
    """A header mapping file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class DicomHeader:
    """The non-patient header fields MediScan reads from a DICOM instance (strings, "" when absent)."""

    study_uid: str = ""
    series_uid: str = ""
    sop_uid: str = ""
    sop_class_uid: str = ""
    modality: str = ""
    body_part: str = ""
    series_description: str = ""
    study_description: str = ""
    protocol_name: str = ""
    manufacturer: str = ""

    def field_value(self, keyword: str) -> str:
        """The value of a DICOM keyword this summary holds ("" when absent)."""
        return {"BodyPartExamined": self.body_part, "SeriesDescription": self.series_description,
                "StudyDescription": self.study_description, "ProtocolName": self.protocol_name,
                "Modality": self.modality}[keyword]

    def to_dict(self) -> dict:
        """JSON-ready: the UIDs, Modality and BodyPartExamined (``None`` when absent)."""
        return {"study_instance_uid": self.study_uid or None, "series_instance_uid": self.series_uid or None,
                "sop_instance_uid": self.sop_uid or None, "modality": self.modality or None,
                "body_part_examined": self.body_part or None}


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    value = "" if value is None else str(value)
    return "".join(c if c.isprintable() else " " for c in value).strip()[:200]


def summarize(ds) -> DicomHeader:
    """The :class:`DicomHeader` of a pydicom dataset (never reads a patient field)."""
    return DicomHeader(*(_text(ds, k) for k in (
        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
        "BodyPartExamined", "SeriesDescription", "StudyDescription", "ProtocolName", "Manufacturer")))


@dataclass(frozen=True)
class HeaderCheck:
    """The outcome of :func:`header_check`: ``status`` (one of :data:`STATUSES`), the ``field`` and
    ``value`` it was based on (``None`` for ``no_header``) and the classes the header allows."""

    status: str
    field: str | None = None
    value: str | None = None
    expected: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {"status": self.status, "field": self.field, "value": self.value, "expected": list(self.expected)}

    def describe(self) -> str:
        """One sentence for reports and burned-in labels."""
        if self.status == "no_header":
            return "header check: no body part in the DICOM header"
        if self.status == "not_mapped":
            return f"header check: {self.field} '{self.value}' is not in the mapping table"
        return f"header check: {self.status} with {self.field} '{self.value}'"


@dataclass(frozen=True)
class HeaderMapping:
    """Header value -> model classes, per source (``BodyPartExamined``, ``keywords``, ``Modality``)."""

    tables: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=lambda: DEFAULT_TABLE)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> HeaderMapping:
        """The default table with the entries of the JSON file at ``path`` replacing (or, with ``[]``,
        removing) the default ones."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HeaderMapError(f"Cannot read the header mapping file '{path}': {exc}. It must be a JSON "
                                 f"object like {{\"BodyPartExamined\": {{\"CHEST\": [\"lungs\"]}}}}.") from None
        if not isinstance(data, dict) or not set(data) <= set(DEFAULT_TABLE):
            raise HeaderMapError(f"The header mapping file '{path}' must be a JSON object whose keys are among "
                                 f"{', '.join(DEFAULT_TABLE)}.")
        tables = {source: dict(entries) for source, entries in DEFAULT_TABLE.items()}
        for source, entries in data.items():
            if not isinstance(entries, dict) or not all(
                    isinstance(v, list) and all(isinstance(c, str) for c in v) for v in entries.values()):
                raise HeaderMapError(f"In '{path}', \"{source}\" must map header values to lists of class names.")
            for value, classes in entries.items():
                tables[source][value.strip().upper()] = tuple(classes)
        return cls({source: {k: v for k, v in t.items() if v} for source, t in tables.items()})

    def classes_for(self, source: str, value: str) -> tuple[str, ...]:
        """The classes ``value`` maps to (``source`` "keywords" searches words; others match exactly)."""
        table = self.tables.get(source, {})
        if source != "keywords":
            return tuple(table.get(value.strip().upper(), ()))
        words = re.findall(r"[A-Z0-9]+", value.upper())
        found: list[str] = []
        for keyword, classes in table.items():
            if any(w in (keyword, keyword + "S") for w in words):
                found += [c for c in classes if c not in found]
        return tuple(found)


@lru_cache(maxsize=4)
def _mapping_from(path: str | None) -> HeaderMapping:
    return HeaderMapping.from_file(path) if path else HeaderMapping()


def default_mapping() -> HeaderMapping:
    """The default table, or the one ``$MEDISCAN_HEADER_MAP`` names (read once per path)."""
    return _mapping_from(os.environ.get(ENV_HEADER_MAP) or None)


def header_check(header: DicomHeader | None, predicted: str, classes, mapping: HeaderMapping | None = None
                 ) -> HeaderCheck:
    """Does the header agree with the predicted class? See the module docstring for the rule."""
    if header is None:
        return HeaderCheck("no_header")
    mapping = mapping or default_mapping()
    known = set(classes)
    first_value = None
    sources = [("BodyPartExamined", "BodyPartExamined")] + [(k, "keywords") for k in _DESCRIPTIONS] + [
        ("Modality", "Modality")]
    for keyword, source in sources:
        value = header.field_value(keyword).strip()
        if not value:
            continue
        allowed = tuple(c for c in mapping.classes_for(source, value) if c in known)
        if allowed:
            return HeaderCheck("agrees" if predicted in allowed else "disagrees", keyword, value, allowed)
        if first_value is None and keyword == "BodyPartExamined":
            first_value = (keyword, value)
    if first_value is None:
        return HeaderCheck("no_header")
    return HeaderCheck("not_mapped", *first_value)
