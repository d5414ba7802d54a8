"""The training data: every split decoded once into uint8 (RAM or ``--cache-dir``), and the dataset summary for
the log and report."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from mediscan.core.dataset import SPLITS, DatasetError, DatasetSplits, TensorSplit, load_split, split_key
from mediscan.core.pixel_cache import check_writable, gather, open_entry
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
    """Decode every split once (into ``config.cache_dir`` when set); unreadable files are errors unless
    --skip-bad. A cache folder that cannot take the splits still to be built is refused before any decoding.

    Returns the tensors of each split and a copy of ``splits`` (``splits`` itself is left as it was) whose
    ``skipped`` and ``colour`` lists also name what decoding found: unreadable files and colour pictures.
    """
    if config.cache_dir:
        _check_cache_dir(splits, config)
    tensors, bad_all, colour = {}, [], []
    started = time.perf_counter()
    for name in SPLITS:
        split, bad = load_split(splits.split(name), config.input_size, workers=config.workers, skip_bad=True,
                                cache_dir=config.cache_dir or None)
        tensors[name] = split
        bad_all += bad
        colour += [str(path) for path in split.colour_paths]
    if bad_all and not config.skip_bad:
        raise DatasetError(f"{len(bad_all)} file(s) could not be read:\n  - " + "\n  - ".join(bad_all)
                           + "\n(--skip-bad leaves them out and lists them)")
    found = dataclasses.replace(splits, skipped=splits.skipped + bad_all, colour=splits.colour + colour)
    total = sum(len(splits.split(name)) for name in SPLITS)
    caches = sorted({split.cache for split in tensors.values() if split.cache})
    log(f"decoded {total - len(bad_all)} images in {time.perf_counter() - started:.1f}s"
        + (f", skipped {len(bad_all)} unreadable" if bad_all else "")
        + (f" (pixel cache: {'; '.join(caches)})" if caches else ""))
    if found.colour:
        log(colour_warning(found.colour))
    for name, split in tensors.items():
        if name != "test" and len(split) == 0:
            raise DatasetError(f"the {name} split has no readable images")
    return tensors, found


def _check_cache_dir(splits: DatasetSplits, config: TrainConfig) -> None:
    """:class:`~mediscan.core.pixel_cache.CacheDirError` now, before decoding, unless the cache folder can
    take every split that is not cached there yet (a fully cached dataset also reads from a read-only one)."""
    size = config.input_size
    missing = [name for name in SPLITS
               if open_entry(config.cache_dir, split_key(splits.split(name), size)) is None]
    if missing:
        check_writable(config.cache_dir, sum(len(splits.split(name)) for name in missing) * size * size)


#: Share of the GPU's free memory the uint8 splits may take; the rest is for the model and its activations.
GPU_DATA_SHARE = 0.5


def to_device(data: dict[str, TensorSplit], device: torch.device,
              log: Callable[[str], None] = lambda _line: None) -> dict[str, TensorSplit]:
    """On a GPU each uint8 split moves into device memory while it fits (train first), so batches need no
    host copy; a split that does not fit stays on the host and streams batches through pinned memory.
    Labels always move. Elsewhere (CPU, MPS) the splits are returned as they are."""
    if device.type != "cuda":
        return data
    free, _total = torch.cuda.mem_get_info(device)
    budget = int(free * GPU_DATA_SHARE)
    moved = {}
    for name in ("train", "val", "test"):
        split = data[name]
        nbytes, pixels = split.pixels.nbytes, split.pixels
        if nbytes <= budget:
            pixels, budget = _upload(split.pixels, device), budget - nbytes
        else:
            log(f"{name}: {nbytes / 2**30:.1f} GiB of decoded images do not fit the GPU's free memory; "
                f"batches stream from host memory")
        moved[name] = dataclasses.replace(split, pixels=pixels, labels=split.labels.to(device))
    return moved


def _upload(pixels, device: torch.device, rows: int = 4096) -> torch.Tensor:
    """The whole store as one device tensor, copied in slices (a cache file is never read into RAM whole)."""
    out = torch.empty(tuple(pixels.shape), dtype=pixels.dtype, device=device)
    for start in range(0, len(pixels), rows):
        out[start:start + rows] = gather(pixels, slice(start, start + rows), device)
    return out
