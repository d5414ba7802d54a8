"""Read any image a user gives MediScan and return a float grayscale array.

This is the ONE decoding/preprocessing entry for training, CLI, dashboard and API,
so every failure becomes an :class:`ImageReadError` with a complete, user-facing
sentence (which input, what is wrong, what to do) -- never a raw traceback and never
a silent fallback.

Inputs: a path, raw bytes (an upload) or a binary file-like object. The format is
detected from the content (DICOM preamble, then Pillow's magic-byte sniffing), not from
the file name. Supported: PNG, JPEG (EXIF orientation applied), BMP, TIFF, DICOM.

Scaling to [0, 1] -- the rule every caller relies on:

* 8-bit data (Pillow modes 1/L/P/RGB/RGBA/LA/CMYK...) is divided by 255, so training on
  8-bit JPEGs and inference on the same files agree exactly.
* 16-bit, 32-bit integer and float data, and all DICOM data (after its Modality LUT /
  rescale and VOI LUT / window), are min-max stretched to [0, 1]. 12-bit detector data
  stored in 16 bits would otherwise look almost black. A constant image becomes all
  zeros (never NaN).

DICOM (Part-10 files, bare legacy datasets, compressed transfer syntaxes) is decoded by
:mod:`mediscan.core.dicom_pixels`; the result types and shared helpers live in
:mod:`mediscan.core.decoded` and are re-exported here.

Colour is reduced to luminance (ITU-R 601-2, Pillow's "L" conversion). Alpha is
composited onto black: a transparent pixel carries no signal, and black is the
background of a radiograph.

Privacy: nothing here logs or prints pixel data, and nothing but the DICOM header summary
(UIDs, Modality, body part, descriptions) leaves the decoders -- no patient names, IDs or dates.
"""
from __future__ import annotations

import io
import os
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mediscan.core.decoded import COLOUR_LIMIT, DecodedImage, ImageReadError, colourfulness
from mediscan.core.decoded import COLOUR_SAMPLE_SIDE as _COLOUR_SAMPLE_SIDE
from mediscan.core.decoded import RECOPY as _RECOPY
from mediscan.core.decoded import check_size as _check_size
from mediscan.core.decoded import clean_label as _clean_label
from mediscan.core.decoded import fail as _fail
from mediscan.core.decoded import finish as _finish
from mediscan.core.decoded import short as _short
from mediscan.core.decoded import stretch as _stretch
from mediscan.core.dicom_pixels import decode_dicom, is_dicom

__all__ = [
    "COLOUR_LIMIT",
    "DEFAULT_MAX_PIXELS",
    "MIN_SIDE",
    "SUPPORTED_SUFFIXES",
    "DecodedImage",
    "ImageReadError",
    "colourfulness",
    "looks_like_image_file",
    "read_image",
]

DEFAULT_MAX_PIXELS = 64_000_000
MIN_SIDE = 32
SUPPORTED_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
)

