"""Heatmap rendering: colourise a [0, 1] map, blend it over an image, encode PNG (all RGB, uint8)."""
from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

from mediscan.core.preprocessing import to_uint8


def _colormap_code(colormap: str) -> int:
    code = getattr(cv2, f"COLORMAP_{str(colormap).upper()}", None)
    if code is None:
        names = sorted(n[9:].lower() for n in dir(cv2) if n.startswith("COLORMAP_"))
        raise ValueError(f"unknown colormap {colormap!r}; OpenCV has {', '.join(names)}")
    return code


def colorize(heatmap: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """``(H, W)`` map in [0, 1] -> ``(H, W, 3)`` uint8 **RGB** (OpenCV's BGR output is converted).

    NaN and out-of-range values are clipped, so an all-zero map gives a flat colour image.
    """
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {heat.shape}")
    heat = np.clip(np.nan_to_num(heat, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    levels = np.round(heat * 255.0).astype(np.uint8)
    bgr = cv2.applyColorMap(levels, _colormap_code(colormap))
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def overlay(image01: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4, colormap: str = "jet") -> np.ndarray:
    """Blend a colourised heatmap over an image: ``(1 - alpha) * image + alpha * colour``, RGB uint8.

    ``image01``: ``(H, W)`` grayscale or ``(H, W, 3)`` RGB in [0, 1]; ``heatmap``: ``(H, W)`` in [0, 1] with
    the same ``H, W`` (use :func:`cam_to_original` first for an uploaded image -- a plain resize would
    misplace the map on non-square images).
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = np.asarray(image01, dtype=np.float32)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W) or (H, W, 3), got shape {np.shape(image01)}")
    heat = np.asarray(heatmap)
    if heat.shape != image.shape[:2]:
        raise ValueError(f"heatmap shape {heat.shape} differs from image shape {image.shape[:2]}; "
                         f"map it with cam_to_original first")
    image = np.clip(np.nan_to_num(image, nan=0.0), 0.0, 1.0)
    colour = colorize(heat, colormap).astype(np.float32) / 255.0
    blended = (1.0 - float(alpha)) * image + float(alpha) * colour
    return to_uint8(blended)


def png_bytes(rgb_or_gray: np.ndarray) -> bytes:
    """Encode ``(H, W)`` gray or ``(H, W, 3)`` RGB (uint8, or float in [0, 1]) as PNG bytes."""
    array = np.asarray(rgb_or_gray)
    if array.dtype != np.uint8:
        array = to_uint8(array)
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"expected (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()
