"""Which DICOM modalities a training run saw: written into every checkpoint as ``meta["modalities"]``.

The modality gate (:mod:`mediscan.core.modality_gate`) stops a DICOM input whose Modality is outside this
set before any network runs. The set comes from, in order:

1. ``--modalities CR,DX,...`` when given (the user knows best, e.g. JPEG exports of DX films);
2. the ``Modality`` of the DICOM training files, when every training file is DICOM;
3. otherwise :data:`~mediscan.core.modality_gate.DEFAULT_MODALITIES` -- JPEG/PNG files carry no modality --
   plus the Modality of any DICOM files among them (a mixed set saw those too).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from mediscan.core.modality_gate import DEFAULT_MODALITIES

__all__ = ["parse_modalities", "dicom_modality", "training_modalities"]

# DICOM's CS value representation: upper-case letters, digits, space and underscore, at most 16 characters.
_CODE = re.compile(r"^[A-Z0-9_ ]{1,16}$")


def parse_modalities(text: str) -> list[str]:
    """``"cr, DX,CT"`` -> ``["CR", "DX", "CT"]``; ``ValueError`` naming the bad entry otherwise."""
    codes = [part.strip().upper() for part in str(text).split(",")]
    codes = [code for code in codes if code]
    if not codes:
        raise ValueError(f"--modalities needs at least one DICOM Modality code, e.g. "
                         f"{','.join(DEFAULT_MODALITIES)}; got {text!r}")
    bad = [code for code in codes if not _CODE.match(code)]
    if bad:
        raise ValueError(f"--modalities: {', '.join(map(repr, bad))} is not a DICOM Modality code (upper-case "
                         f"letters/digits, at most 16 characters, e.g. {','.join(DEFAULT_MODALITIES)})")
    return list(dict.fromkeys(codes))


def dicom_modality(path: str | Path) -> str | None:
    """The Modality of a DICOM file ('' when it has none), or ``None`` when the file is not DICOM.

    Reads the header only (no pixel data)."""
    from mediscan.core.dicom_pixels import is_dicom
    with open(path, "rb") as handle:
        head = handle.read(1024)
    if not is_dicom(head):
        return None
    import pydicom
    ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True, specific_tags=["Modality"])
    return str(getattr(ds, "Modality", "") or "").strip().upper()


def training_modalities(paths: Iterable[str | Path], flag: str | None = None) -> list[str]:
    """``meta["modalities"]`` for a run on ``paths`` (the training files), by the rules of the module docstring."""
    if flag:
        return parse_modalities(flag)
    found, any_plain = [], False
    for path in paths:
        modality = dicom_modality(path)
        if modality is None:
            any_plain = True
        elif modality:
            found.append(modality)
    if found and not any_plain:
        return list(dict.fromkeys(sorted(found)))
    return list(dict.fromkeys([*DEFAULT_MODALITIES, *sorted(found)]))
