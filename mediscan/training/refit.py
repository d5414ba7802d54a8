"""Refit a saved checkpoint's out-of-scope statistics, without retraining.

Checkpoints written before the detector read several layers carry one-layer statistics; their
predictions are unchanged by a refit, only the out-of-scope check gets the current method. Training
calls the same fitting code (:func:`mediscan.training.finalize`), so a refitted checkpoint is what a
fresh training run would have stored.

    python densenet121_xray_classifier.py --refit-ood models/best.safetensors --data dataset
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from mediscan.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mediscan.core.dataset import DatasetError, load_split, scan_dataset
from mediscan.core.ood import DEFAULT_LAYERS, OODDetector, fit_ood

__all__ = ["refit_ood"]


def refit_ood(checkpoint: str | Path, data: str | Path, *, out: str | Path | None = None, batch_size: int = 64,
              workers: int = 2, device: str = "auto", skip_bad: bool = False,
              log: Callable[[str], None] = print) -> tuple[Path, OODDetector]:
    """Fit the out-of-scope detector of ``checkpoint`` on ``data``'s train (statistics) and val (threshold)
    images and write the checkpoint again, atomically: into folder ``out`` under the same file name, or
    over ``checkpoint`` itself (default). Its predictions do not change; an ONNX export of it goes stale.

    The split is the one training used: without a ``val/`` folder, the checkpoint's own ``val_fraction``
    and ``seed`` pick the same held-out images. Raises :class:`CheckpointError` for a checkpoint that
    cannot be loaded or whose classes differ from the dataset's, :class:`DatasetError` for bad data.
    """
    from mediscan.core.runtime import predict_split, select_device

    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    torch_device = select_device(device)
    loaded = load_checkpoint(checkpoint, torch_device)
    train_args = loaded.meta.get("train_args") or {}
    splits = scan_dataset(data, val_fraction=float(train_args.get("val_fraction", 0.15)),
                          seed=int(train_args.get("seed", 0)), skip_bad=skip_bad, require_test=False)
    if splits.classes != loaded.classes:
        raise CheckpointError(f"{checkpoint} predicts {loaded.classes} but {data} has classes {splits.classes}; "
                              f"refit on the dataset the model was trained on")
    trained_on = (loaded.meta.get("dataset_fingerprint") or {}).get("sha256")
    if trained_on and trained_on != splits.fingerprint.get("sha256"):
        log(f"WARNING: {data} is not the dataset {checkpoint.name} was trained on (fingerprints differ); the "
            f"out-of-scope statistics will describe {data}")
    size = loaded.preprocessing.input_size
    features = {}
    for name in ("train", "val"):
        split, bad = load_split(splits.split(name), size, workers=workers, skip_bad=skip_bad)
        if len(split) == 0:
            raise DatasetError(f"the {name} split of {data} has no readable images")
        if bad:
            log(f"skipped {len(bad)} unreadable {name} file(s)")
        _, pooled = predict_split(loaded.model, split.images, batch_size, torch_device, layers=DEFAULT_LAYERS)
        features[name] = (pooled, split.labels.cpu())
    detector = fit_ood(features["train"][0], features["train"][1], features["val"][0],
                       n_classes=len(loaded.classes))
    meta = dict(loaded.meta, ood=detector.to_meta())
    target = Path(out) / checkpoint.name if out else checkpoint
    target.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(target, loaded.model, meta, {**_other_extra(loaded.extra), **detector.to_tensors()})
    log(f"out-of-scope statistics refitted on {detector.n_train} train / {detector.n_val} val images "
        f"({', '.join(detector.layer_names)}; threshold {detector.threshold:.3f}) in "
        f"{time.perf_counter() - started:.1f}s: {target}")
    return target, detector


def _other_extra(extra: dict) -> dict:
    """Extra tensors that are not out-of-scope statistics (kept as they were)."""
    return {name: tensor for name, tensor in extra.items() if not name.startswith("ood.")}
