"""Dataset folders: scan and check them (:func:`scan_dataset`), decode a split once into uint8 (:func:`load_split`).

Layout: ``ROOT/{train,val,test}/<class>/<images>``. Class names are the folder names under ``train``
(sorted). ``val`` is optional: without it a stratified, seeded share of ``train`` is held out.
Everything is checked before training starts, and every problem is reported with the files involved.
Training and evaluation both read datasets, so this sits in ``core``, below both. Decoded splits are
uint8 grey levels at the model's input size, in RAM or in an on-disk cache (:mod:`mediscan.core.pixel_cache`).
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import PIL
import torch

from mediscan.core.imaging import ImageReadError, looks_like_image_file, read_image
from mediscan.core.pixel_cache import FORMAT_VERSION, PixelFile, build_entry, gather, quantize, to_model_range
from mediscan.core.preprocessing import PreprocessConfig, crop_and_resize

SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """The dataset folder cannot be used as it is (the message lists what to fix)."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    digest: str = field(default="", compare=False)    # sha256 of the file's bytes ("" = not computed yet)


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
    """A split decoded once: ``pixels`` ``(N, 1, S, S)`` uint8 grey levels and labels ``(N,)``.

    ``pixels`` is a tensor (CPU or GPU) or a :class:`~mediscan.core.pixel_cache.PixelFile` (``--cache-dir``);
    model-range floats also work (a split built by hand). :meth:`batch` gives model-ready images
    in [-1024, 1024] one batch at a time; :attr:`images` converts the whole split at once (small splits only).
    ``paths[i]`` is the file of row ``i``; ``colour_paths`` the subset that were colour pictures (decoded to
    grayscale like the rest); ``cache`` says where the pixels came from. Made by :func:`load_split`.
    """

    pixels: torch.Tensor | PixelFile
    labels: torch.Tensor
    paths: list[Path]
    colour_paths: list[Path] = field(default_factory=list)   # files that were colour pictures
    cache: str = ""                                          # "", or "built <folder>" / "reused <folder>"

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    @property
    def images(self) -> torch.Tensor:
        """The whole split as model-range floats ``(N, 1, S, S)``: four times the memory of ``pixels``."""
        return to_model_range(self.pixels[:])

    def batch(self, index: torch.Tensor | slice, device: torch.device | str) -> torch.Tensor:
        """Rows ``index`` as model-range floats on ``device`` (converted there, after the uint8 copy)."""
        return to_model_range(gather(self.pixels, index, device))


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def scan_dataset(root: str | Path, *, val_fraction: float = 0.15, seed: int = 0, skip_bad: bool = False,
                 require_test: bool = True) -> DatasetSplits:
    """List and check the dataset under ``root``; nothing is decoded (that is :func:`load_split`).

    Checks: the folder and its splits exist (``test`` only if ``require_test``), every split has the same
    classes (at least two), no class is empty, every file is an image by its name. Raises
    :class:`DatasetError` naming every problem found; with ``skip_bad`` files that are not images are left
    out and listed in ``skipped`` instead. Without ``val/``, ``val_fraction`` of each training class is held
    out (seeded by ``seed``). Exact duplicate files across splits are reported in ``duplicates`` (they leak
    test answers into training); ``fingerprint`` identifies the files and their contents.
    """
    root = Path(root)
    present = _present_splits(root, require_test)
    classes = _checked_classes(present)
    files, not_images = _image_files(present, classes, skip_bad)
    val_from_train = "val" not in files
    if val_from_train:
        files["train"], files["val"] = stratified_split(files["train"], val_fraction, seed)
    splits = DatasetSplits(root=root, classes=classes, train=files["train"], val=files["val"],
                           test=files.get("test", []), val_from_train=val_from_train,
                           skipped=not_images if skip_bad else [])
    digests = {s.path: _file_digest(s.path) for name in SPLITS for s in splits.split(name)}
    for name in SPLITS:
        setattr(splits, name, [Sample(s.path, s.label, digests[s.path]) for s in splits.split(name)])
    splits.duplicates = find_cross_split_duplicates(splits, digests)
    splits.fingerprint = dataset_fingerprint(splits, digests)
    return splits


def _raise_if(problems: list[str], hint: str = "") -> None:
    if problems:
        raise DatasetError("Dataset problems:\n  - " + "\n  - ".join(problems) + hint)


def _present_splits(root: Path, require_test: bool) -> dict[str, Path]:
    """The split folders that exist, after checking the required ones do."""
    if not root.is_dir():
        raise DatasetError(f"Dataset folder {root} does not exist. Expected {root}/train/<class>/*.png "
                           f"(and test/, optionally val/), one sub-folder per class.")
    present = {s: root / s for s in SPLITS if (root / s).is_dir()}
    _raise_if([f"missing split: {root / required}/ (create it with one sub-folder per class)"
               for required in (("train", "test") if require_test else ("train",)) if required not in present])
    return present


def _checked_classes(present: dict[str, Path]) -> list[str]:
    """The class names (folders under train/), after checking every split has the same ones."""
    classes = _class_folders(present["train"])
    if len(classes) < 2:
        raise DatasetError(f"{present['train']} has {len(classes)} class folder(s) {classes}; "
                           f"need at least 2 (e.g. bone/ brain/ heart/ lungs/).")
    problems = []
    for folder in present.values():
        theirs = _class_folders(folder)
        if theirs != classes:
            missing, extra = sorted(set(classes) - set(theirs)), sorted(set(theirs) - set(classes))
            problems.append(f"{folder}: classes differ from train/ (missing {missing or 'none'}, "
                            f"extra {extra or 'none'})")
    _raise_if(problems)
    return classes


