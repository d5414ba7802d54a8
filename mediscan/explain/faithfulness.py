"""Faithfulness of a Grad-CAM map: does removing what the map highlights change the prediction?"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from grad_cam import check_eval, class_index_tensor, model_device

#: Replacement for removed pixels: 0.0 in the model's [-1024, 1024] range is mid-grey. A fixed value
#: (rather than each image's mean) makes scores comparable across images, and for X-rays the mean sits in
#: the dark background, so "removing" with it would look like adding more background.
NEUTRAL_VALUE = 0.0

# Feature-map stride of DenseNet121: random masks are drawn at this granularity so that they are blobs
# like a Grad-CAM map, not salt-and-pepper noise (scattered pixels are a different, harsher perturbation).
_RANDOM_MASK_STRIDE = 32


def _removal_masks(cams: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W) maps -> two (B, H, W) bool masks of exactly ``round(fraction * H * W)`` pixels each:
    the highest-scoring pixels of each map, and those of a seeded random smooth map."""
    batch, height, width = cams.shape
    count = int(round(fraction * height * width))
    generator = torch.Generator().manual_seed(int(seed))
    low = torch.rand((batch, 1, max(1, height // _RANDOM_MASK_STRIDE), max(1, width // _RANDOM_MASK_STRIDE)),
                     generator=generator)
    # A little pixel-level noise breaks ties in the upsampled random map deterministically.
    noise = torch.rand((batch, height, width), generator=generator) * 1e-4
    random_map = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)[:, 0] + noise

    def top(maps: torch.Tensor) -> torch.Tensor:
        flat = maps.reshape(batch, -1).float()
        mask = torch.zeros_like(flat, dtype=torch.bool)
        if count > 0:
            mask.scatter_(1, flat.topk(count, dim=1).indices, True)
        return mask.reshape(batch, height, width)

    return top(cams.detach().cpu()), top(random_map)


def faithfulness(model: nn.Module, inputs: torch.Tensor, cams: torch.Tensor, classes, *,
                 fraction: float = 0.2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Probability drop when the most-highlighted pixels are removed, against removing random ones.

    For each item, the ``fraction`` of input pixels with the highest map values is set to
    :data:`NEUTRAL_VALUE` (mid-grey); separately, the same number of pixels chosen by a seeded random
    blob-like mask. The intact, top-removed and random-removed inputs go through the model in ONE batched
    forward. A faithful map gives ``drop_top`` clearly above ``drop_random``.

    Args:
        model: eval-mode classifier (same requirement as :func:`grad_cam`).
        inputs: ``(B, 1, S, S)`` model inputs; ``cams``: ``(B, S, S)`` upsampled maps (``CamResult.cams``).
        classes: the class each map explains (``CamResult.class_indices``), an int, or ``B`` ints.

    Returns:
        ``prob``, ``prob_top_removed``, ``prob_random_removed``, ``drop_top``, ``drop_random``: each
        ``(B,)`` float32 on the CPU (softmax probabilities of the class).
    """
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    check_eval(model)
    if inputs.ndim != 4:
        raise ValueError(f"inputs must be (B, C, H, W), got {tuple(inputs.shape)}")
    cams = torch.as_tensor(cams)
    batch, _, height, width = inputs.shape
    if tuple(cams.shape) != (batch, height, width):
        raise ValueError(f"cams must be (B, H, W) = {(batch, height, width)}, got {tuple(cams.shape)}")
    device = model_device(model) or inputs.device
    inputs = inputs.detach().to(device)
    top_mask, random_mask = (m.to(device)[:, None] for m in _removal_masks(cams, fraction, seed))
    neutral = torch.full_like(inputs, NEUTRAL_VALUE)
    batched = torch.cat([inputs, torch.where(top_mask, neutral, inputs), torch.where(random_mask, neutral, inputs)])
    with torch.no_grad():
        probs = torch.softmax(model(batched).float(), dim=1).cpu()
    class_indices = class_index_tensor(classes, probs[:batch]).cpu()
    picked = probs.reshape(3, batch, -1).gather(2, class_indices.expand(3, batch)[:, :, None])[:, :, 0]
    prob, prob_top, prob_random = picked
    return {"prob": prob, "prob_top_removed": prob_top, "prob_random_removed": prob_random,
            "drop_top": prob - prob_top, "drop_random": prob - prob_random}
