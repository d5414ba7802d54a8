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

DICOM is parsed from memory (uploads never touch the disk); multi-frame files give frame
1 plus a warning, with frame 1's rescale and window when an enhanced file keeps them in
functional groups; MONOCHROME1 is inverted so that bone is bright; a compressed transfer
syntax without an installed decoder plugin is reported with the pip package to add.

Colour is reduced to luminance (ITU-R 601-2, Pillow's "L" conversion). Alpha is
composited onto black: a transparent pixel carries no signal, and black is the
background of a radiograph.

Privacy: nothing here logs or prints pixel data, and nothing but the DICOM Modality tag
leaves this module -- no patient names, IDs or dates.
"""
from __future__ import annotations

import io
import os
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # pydicom >= 3
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array
except ImportError:  # pydicom 2.x (requirements allow >= 2.4)
    from pydicom.pixel_data_handlers.util import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space

    get_decoder = pixel_array = None

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MIN_SIDE",
    "SUPPORTED_SUFFIXES",
    "DecodedImage",
    "ImageReadError",
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
_RECOPY = "The transfer was probably cut off; copy the file again."
# Serialises our temporary change of the (process-global) warnings filters; see _open_pil.
_WARNINGS_LOCK = threading.Lock()


class ImageReadError(ValueError):
    """User-facing decoding error.

    ``str(err)`` is a complete sentence naming the source, the problem and what to do.
    Attributes: ``source`` (file name / label), ``reason`` (one of "missing", "empty",
    "not_image", "truncated", "too_large", "too_small", "no_pixel_data", "unsupported",
    "corrupt") and ``hint`` (what to do).

    The message is the only positional argument, so the error survives pickling and
    torch's DataLoader worker re-raise (which calls ``type(err)(message)``).
    """

    def __init__(self, message: str, *, source: str = "<input>", reason: str = "corrupt", hint: str = ""):
        super().__init__(message)
        self.source = source
        self.reason = reason
        self.hint = hint


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image: float32 (H, W) grayscale in [0, 1], C-contiguous."""

    pixels: np.ndarray
    source: str
    format: str  # "PNG", "JPEG", "TIFF", "BMP", "DICOM"
    bit_depth: int  # 8, 16 or 32
    warnings: tuple[str, ...] = ()
    modality: str | None = None  # DICOM Modality (e.g. "CR"); never any patient field
    colourfulness: float = 0.0  # of the colour image before grayscale conversion (0 for grayscale files)

    @property
    def is_colour(self) -> bool:
        """A colour picture (colourfulness above :data:`COLOUR_LIMIT`), which no radiograph is."""
        return self.colourfulness > COLOUR_LIMIT


def _fail(source: str, reason: str, problem: str, hint: str) -> ImageReadError:
    return ImageReadError(f"Cannot read image '{source}': {problem}. {hint}", source=source, reason=reason, hint=hint)


def _clean_label(text: str) -> str:
    # Upload names come from clients: keep messages one printable line of sane length.
    text = "".join(c if c.isprintable() else "?" for c in str(text))
    return text if len(text) <= 200 else text[:197] + "..."


def _short(exc: BaseException) -> str:
    msg = _clean_label(str(exc) or type(exc).__name__)
    return f"{type(exc).__name__}: {msg}"


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
    if _is_dicom(data):
        return _decode_dicom(data, label, max_pixels, min_side)
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


def _check_size(label: str, width: int, height: int, max_pixels: int, min_side: int) -> None:
    """Reject bombs and thumbnails from the header size, before decoding pixels."""
    if width * height > max_pixels:
        raise _fail(label, "too_large",
                    f"it is {width}x{height} = {width * height:,} pixels, more than the limit of {max_pixels:,}",
                    "Downscale the image (or raise max_pixels if it is genuine).")
    if min(width, height) < min_side:
        raise _fail(label, "too_small",
                    f"it is only {width}x{height} pixels; each side must be at least {min_side}",
                    "Use the full-resolution image, not a thumbnail or icon.")


def _stretch(arr: np.ndarray) -> np.ndarray:
    """Min-max stretch to float32 [0, 1]; a constant image gives zeros."""
    arr = arr.astype(np.float64, copy=False)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.float32)
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _finish(pixels: np.ndarray, label: str, fmt: str, bits: int, notes: list[str], modality=None,
            colourfulness: float = 0.0) -> DecodedImage:
    if pixels.ndim != 2:
        raise _fail(label, "unsupported", f"decoding gave an array of shape {pixels.shape}, not a 2-D image",
                    "Export the image as a single-frame grayscale PNG.")
    return DecodedImage(np.ascontiguousarray(pixels, dtype=np.float32), label, fmt, bits, tuple(notes), modality,
                        colourfulness)


