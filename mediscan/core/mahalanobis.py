"""Class-conditional Gaussian statistics with one shared ("tied") covariance, and distances under them.

The statistics half of the out-of-scope detector (:mod:`mediscan.core.ood` decides what the distances
mean): per layer, one mean per class and the precision (inverse) of a shrunk tied covariance estimated
from the within-class residuals, and the Mahalanobis distance of new features to each class mean.

Why shrinkage: with up to 1024 feature dimensions and about a thousand training images the sample
covariance is singular or nearly so (rank <= n - classes, and ReLU features have dead dimensions
that are exactly zero everywhere), so its inverse does not exist or amplifies noise in directions
the data never varied in. We shrink it toward a scaled identity,
``(1 - a) S + a (trace(S) / d) I``, with the Ledoit-Wolf (2004) choice of ``a`` that minimises the
expected squared error of the estimate -- no tuning, and always invertible. A fixed ``a`` can be
passed instead (``shrinkage=0.1``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["MahalanobisLayer", "ledoit_wolf_shrinkage", "fit_statistics"]


@dataclass
class MahalanobisLayer:
    """One layer's statistics: class means, tied precision, and the scale that relates it to other layers.

    Attributes:
        means: ``(C, D)`` class means of the training features (float32).
        precision: ``(D, D)`` inverse of the shrunk tied covariance (float32).
        shrinkage: the covariance shrinkage weight ``a`` in [0, 1] that was used.
        scale: the detector divides this layer's distances by it (its held-out percentile distance).
    """

    means: torch.Tensor
    precision: torch.Tensor
    shrinkage: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        self.means = self.means.detach().to("cpu", torch.float32).contiguous()
        self.precision = self.precision.detach().to("cpu", torch.float32).contiguous()
        c, d = self.means.shape
        if self.precision.shape != (d, d):
            raise ValueError(f"precision must be ({d}, {d}) for {d}-d means, got {tuple(self.precision.shape)}")
        self.scale = float(self.scale)
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"layer scale must be a positive number, got {self.scale!r}")
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
        """``(B, C)`` float64 Mahalanobis distance of each row of ``pooled`` (B, D) to each class mean."""
        x = torch.as_tensor(pooled).detach().to("cpu", torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected pooled features of shape (B, {self.dim}), got {tuple(x.shape)}")
        xp = x @ self._p64
        squared = (xp * x).sum(1, keepdim=True) - 2.0 * x @ self._p_means.T + self._mean_terms
        return squared.clamp_min(0.0).sqrt()

    def distance(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(B,)`` float64 distance to the nearest class mean (not yet divided by :attr:`scale`)."""
        return self.class_distances(pooled).min(dim=1).values


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


def class_means(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``(C, D)`` float64 mean of each class's rows; every class needs at least one row."""
    means = torch.zeros(n_classes, features.shape[1], dtype=torch.float64)
    for c in range(n_classes):
        rows = features[labels == c]
        if len(rows) == 0:
            raise ValueError(f"class {c} has no training features; every class needs at least one")
        means[c] = rows.mean(0)
    return means


def fit_statistics(features: torch.Tensor, labels: torch.Tensor, n_classes: int,
                   shrinkage: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Class means, precision of the shrunk tied covariance, and the shrinkage used.

    ``shrinkage``: the weight ``a`` in [0, 1]; ``None`` = :func:`ledoit_wolf_shrinkage` of the residuals."""
    means = class_means(features, labels, n_classes)
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
