"""Classification metrics and temperature calibration: pure functions of logits and labels.

The same code scores a model straight after training and a checkpoint evaluated alone (``--evaluate``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ECE_BINS = 15


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
