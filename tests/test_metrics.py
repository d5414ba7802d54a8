"""The report's metrics against independent references: scikit-learn for accuracy, precision, recall, F1,
ROC-AUC, the confusion matrix and the log-loss; scipy's bounded minimiser for the temperature; and a
calibration error written out here from its definition (Guo et al. 2017, equal-width bins weighted by size).

Nothing here derives an expected value from ``mediscan.evaluation.metrics`` itself.
"""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from mediscan.evaluation.metrics import (
    ECE_BINS,
    binary_roc_auc,
    classification_metrics,
    confusion_matrix,
    expected_calibration_error,
    fit_temperature,
)

CLASSES = ["bone", "brain", "heart", "lungs"]
TOL = 1e-6


def random_problem(seed: int, n: int = 400, k: int = 4, signal: float = 1.5, scale: float = 1.0):
    """Logits that carry some signal about random labels (so no metric is trivially 0 or 1)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k)) + signal * np.eye(k)[labels]
    return (scale * logits).astype(np.float32), labels


def reference_ece(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: sum over equal-width bins (low, high] of (bin size / n) * |accuracy - confidence|.

    Per-bin accuracy and confidence come from scikit-learn's calibration_curve (uniform bins, the same
    right-closed edges); the bin sizes are counted here."""
    confidence = probabilities.max(axis=1).astype(np.float64)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=bins, strategy="uniform")
    edges = np.linspace(0.0, 1.0, bins + 1)
    sizes = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=bins)
    sizes = sizes[sizes > 0]
    return float(np.sum(sizes / len(labels) * np.abs(accuracy - mean_confidence)))


