"""Shared test helpers: tiny synthetic datasets and checkpoints, made fresh by the tests themselves."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:      # the top-level scripts (app.py, grad_cam.py, ...) live in the repo root
    sys.path.insert(0, str(ROOT))

CLASSES = ("bone", "brain", "heart", "lungs")


def pattern_image(label: int, size: int = 40, rng: np.random.Generator | None = None) -> np.ndarray:
    """A uint8 image whose class is easy to learn: each class has its own texture, plus noise and jitter."""
    rng = rng or np.random.default_rng()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if label == 0:
        base = 0.5 + 0.5 * np.sin(yy / 2.0 + phase)                     # horizontal stripes
    elif label == 1:
        base = 0.5 + 0.5 * np.sin(xx / 2.0 + phase)                     # vertical stripes
    elif label == 2:
        cy, cx = size / 2 + rng.uniform(-3, 3, 2)
        base = (((yy - cy) ** 2 + (xx - cx) ** 2) < (size / 4) ** 2).astype(np.float32)  # bright disc
    else:
        base = ((xx + yy) / (2 * size)).astype(np.float32)               # smooth diagonal ramp
    noisy = base * 0.8 + rng.normal(0, 0.05, base.shape)
    return (np.clip(noisy, 0, 1) * 255).astype(np.uint8)


def make_dataset(root: Path, *, per_class: int = 6, splits=("train", "val", "test"), classes=CLASSES,
                 size: int = 40, seed: int = 0, suffix: str = ".png") -> Path:
    """Write ``root/{split}/{class}/img_k.png`` with learnable synthetic images; returns root."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                Image.fromarray(pattern_image(label % 4, size, rng)).save(folder / f"{name}_{split}_{k}{suffix}")
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "dataset")
