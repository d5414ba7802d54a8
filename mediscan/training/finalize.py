"""After training, and for a saved checkpoint: calibration, the out-of-scope fit, test metrics, the report.

:func:`finalize` gives the best epoch's weights a temperature (fitted on val), out-of-scope statistics
(fitted on train features, thresholded on val) and test metrics, rewrites ``best.safetensors`` with them
and writes the report next to it. :func:`refit_ood` refits only the out-of-scope statistics of a saved
checkpoint -- checkpoints written before the detector read several layers carry one-layer statistics;
their predictions are unchanged by a refit, only the out-of-scope check gets the current method:

    python densenet121_xray_classifier.py --refit-ood models/best.safetensors --data dataset

Both fit the detector with :func:`fit_detector`, so a refitted checkpoint is what a fresh run would store.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from mediscan.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mediscan.core.dataset import DatasetError, DatasetSplits, TensorSplit, load_split, scan_dataset
from mediscan.core.model import OrganClassifier
from mediscan.core.ood import DEFAULT_LAYERS, OODDetector, fit_ood
from mediscan.core.runtime import predict_files, predict_split, select_device
from mediscan.evaluation.metrics import classification_metrics, fit_temperature
from mediscan.evaluation.report import save_history, save_split_gallery, write_report
from mediscan.training.config import TrainConfig
from mediscan.training.data import describe_dataset

__all__ = ["finalize", "fit_detector", "refit_ood"]


def fit_detector(model: OrganClassifier, train: TensorSplit, val: TensorSplit, batch_size: int,
                 device: torch.device, n_classes: int | None = None,
                 energy: bool = False) -> tuple[OODDetector, torch.Tensor]:
    """The out-of-scope detector of ``model`` (statistics on ``train``, threshold on ``val``) and the fp32
    validation logits computed on the way.

    Validation images are decoded again from their files, in float as the Predictor decodes them
    (:func:`~mediscan.core.runtime.predict_files`), and run in fp32 even where training ran under bf16
    autocast: the temperature and the out-of-scope threshold only mean what they promise ("at most 5 % of
    validation flagged") on the numbers the Predictor computes (docs/benchmarks.md, "Training: the
    out-of-scope fit runs in fp32").
    ``energy``: the classifier's free energy joins the score (models trained with outlier exposure).
    """
    # Validation straight from its files, as the Predictor will see it: the threshold's promise is about those
    # numbers, not the 8-bit copy training keeps (runtime.predict_files says why it matters).
    val_logits, val_pooled = predict_files(model, val.paths, val.pixels.shape[-1], batch_size, device,
                                           layers=DEFAULT_LAYERS)
    _, train_pooled = predict_split(model, train.pixels, batch_size, device, amp=False, layers=DEFAULT_LAYERS)
    return fit_ood(train_pooled, train.labels.cpu(), val_pooled, n_classes=n_classes,
                   val_logits=val_logits if energy else None), val_logits


def finalize(best_path: Path, data: dict[str, TensorSplit], splits: DatasetSplits, config: TrainConfig,
             device: torch.device, history: list[dict], log: Callable[[str], None]):
    """Calibrate, fit the out-of-scope detector, evaluate on test, rewrite best with it all, write the report.

    Returns ``(report path or None, test metrics or None)``: both are None without test images.
    """
    started = time.perf_counter()
    best = load_checkpoint(best_path, device)
    model, meta = best.model, best.meta
    batch = config.batch_size * 4
    detector, val_logits = fit_detector(model, data["train"], data["val"], batch, device,
                                        energy=config.outlier_exposure)
    temperature = fit_temperature(val_logits, data["val"].labels)
    val_metrics = classification_metrics(val_logits, data["val"].labels, splits.classes, temperature)
    test_metrics, test_logits = None, None
    if len(data["test"]):
        test_logits, _ = predict_split(model, data["test"].pixels, batch, device, amp=False)
        test_metrics = classification_metrics(test_logits, data["test"].labels, splits.classes, temperature)
    meta.update(temperature=temperature, ood=detector.to_meta(),
                metrics={"val": _headline(val_metrics), "test": _headline(test_metrics)})
    save_checkpoint(best_path, model, meta, detector.to_tensors())
    log(f"temperature {temperature:.3f} (fitted on val); out-of-scope threshold {detector.threshold:.2f} "
        f"({detector.combination} of {', '.join(detector.part_names)})")
    log(f"calibration and out-of-scope fit: {time.perf_counter() - started:.1f}s")
    _, curves = save_history(history, best_path.parent)
    if test_metrics is None:
        return None, None
    report = _training_report(best_path, model, meta, data["test"], test_logits, splits, config, test_metrics,
                              val_metrics, curves)
    roc_auc = test_metrics["macro_roc_auc"]
    log(f"test: accuracy {test_metrics['accuracy']:.3f}, macro F1 {test_metrics['macro_f1']:.3f}, "
        f"macro ROC-AUC {roc_auc if roc_auc is None else round(roc_auc, 3)}, "
        f"ECE {test_metrics['ece']:.3f} -> {test_metrics['ece_calibrated']:.3f}")
    log(f"report: {report}")
    return report, test_metrics


def _training_report(best_path: Path, model: OrganClassifier, meta: dict, test: TensorSplit,
                     test_logits: torch.Tensor, splits: DatasetSplits, config: TrainConfig, test_metrics: dict,
                     val_metrics: dict, curves: Path | None) -> Path:
    """report.md (+ figures, metrics.json, the Grad-CAM gallery unless --no-gallery) beside ``best_path``."""
    out = best_path.parent
    gallery = None
    if config.gallery:
        gallery = save_split_gallery(model, test, splits.classes, out / "gradcam_gallery.png", test_logits)
    return write_report(out, classes=splits.classes, metrics=test_metrics, meta=meta, checkpoint=best_path,
                        history_png=curves, gallery_png=gallery, val_metrics=val_metrics,
                        dataset_notes=describe_dataset(splits, config))


def _headline(metrics: dict | None) -> dict | None:
    if metrics is None:
        return None
    keys = ("n", "accuracy", "macro_f1", "macro_roc_auc", "ece", "ece_calibrated")
    return {k: metrics[k] for k in keys}


def refit_ood(checkpoint: str | Path, data: str | Path, *, out: str | Path | None = None, batch_size: int = 64,
              workers: int = 2, device: str = "auto", skip_bad: bool = False,
              cache_dir: str | Path | None = None, log: Callable[[str], None] = print) -> tuple[Path, OODDetector]:
    """Fit the out-of-scope detector of ``checkpoint`` on ``data``'s train (statistics) and val (threshold)
    images and write the checkpoint again, atomically: into folder ``out`` under the same file name, or
    over ``checkpoint`` itself (default). Its predictions do not change; an ONNX export of it goes stale.

    The split is the one training used: without a ``val/`` folder, the checkpoint's own ``val_fraction``
    and ``seed`` pick the same held-out images. Raises :class:`CheckpointError` for a checkpoint that
    cannot be loaded or whose classes differ from the dataset's, :class:`DatasetError` for bad data.
    ``cache_dir``: the on-disk pixel cache training uses (``--cache-dir``); the split training cached is
    reused, not decoded again, and the pixels stay on disk.
    """
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
    train = _readable_split(splits, "train", size, workers, skip_bad, data, log, cache_dir)
    val = _readable_split(splits, "val", size, workers, skip_bad, data, log, cache_dir)
    detector, _ = fit_detector(loaded.model, train, val, batch_size, torch_device, n_classes=len(loaded.classes),
                               energy=bool(train_args.get("outlier_exposure")))
    meta = dict(loaded.meta, ood=detector.to_meta())
    target = Path(out) / checkpoint.name if out else checkpoint
    target.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(target, loaded.model, meta, {**_other_extra(loaded.extra), **detector.to_tensors()})
    log(f"out-of-scope statistics refitted on {detector.n_train} train / {detector.n_val} val images "
        f"({detector.combination} of {', '.join(detector.part_names)}; threshold {detector.threshold:.3f}) in "
        f"{time.perf_counter() - started:.1f}s: {target}")
    return target, detector


def _readable_split(splits: DatasetSplits, name: str, input_size: int, workers: int, skip_bad: bool,
                    data: str | Path, log: Callable[[str], None], cache_dir: str | Path | None) -> TensorSplit:
    """Split ``name`` decoded (into or from ``cache_dir`` when set); a :class:`DatasetError` when none of its
    images can be read."""
    split, bad = load_split(splits.split(name), input_size, workers=workers, skip_bad=skip_bad,
                            cache_dir=cache_dir or None)
    if len(split) == 0:
        raise DatasetError(f"the {name} split of {data} has no readable images")
    if bad:
        log(f"skipped {len(bad)} unreadable {name} file(s)")
    if split.cache:
        log(f"{name}: pixel cache {split.cache}")
    return split


def _other_extra(extra: dict) -> dict:
    """Extra tensors that are not out-of-scope statistics (kept as they were)."""
    return {name: tensor for name, tensor in extra.items() if not name.startswith("ood.")}
