"""The training data: every split decoded once into tensors, and the dataset summary for the log and report."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from mediscan.core.dataset import SPLITS, DatasetError, DatasetSplits, TensorSplit, load_split
from mediscan.training.config import TrainConfig


def describe_dataset(splits: DatasetSplits, config: TrainConfig) -> list[str]:
    """Human-readable lines about the data, for the log and the report."""
    lines = [f"classes: {', '.join(splits.classes)}"]
    for name in SPLITS:
        counts = splits.class_counts(name)
        lines.append(f"{name}: {sum(counts.values())} images ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    if splits.val_from_train:
        lines.append(f"no val/ folder: held out {config.val_fraction:.0%} of train/ per class "
                     f"(stratified, seed {config.seed}) for validation")
    if splits.duplicates:
        shown = "; ".join(f"{a} == {b}" for a, b in splits.duplicates[:5])
        lines.append(f"WARNING: {len(splits.duplicates)} identical file(s) appear in two splits (leakage: "
                     f"test/val scores will be optimistic): {shown}"
                     + (" ..." if len(splits.duplicates) > 5 else ""))
    if splits.skipped:
        lines.append(f"skipped {len(splits.skipped)} bad file(s): " + "; ".join(splits.skipped[:10]))
    if splits.colour:
        lines.append(colour_warning(splits.colour))
    return lines


def colour_warning(paths: list[str]) -> str:
    """Colour pictures train like any image, but every predictor answers a colour upload with
    ``out_of_scope`` (radiographs are grayscale): say so before the user wonders why."""
    return (f"WARNING: {len(paths)} image(s) are colour pictures, not grayscale X-rays (e.g. "
            f"{'; '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}). They are trained on in grayscale, but "
            f"MediScan reports colour uploads as out of scope: save your X-rays as grayscale.")


def load_tensors(splits: DatasetSplits, config: TrainConfig,
                 log: Callable[[str], None]) -> tuple[dict[str, TensorSplit], DatasetSplits]:
    """Decode every split once; unreadable files are errors unless --skip-bad.

    Returns the tensors of each split and a copy of ``splits`` (``splits`` itself is left as it was) whose
    ``skipped`` and ``colour`` lists also name what decoding found: unreadable files and colour pictures.
    """
    tensors, bad_all, colour = {}, [], []
    started = time.perf_counter()
    for name in SPLITS:
        split, bad = load_split(splits.split(name), config.input_size, workers=config.workers, skip_bad=True)
        tensors[name] = split
        bad_all += bad
        colour += [str(path) for path in split.colour_paths]
    if bad_all and not config.skip_bad:
        raise DatasetError(f"{len(bad_all)} file(s) could not be read:\n  - " + "\n  - ".join(bad_all)
                           + "\n(--skip-bad leaves them out and lists them)")
    found = dataclasses.replace(splits, skipped=splits.skipped + bad_all, colour=splits.colour + colour)
    total = sum(len(splits.split(name)) for name in SPLITS)
    log(f"decoded {total - len(bad_all)} images in {time.perf_counter() - started:.1f}s"
        + (f", skipped {len(bad_all)} unreadable" if bad_all else ""))
    if found.colour:
        log(colour_warning(found.colour))
    for name, split in tensors.items():
        if name != "test" and len(split) == 0:
            raise DatasetError(f"the {name} split has no readable images")
    return tensors, found


def to_device(data: dict[str, TensorSplit], device: torch.device) -> dict[str, TensorSplit]:
    """On a GPU the whole decoded set lives in device memory, so no loader runs per step; elsewhere as is."""
    if device.type != "cuda":
        return data
    return {name: dataclasses.replace(split, images=split.images.pin_memory().to(device, non_blocking=True),
                                      labels=split.labels.to(device))
            for name, split in data.items()}
