"""The Secondary Capture MediScan stores back into the study: the representative image with the Grad-CAM
overlay and the answer burned in (label, confidence, verdict, "NOT FOR DIAGNOSTIC USE").

highdicom copies the Patient and General Study modules of the source instance and keeps its
StudyInstanceUID; the Series and SOP Instance UIDs are the deterministic ones of :mod:`mediscan.dicom.uids`.
The image is RGB, at most :data:`MAX_SIDE` pixels on its longer side (an archive viewer needs no more to
show what the model looked at, and a 3000 x 3000 RGB capture would cost 27 MB per result) and at least
:data:`MIN_SIDE` (so that the burned-in text stays legible on a small source image).
"""
from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mediscan.dicom.uids import MANUFACTURER

__all__ = ["MAX_SIDE", "MIN_SIDE", "NOT_FOR_DIAGNOSIS", "burn_in", "secondary_capture"]

MAX_SIDE = 1024
MIN_SIDE = 512  # smaller images are scaled up, or the burned-in text would not fit
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE"
SERIES_NUMBER = 9901  # high, so that viewers list the result series after the acquired ones


def burn_in(rgb: np.ndarray, lines: list[str]) -> np.ndarray:
    """``rgb`` (H, W, 3 uint8) scaled to a longer side between :data:`MIN_SIDE` and :data:`MAX_SIDE`, with a
    black band of text lines above it (long lines wrap to the width)."""
    im = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")
    scale = min(1.0, MAX_SIDE / max(im.size)) if max(im.size) > MIN_SIDE else MIN_SIDE / max(im.size)
    if scale != 1.0:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)
    size = max(10, im.width // 28)
    font = ImageFont.load_default(size=size)
    # A verdict reason is a sentence: wrap it to the image's width rather than let it run off the edge.
    width = max(16, int((im.width - size) / (0.55 * size)))
    wrapped = [(part, line == NOT_FOR_DIAGNOSIS) for line in lines for part in (textwrap.wrap(line, width) or [""])]
    band = (size + size // 3) * len(wrapped) + size // 2
    out = Image.new("RGB", (im.width, im.height + band), (0, 0, 0))
    out.paste(im, (0, band))
    draw = ImageDraw.Draw(out)
    for k, (line, notice) in enumerate(wrapped):
        colour = (255, 64, 64) if notice else (255, 255, 255)
        draw.text((size // 3, size // 4 + k * (size + size // 3)), line, fill=colour, font=font)
    return np.asarray(out, dtype=np.uint8)


def secondary_capture(ref, pixels: np.ndarray, *, series_uid: str, instance_uid: str, description: str,
                      version: str):
    """A highdicom ``SCImage`` of ``pixels`` (RGB uint8, the burned-in overlay) in the study of ``ref``
    (the source instance's dataset; its pixel data is not needed)."""
    import highdicom as hd

    from mediscan.dicom.structured_report import with_type2

    ref = with_type2(ref)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref, pixel_array=np.ascontiguousarray(pixels, dtype=np.uint8),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB, bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT, series_instance_uid=series_uid,
        series_number=SERIES_NUMBER, sop_instance_uid=instance_uid, instance_number=1,
        manufacturer=MANUFACTURER, patient_orientation=("L", "F"),  # placeholder, replaced below
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    # The capture shows the source image as it was displayed: its orientation, if it had one, or none
    # (Type 2: empty) rather than highdicom's required guess.
    sc.PatientOrientation = ref.get("PatientOrientation") or None
    sc.SeriesDescription = description[:64]
    sc.ManufacturerModelName = "MediScan organ classifier"
    sc.SoftwareVersions = version[:64]
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = NOT_FOR_DIAGNOSIS
    # No BodyPartExamined on the capture: the source's value is the claim the model is checked against, not
    # a fact about the result. General Series Laterality (Type 2C) is then needed (dciodvfy checks it): the
    # source's, or empty (unknown).
    if "BodyPartExamined" in sc:
        del sc.BodyPartExamined
    sc.Laterality = ref.get("Laterality") or ref.get("ImageLaterality") or None
    if sc.Laterality not in (None, "", "L", "R"):  # ImageLaterality's "U"/"B" are not Laterality terms
        sc.Laterality = None
    return sc
