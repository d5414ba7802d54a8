"""DICOM -> float grayscale image: the DICOM half of :func:`mediscan.core.imaging.read_image`.

Parsed from memory (uploads and received instances never touch the disk). The Modality LUT / rescale and
the VOI LUT / window are applied, then the result is min-max stretched to [0, 1] (the rule of
:mod:`mediscan.core.imaging`). Multi-frame files give frame 1 plus a warning, with frame 1's rescale and
window when an enhanced file keeps them in functional groups; MONOCHROME1 is inverted so that bone is
bright. Compressed transfer syntaxes (JPEG Lossless process 14, JPEG baseline/extended, JPEG-LS, JPEG 2000,
RLE) decode through the pylibjpeg plugins in requirements.txt; one without an installed decoder is
reported with the pip package to add. Files without the 128-byte preamble and file meta (legacy ACR-NEMA
style) are read, with a warning, in the transfer syntax their first element shows.

Besides the pixels the result carries :class:`~mediscan.core.dicom_header.DicomHeader` (UIDs, Modality,
body part, descriptions): never a patient field.
"""
from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from mediscan.core.decoded import (
    COLOUR_SAMPLE_SIDE,
    RECOPY,
    DecodedImage,
    ImageReadError,
    check_size,
    clean_label,
    colourfulness,
    fail,
    finish,
    short,
    stretch,
)
from mediscan.core.dicom_header import summarize

# pydicom >= 3 (highdicom needs it too): decodes only the frame asked for and converts YBR to RGB.
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array

__all__ = ["decode_dicom", "is_dicom", "read_dataset"]

_EXPORT = "export the image as PNG or uncompressed DICOM"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# A dataset without preamble starts with its lowest group: command (0000), file meta (0002) or identifying
# (0008) -- see _looks_raw. None of the image formats Pillow reads starts with those bytes.
_LEGACY_NOTE = ("no DICOM preamble / file meta (legacy ACR-NEMA style): read as {ts}; re-save it as a "
                "Part-10 DICOM file to silence this")


def is_dicom(data: bytes) -> bool:
    """A Part-10 file ("DICM" after the 128-byte preamble), or a bare dataset (legacy style) that starts
    with a group 0000/0002/0008 element."""
    # The preamble may itself be a TIFF header in dual-personality files: this check comes before Pillow's.
    return data[128:132] == b"DICM" or _looks_raw(data)


def _looks_raw(data: bytes) -> bool:
    if len(data) < 8:
        return False
    group, element = int.from_bytes(data[:2], "little"), int.from_bytes(data[2:4], "little")
    if group in (0x0002, 0x0008) and element < 0x0030:
        return True
    return data[:8] == b"\x00\x00\x00\x00\x04\x00\x00\x00"  # (0000,0000) UL, length 4: a command group


def read_dataset(data: bytes, label: str) -> tuple[pydicom.Dataset, list[str]]:
    """Parse ``data`` (Part-10 or bare dataset) from memory; returns the dataset and warnings.

    A bare dataset gets a file meta with the transfer syntax that pydicom found it encoded in, so that its
    pixels decode like a Part-10 file's.
    """
    if data[128:132] == b"DICM":
        return pydicom.dcmread(io.BytesIO(data)), []
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if not len(ds):
        raise fail(label, "not_image", "it looks like a DICOM dataset without preamble, but no element parsed",
                   f"Check the file in a DICOM viewer, or {_EXPORT}.")
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
    return ds, [_LEGACY_NOTE.format(ts=ds.file_meta.TransferSyntaxUID.name)]


def _decoder_packages(uid: str) -> str:
    """The pip command that adds a decoder for this transfer syntax (for the hint)."""
    if uid.startswith("1.2.840.10008.1.2.4.9") or uid.startswith("1.2.840.10008.1.2.4.20"):
        return "pip install pylibjpeg pylibjpeg-openjpeg (or pip install python-gdcm)"
    if uid == "1.2.840.10008.1.2.5":
        return "pip install pylibjpeg pylibjpeg-rle"
    if uid.startswith("1.2.840.10008.1.2.4.10"):     # MPEG-2 / MPEG-4 / HEVC video: no Python decoder exists
        return "export a single frame of the video as a still image (no installable decoder reads DICOM video)"
    return "pip install pylibjpeg pylibjpeg-libjpeg (or pip install python-gdcm)"


def _decoder_hint(uid: str) -> str:
    remedy = _decoder_packages(uid)
    return f"Run '{remedy}', or {_EXPORT}." if remedy.startswith("pip") else f"{remedy[0].upper()}{remedy[1:]}."


def _decoder_missing(ts) -> bool:
    """True when ``ts`` is compressed and no installed pydicom plugin can decode it."""
    if ts is None:
        return False
    try:
        if not ts.is_compressed:
            return False
    except ValueError:  # not a transfer syntax pydicom knows (private or damaged UID)
        return True
    try:
        return not get_decoder(ts).is_available
    except NotImplementedError:  # a transfer syntax pydicom has no decoder for at all
        return True


