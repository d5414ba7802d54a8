"""Training augmentation on model-range tensors, on whatever device the batch lives (graph-capturable)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mediscan.core.preprocessing import scale_to_model_range, scale_to_unit_range


def augment_batch(images: torch.Tensor, generator: torch.Generator | None = None, *,
                  max_rotation_deg: float = 10.0, max_scale: float = 0.1, max_shift: float = 0.06,
                  max_brightness: float = 0.1, max_contrast: float = 0.15) -> torch.Tensor:
    """Small random rotation/scale/shift and brightness/contrast, per image, on whatever device the batch is.

    ``generator`` (optional) must live on the batch's device; without one the device's default RNG is used.

    Works in [0, 1] space so that the border revealed by a rotation or shift is black, as X-ray
    backgrounds are, and returns model-range tensors again.
    """
    n, device = images.shape[0], images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        # Drawn on the batch's device (generator too, if given) so the whole step can be graph-captured.
        return torch.rand(n, generator=generator, device=device).mul(high - low).add(low)

    pixels01 = scale_to_unit_range(images)
    angle = uniform(-max_rotation_deg, max_rotation_deg) * (math.pi / 180.0)
    scale = uniform(1.0 - max_scale, 1.0 + max_scale)
    shift_x, shift_y = uniform(-max_shift, max_shift) * 2, uniform(-max_shift, max_shift) * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    pixels01 = F.grid_sample(pixels01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = uniform(1.0 - max_contrast, 1.0 + max_contrast).view(n, 1, 1, 1)
    brightness = uniform(-max_brightness, max_brightness).view(n, 1, 1, 1)
    pixels01 = ((pixels01 - 0.5) * contrast + 0.5 + brightness).clamp_(0.0, 1.0)
    return scale_to_model_range(pixels01)
