"""Dataset folders: scan, validate, decode once into tensors, augment batches.

Layout: ``ROOT/{train,val,test}/<class>/<images>``. Class names are the folder names under ``train``
(sorted). ``val`` is optional: without it a stratified, seeded share of ``train`` is held out.
Everything is checked before training starts, and every problem is reported with the files involved.
"""
from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mediscan.core.imaging import ImageReadError, looks_like_image_file, read_image
from mediscan.core.preprocessing import crop_and_resize, scale_to_model_range

SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """The dataset folder cannot be used as it is (the message lists what to fix)."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class DatasetSplits:
    """Files of each split, the class names, and what the checks found."""

    root: Path
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    val_from_train: bool = False
    skipped: list[str] = field(default_factory=list)          # "path: reason" of files left out
    colour: list[str] = field(default_factory=list)           # colour pictures (no radiograph is one)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # identical files in two splits
    fingerprint: dict = field(default_factory=dict)

    def split(self, name: str) -> list[Sample]:
        return getattr(self, name)

    def class_counts(self, name: str) -> dict[str, int]:
        counts = Counter(s.label for s in self.split(name))
        return {c: counts.get(i, 0) for i, c in enumerate(self.classes)}


@dataclass
class TensorSplit:
    """A split decoded once: model-ready images ``(N, 1, S, S)`` in [-1024, 1024] and labels ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor
    paths: list[Path]
    colour_paths: list[Path] = field(default_factory=list)   # files that were colour pictures

    def __len__(self) -> int:
        return len(self.labels)


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def scan_dataset(root: str | Path, *, val_fraction: float = 0.15, seed: int = 0, skip_bad: bool = False,
                 require_test: bool = True) -> DatasetSplits:
    """List and check the dataset. Raises :class:`DatasetError` naming every problem found.

    Checks: the folder and its splits exist, every split has the same classes, no class is empty, every
    file is an image (by name; decoding is checked by :func:`load_split`). Exact duplicate files across
    splits are reported in ``duplicates`` (they leak test answers into training).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Dataset folder {root} does not exist. Expected {root}/train/<class>/*.png "
                           f"(and test/, optionally val/), one sub-folder per class.")
    problems: list[str] = []
    present = {s: root / s for s in SPLITS if (root / s).is_dir()}
    for required in ("train", "test") if require_test else ("train",):
        if required not in present:
            problems.append(f"missing split: {root / required}/ (create it with one sub-folder per class)")
    if problems:
        raise DatasetError("Dataset problems:\n  - " + "\n  - ".join(problems))

    classes = _class_folders(present["train"])
    if len(classes) < 2:
        raise DatasetError(f"{present['train']} has {len(classes)} class folder(s) {classes}; "
                           f"need at least 2 (e.g. bone/ brain/ heart/ lungs/).")
    for split, folder in present.items():
        theirs = _class_folders(folder)
        if theirs != classes:
            missing, extra = sorted(set(classes) - set(theirs)), sorted(set(theirs) - set(classes))
            problems.append(f"{folder}: classes differ from train/ (missing {missing or 'none'}, "
                            f"extra {extra or 'none'})")
    if problems:
        raise DatasetError("Dataset problems:\n  - " + "\n  - ".join(problems))

    files: dict[str, list[Sample]] = {}
    not_images: list[str] = []
    for split, folder in present.items():
        files[split] = []
        for label, name in enumerate(classes):
            class_files = _files_in(folder / name)
            images = [p for p in class_files if looks_like_image_file(p)]
            image_set = set(images)
            not_images += [f"{p}: not an image file (supported: PNG, JPEG, BMP, TIFF, DICOM)"
                           for p in class_files if p not in image_set]
            if not images:
                problems.append(f"empty class: {folder / name}/ has no image files")
            files[split] += [Sample(p, label) for p in images]
    if not_images and not skip_bad:
        problems += not_images
    if problems:
        hint = "\n(--skip-bad leaves out unreadable or non-image files and lists them)" if not_images else ""
        raise DatasetError("Dataset problems:\n  - " + "\n  - ".join(problems) + hint)

    val_from_train = "val" not in files
    if val_from_train:
        files["train"], files["val"] = stratified_split(files["train"], val_fraction, seed)
    splits = DatasetSplits(root=root, classes=classes, train=files["train"], val=files["val"],
                           test=files.get("test", []), val_from_train=val_from_train,
                           skipped=not_images if skip_bad else [])
    digests = {s.path: _file_digest(s.path) for name in SPLITS for s in splits.split(name)}
    splits.duplicates = find_cross_split_duplicates(splits, digests)
    splits.fingerprint = dataset_fingerprint(splits, digests)
    return splits


def stratified_split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``fraction`` of each class (at least one image per class), reproducibly."""
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"--val-fraction must be between 0 and 1, got {fraction}")
    by_label: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_label[sample.label].append(sample)
    rng = random.Random(seed)
    keep, held_out = [], []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda s: str(s.path))
        rng.shuffle(group)
        n_val = max(1, round(len(group) * fraction)) if len(group) > 1 else 0
        held_out += group[:n_val]
        keep += group[n_val:]
    return keep, held_out


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_cross_split_duplicates(splits: DatasetSplits, digests: dict[Path, str]) -> list[tuple[str, str]]:
    """Pairs of byte-identical files that sit in two different splits."""
    first_seen: dict[str, tuple[str, Path]] = {}
    pairs = []
    for name in SPLITS:
        for sample in splits.split(name):
            digest = digests[sample.path]
            if digest in first_seen and first_seen[digest][0] != name:
                pairs.append((str(first_seen[digest][1]), str(sample.path)))
            first_seen.setdefault(digest, (name, sample.path))
    return pairs


