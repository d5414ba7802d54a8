"""What a decoder returns (:class:`DecodedImage`), how it fails (:class:`ImageReadError`), and the helpers
that the Pillow path (:mod:`mediscan.core.imaging`) and the DICOM path (:mod:`mediscan.core.dicom_pixels`)
share, so that both follow one scaling rule and one message style.

Every failure is a complete, user-facing sentence: which input, what is wrong, what to do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the type only: dicom_header imports nothing of this module
    from mediscan.core.dicom_header import DicomHeader

__all__ = ["COLOUR_LIMIT", "COLOUR_SAMPLE_SIDE", "DecodedImage", "ImageReadError", "colourfulness"]

RECOPY = "The transfer was probably cut off; copy the file again."
# Colourfulness is a global statistic, so every k-th pixel estimates it: a nearest-neighbour subsample
# keeps pixel values as they are (a box-filtered thumbnail would average colour noise away) and costs ~4 ms
# on a 9-megapixel photo instead of ~50.
COLOUR_SAMPLE_SIDE = 256
#: Colourfulness above which an image counts as a colour picture. Gray pixels score 0 and JPEG chroma noise on
#: a gray image stays near 0.01; ordinary colour photos score 0.15 and more. 0.1 leaves room for a faint tint
#: (a scanned film) and for small coloured annotations.
COLOUR_LIMIT = 0.1


class ImageReadError(ValueError):
    """User-facing decoding error.

    ``str(err)`` is a complete sentence naming the source, the problem and what to do.
    Attributes: ``source`` (file name / label), ``reason`` (one of "missing", "empty",
    "not_image", "truncated", "too_large", "too_small", "no_pixel_data", "unsupported",
    "corrupt"), ``problem`` (what is wrong, the middle of the message), ``hint`` (what to do) and
    ``dicom``: the header summary of a DICOM file whose header was
    read but whose pixels cannot be used (``None`` otherwise), so that the modality gate can still answer
    for a report or other non-image object instead of calling it unreadable.

    The message is the only positional argument, so the error survives pickling and
    torch's DataLoader worker re-raise (which calls ``type(err)(message)``).
    """

    def __init__(self, message: str, *, source: str = "<input>", reason: str = "corrupt", problem: str = "",
                 hint: str = "", dicom: DicomHeader | None = None):
        super().__init__(message)
        self.source = source
        self.reason = reason
        self.problem = problem or message
        self.hint = hint
        self.dicom = dicom


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image: float32 (H, W) grayscale in [0, 1], C-contiguous.

    ``dicom`` is the header summary of a DICOM input (UIDs, Modality, BodyPartExamined, descriptions:
    never a patient field), ``None`` for every other format.
    """

    pixels: np.ndarray
    source: str
    format: str  # "PNG", "JPEG", "TIFF", "BMP", "DICOM"
    bit_depth: int  # 8, 16 or 32 (0 for a header-only object: see header_only)
    warnings: tuple[str, ...] = ()
    modality: str | None = None  # DICOM Modality (e.g. "CR"); never any patient field
    colourfulness: float = 0.0  # of the colour image before grayscale conversion (0 for grayscale files)
    dicom: DicomHeader | None = None

    @property
    def is_colour(self) -> bool:
        """A colour picture (colourfulness above :data:`COLOUR_LIMIT`), which no radiograph is."""
        return self.colourfulness > COLOUR_LIMIT


def header_only(error: ImageReadError) -> DecodedImage:
    """The :class:`DecodedImage` of a DICOM object whose header was read but whose pixels cannot be used
    (``error.dicom`` set): no pixels (a 0 x 0 array, bit depth 0), its header summary, and why there are no
    pixels as its warning. Only for inputs the modality gate stops, which never reach the network."""
    if error.dicom is None:
        raise ValueError("header_only needs an ImageReadError that carries a DICOM header summary")
    return DecodedImage(np.zeros((0, 0), np.float32), error.source, "DICOM", 0,
                        (f"no usable pixels: {error.problem}.",),
                        error.dicom.modality or None, 0.0, error.dicom)


def fail(source: str, reason: str, problem: str, hint: str) -> ImageReadError:
    """The error for ``source``: "Cannot read image '<source>': <problem>. <hint>"."""
    return ImageReadError(f"Cannot read image '{source}': {problem}. {hint}", source=source, reason=reason,
                          problem=problem, hint=hint)


def clean_label(text: str) -> str:
    """One printable line of sane length (upload names and header strings come from clients)."""
    text = "".join(c if c.isprintable() else "?" for c in str(text))
    return text if len(text) <= 200 else text[:197] + "..."


def short(exc: BaseException) -> str:
    """``"TypeName: message"`` of an exception, cleaned for a one-line message."""
    msg = clean_label(str(exc) or type(exc).__name__)
    return f"{type(exc).__name__}: {msg}"


def check_size(label: str, width: int, height: int, max_pixels: int, min_side: int) -> None:
    """Reject bombs and thumbnails from the header size, before decoding pixels."""
    if width * height > max_pixels:
        raise fail(label, "too_large",
                   f"it is {width}x{height} = {width * height:,} pixels, more than the limit of {max_pixels:,}",
                   "Downscale the image (or raise max_pixels if it is genuine).")
    if min(width, height) < min_side:
        raise fail(label, "too_small",
                   f"it is only {width}x{height} pixels; each side must be at least {min_side}",
                   "Use the full-resolution image, not a thumbnail or icon.")


def stretch(arr: np.ndarray) -> np.ndarray:
    """Min-max stretch to float32 [0, 1]; a constant image gives zeros."""
    arr = arr.astype(np.float64, copy=False)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.float32)
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def finish(pixels: np.ndarray, label: str, fmt: str, bits: int, notes: list[str], modality=None,
           colourfulness: float = 0.0, dicom: DicomHeader | None = None) -> DecodedImage:
    """Wrap a 2-D array as a :class:`DecodedImage` (anything else is an "unsupported" error)."""
    if pixels.ndim != 2:
        raise fail(label, "unsupported", f"decoding gave an array of shape {pixels.shape}, not a 2-D image",
                   "Export the image as a single-frame grayscale PNG.")
    return DecodedImage(np.ascontiguousarray(pixels, dtype=np.float32), label, fmt, bits, tuple(notes), modality,
                        colourfulness, dicom)


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler and Suesstrunk's colourfulness of an (H, W, 3) RGB array in [0, 1]: 0 for gray pixels
    (R = G = B), about 0.06 for a slightly coloured photo, 0.15 and above for an ordinary colour photo."""
    rgb = np.asarray(rgb, dtype=np.float32)
    red_green = rgb[..., 0] - rgb[..., 1]
    yellow_blue = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    spread = np.hypot(red_green.std(), yellow_blue.std())
    mean = np.hypot(red_green.mean(), yellow_blue.mean())
    return float(spread + 0.3 * mean)
