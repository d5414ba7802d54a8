"""Out-of-scope detection: does an image resemble the training images at all?

A four-class softmax always picks one of its classes: shown a cat photo it may say "lungs, 97 %".
This module scores how far an image's pooled 1024-d DenseNet features lie from the training
features, so that such inputs get the verdict ``out_of_scope`` instead of an organ.

Method (Lee et al. 2018, "A simple unified framework for detecting out-of-distribution samples"):

* one mean per class, one covariance shared by all classes ("tied"), estimated from the
  within-class residuals of the training features;
* score(x) = min over classes of the Mahalanobis distance sqrt((x - mu_c)^T P (x - mu_c)),
  P = inverse covariance. Higher = stranger.

Why shrinkage: with 1024 feature dimensions and about a thousand training images the sample
covariance is singular or nearly so (rank <= n - classes, and ReLU features have dead dimensions
that are exactly zero everywhere), so its inverse does not exist or amplifies noise in directions
the data never varied in. We shrink it toward a scaled identity,
``(1 - a) S + a (trace(S) / d) I``, with the Ledoit-Wolf (2004) choice of ``a`` that minimises the
expected squared error of the estimate -- no tuning, and always invertible. A fixed ``a`` can be
passed instead (``shrinkage=0.1``).

Threshold rule: ``threshold`` = the ``percentile``-th percentile (default 95) of the scores of
held-out in-distribution images, and an image is flagged when its score is strictly above it, so at
most ``100 - percentile`` % (5 %) of those images are flagged. The held-out images are the
validation set when given. Without one, the training scores cannot be used directly (the means and
covariance were fitted to them, so they are optimistically small and the threshold would flag far
more than 5 % of new images); the scores then come from 5-fold cross-fitting on the training set
(fit on four fifths, score the fifth left out).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["OODDetector", "fit_ood", "ledoit_wolf_shrinkage", "DEFAULT_PERCENTILE", "PREFIX"]

PREFIX = "ood."
METHOD = "mahalanobis-tied"
DEFAULT_PERCENTILE = 95.0
CROSS_FIT_FOLDS = 5


@dataclass
class OODDetector:
    """Mahalanobis out-of-scope detector on pooled features (see the module docstring).

    Attributes:
        means: ``(C, D)`` class means of the training features (float32).
        precision: ``(D, D)`` inverse of the shrunk tied covariance (float32).
        threshold: scores strictly above this are out of scope.
        percentile: the percentile of held-out in-distribution scores the threshold was set at.
        shrinkage: the covariance shrinkage weight ``a`` in [0, 1] that was used.
        n_train: training images the statistics come from.
        n_val: held-out images the threshold comes from (0 with cross-fitting).
        threshold_from: ``"validation"`` or ``"train-crossfit"``.
    """

    means: torch.Tensor
    precision: torch.Tensor
    threshold: float
    percentile: float = DEFAULT_PERCENTILE
    shrinkage: float = 0.0
    n_train: int = 0
    n_val: int = 0
    threshold_from: str = "validation"

    def __post_init__(self) -> None:
        self.means = self.means.detach().to("cpu", torch.float32).contiguous()
        self.precision = self.precision.detach().to("cpu", torch.float32).contiguous()
        c, d = self.means.shape
        if self.precision.shape != (d, d):
            raise ValueError(f"precision must be ({d}, {d}) for {d}-d means, got {tuple(self.precision.shape)}")
        self.threshold = float(self.threshold)
        # Scoring expands (x - mu)^T P (x - mu) = x^T P x - 2 x^T P mu + mu^T P mu, in float64:
        # the expansion subtracts large numbers, which float32 would round badly.
        p64 = self.precision.double()
        self._p64 = p64
        self._p_means = self.means.double() @ p64                       # (C, D)
        self._mean_terms = (self._p_means * self.means.double()).sum(1)  # (C,)

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def n_classes(self) -> int:
        return int(self.means.shape[0])

    def class_distances(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` Mahalanobis distance of each row of ``pooled`` (B, D) to each class mean."""
        x = torch.as_tensor(pooled).detach().to("cpu", torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected pooled features of shape (B, {self.dim}), got {tuple(x.shape)}")
        xp = x @ self._p64
        squared = (xp * x).sum(1, keepdim=True) - 2.0 * x @ self._p_means.T + self._mean_terms
        return squared.clamp_min(0.0).sqrt()

    def score(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(B,)`` float32 out-of-scope scores (distance to the nearest class mean); higher = stranger."""
        return self.class_distances(pooled).min(dim=1).values.float()

    def is_out_of_scope(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: score strictly above :attr:`threshold`."""
        return self.score(pooled) > self.threshold

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The statistics as checkpoint extra tensors (keys start with ``ood.``)."""
        return {PREFIX + "means": self.means.clone(), PREFIX + "precision": self.precision.clone()}

    def to_meta(self) -> dict:
        """JSON-able description (stored as ``meta["ood"]``); with :meth:`to_tensors` it rebuilds the detector."""
        return {
            "method": METHOD,
            "covariance": "tied, shrunk toward scaled identity",
            "shrinkage": float(self.shrinkage),
            "threshold": float(self.threshold),
            "percentile": float(self.percentile),
            "threshold_from": self.threshold_from,
            "rule": (f"out of scope when the Mahalanobis distance to the nearest class mean exceeds the "
                     f"{self.percentile:g}th percentile of held-out in-distribution scores"),
            "n_train": int(self.n_train),
            "n_val": int(self.n_val),
            "n_classes": self.n_classes,
            "dim": self.dim,
        }

    @classmethod
    def from_checkpoint(cls, extra: dict, meta: dict) -> "OODDetector | None":
        """Rebuild from a checkpoint's extra tensors and metadata; ``None`` if it has no OOD statistics.

        Raises ``ValueError`` when the statistics are present but inconsistent (a damaged checkpoint).
        """
        info = (meta or {}).get("ood")
        means, precision = (extra or {}).get(PREFIX + "means"), (extra or {}).get(PREFIX + "precision")
        if not info or means is None or precision is None:
            return None
        if info.get("method", METHOD) != METHOD:
            raise ValueError(f"unknown out-of-scope method {info.get('method')!r} in checkpoint")
        threshold = float(info["threshold"])
        if not math.isfinite(threshold):
            raise ValueError(f"out-of-scope threshold in checkpoint is not a number: {info['threshold']!r}")
        classes = (meta or {}).get("classes")
        if classes is not None and means.shape[0] != len(classes):
            raise ValueError(f"out-of-scope statistics have {means.shape[0]} class means for {len(classes)} classes")
        return cls(means=means, precision=precision, threshold=threshold,
                   percentile=float(info.get("percentile", DEFAULT_PERCENTILE)),
                   shrinkage=float(info.get("shrinkage", 0.0)), n_train=int(info.get("n_train", 0)),
                   n_val=int(info.get("n_val", 0)), threshold_from=str(info.get("threshold_from", "validation")))


# --------------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------------

def ledoit_wolf_shrinkage(residuals: torch.Tensor) -> float:
    """Ledoit-Wolf (2004) optimal weight ``a`` for ``(1 - a) S + a mu I`` from centred data ``(n, d)``.

    ``S = X^T X / n``, ``mu = trace(S) / d``. ``a = min(b2, d2) / d2`` with ``d2 = ||S - mu I||^2``
    (how far S is from a scaled identity) and ``b2`` the estimated variance of S's entries (how much
    of that distance is sampling noise), both per dimension (Frobenius norm / d).
    """
    x = residuals.to(torch.float64)
    n, d = x.shape
    if n < 2:
        return 1.0
    s = x.T @ x / n
    mu = torch.trace(s) / d
    d2 = ((s - mu * torch.eye(d, dtype=x.dtype)) ** 2).sum() / d
    # b2 = (1/n^2) sum_k ||x_k x_k^T - S||^2 / d, expanded to avoid n outer products:
    #    = (sum_k ||x_k||^4 / n - ||S||^2) / (n d)
    row_sq = (x ** 2).sum(1)                                  # ||x_k||^2
    b2_bar = ((row_sq ** 2).sum() / n - (s ** 2).sum()) / (n * d)
    b2 = torch.minimum(b2_bar.clamp_min(0.0), d2)
    if float(d2) <= 0.0:
        return 1.0
    return float(b2 / d2)


def _class_means(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    means = torch.zeros(n_classes, features.shape[1], dtype=torch.float64)
    for c in range(n_classes):
        rows = features[labels == c]
        if len(rows) == 0:
            raise ValueError(f"class {c} has no training features; every class needs at least one")
        means[c] = rows.mean(0)
    return means


def _fit_statistics(features: torch.Tensor, labels: torch.Tensor, n_classes: int,
                    shrinkage: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Class means, precision of the shrunk tied covariance, and the shrinkage used."""
    means = _class_means(features, labels, n_classes)
    residuals = features - means[labels]
    d = features.shape[1]
    cov = residuals.T @ residuals / max(len(features), 1)
    a = ledoit_wolf_shrinkage(residuals) if shrinkage is None else float(shrinkage)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {a}")
    mu = float(torch.trace(cov)) / d
    # The floor keeps the matrix invertible when every feature is constant (mu = 0, e.g. dead units).
    target = max(mu, 1e-8)
    shrunk = (1.0 - a) * cov + a * target * torch.eye(d, dtype=torch.float64)
    shrunk += 1e-9 * target * torch.eye(d, dtype=torch.float64)
    precision = torch.linalg.inv(0.5 * (shrunk + shrunk.T))
    return means, 0.5 * (precision + precision.T), a


def _percentile(scores: torch.Tensor, percentile: float) -> float:
    """The ``percentile``-th percentile of ``scores``, rounded up to an observed score.

    Rounding up keeps the promise "at most 100 - percentile % flagged" for every sample size: with
    linear interpolation, 186 validation scores put the 95th percentile between the 176th and 177th
    smallest, and the 10 above it are 5.4 %."""
    return float(torch.quantile(scores.double(), percentile / 100.0, interpolation="higher"))


def _cross_fit_scores(features, labels, n_classes, shrinkage, folds: int) -> torch.Tensor:
    """Honest in-distribution scores for every training row: each scored by statistics fitted without it."""
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(features), generator=generator)
    scores = torch.empty(len(features), dtype=torch.float32)
    for fold in range(folds):
        held = order[fold::folds]
        keep = torch.ones(len(features), dtype=torch.bool)
        keep[held] = False
        if any(int((labels[keep] == c).sum()) == 0 for c in range(n_classes)):
            raise ValueError("too few training features per class to cross-fit the out-of-scope threshold; "
                             "pass validation features")
        means, precision, _ = _fit_statistics(features[keep], labels[keep], n_classes, shrinkage)
        fold_detector = OODDetector(means, precision, threshold=0.0)
        scores[held] = fold_detector.score(features[held])
    return scores


