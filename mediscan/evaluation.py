"""Metrics, calibration and the evaluation report (report.md + figures + metrics.json).

Everything here works on logits and labels, so the same code scores a model straight after training
and a checkpoint evaluated alone (``--evaluate``).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import NOT_FOR_CLINICAL_USE

ECE_BINS = 15


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------

def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def binary_roc_auc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Area under the ROC curve via the rank-sum statistic (ties get average ranks); None if undefined."""
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):                     # average ranks over runs of equal scores
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE: |accuracy - confidence| averaged over equal-width confidence bins, weighted by size."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str],
                           temperature: float = 1.0) -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro ROC-AUC, confusion matrix, NLL and ECE
    (raw and at ``temperature``)."""
    logits = logits.detach().float().cpu()
    y = labels.detach().cpu().numpy().astype(np.int64)
    probs_raw = F.softmax(logits, dim=1).numpy()
    probs_cal = F.softmax(logits / temperature, dim=1).numpy()
    pred = probs_raw.argmax(axis=1)
    n = len(classes)
    matrix = confusion_matrix(y, pred, n)
    per_class = {}
    for i, name in enumerate(classes):
        tp = matrix[i, i]
        precision = tp / matrix[:, i].sum() if matrix[:, i].sum() else 0.0
        recall = tp / matrix[i, :].sum() if matrix[i, :].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                           "support": int(matrix[i, :].sum()),
                           "roc_auc": binary_roc_auc(probs_raw[:, i], y == i)}
    aucs = [m["roc_auc"] for m in per_class.values() if m["roc_auc"] is not None]
    labels_t = torch.as_tensor(y)
    return {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()) if len(y) else 0.0,
        "macro_f1": float(np.mean([m["f1"] for m in per_class.values()])),
        "macro_roc_auc": float(np.mean(aucs)) if aucs else None,
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "nll": float(F.cross_entropy(logits, labels_t)) if len(y) else None,
        "nll_calibrated": float(F.cross_entropy(logits / temperature, labels_t)) if len(y) else None,
        "ece": expected_calibration_error(probs_raw, y) if len(y) else None,
        "ece_calibrated": expected_calibration_error(probs_cal, y) if len(y) else None,
        "temperature": float(temperature),
    }


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising NLL of softmax(logits / T)."""
    # clone(): logits usually come from inference_mode, and such tensors cannot enter autograd.
    logits = logits.detach().float().cpu().clone()
    labels = labels.detach().cpu().clone()
    if len(labels) == 0:
        return 1.0
    log_t = torch.zeros(1, requires_grad=True)           # optimise log T so T stays positive
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp().clamp(0.05, 20.0))
    # Never return a temperature that makes validation NLL worse than no scaling at all.
    if F.cross_entropy(logits / temperature, labels) > F.cross_entropy(logits, labels):
        return 1.0
    return temperature


# --------------------------------------------------------------------------------------------------
# Figures and report files
# --------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")           # never open a window: servers and CI have no display
    import matplotlib.pyplot as plt
    return plt


def save_confusion_matrix(matrix: list[list[int]], classes: list[str], out_dir: Path) -> tuple[Path, Path]:
    """confusion_matrix.png and confusion_matrix.json."""
    plt = _pyplot()
    data = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 1.2 * len(classes) + 2))
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
    plt.close(fig)
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
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
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
    plt.close(fig)
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
                        skip_bad: bool = False) -> Path:
    """Evaluate a saved checkpoint on ``data/test`` with its stored temperature; write the report.

    The report goes to ``out_dir`` (default: ``<checkpoint folder>/evaluation``).
    """
    from .checkpoint import CheckpointError, load_checkpoint
    from .data import DatasetError, load_split, scan_dataset
    from .training import predict_split, select_device

    torch_device = select_device(device)
    loaded = load_checkpoint(checkpoint, torch_device)
    splits = scan_dataset(data, skip_bad=skip_bad)
    if splits.classes != loaded.classes:
        raise CheckpointError(f"{checkpoint} predicts {loaded.classes} but {data}/test has classes "
                              f"{splits.classes}; evaluate on a dataset with the same class folders")
    test, bad = load_split(splits.test, loaded.preprocessing.input_size, workers=workers, skip_bad=skip_bad)
    if len(test) == 0:
        raise DatasetError(f"{data}/test has no readable images")
    logits, _ = predict_split(loaded.model, test.images, batch_size, torch_device)
    metrics = classification_metrics(logits, test.labels, loaded.classes, loaded.temperature)
    out = Path(out_dir) if out_dir else Path(checkpoint).parent / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    notes = [f"skipped unreadable: {b}" for b in bad]
    if splits.duplicates:
        notes.append(f"WARNING: {len(splits.duplicates)} identical file(s) appear in two splits (leakage)")
    gallery = save_split_gallery(loaded.model, test, loaded.classes, out / "gradcam_gallery.png")
    return write_report(out, classes=loaded.classes, metrics=metrics, meta=loaded.meta, checkpoint=Path(checkpoint),
                        gallery_png=gallery, dataset_notes=notes)


def save_split_gallery(model, split, classes: list[str], path: Path) -> Path:
    """Grad-CAM gallery of a decoded split (``TensorSplit``), drawn on the CPU from the cropped model inputs."""
    from .gallery import save_gradcam_gallery
    device = next(model.parameters()).device
    images, labels = split.images.cpu(), split.labels.cpu()
    samples = [((images[i, 0] / 2048.0 + 0.5).clamp(0, 1).numpy(), int(labels[i]), split.paths[i].name)
               for i in range(len(split))]
    try:
        return save_gradcam_gallery(model.to("cpu").eval(), samples, classes, path, split.images.shape[-1])
    finally:
        model.to(device)
