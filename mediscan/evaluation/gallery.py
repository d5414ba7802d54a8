"""Evaluation gallery: a grid of Grad-CAM overlays, correct and misclassified, for the training report.

Each tile is the model's input (the centre crop, resized) with the heatmap of the *predicted* class on
top, titled ``true: X / pred: Y (p%)``; misclassified tiles have a red title.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import grad_cam
from mediscan.core.preprocessing import preprocess, scale_to_unit_range
from mediscan.core.runtime import predict_split
from mediscan.evaluation.figures import new_figure
from mediscan.explain.overlays import overlay

#: Tile size in pixels (the PNG is ``columns * TILE_WIDTH_PX`` by ``rows * TILE_HEIGHT_PX``).
TILE_WIDTH_PX = 240
TILE_HEIGHT_PX = 270
MAX_COLUMNS = 4
DPI = 100
_BATCH = 8          # bounds memory at 224 px inputs
CORRECT_COLOR = "black"
WRONG_COLOR = "red"


#: Tiles in a gallery: half misclassified, half correct where both exist.
GALLERY_ITEMS = 16


def select_items(true_indices: Sequence[int], predicted: Sequence[int], max_items: int) -> list[int]:
    """Pick up to ``max_items`` sample indices, half misclassified and half correct where both exist
    (the other group fills any shortfall), each group in its original order; returned sorted."""
    if max_items <= 0:
        return []
    wrong = [i for i, (t, p) in enumerate(zip(true_indices, predicted)) if t != p]
    right = [i for i, (t, p) in enumerate(zip(true_indices, predicted)) if t == p]
    n_wrong = min(len(wrong), max(max_items // 2, max_items - len(right)))
    n_right = min(len(right), max_items - n_wrong)
    return sorted(wrong[:n_wrong] + right[:n_right])


def tile_title(true_index: int, predicted: int, probability: float, classes: Sequence[str]) -> tuple[str, str]:
    """``("true: X / pred: Y (p%)", colour)`` with a red colour for a misclassified item."""
    text = f"true: {classes[true_index]} / pred: {classes[predicted]} ({100.0 * probability:.0f}%)"
    return text, (CORRECT_COLOR if true_index == predicted else WRONG_COLOR)


def save_gradcam_gallery(model: torch.nn.Module, samples: Sequence[tuple[np.ndarray, int, str]],
                         classes: Sequence[str], path: str | Path, input_size: int,
                         max_items: int = GALLERY_ITEMS, logits: torch.Tensor | None = None) -> Path:
    """Write a PNG grid of Grad-CAM overlays for ``samples`` and return its path.

    Args:
        model: eval-mode classifier (``grad_cam.grad_cam`` raises on a model in training mode).
        samples: ``(pixels01 (H, W) in [0, 1], true_index, name)`` triples, any image size.
        classes: class names, index -> name.
        path: where to write the PNG (parent folders are created).
        input_size: the model's input side ``S`` (from the checkpoint's preprocessing).
        max_items: at most this many tiles; misclassified and correct items are both shown when available.
        logits: ``(len(samples), C)`` logits the caller already has (an evaluation's, from the device it ran
            on). Tiles are then chosen, titled and explained by them, so that the gallery shows what the
            evaluation counted: a recompute here, on another device or precision, can flip a borderline item.
            ``None``: computed here.
    """
    if not samples:
        raise ValueError("no samples to draw")
    inputs = torch.stack([preprocess(np.asarray(pixels, dtype=np.float32), input_size)[0]
                          for pixels, _, _ in samples])
    true_indices = [int(true) for _, true, _ in samples]
    if logits is None:      # predictions only, to choose which items to show
        logits, _ = predict_split(model, inputs, _BATCH, next(model.parameters()).device)
    logits = torch.as_tensor(logits).detach().float().cpu()
    if logits.shape != (len(samples), len(classes)):
        raise ValueError(f"logits must be ({len(samples)}, {len(classes)}) for {len(samples)} samples "
                         f"of {len(classes)} classes, got {tuple(logits.shape)}")
    chosen = select_items(true_indices, logits.argmax(dim=1).tolist(), max_items)
    predicted = logits[chosen].argmax(dim=1)
    # Heatmaps of the class each tile is titled with (fast path: one forward per chunk).
    cams = [grad_cam.grad_cam(model, inputs[chosen[i:i + _BATCH]], classes=predicted[i:i + _BATCH]).cams
            for i in range(0, len(chosen), _BATCH)]
    tiles = [(inputs[index, 0].numpy(), samples[index][2], true_indices[index]) for index in chosen]
    return _draw(tiles, logits[chosen], torch.cat(cams).numpy(), classes, Path(path))


def _draw(tiles: list[tuple[np.ndarray, str, int]], logits: torch.Tensor, cams: np.ndarray,
          classes: Sequence[str], path: Path) -> Path:
    """The grid: per tile ``(model input, name, true index)`` its overlay, titled with truth and prediction."""
    probabilities = torch.softmax(logits, dim=1)
    predicted = logits.argmax(dim=1).tolist()
    columns = min(MAX_COLUMNS, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    figure = new_figure(dpi=DPI, figsize=(columns * TILE_WIDTH_PX / DPI, rows * TILE_HEIGHT_PX / DPI))
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for slot, (model_input, name, true_index) in enumerate(tiles):
        ax = axes[slot // columns][slot % columns]
        ax.imshow(overlay(scale_to_unit_range(model_input), cams[slot]))      # on the crop the model saw
        text, colour = tile_title(true_index, predicted[slot], float(probabilities[slot, predicted[slot]]), classes)
        ax.set_title(f"{name}\n{text}", color=colour, fontsize=7,
                     fontweight="bold" if colour == WRONG_COLOR else "normal")
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.05, hspace=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No bbox_inches="tight": the PNG keeps the documented pixel size.
    figure.savefig(path, format="png", dpi=DPI)
    return path