def decode_dicom(data: bytes, label: str, max_pixels: int, min_side: int) -> DecodedImage:
    """Decode DICOM ``data`` (see the module docstring); every problem is an :class:`ImageReadError`."""
    ds = None
    try:
        ds, notes = read_dataset(data, label)
        _check_decodable(ds, label)
        rows, cols = int(ds.Rows), int(ds.Columns)
        check_size(label, cols, rows, max_pixels, min_side)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        pixels, colour = _to_gray(ds, _first_frame(ds), rows, cols)
        bits = int(ds.get("BitsAllocated", 16) or 16)
    except ImageReadError as exc:
        raise _with_header(exc, ds)
    except Exception as exc:
        text = str(exc).lower()
        if isinstance(exc, EOFError) or any(s in text for s in ("truncat", "less than expected", "shorter than")):
            raise _with_header(fail(label, "truncated", f"the DICOM file ends too early ({short(exc)})", RECOPY),
                               ds) from None
        raise _with_header(fail(label, "corrupt", f"the DICOM data cannot be decoded ({short(exc)})",
                                f"Check the file in a DICOM viewer, or {_EXPORT}."), ds) from None
    if frames > 1:
        notes.append(f"multi-frame DICOM: using frame 1 of {frames}")
    modality = clean_label(ds.get("Modality", "") or "").strip() or None
    return finish(pixels, label, "DICOM", 8 if bits <= 8 else 16 if bits <= 16 else 32, notes, modality,
                  colourfulness=colour, dicom=summarize(ds))


def _with_header(error: ImageReadError, ds) -> ImageReadError:
    """``error`` carrying the summary of ``ds``'s header when the header was read: its pixels are unusable, but
    the header may still say the object is out of scope (a report, an ultrasound cine ...)."""
    if ds is not None and error.dicom is None:
        try:
            error.dicom = summarize(ds)
        except Exception:  # noqa: BLE001 -- a header too damaged to summarise: the error stands as it is
            pass
    return error


def _check_decodable(ds, label: str) -> None:
    """Pixel data present, a decoder for its transfer syntax installed, an image size given."""
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise fail(label, "no_pixel_data",
                   "the DICOM file has no pixel data (it is a report or other non-image object, or it is cut off)",
                   "Choose the DICOM image file of the study.")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if _decoder_missing(ts):
        raise fail(label, "unsupported",
                   f"its transfer syntax '{clean_label(ts.name)}' ({clean_label(ts)}) needs a decoder plugin "
                   "that is not installed",
                   _decoder_hint(str(ts)))
    if "Rows" not in ds or "Columns" not in ds:
        raise fail(label, "corrupt", "the DICOM header has no image size (Rows/Columns)",
                   f"Check the file in a DICOM viewer, or {_EXPORT}.")


def _to_gray(ds, arr: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, float]:
    """Stored values -> [0, 1] grayscale (LUTs applied; colour reduced to luminance) and colourfulness."""
    # Type 1 elements that pydicom's decoder has already required ("Missing required element"): no defaults.
    samples = int(ds.SamplesPerPixel)
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    colour_bits = int(ds.BitsStored)  # full scale of the RGB values below
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        samples = 3
        # The RGB values now come from the lookup table, whose entry size (8 or 16 bits) is the third
        # number of its descriptor; BitsStored describes the palette indices.
        colour_bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    if samples == 1:
        _lift_frame_functional_groups(ds)
        arr = apply_modality_lut(arr, ds)  # stored values -> e.g. Hounsfield units
        arr = apply_voi_lut(arr, ds, index=0)  # VOI LUT, else WindowCenter/Width
        if photometric == "MONOCHROME1":
            arr = -arr.astype(np.float64)  # MONOCHROME1: low = white; flip so bone is bright
        return stretch(arr), 0.0
    rgb = arr[..., :3].astype(np.float64)  # pydicom >= 3 has already converted YBR to RGB
    step = max(1, max(rows, cols) // COLOUR_SAMPLE_SIDE)
    colour = colourfulness(rgb[::step, ::step] / float(2 ** colour_bits - 1))
    return stretch(rgb @ np.array([0.299, 0.587, 0.114])), colour


#: Enhanced multi-frame DICOM (enhanced CT / MR / XA ...) keeps the rescale and window of each frame in
#: functional-group macros, not at the top level where pydicom's LUT functions look for them.
_FRAME_MACROS = {
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction"),
}


def _lift_frame_functional_groups(ds) -> None:
    """Copy frame 1's rescale and window from an enhanced DICOM's functional groups to the top level of
    ``ds`` (our own parsed copy), so that they are applied like a classic DICOM's. The per-frame group
    overrides the shared one, as the standard says; classic files have neither and are left alone."""
    groups = [seq[0] for seq in (ds.get("PerFrameFunctionalGroupsSequence"),
                                 ds.get("SharedFunctionalGroupsSequence")) if seq]
    for macro, keywords in _FRAME_MACROS.items():
        item = next((group.get(macro)[0] for group in groups if group.get(macro)), None)
        if item is None:
            continue
        for keyword in keywords:
            if keyword in item:
                setattr(ds, keyword, item[keyword].value)


def _first_frame(ds) -> np.ndarray:
    """Decoded pixels of frame 1 (RGB for colour data)."""
    return pixel_array(ds, index=0)  # pydicom decodes only that frame (the only one, for most files)