def _image_files(present: dict[str, Path], classes: list[str],
                 skip_bad: bool) -> tuple[dict[str, list[Sample]], list[str]]:
    """The image files of every split and class, and "path: reason" of the files that are not images."""
    files: dict[str, list[Sample]] = {}
    not_images: list[str] = []
    problems: list[str] = []
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
    _raise_if(problems, "\n(--skip-bad leaves out unreadable or non-image files and lists them)" if not_images else "")
    return files, not_images


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


def split_key(samples: list[Sample], input_size: int) -> str:
    """The on-disk cache key of ``samples`` decoded at ``input_size``: every file's path, label and content
    hash in order, the preprocessing, the cache format and the decoders' versions (a changed file, input
    size or decoder gives a new key)."""
    hasher = hashlib.sha256(json.dumps({
        "format": FORMAT_VERSION, "preprocessing": PreprocessConfig(input_size).to_dict(),
        "versions": [np.__version__, cv2.__version__, PIL.__version__]}, sort_keys=True).encode())
    for sample in samples:
        digest = sample.digest or _file_digest(sample.path)
        hasher.update(f"{Path(sample.path).resolve()}\t{sample.label}\t{digest}\n".encode())
    return hasher.hexdigest()[:32]


def load_split(samples: list[Sample], input_size: int, *, workers: int = 2, skip_bad: bool = False,
               progress=None, cache_dir: str | Path | None = None) -> tuple[TensorSplit, list[str]]:
    """Decode every image of ``samples`` once (``workers`` threads), in their order, into uint8.

    Each image is centre-cropped and resized as :func:`~mediscan.core.preprocessing.preprocess` does (the
    transform the Predictor applies) and rounded to 256 grey levels. With ``cache_dir`` the pixels live in
    an on-disk cache keyed by :func:`split_key`: reused when it exists, built (atomically) when not. Returns
    the :class:`TensorSplit` and the "path: reason" list of files left out. Unreadable files raise
    :class:`DatasetError` listing all of them, unless ``skip_bad``. ``progress`` (optional) gets
    ``update(1)`` per decoded file. A bad cache folder raises
    :class:`~mediscan.core.pixel_cache.CacheDirError`.
    """
    fill = _decoder(samples, input_size, workers, progress)
    if cache_dir is None:
        (pixels, index), cache = _decode_in_ram(len(samples), input_size, fill), ""
    else:
        pixels, index, built = build_entry(cache_dir, split_key(samples, input_size), len(samples), input_size,
                                           fill)
        cache = f"{'built' if built else 'reused'} {Path(cache_dir) / index['key']}"
    bad = [f"{samples[row].path}: {reason}" for row, reason in index["bad"]]
    if bad and not skip_bad:
        raise DatasetError(f"{len(bad)} file(s) could not be read:\n  - " + "\n  - ".join(bad) +
                           "\n(--skip-bad leaves them out and lists them)")
    kept = [samples[row] for row in index["kept"]]
    labels = torch.tensor([s.label for s in kept], dtype=torch.long)
    colour = [samples[row].path for row in index["colour"]]
    return TensorSplit(pixels, labels, [s.path for s in kept], colour, cache), bad


def _decode_in_ram(count: int, size: int, fill) -> tuple[torch.Tensor, dict]:
    """Run ``fill`` into one preallocated uint8 tensor (no per-image float copies are kept)."""
    pixels = torch.empty((count, 1, size, size), dtype=torch.uint8)
    flat = pixels.numpy().reshape(count, size * size)

    def write(row: int, image: np.ndarray) -> None:
        flat[row] = image.reshape(-1)
    index = fill(write)
    if len(index["kept"]) < count:             # unreadable files drop out (rare: copying the rest is fine)
        pixels = pixels[torch.tensor(index["kept"], dtype=torch.long)]
    return pixels, index


def _decoder(samples: list[Sample], size: int, workers: int, progress):
    """The ``fill`` of :func:`~mediscan.core.pixel_cache.build_entry`: decode, crop, resize and quantise
    every sample into ``write(row, uint8 image)``, and return the index (kept, colour and bad rows)."""
    def decode(write, row: int):
        try:
            decoded = read_image(samples[row].path)
        except ImageReadError as exc:
            return row, False, str(exc)
        write(row, quantize(crop_and_resize(decoded.pixels, size)))
        return row, decoded.is_colour, None

    def fill(write) -> dict:
        index = {"kept": [], "colour": [], "bad": []}
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for row, is_colour, error in _in_order(pool, partial(decode, write), len(samples),
                                                   ahead=4 * max(1, workers)):
                if progress is not None:
                    progress.update(1)
                if error:
                    index["bad"].append([row, error])
                else:
                    index["kept"].append(row)
                    if is_colour:
                        index["colour"].append(row)
        return index
    return fill


def _in_order(pool: ThreadPoolExecutor, fn, count: int, ahead: int):
    """``fn(0) .. fn(count - 1)`` on ``pool``, results in order, at most ``ahead`` in flight (``pool.map``
    would submit every file at once and hold all their results)."""
    pending: deque = deque()
    for row in range(count):
        pending.append(pool.submit(fn, row))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