# Colour is kept as a measurement, not as pixels: radiographs are grayscale, so a colourful upload (a photo,
# a stained slide) is strong evidence that the image is out of scope whatever the classifier says.
# Colourfulness is a global statistic, so every k-th pixel estimates it: a nearest-neighbour subsample
# keeps pixel values as they are (a box-filtered thumbnail would average colour noise away) and costs ~4 ms
# on a 9-megapixel photo instead of ~50.
_COLOUR_SAMPLE_SIDE = 256
#: Colourfulness above which an image counts as a colour picture. Gray pixels score 0 and JPEG chroma noise on
#: a gray image stays near 0.01; ordinary colour photos score 0.15 and more. 0.1 leaves room for a faint tint
#: (a scanned film) and for small coloured annotations.
COLOUR_LIMIT = 0.1


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler and Suesstrunk's colourfulness of an (H, W, 3) RGB array in [0, 1]: 0 for gray pixels
    (R = G = B), about 0.06 for a slightly coloured photo, 0.15 and above for an ordinary colour photo."""
    rgb = np.asarray(rgb, dtype=np.float32)
    red_green = rgb[..., 0] - rgb[..., 1]
    yellow_blue = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    spread = np.hypot(red_green.std(), yellow_blue.std())
    mean = np.hypot(red_green.mean(), yellow_blue.mean())
    return float(spread + 0.3 * mean)


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


# ----------------------------------------------------------------------------- DICOM


def _is_dicom(data: bytes) -> bool:
    # Part-10 files carry "DICM" after a 128-byte preamble (which may itself be a TIFF
    # header in dual-personality files, so this check comes before Pillow's).
    return data[128:132] == b"DICM"


def _decoder_packages(uid: str) -> str:
    """The pip command that adds a decoder for this transfer syntax (for the hint)."""
    if uid.startswith("1.2.840.10008.1.2.4.9") or uid.startswith("1.2.840.10008.1.2.4.20"):
        return "pip install pylibjpeg pylibjpeg-openjpeg (or pip install python-gdcm)"
    if uid == "1.2.840.10008.1.2.5":
        return "pip install pylibjpeg pylibjpeg-rle"
    return "pip install pylibjpeg pylibjpeg-libjpeg (or pip install python-gdcm)"


def _decoder_missing(ts) -> bool:
    """True when ``ts`` is compressed and no installed pydicom plugin can decode it."""
    if ts is None:
        return False
    try:
        if not ts.is_compressed:
            return False
    except ValueError:  # not a transfer syntax pydicom knows (private or damaged UID)
        return True
    if get_decoder is None:  # pydicom 2.x
        handlers = pydicom.config.pixel_data_handlers
        return not any(h.is_available() and h.supports_transfer_syntax(ts) for h in handlers)
    try:
        return not get_decoder(ts).is_available
    except NotImplementedError:  # a transfer syntax pydicom has no decoder for at all
        return True


def _decode_dicom(data: bytes, label: str, max_pixels: int, min_side: int) -> DecodedImage:
    export = "export the image as PNG or uncompressed DICOM"
    try:
        ds = pydicom.dcmread(io.BytesIO(data))  # from memory: uploads never touch the disk
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise _fail(label, "no_pixel_data",
                        "the DICOM file has no pixel data (it is a report or other non-image object, or it is cut off)",
                        "Choose the DICOM image file of the study.")
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if _decoder_missing(ts):
            raise _fail(label, "unsupported",
                        f"its transfer syntax '{_clean_label(ts.name)}' ({_clean_label(ts)}) needs a decoder plugin "
                        "that is not installed",
                        f"Run '{_decoder_packages(str(ts))}', or {export}.")
        if "Rows" not in ds or "Columns" not in ds:
            raise _fail(label, "corrupt", "the DICOM header has no image size (Rows/Columns)",
                        f"Check the file in a DICOM viewer, or {export}.")
        rows, cols = int(ds.Rows), int(ds.Columns)
        _check_size(label, cols, rows, max_pixels, min_side)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
        modality = _clean_label(ds.get("Modality", "") or "").strip() or None
        arr = _first_frame(ds, frames)
        colour = 0.0
        colour_bits = int(ds.get("BitsStored", 8) or 8)  # full scale of the RGB values below
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
        else:  # RGB (pydicom >= 3 has already converted YBR to RGB)
            rgb = arr[..., :3].astype(np.float64)
            step = max(1, max(rows, cols) // _COLOUR_SAMPLE_SIDE)
            colour = colourfulness(rgb[::step, ::step] / float(2 ** colour_bits - 1))
            arr = rgb @ np.array([0.299, 0.587, 0.114])
        pixels = _stretch(arr)
        bits = int(ds.get("BitsAllocated", 16) or 16)
    except ImageReadError:
        raise
    except Exception as exc:
        text = str(exc).lower()
        if isinstance(exc, EOFError) or any(s in text for s in ("truncat", "less than expected", "shorter than")):
            raise _fail(label, "truncated", f"the DICOM file ends too early ({_short(exc)})", _RECOPY) from None
        raise _fail(label, "corrupt", f"the DICOM data cannot be decoded ({_short(exc)})",
                    f"Check the file in a DICOM viewer, or {export}.") from None
    notes = [f"multi-frame DICOM: using frame 1 of {frames}"] if frames > 1 else []
    return _finish(pixels, label, "DICOM", 8 if bits <= 8 else 16 if bits <= 16 else 32, notes, modality,
                   colourfulness=colour)


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


def _first_frame(ds, frames: int) -> np.ndarray:
    """Decoded pixels of frame 1 (RGB for colour data)."""
    if pixel_array is not None:  # pydicom >= 3 decodes only the frame asked for
        return pixel_array(ds, index=0 if frames > 1 else None)
    arr = ds.pixel_array  # pydicom 2.x: decodes every frame, and leaves YBR as it is
    if frames > 1:
        arr = arr[0]
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric.startswith("YBR_FULL"):
        arr = convert_color_space(arr, photometric, "RGB")
    return arr
