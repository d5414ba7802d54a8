"""The modality gate: a DICOM input whose Modality or SOP class the model was never trained on is answered
``out_of_scope`` before any network runs.

A classifier trained on radiographs, CT and MR gives *some* organ for an ultrasound frame, a PET slice or a
mammogram, often with high confidence; the out-of-scope detector catches only part of them. In the DICOM
setting the header says what the object is, so it is read first:

* a non-image object (Structured Report, Key Object Selection, presentation state, segmentation, RT plan /
  structure set / dose, encapsulated PDF, waveform ...; any SOP class that is not an "Image Storage" one) is
  never analysed, whatever the model was trained on;
* an image whose SOP class implies a modality (Ultrasound -> US, Nuclear Medicine -> NM, PET -> PT,
  Mammography -> MG, ...) outside the checkpoint's set is stopped, and so is one whose ``Modality`` attribute is
  outside it (US, NM, PT, MG, SEG, SR, OT, XC ...).

The set a checkpoint was trained on is ``meta["modalities"]`` (written by training: the Modality of DICOM
training files, else ``--modalities``); absent -- old checkpoints, JPEG/PNG training data -- it is the documented
default :data:`DEFAULT_MODALITIES`. Non-DICOM inputs carry no header and are never stopped here; an empty
Modality or an unknown (private) SOP class says nothing, so it does not stop an image either.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # the type only
    from mediscan.core.dicom_header import DicomHeader

__all__ = ["DEFAULT_MODALITIES", "MODALITY_NAMES", "checkpoint_modalities", "gate_unreadable", "modality_gate",
           "modality_rule", "sop_class_modality"]

#: What a checkpoint is taken to have been trained on when its metadata does not say: the radiograph-like
#: modalities (computed / digital radiography, CT, MR, angiography, fluoroscopy).
DEFAULT_MODALITIES: tuple[str, ...] = ("CR", "DX", "CT", "MR", "XA", "RF")

#: Plain names of the DICOM Modality defined terms quoted in the gate's sentence.
MODALITY_NAMES = {
    "CR": "computed radiography", "DX": "digital radiography", "CT": "computed tomography",
    "MR": "magnetic resonance", "XA": "X-ray angiography", "RF": "radiofluoroscopy", "US": "ultrasound",
    "NM": "nuclear medicine", "PT": "positron emission tomography", "MG": "mammography",
    "IO": "intra-oral radiography", "PX": "panoramic X-ray", "BMD": "bone densitometry",
    "SEG": "segmentation", "SR": "structured report", "KO": "key object selection", "PR": "presentation state",
    "OT": "other", "SC": "secondary capture", "XC": "external-camera photography", "ES": "endoscopy",
    "OP": "ophthalmic photography", "OPT": "ophthalmic tomography", "SM": "slide microscopy",
    "GM": "general microscopy", "DOC": "document", "ECG": "electrocardiography", "RTIMAGE": "radiotherapy image",
    "RTDOSE": "radiotherapy dose", "RTSTRUCT": "radiotherapy structure set", "RTPLAN": "radiotherapy plan",
    "RTRECORD": "radiotherapy record", "REG": "registration", "IVUS": "intravascular ultrasound",
    "OCT": "optical coherence tomography", "TG": "thermography",
}

# SOP class name -> the modality it implies (first match wins; names as pydicom spells them). Secondary
# Capture and VL classes imply nothing fixed: their Modality attribute decides.
_SOP_MODALITY = (
    ("Ultrasound", "US"), ("US Volume", "US"), ("Intravascular Optical Coherence", "IVOCT"),
    ("Nuclear Medicine", "NM"), ("Positron Emission Tomography", "PT"), ("PET Image", "PT"),
    ("Mammography", "MG"), ("Breast Tomosynthesis", "MG"), ("Breast Projection", "MG"),
    ("Intra-Oral", "IO"), ("Computed Radiography", "CR"), ("Digital X-Ray", "DX"),
    ("X-Ray Angiographic", "XA"), ("XA Image", "XA"), ("X-Ray Radiofluoroscopic", "RF"), ("XRF Image", "RF"),
    ("CT Image", "CT"), ("MR Image", "MR"), ("Ophthalmic", "OP"), ("Whole Slide Microscopy", "SM"),
    ("RT Image", "RTIMAGE"),
)


def checkpoint_modalities(meta: dict) -> tuple[str, ...]:
    """The modalities a checkpoint was trained on: ``meta["modalities"]``, or :data:`DEFAULT_MODALITIES` when
    absent. Raises ``ValueError`` (the caller names the file) for a value that is not a non-empty list of
    Modality strings."""
    value = meta.get("modalities")
    if value is None:
        return DEFAULT_MODALITIES
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(m, str) and m.strip() and len(m.strip()) <= 16 for m in value):
        raise ValueError(f"meta['modalities'] must be a non-empty list of DICOM Modality codes such as "
                         f"{list(DEFAULT_MODALITIES)}, got {value!r}")
    return tuple(dict.fromkeys(m.strip().upper() for m in value))


def _sop_name(sop_class_uid: str) -> str | None:
    """pydicom's name of a SOP class UID, or ``None`` for a UID it does not know (private, damaged)."""
    from pydicom.uid import UID
    try:
        name = UID(sop_class_uid).name
    except Exception:  # noqa: BLE001 -- a damaged UID string says nothing about the object
        return None
    return None if not name or name == sop_class_uid else name


