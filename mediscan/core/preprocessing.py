"""The ONE preprocessing: grayscale [0, 1] image -> model input, shared by training and every inference path.

Steps: centre-crop the largest square, resize it to ``input_size`` (area interpolation when shrinking,
so no aliasing), then scale [0, 1] -> [-1024, 1024], the range torchxrayvision's weights were trained on
(``xrv.utils.normalize``). Cropping before resizing keeps the geometry exact, which is what lets a
Grad-CAM heatmap be mapped back onto the image as it was uploaded (:class:`CropGeometry`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch

#: torchxrayvision models expect pixels in [-INPUT_RANGE, INPUT_RANGE].
INPUT_RANGE = 1024.0
DEFAULT_INPUT_SIZE = 224


@dataclass(frozen=True)
class PreprocessConfig:
    """What a checkpoint records about its input, so no entry point hard-codes it."""

    input_size: int = DEFAULT_INPUT_SIZE
    crop: str = "center-square"
    interpolation: str = "area-down/linear-up"
    input_range: float = INPUT_RANGE

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        config = cls(**known)
        if config.crop != "center-square" or config.input_range != INPUT_RANGE:
            raise ValueError(f"unsupported preprocessing in checkpoint: {data}")
        return config


@dataclass(frozen=True)
class CropGeometry:
    """Where the model's square input came from in the original image (pixel coordinates)."""

    original_height: int
    original_width: int
    top: int
    left: int
    side: int          # side of the square crop in original pixels

    @classmethod
    def for_shape(cls, height: int, width: int) -> "CropGeometry":
        side = min(height, width)
        return cls(height, width, (height - side) // 2, (width - side) // 2, side)


def crop_and_resize(pixels: np.ndarray, input_size: int) -> np.ndarray:
    """(H, W) float image -> (input_size, input_size) float32 centre crop, values unchanged in range."""
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {pixels.shape}")
    geometry = CropGeometry.for_shape(*pixels.shape)
    square = pixels[geometry.top:geometry.top + geometry.side, geometry.left:geometry.left + geometry.side]
    square = np.ascontiguousarray(square, dtype=np.float32)
    if geometry.side == input_size:
        return square.copy()
    interpolation = cv2.INTER_AREA if geometry.side > input_size else cv2.INTER_LINEAR
    return cv2.resize(square, (input_size, input_size), interpolation=interpolation)


def scale_to_model_range(pixels01: np.ndarray | torch.Tensor):
    """[0, 1] -> [-1024, 1024] (works on arrays and tensors)."""
    return (pixels01 * 2.0 - 1.0) * INPUT_RANGE


def scale_to_unit_range(model_pixels: np.ndarray | torch.Tensor):
    """The inverse of :func:`scale_to_model_range`: [-1024, 1024] -> [0, 1] (not clipped)."""
    return model_pixels / (2.0 * INPUT_RANGE) + 0.5


def to_uint8(image01: np.ndarray) -> np.ndarray:
    """Float [0, 1] image (any shape) -> uint8, rounded; NaN becomes 0 and out-of-range values are clipped."""
    return np.round(np.clip(np.nan_to_num(np.asarray(image01, dtype=np.float32), nan=0.0), 0.0, 1.0) * 255.0
                    ).astype(np.uint8)


def preprocess(pixels01: np.ndarray, input_size: int = DEFAULT_INPUT_SIZE) -> tuple[torch.Tensor, CropGeometry]:
    """Grayscale image in [0, 1] (any size) -> ``(1, S, S)`` float32 tensor in [-1024, 1024] and its geometry."""
    geometry = CropGeometry.for_shape(*pixels01.shape)
    square = crop_and_resize(pixels01, input_size)
    np.clip(square, 0.0, 1.0, out=square)   # area/linear interpolation stays in range; clip guards float error
    tensor = torch.from_numpy(scale_to_model_range(square)).unsqueeze(0)
    return tensor, geometry