def fit_ood(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor | None = None,
            *, percentile: float = DEFAULT_PERCENTILE, shrinkage: float | None = None,
            n_classes: int | None = None) -> OODDetector:
    """Fit the out-of-scope detector.

    Args:
        train_features: ``(N, D)`` pooled features of the training images (eval mode, no augmentation).
        train_labels: ``(N,)`` integer class labels.
        val_features: ``(M, D)`` pooled features of held-out in-distribution images (the validation
            set); the threshold is the ``percentile``-th percentile of their scores. ``None`` =
            5-fold cross-fitted training scores instead.
        percentile: in (0, 100]; at most ``100 - percentile`` % of those held-out images are flagged.
        shrinkage: covariance shrinkage weight in [0, 1]; ``None`` = Ledoit-Wolf.
        n_classes: number of classes (default ``max(label) + 1``); every class needs features.
    """
    features = torch.as_tensor(train_features).detach().to("cpu", torch.float64)
    labels = torch.as_tensor(train_labels).detach().to("cpu", torch.long).flatten()
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"need (N, D) features and N labels, got {tuple(features.shape)} and {len(labels)}")
    if not torch.isfinite(features).all():
        raise ValueError("training features contain NaN or infinite values")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    n_classes = int(labels.max()) + 1 if n_classes is None else int(n_classes)
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise ValueError(f"labels must be in [0, {n_classes})")

    means, precision, used = _fit_statistics(features, labels, n_classes, shrinkage)
    detector = OODDetector(means, precision, threshold=0.0, percentile=percentile, shrinkage=used,
                           n_train=len(features))
    if val_features is not None and len(val_features) > 0:
        held_scores = detector.score(torch.as_tensor(val_features))
        detector.n_val, detector.threshold_from = len(held_scores), "validation"
    else:
        held_scores = _cross_fit_scores(features, labels, n_classes, shrinkage, CROSS_FIT_FOLDS)
        detector.n_val, detector.threshold_from = 0, "train-crossfit"
    detector.threshold = _percentile(held_scores, percentile)
    return detector