def dataset_fingerprint(splits: DatasetSplits, digests: dict[Path, str]) -> dict:
    """File count and a hash over (split, class, relative path, content hash) of every file."""
    hasher = hashlib.sha256()
    count = 0
    for name in SPLITS:
        for sample in sorted(splits.split(name), key=lambda s: str(s.path)):
            rel = sample.path.relative_to(splits.root).as_posix()
            hasher.update(f"{name}\t{splits.classes[sample.label]}\t{rel}\t{digests[sample.path]}\n".encode())
            count += 1
    return {"files": count, "sha256": hasher.hexdigest(),
            "counts": {name: splits.class_counts(name) for name in SPLITS}}


def load_split(samples: list[Sample], input_size: int, *, workers: int = 2, skip_bad: bool = False,
               progress=None) -> tuple[TensorSplit, list[str]]:
    """Decode and preprocess every image once (in parallel threads).

    Returns the tensors and the "path: reason" list of files left out. Unreadable files raise
    :class:`DatasetError` listing all of them, unless ``skip_bad``.
    """
    def decode(sample: Sample):
        try:
            decoded = read_image(sample.path)
        except ImageReadError as exc:
            return sample, None, False, str(exc)
        return sample, crop_and_resize(decoded.pixels, input_size), decoded.is_colour, None

    kept, arrays, bad, colour = [], [], [], []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for sample, array, is_colour, error in pool.map(decode, samples):
            if progress is not None:
                progress.update(1)
            if error:
                bad.append(f"{sample.path}: {error}")
            else:
                kept.append(sample)
                arrays.append(array)
                if is_colour:
                    colour.append(sample.path)
    if bad and not skip_bad:
        raise DatasetError(f"{len(bad)} file(s) could not be read:\n  - " + "\n  - ".join(bad) +
                           "\n(--skip-bad leaves them out and lists them)")
    if arrays:
        stacked = np.clip(np.stack(arrays), 0.0, 1.0)
        images = torch.from_numpy(scale_to_model_range(stacked)).unsqueeze(1).float()
    else:
        images = torch.empty(0, 1, input_size, input_size)
    labels = torch.tensor([s.label for s in kept], dtype=torch.long)
    return TensorSplit(images, labels, [s.path for s in kept], colour), bad