def sop_class_modality(sop_class_uid: str) -> str | None:
    """The modality a SOP class implies (``"US"`` for Ultrasound Image Storage ...), ``None`` when it implies
    none (Secondary Capture, VL, unknown UIDs)."""
    name = _sop_name(sop_class_uid) or ""
    return next((modality for words, modality in _SOP_MODALITY if words in name), None)


def _describe(modality: str) -> str:
    name = MODALITY_NAMES.get(modality)
    return f"{modality} ({name})" if name else modality


def modality_gate(header: DicomHeader | None, allowed: Iterable[str] = DEFAULT_MODALITIES) -> str | None:
    """``None`` when the input may be analysed, else one sentence saying why it is out of scope.

    ``header`` is the DICOM header summary (``None`` for non-DICOM input: never stopped); ``allowed`` the
    checkpoint's modalities (:func:`checkpoint_modalities`). See the module docstring for the rules.
    """
    if header is None:
        return None
    allowed = tuple(m.strip().upper() for m in allowed)
    trained = ", ".join(allowed)
    sop_uid = (header.sop_class_uid or "").strip()
    name = _sop_name(sop_uid) if sop_uid else None
    if name and "Image Storage" not in name and "Volume Storage" not in name:
        return f"This DICOM object ({name}, SOP class {sop_uid}) is not an image, so it was not analysed."
    modality = (header.modality or "").strip().upper()
    if modality and modality not in allowed:
        return f"Modality {_describe(modality)} is not one this model was trained on ({trained}); it was not analysed."
    implied = sop_class_modality(sop_uid) if name else None
    if implied and implied not in allowed:      # e.g. an ultrasound frame whose Modality says CR
        return (f"Its SOP class ({name}) is modality {_describe(implied)}, not one this model was trained on "
                f"({trained}); it was not analysed.")
    return None


def gate_unreadable(error: Exception, allowed: Iterable[str] = DEFAULT_MODALITIES) -> str | None:
    """The gate's sentence for an input that could not be decoded but whose DICOM header was read and puts it
    out of scope (``error.dicom``, set by the DICOM decoder: a Structured Report, an ultrasound cine nothing
    can decode ...); ``None`` when the error stands -- the header was not read or says nothing against it."""
    header = getattr(error, "dicom", None)
    return None if header is None else modality_gate(header, allowed)


def modality_rule(allowed: Iterable[str]) -> str:
    """The gate's rule in words, for the model card."""
    return (f"DICOM inputs must be images of a modality this model was trained on ({', '.join(allowed)}); "
            f"other modalities (US, NM, PT, MG, OT ...) and non-image objects (SR, KOS, presentation states, SEG, "
            f"RT ...) are out of scope and never reach the network. Other image formats carry no modality and "
            f"are not gated.")