def reference_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """argmin over T in [0.05, 20] of the mean negative log-likelihood of softmax(logits / T)."""
    logits = logits.astype(np.float64)

    def nll(log_t: float) -> float:
        return -log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(labels)), labels].mean()
    best = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded",
                           options={"xatol": 1e-10})
    return float(np.exp(best.x))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_match_scikit_learn(seed):
    logits, labels = random_problem(seed)
    temperature = 1.7
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # e.g. softmax without dim= (deprecated, and wrong for 1-D)
        got = classification_metrics(torch.from_numpy(logits), torch.from_numpy(labels), CLASSES, temperature)

    probs = softmax(logits.astype(np.float64), axis=1)
    calibrated = softmax(logits.astype(np.float64) / temperature, axis=1)
    pred = probs.argmax(axis=1)
    k = range(len(CLASSES))
    precision, recall, f1, support = skm.precision_recall_fscore_support(labels, pred, labels=list(k),
                                                                         zero_division=0)
    assert got["n"] == len(labels)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred), abs=TOL)
    assert got["macro_f1"] == pytest.approx(skm.f1_score(labels, pred, average="macro"), abs=TOL)
    assert got["confusion_matrix"] == skm.confusion_matrix(labels, pred, labels=list(k)).tolist()
    for i, name in enumerate(CLASSES):
        per = got["per_class"][name]
        assert per["precision"] == pytest.approx(precision[i], abs=TOL), name
        assert per["recall"] == pytest.approx(recall[i], abs=TOL), name
        assert per["f1"] == pytest.approx(f1[i], abs=TOL), name
        assert per["support"] == support[i]
        assert per["roc_auc"] == pytest.approx(skm.roc_auc_score(labels == i, probs[:, i]), abs=TOL), name
    assert got["macro_roc_auc"] == pytest.approx(
        skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"), abs=TOL)
    assert got["nll"] == pytest.approx(skm.log_loss(labels, probs, labels=list(k)), abs=1e-5)
    assert got["nll_calibrated"] == pytest.approx(skm.log_loss(labels, calibrated, labels=list(k)), abs=1e-5)
    assert got["ece"] == pytest.approx(reference_ece(probs, labels), abs=TOL)
    assert got["ece_calibrated"] == pytest.approx(reference_ece(calibrated, labels), abs=TOL)
    assert got["ece"] != pytest.approx(got["ece_calibrated"], abs=1e-3)     # the temperature is used
    assert got["temperature"] == temperature


def test_a_class_never_predicted_and_a_class_never_present():
    """Precision of a class nothing is predicted as is 0 (scikit-learn's zero_division=0); a class absent
    from the labels has no ROC-AUC and is left out of the macro average."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, 200)                    # "lungs" (3) never occurs
    logits = rng.normal(0, 1, (200, 4)).astype(np.float32)
    logits[:, 2] -= 50.0                                # "heart" (2) is never predicted
    logits[labels == 0, 0] += 1.0
    got = classification_metrics(torch.from_numpy(logits), torch.from_numpy(labels), CLASSES)
    probs = softmax(logits.astype(np.float64), axis=1)
    pred = probs.argmax(axis=1)
    precision, recall, f1, _ = skm.precision_recall_fscore_support(labels, pred, labels=[0, 1, 2, 3],
                                                                   zero_division=0)
    for i, name in enumerate(CLASSES):
        assert got["per_class"][name]["precision"] == pytest.approx(precision[i], abs=TOL)
        assert got["per_class"][name]["recall"] == pytest.approx(recall[i], abs=TOL)
        assert got["per_class"][name]["f1"] == pytest.approx(f1[i], abs=TOL)
    assert got["per_class"]["heart"]["precision"] == 0.0 and got["per_class"]["heart"]["f1"] == 0.0
    assert got["per_class"]["lungs"]["roc_auc"] is None and got["per_class"]["lungs"]["support"] == 0
    assert got["macro_f1"] == pytest.approx(np.mean(f1), abs=TOL)
    present = [skm.roc_auc_score(labels == i, probs[:, i]) for i in range(3)]
    assert got["macro_roc_auc"] == pytest.approx(np.mean(present), abs=TOL)
    assert got["temperature"] == 1.0 and got["nll"] == got["nll_calibrated"]


def test_no_samples_gives_empty_metrics_not_nan():
    got = classification_metrics(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), CLASSES, 2.0)
    assert (got["n"], got["accuracy"], got["macro_roc_auc"]) == (0, 0.0, None)
    assert (got["nll"], got["nll_calibrated"], got["ece"], got["ece_calibrated"]) == (None, None, None, None)
    assert got["confusion_matrix"] == [[0] * 4 for _ in range(4)] and got["macro_f1"] == 0.0


def test_roc_auc_with_ties_matches_scikit_learn():
    rng = np.random.default_rng(3)
    positives = rng.random(300) < 0.3
    scores = np.round(rng.random(300) * 0.6 + 0.4 * positives, 1)        # few distinct values: many ties
    assert len(np.unique(scores)) < 12
    assert binary_roc_auc(scores, positives) == pytest.approx(skm.roc_auc_score(positives, scores), abs=TOL)
    constant = np.full(10, 0.5)
    assert binary_roc_auc(constant, np.arange(10) < 4) == pytest.approx(0.5, abs=TOL)
    assert binary_roc_auc(rng.random(10), np.ones(10, bool)) is None
    assert binary_roc_auc(rng.random(10), np.zeros(10, bool)) is None
    ordered = np.array([0.1, 0.2, 0.3, 0.4])
    assert binary_roc_auc(ordered, np.array([False, False, True, True])) == 1.0
    assert binary_roc_auc(ordered, np.array([True, True, False, False])) == 0.0


def test_confusion_matrix_matches_scikit_learn():
    rng = np.random.default_rng(4)
    labels, pred = rng.integers(0, 5, 250), rng.integers(0, 5, 250)
    np.testing.assert_array_equal(confusion_matrix(labels, pred, 5),
                                  skm.confusion_matrix(labels, pred, labels=range(5)))
    assert confusion_matrix(np.array([1]), np.array([0]), 3).tolist() == [[0, 0, 0], [1, 0, 0], [0, 0, 0]]
    assert np.issubdtype(confusion_matrix(labels, pred, 5).dtype, np.integer)
    logits, labels = random_problem(0, n=40)
    got = classification_metrics(torch.from_numpy(logits), torch.from_numpy(labels), CLASSES)
    assert ".0" not in json.dumps(got["confusion_matrix"])      # counts in metrics.json, not floats


def test_ece_weights_each_bin_by_its_size():
    assert ECE_BINS == 15
    # Hand-computed: 3 samples at confidence 0.9 (2 right), 1 at 0.6 (wrong).
    # Bin (0.8667, 0.9333]: 3/4 * |2/3 - 0.9|; bin (0.5333, 0.6]: 1/4 * |0 - 0.6|.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.6, 0.4]])
    labels = np.array([0, 0, 0, 1])
    expected = 0.75 * abs(2 / 3 - 0.9) + 0.25 * 0.6
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-12)
    # Bins are right-closed: confidence exactly 1.0 and exactly an inner edge count, in the lower bin.
    edge = np.linspace(0, 1, 16)[10]
    probs = np.array([[1.0, 0.0], [edge, 1 - edge], [edge, 1 - edge]])
    labels = np.array([0, 0, 1])
    expected = (1 / 3) * 0.0 + (2 / 3) * abs(0.5 - edge)
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-12)
    assert expected_calibration_error(probs, labels, bins=1) == pytest.approx(
        abs(2 / 3 - (1 + 2 * edge) / 3), abs=1e-12)
    for seed in range(3):
        logits, labels = random_problem(seed, n=300, k=3, scale=2.0)
        probs = softmax(logits.astype(np.float64), axis=1)
        assert expected_calibration_error(probs, labels) == pytest.approx(reference_ece(probs, labels), abs=TOL)


@pytest.mark.parametrize("scale", [0.4, 3.0])
def test_fitted_temperature_minimises_the_validation_nll(scale):
    """Over-confident logits (scale 3) need T > 1, under-confident ones (0.4) T < 1."""
    logits, labels = random_problem(7, n=500, scale=scale)
    expected = reference_temperature(logits, labels)
    assert (expected > 1.2) if scale > 1 else (expected < 0.8)
    got = fit_temperature(torch.from_numpy(logits), torch.from_numpy(labels))
    assert got == pytest.approx(expected, rel=1e-3)


def test_temperature_is_clamped_and_never_worse_than_none():
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 4, 300)
    noise = torch.from_numpy((rng.normal(0, 1, (300, 4)) * 40).astype(np.float32))     # confident and random
    assert fit_temperature(noise, torch.from_numpy(labels)) == pytest.approx(20.0, rel=1e-6)
    perfect = torch.from_numpy((np.eye(4)[labels] * 0.01).astype(np.float32))             # right but timid
    assert fit_temperature(perfect, torch.from_numpy(labels)) == pytest.approx(0.05, rel=1e-6)
    assert fit_temperature(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)) == 1.0
    # Inputs from inference_mode work and are not modified.
    with torch.inference_mode():
        logits = torch.from_numpy(random_problem(9, scale=3.0)[0])
    before = logits.clone()
    fit_temperature(logits, torch.from_numpy(random_problem(9)[1]))
    assert torch.equal(logits, before)


def test_f1_when_precision_equals_recall():
    """Hand-computed: labels 0 0 1 1 2, predictions 0 1 0 1 2. Classes 0 and 1: one right, one missed, one
    wrongly claimed -> precision = recall = F1 = 1/2; class 2: all 1; class 3 absent: 0."""
    labels = np.array([0, 0, 1, 1, 2])
    logits = torch.from_numpy(np.eye(4, dtype=np.float32)[[0, 1, 0, 1, 2]] * 5)
    got = classification_metrics(logits, torch.from_numpy(labels), CLASSES)
    for name, expected in (("bone", 0.5), ("brain", 0.5), ("heart", 1.0), ("lungs", 0.0)):
        per = got["per_class"][name]
        assert (per["precision"], per["recall"], per["f1"]) == pytest.approx((expected,) * 3, abs=1e-12), name
    assert got["macro_f1"] == pytest.approx(0.5, abs=1e-12) and got["accuracy"] == pytest.approx(0.6, abs=1e-12)


def test_temperature_of_a_single_sample_is_fitted_too():
    """One confidently wrong sample: NLL falls as T grows, so the fit ends at the upper clamp (20)."""
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    assert reference_temperature(logits.numpy(), np.array([1])) == pytest.approx(20.0, rel=1e-4)
    assert fit_temperature(logits, torch.tensor([1])) == pytest.approx(20.0, rel=1e-6)


def test_max_iter_bounds_the_optimiser():
    """One L-BFGS iteration stops well short of the minimiser that the default (100) reaches."""
    logits, labels = random_problem(7, n=500, scale=0.4)
    expected = reference_temperature(logits, labels)
    short = fit_temperature(torch.from_numpy(logits), torch.from_numpy(labels), max_iter=1)
    assert abs(short - expected) > 0.1
    assert fit_temperature(torch.from_numpy(logits), torch.from_numpy(labels)) == pytest.approx(expected, rel=1e-3)


class _Overshooting:
    """An optimiser that ends at T = 20 whatever the loss (as a line search may on a flat or noisy NLL)."""

    def __init__(self, params, **_):
        self.params = list(params)

    def zero_grad(self):
        pass

    def step(self, closure):
        closure()
        with torch.no_grad():
            self.params[0].fill_(math.log(20.0))


def test_a_fit_worse_than_no_scaling_falls_back_to_one(monkeypatch):
    rng = np.random.default_rng(8)
    labels = torch.from_numpy(rng.integers(0, 4, 300))
    timid = torch.from_numpy((np.eye(4)[labels.numpy()] * 2.0).astype(np.float32))   # best T < 1; T = 20 is worse
    monkeypatch.setattr(torch.optim, "LBFGS", _Overshooting)
    assert fit_temperature(timid, labels) == 1.0