_SUPPORTED_TEXT = "PNG, JPEG, BMP, TIFF (8 or 16 bit) or DICOM"
# Pillow may only try these parsers: it has dozens more, and some (EPS -> Ghostscript)
# are not something a web upload should reach. MPO (multi-picture JPEG from phones) is
# returned by the JPEG parser itself.
_PIL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
# Signatures of the formats we read: a file that starts like one but fails to parse is
# damaged, not "not an image".
_SUPPORTED_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)
# Formats people often upload by mistake: name them instead of saying "not an image".
_KNOWN_OTHER_MAGIC = (
    (0, b"GIF8", "a GIF image"),
    (8, b"WEBP", "a WebP image"),
    (4, b"ftypheic", "a HEIC image"),
    (4, b"ftypavif", "an AVIF image"),
    (0, b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 image"),
    (0, b"\xff\x4f\xff\x51", "a JPEG 2000 codestream"),
    (0, b"%PDF", "a PDF document"),
    (0, b"PK\x03\x04", "a ZIP archive"),
)
_REEXPORT = "Re-export or re-download the image."
# Serialises our temporary change of the (process-global) warnings filters; see _open_pil.
_WARNINGS_LOCK = threading.Lock()


# ----------------------------------------------------------------------------- public API


def looks_like_image_file(path: str | os.PathLike) -> bool:
    """Whether a folder scanner should consider ``path`` an image.

    True for a supported suffix (case-insensitive) and for suffix-less DICOM files (the
    "DICM" magic at offset 128). macOS "._name" resource-fork files are never images.
    Only the suffix-less case touches the disk; unreadable files give False.
    """
    name = os.path.basename(os.fspath(path))
    if name.startswith("._"):
        return False
    suffix = os.path.splitext(name)[1].lower()
    if suffix in SUPPORTED_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def read_image(
    source,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_SIDE,
) -> DecodedImage:
    """Decode ``source`` into a :class:`DecodedImage` (float32 grayscale in [0, 1]).

    ``source`` is a path (``str`` / ``os.PathLike``), the file content (``bytes``,
    ``bytearray``, ``memoryview``) or a binary file-like object, read from its current
    position. ``name`` labels bytes / file-like input in messages (e.g. the upload's file
    name). Images with more than ``max_pixels`` pixels (checked from the header, before
    any pixel is decoded) or a side shorter than ``min_side`` are rejected.

    Raises :class:`ImageReadError` for every problem with the input itself, and
    ``TypeError`` / ``ValueError`` only for programming errors (wrong argument types).
    """
    if max_pixels < 1 or min_side < 1:
        raise ValueError("max_pixels and min_side must be positive")
    data, label = _read_source(source, name)
    if not data:
        raise _fail(label, "empty", "it is empty (0 bytes)",
                    "Upload or select the file again; it may not have been saved completely.")
    if is_dicom(data):
        return decode_dicom(data, label, max_pixels, min_side)
    return _decode_pil(data, label, max_pixels, min_side)


# ----------------------------------------------------------------------------- input


def _read_source(source, name: str | None) -> tuple[bytes, str]:
    """Return (content, label) for any accepted kind of input."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), _clean_label(name or "<bytes>")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        label = _clean_label(name or path)
        if os.path.isdir(path):
            raise _fail(label, "unsupported", "it is a directory, not an image file",
                        "Pass a single image file (use the command's folder option for a whole folder).")
        try:
            with open(path, "rb") as fh:
                return fh.read(), label
        except FileNotFoundError:
            raise _fail(label, "missing", "the file does not exist",
                        "Check the path and the working directory.") from None
        except PermissionError:
            raise _fail(label, "missing", "the file cannot be opened (permission denied)",
                        "Check the file's permissions.") from None
        except OSError as exc:
            raise _fail(label, "missing", f"the file cannot be read ({_short(exc)})",
                        "Check that the path points to a readable file.") from None
    if hasattr(source, "read"):
        # Flask's FileStorage has .filename (its .name is the form field); Streamlit's
        # UploadedFile and open files have .name.
        label = name or getattr(source, "filename", None) or getattr(source, "name", None)
        label = _clean_label(label if isinstance(label, str) and label else "<stream>")
        try:
            data = source.read()
        except Exception as exc:  # any stream failure is a user-facing read problem
            raise _fail(label, "missing", f"the upload could not be read ({_short(exc)})",
                        "Upload the file again.") from None
        if isinstance(data, str):
            raise TypeError(f"{label}: file object is open in text mode; open it with 'rb'")
        return bytes(data or b""), label
    raise TypeError(f"read_image() needs a path, bytes or a binary file object, not {type(source).__name__}")


def _pil_colourfulness(im: Image.Image) -> float:
    """Colourfulness of a Pillow image; 0 for modes that hold no colour."""
    if im.mode in ("1", "L", "LA", "La", "I", "F") or im.mode.startswith("I;16"):
        return 0.0
    step = max(1, max(im.size) // _COLOUR_SAMPLE_SIDE)
    sample = im.resize((max(1, im.width // step), max(1, im.height // step)), Image.Resampling.NEAREST)
    try:
        return colourfulness(np.asarray(sample.convert("RGB"), dtype=np.float32) / 255.0)
    except ValueError:  # a mode Pillow cannot turn into RGB: the grayscale conversion reports it
        return 0.0


# ----------------------------------------------------------------------------- Pillow


def _is_text(data: bytes) -> bool:
    head = data[:512]
    return head.lstrip()[:1] == b"<" or all(32 <= c < 127 or c in b"\t\r\n" for c in head)


def _not_image(data: bytes, label: str) -> ImageReadError:
    """The most specific error for content Pillow could not identify."""
    supply = f"Supply {_SUPPORTED_TEXT} image data."
    if data.startswith(b"version https://git-lfs"):
        return _fail(label, "not_image", "it is a Git LFS pointer, not the image itself",
                     "Run 'git lfs pull' to fetch the real files.")
    if _is_text(data):
        return _fail(label, "not_image", "it contains text, not an image (an HTML error page or a text file?)", supply)
    for magic, what in _SUPPORTED_MAGIC:
        if data.startswith(magic):
            return _fail(label, "corrupt", f"it starts like a {what} file but its header is damaged", _REEXPORT)
    for offset, magic, what in _KNOWN_OTHER_MAGIC:
        if data[offset:offset + len(magic)] == magic:
            return _fail(label, "unsupported", f"it is {what}, which MediScan does not read",
                         f"Convert it to {_SUPPORTED_TEXT}.")
    return _fail(label, "not_image", "its content is not a recognised image format", supply)


def _open_pil(data: bytes, label: str) -> Image.Image:
    """Image.open restricted to our formats, with PIL's bomb guard mapped to our error.

    Only the header is parsed here. PIL's DecompressionBombWarning (above
    Image.MAX_IMAGE_PIXELS) is silenced because our own max_pixels check, done right
    after, decides; PIL's DecompressionBombError (twice that) cannot be lifted without
    changing a PIL global, which we never do, so it becomes "too_large". The warnings
    filters are process-global (Python < 3.14), hence the lock around this short block.
    """
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except Image.DecompressionBombError as exc:
        raise _fail(label, "too_large", f"its header declares a decompression-bomb size ({_short(exc)})",
                    "Downscale the image before uploading.") from None
    except UnidentifiedImageError:
        raise _not_image(data, label) from None
    except Exception as exc:  # a recognised signature whose header Pillow's parser rejects
        if _is_text(data):  # e.g. a text file that happens to start with "BM"
            raise _not_image(data, label) from None
        raise _classify_pil_error(exc, label) from None


def _classify_pil_error(exc: BaseException, label: str) -> ImageReadError:
    text = str(exc).lower()
    if isinstance(exc, EOFError) or "truncat" in text:
        return _fail(label, "truncated", f"the file ends before all pixels were read ({_short(exc)})", _RECOPY)
    if isinstance(exc, MemoryError):
        return _fail(label, "too_large", "there is not enough memory to decode it", "Downscale the image.")
    if "decoder" in text and "not available" in text:
        return _fail(label, "unsupported", f"it uses an encoding this installation cannot decode ({_short(exc)})",
                     "Re-save it as PNG or as an uncompressed TIFF.")
    return _fail(label, "corrupt", f"the image data is damaged ({_short(exc)})", _REEXPORT)


def _decode_pil(data: bytes, label: str, max_pixels: int, min_side: int) -> DecodedImage:
    im = _open_pil(data, label)
    fmt = "JPEG" if im.format == "MPO" else str(im.format)
    notes: list[str] = []
    try:
        _check_size(label, im.width, im.height, max_pixels, min_side)
        if fmt == "TIFF" and getattr(im, "n_frames", 1) > 1:
            notes.append(f"multi-page TIFF: using page 1 of {im.n_frames}")
        im.load()  # decode fully now so truncation surfaces here (LOAD_TRUNCATED_IMAGES stays off)
        try:
            im = ImageOps.exif_transpose(im)
        except Exception as exc:  # bad EXIF must not reject a good image, but say so
            notes.append(f"EXIF orientation ignored (unreadable: {_short(exc)})")
        colour = _pil_colourfulness(im)
        pixels, bits = _pil_to_gray(im, label)
    except ImageReadError:
        raise
    except Exception as exc:
        raise _classify_pil_error(exc, label) from None
    return _finish(pixels, label, fmt, bits, notes, colourfulness=colour)


def _pil_to_gray(im: Image.Image, label: str) -> tuple[np.ndarray, int]:
    """Pillow image -> (float [0, 1] array, bit depth), following the module's scaling rule."""
    mode = im.mode
    if mode.startswith("I;16"):  # I;16, I;16B, I;16L, I;16N: 16-bit unsigned
        return _stretch(np.asarray(im)), 16
    if mode in ("I", "F"):
        arr = np.asarray(im)
        if mode == "F":
            if not np.isfinite(arr).all():
                raise _fail(label, "corrupt", "it contains NaN or infinite pixel values",
                            "Re-export the image without invalid values.")
            return _stretch(arr), 32
        # 16-bit PNG/TIFF sometimes arrive as 32-bit "I" (older Pillow): report what they hold.
        bits = 16 if arr.min() >= 0 and arr.max() <= 0xFFFF else 32
        return _stretch(arr), bits
    # 8-bit family from here on: divide by 255.
    if mode == "P":  # palette: through RGBA only when it has a transparent entry
        im = im.convert("RGBA" if "transparency" in im.info else "L")
    elif mode in ("PA", "La", "RGBa"):  # palette+alpha and premultiplied alpha
        im = im.convert({"PA": "RGBA", "La": "LA", "RGBa": "RGBA"}[mode])
    elif mode == "LAB":
        im = im.getchannel("L")  # lightness; Pillow cannot convert LAB to L directly
    if im.mode in ("RGBA", "LA"):
        gray = np.asarray(im.convert("L"), dtype=np.float32)
        alpha = np.asarray(im.getchannel("A"), dtype=np.float32)
        return gray * alpha / (255.0 * 255.0), 8  # composite onto black
    if im.mode != "L":
        try:
            im = im.convert("L")
        except ValueError:
            raise _fail(label, "unsupported", f"its pixel mode {im.mode!r} cannot be converted to grayscale",
                        "Re-save it as an 8- or 16-bit grayscale or RGB image.") from None
    return np.asarray(im, dtype=np.float32) / 255.0, 8
