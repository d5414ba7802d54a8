"""The evaluation report: report.md, its figures, metrics.json and the Grad-CAM gallery of a split.

``evaluate_checkpoint`` scores a saved checkpoint alone (``--evaluate``); training calls the same writers.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from mediscan import NOT_FOR_CLINICAL_USE
from mediscan.core.preprocessing import scale_to_unit_range
from mediscan.evaluation.figures import new_figure
from mediscan.evaluation.metrics import classification_metrics


def save_confusion_matrix(matrix: list[list[int]], classes: list[str], out_dir: Path) -> tuple[Path, Path]:
    """confusion_matrix.png and confusion_matrix.json."""
    data = np.asarray(matrix)
    fig = new_figure(figsize=(1.2 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    ax = fig.subplots()
    ax.imshow(data, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = data.max() / 2 if data.size else 0
    for (i, j), value in np.ndenumerate(data):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > threshold else "black")
    ax.set_title("Confusion matrix (test)")
    fig.tight_layout()
    png = out_dir / "confusion_matrix.png"
    fig.savefig(png, dpi=110)
    js = out_dir / "confusion_matrix.json"
    js.write_text(json.dumps({"classes": classes, "rows_true_columns_predicted": matrix}, indent=2))
    return png, js


def save_history(history: list[dict], out_dir: Path) -> tuple[Path, Path | None]:
    """history.csv (one row per epoch) and training_curves.png."""
    csv_path = out_dir / "history.csv"
    if history:
        with csv_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
    else:
        csv_path.write_text("")
        return csv_path, None
    epochs = [h["epoch"] for h in history]
    fig = new_figure(figsize=(10, 3.8))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [h["val_acc"] for h in history], "o-", label="val")
    stage_change = [h["epoch"] for h in history if h["stage"] == 2][:1]
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        for x in stage_change:
            ax.axvline(x - 0.5, color="grey", linestyle=":", label="fine-tuning starts")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    png = out_dir / "training_curves.png"
    fig.savefig(png, dpi=110)
    return csv_path, png


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def write_report(out_dir: Path, *, classes: list[str], metrics: dict, meta: dict, checkpoint: Path,
                 history_png: Path | None = None, gallery_png: Path | None = None,
                 val_metrics: dict | None = None, dataset_notes: list[str] | None = None) -> Path:
    """report.md: headline numbers, per-class table, calibration, figures, and the clinical-use warning."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cm_png, _ = save_confusion_matrix(metrics["confusion_matrix"], classes, out_dir)
    (out_dir / "metrics.json").write_text(json.dumps({"test": metrics, "val": val_metrics}, indent=2))
    lines = [
        "# MediScan evaluation report",
        "",
        f"> **{NOT_FOR_CLINICAL_USE}**",
        "",
        f"- Checkpoint: `{checkpoint}`",
        f"- Classes: {', '.join(classes)}",
        f"- Backbone weights: {meta.get('weight_source')}",
        f"- Created: {meta.get('created')}",
        f"- Dataset fingerprint: {(meta.get('dataset_fingerprint') or {}).get('files', 'n/a')} files, "
        f"sha256 `{str((meta.get('dataset_fingerprint') or {}).get('sha256', 'n/a'))[:16]}`",
        "",
        "## Test set",
        "",
        "| images | accuracy | macro F1 | macro ROC-AUC | ECE "
        f"| ECE after temperature scaling (T={metrics['temperature']:.3f}) |",
        "|---|---|---|---|---|---|",
        f"| {metrics['n']} | {_fmt(metrics['accuracy'])} | {_fmt(metrics['macro_f1'])} | "
        f"{_fmt(metrics['macro_roc_auc'])} | {_fmt(metrics['ece'])} | {_fmt(metrics['ece_calibrated'])} |",
        "",
        "| class | precision | recall | F1 | ROC-AUC | support |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in metrics["per_class"].items():
        lines.append(f"| {name} | {_fmt(m['precision'])} | {_fmt(m['recall'])} | {_fmt(m['f1'])} | "
                     f"{_fmt(m['roc_auc'])} | {m['support']} |")
    if val_metrics:
        lines += ["", f"Validation: accuracy {_fmt(val_metrics['accuracy'])} on {val_metrics['n']} images; "
                      f"ECE {_fmt(val_metrics['ece'])} -> {_fmt(val_metrics['ece_calibrated'])} after scaling "
                      f"(the temperature was fitted on validation)."]
    lines += ["", "## Figures", "", f"![Confusion matrix]({cm_png.name})"]
    if history_png:
        lines += ["", f"![Training curves]({history_png.name})"]
    if gallery_png:
        lines += ["", "Grad-CAM on test images (correct and misclassified):", "",
                  f"![Grad-CAM gallery]({gallery_png.name})"]
    if dataset_notes:
        lines += ["", "## Dataset notes", ""] + [f"- {note}" for note in dataset_notes]
    lines += ["", "---", "", NOT_FOR_CLINICAL_USE, ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, *, out_dir: str | Path | None = None,
                        batch_size: int = 64, workers: int = 2, device: str = "auto",
                        skip_bad: bool = False, cache_dir: str | Path | None = None) -> Path:
    """Evaluate a saved checkpoint on ``data/test`` with its stored temperature; write the report.

    The report goes to ``out_dir`` (default: ``<checkpoint folder>/evaluation``). ``cache_dir``: the on-disk
    pixel cache training uses (``--cache-dir``), reused or built; the test split then stays on disk.
    """
    from mediscan.core.checkpoint import CheckpointError, load_checkpoint
    from mediscan.core.dataset import DatasetError, load_split, scan_dataset
    from mediscan.core.runtime import predict_split, select_device

    torch_device = select_device(device)
    loaded = load_checkpoint(checkpoint, torch_device)
    splits = scan_dataset(data, skip_bad=skip_bad)
    if splits.classes != loaded.classes:
        raise CheckpointError(f"{checkpoint} predicts {loaded.classes} but {data}/test has classes "
                              f"{splits.classes}; evaluate on a dataset with the same class folders")
    test, bad = load_split(splits.test, loaded.preprocessing.input_size, workers=workers, skip_bad=skip_bad,
                           cache_dir=cache_dir or None)
    if len(test) == 0:
        raise DatasetError(f"{data}/test has no readable images")
    logits, _ = predict_split(loaded.model, test.pixels, batch_size, torch_device)   # uint8, a batch at a time
    metrics = classification_metrics(logits, test.labels, loaded.classes, loaded.temperature)
    out = Path(out_dir) if out_dir else Path(checkpoint).parent / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    notes = [f"skipped unreadable: {b}" for b in bad]
    if splits.duplicates:
        notes.append(f"WARNING: {len(splits.duplicates)} identical file(s) appear in two splits (leakage)")
    gallery = save_split_gallery(loaded.model, test, loaded.classes, out / "gradcam_gallery.png", logits)
    return write_report(out, classes=loaded.classes, metrics=metrics, meta=loaded.meta, checkpoint=Path(checkpoint),
                        gallery_png=gallery, dataset_notes=notes)


def save_split_gallery(model, split, classes: list[str], path: Path, logits) -> Path:
    """Grad-CAM gallery of a decoded split (``TensorSplit``) whose ``logits`` ``(N, C)`` are already known,
    drawn on the CPU from the cropped model inputs.

    The tiles are chosen, titled and explained by those logits (the evaluation's, on whatever device it ran), so
    the gallery shows the predictions the metrics counted. They are chosen with
    :func:`~mediscan.evaluation.gallery.select_items` and only their
    rows are read and converted: the whole split as floats would be four times its uint8 pixels, per image
    again as numpy arrays, which a million-image test split (or one in an on-disk cache) cannot afford."""
    import torch

    from mediscan.evaluation.gallery import GALLERY_ITEMS, save_gradcam_gallery, select_items
    labels = split.labels.cpu()
    logits = torch.as_tensor(logits).detach().float().cpu()
    chosen = select_items(labels.tolist(), logits.argmax(dim=1).tolist(), GALLERY_ITEMS)
    images = split.batch(torch.tensor(chosen, dtype=torch.long), "cpu")
    samples = [(scale_to_unit_range(images[k, 0]).clamp(0, 1).numpy(), int(labels[row]), split.paths[row].name)
               for k, row in enumerate(chosen)]
    device = next(model.parameters()).device
    try:
        return save_gradcam_gallery(model.to("cpu").eval(), samples, classes, path, images.shape[-1],
                                    logits=logits[chosen])
    finally:
        model.to(device)
