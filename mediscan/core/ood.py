"""Out-of-scope detection: does an image resemble the training images at all?

A four-class softmax always picks one of its classes: shown a cat photo it may say "lungs, 97 %".
This module scores how far an image's DenseNet features lie from the training images' features, so
that such inputs get the verdict ``out_of_scope`` instead of an organ.

Method (Lee et al. 2018, "A simple unified framework for detecting out-of-distribution samples"),
on the spatially pooled, rectified output of a few backbone stages ("layers"):

* per layer, one mean per class and one covariance shared by all classes ("tied"), estimated from
  the within-class residuals of the training features;
* per layer, distance(x) = min over classes of the Mahalanobis distance
  sqrt((x - mu_c)^T P (x - mu_c)), P = inverse covariance;
* the layers are put on one scale by dividing each distance by that layer's ``percentile``-th
  percentile of held-out in-distribution distances (its *scale*), and the score is the largest of
  these relative distances. Higher = stranger; 1.0 on a layer means "as unusual there as the 95th
  percentile validation image".

Why more than the last layer (Lee et al. also combine layers): the final 1024-d features keep what the
classifier needs to tell organs apart, and a model trained on a thousand radiographs maps much of what
it has never seen (a grayscale photo, a micrograph, a page of text) somewhere among them. An early
stage (``denseblock1``, 256 channels: local texture, edges, grain and noise) tells "not a radiograph"
apart far better, and the two together flag more than either alone. Adding denseblock2 and denseblock3
did not help (each layer spends part of the 5 % false-alarm budget), nor did Gram-matrix deviations
(Sastry & Oore 2020) of any stage, nor perturbing the input against the score's gradient (Lee et al.'s
input preprocessing). The measurements behind this choice (``bench/ood_benchmark.py``) are in
docs/benchmarks.md, "Out-of-scope detector: which layers".

The covariance is shrunk so that it is always invertible (:mod:`mediscan.core.mahalanobis` says why).

Threshold rule: an image is flagged when its score is strictly above ``threshold``, which lies halfway
between the ``percentile``-th percentile (default 95) of the (combined) scores of held-out
in-distribution images and the next higher of those scores. So at most ``100 - percentile`` % (5 %)
of those images are flagged, and small rounding differences between training and inference do not
flag one more. The held-out images are the validation set when given. Without one, the training
scores cannot be used directly (the means and covariance were fitted to them, so they are
optimistically small and the threshold would flag far more than 5 % of new images); the scores then
come from 5-fold cross-fitting on the training set (fit on four fifths, score the fifth left out).

Energy (optional; checkpoints trained with outlier exposure, :mod:`mediscan.training.outliers`): the
classifier's free energy E = -logsumexp(logits) (Liu et al. 2020) joins the layers as one more relative
score, ``E - scale + 1`` with ``scale`` its ``percentile``-th validation percentile (1.0 there, as for the
layers), so the same combination and the same validation-only threshold apply. Outlier exposure trains
the logits to give synthetic outliers a high energy; without it the energy adds little (docs/benchmarks.md).

Combining the parts (``combination``). ``"max"``: the largest relative part, as above. ``"fisher"``
(the default once the energy is a part): each part's score becomes its p-value among the validation
images' scores of that part, ``p = (1 + #validation scores >= it) / (1 + #validation scores)``, and the
score is Fisher's ``-sum(log p)`` over the parts (Fisher 1925; Haroush et al. 2022 combine layer-wise
p-values of a network this way for OOD detection). Why: the energy part's validation scores have a long
upper tail (hard in-scope images get a high energy), so under the max the energy alone used almost all of
the 5 % budget and an image that was unusual on every part, but extreme on none, passed. Fisher's sum
flags such an image. The threshold is then placed, as for the max, among the validation images' own
combined scores, each computed leaving itself out of the reference (``p = #scores >= it / #scores``), so
the promise "at most 5 % of validation flagged" holds for the same reason (the validation images
themselves, scored later against a reference that holds them, come out a little lower). On ten
outlier-exposure checkpoints it flagged more of the out-of-scope images on every one, and fewer in-scope
test images in all (3.0 % against 4.9 %); on three without the energy part it flagged fewer
(docs/benchmarks.md, "Combining the detector's parts"), so those keep the max. The reference holds at
most :data:`~mediscan.core.combination.REFERENCE_SIZE` scores per part (evenly spaced order statistics of a larger validation set),
so the checkpoint and the cost per image stay flat as the validation set grows. The threshold keeps a
margin of at least ``P ln((M + 1) / M)`` above the kept validation score (``P`` parts, ``M`` reference
scores; :func:`_fisher_margin` says why). A limit: one part's
p-value is at least ``1 / (1 + M)``, so with a small validation set one extreme part alone cannot pass the
threshold (186 images: ``-log p <= 5.2`` against a threshold near 8); the synthetic outliers the network
trained on, which the energy alone flagged under the max, are flagged less often (docs/benchmarks.md).

Checkpoints written before several layers were used hold one layer (``norm5``) under the method name
``mahalanobis-tied``; they load as a one-layer detector with scale 1, so their scores and threshold
mean what they meant then.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from mediscan.core.combination import COMBINATIONS, combine, reference_sample
from mediscan.core.mahalanobis import MahalanobisLayer, fit_statistics, ledoit_wolf_shrinkage

__all__ = ["OODDetector", "MahalanobisLayer", "fit_ood", "free_energy", "ENERGY", "ledoit_wolf_shrinkage", "DEFAULT_LAYERS",
           "FINAL_LAYER", "DEFAULT_PERCENTILE", "PREFIX"]

PREFIX = "ood."
METHOD = "mahalanobis-tied-layers"
LEGACY_METHOD = "mahalanobis-tied"          # one layer (norm5), tensors ood.means / ood.precision
DEFAULT_PERCENTILE = 95.0
CROSS_FIT_FOLDS = 5
#: The backbone's last stage: its pooled, rectified output is what the classifier's Linear layer sees.
FINAL_LAYER = "norm5"
#: The name of the energy part among :meth:`OODDetector.layer_scores`.
ENERGY = "energy"
#: The backbone stages the detector reads (names of ``model.features`` children), early to late.
DEFAULT_LAYERS = ("denseblock1", FINAL_LAYER)

Features = "torch.Tensor | Mapping[str, torch.Tensor]"


@dataclass
class OODDetector:
    """Multi-layer Mahalanobis out-of-scope detector (see the module docstring).

    Attributes:
        layers: backbone stage name -> :class:`MahalanobisLayer`, early to late.
        threshold: scores strictly above this are out of scope.
        percentile: the percentile of held-out in-distribution scores the threshold (and each layer's
            scale) was set at.
        n_train: training images the statistics come from.
        n_val: held-out images the threshold comes from (0 with cross-fitting).
        threshold_from: ``"validation"`` or ``"train-crossfit"``.
        method: how it is stored (``mahalanobis-tied-layers``; ``mahalanobis-tied`` for old checkpoints).
        energy_scale: the validation percentile of the free energy when the energy is part of the score
            (then :meth:`score` needs the logits), else ``None``.
        combination: ``"max"`` or ``"fisher"`` (:data:`COMBINATIONS`, the module docstring).
        reference: with ``"fisher"``, ``(parts, M)`` validation scores of each part (rows in
            :attr:`part_names` order, sorted ascending, float64) that p-values are counted against.
    """

    layers: dict[str, MahalanobisLayer]
    threshold: float
    percentile: float = DEFAULT_PERCENTILE
    n_train: int = 0
    n_val: int = 0
    threshold_from: str = "validation"
    method: str = field(default=METHOD)
    energy_scale: float | None = None
    combination: str = "max"
    reference: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("an out-of-scope detector needs at least one layer")
        self.layers = dict(self.layers)
        self.threshold = float(self.threshold)
        counts = {layer.n_classes for layer in self.layers.values()}
        if len(counts) != 1:
            raise ValueError(f"every layer needs the same number of class means, got {sorted(counts)}")
        if self.combination not in COMBINATIONS:
            raise ValueError(f"unknown way to combine the detector's parts {self.combination!r}; "
                             f"one of {', '.join(COMBINATIONS)}")
        if self.combination == "fisher":
            reference = None if self.reference is None else torch.as_tensor(self.reference).detach()
            if reference is None or reference.ndim != 2 or reference.shape[0] != len(self.part_names) \
                    or reference.shape[1] == 0 or not torch.isfinite(reference).all():
                raise ValueError(f"Fisher's combination needs finite validation scores for each of its "
                                 f"{len(self.part_names)} parts, got "
                                 f"{None if reference is None else tuple(reference.shape)}")
            self.reference = reference.to("cpu", torch.float64).sort(dim=1).values.contiguous()
        else:
            self.reference = None

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The backbone stages whose pooled features :meth:`score` needs, early to late."""
        return tuple(self.layers)

    @property
    def part_names(self) -> tuple[str, ...]:
        """The parts :meth:`layer_scores` returns, in order: the layers, then :data:`ENERGY` when used."""
        return self.layer_names + ((ENERGY,) if self.energy_scale is not None else ())

    @property
    def n_classes(self) -> int:
        return next(iter(self.layers.values())).n_classes

    def layer_scores(self, features: Features, logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each layer's ``(B,)`` float64 distance divided by its scale (1.0 = that layer's percentile), and
        the relative energy under :data:`ENERGY` when the detector uses it (``logits`` required then)."""
        features = self._by_layer(features)
        scores = {name: layer.distance(features[name]) / layer.scale for name, layer in self.layers.items()}
        if self.energy_scale is not None:
            if logits is None:
                raise ValueError("this detector also scores the classifier's energy: pass the logits")
            scores[ENERGY] = free_energy(logits).detach().double().cpu() - self.energy_scale + 1.0
        return scores

    def score(self, features: Features, logits: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` float32 out-of-scope scores; higher = stranger.

        ``features``: ``{layer name: (B, D) pooled features}`` for every name in :attr:`layer_names`
        (extra names are ignored), or one ``(B, D)`` tensor for a one-layer detector; ``logits`` ``(B, C)``
        the classifier's raw outputs (needed when :attr:`energy_scale` is set, ignored otherwise).
        """
        parts = torch.stack(list(self.layer_scores(features, logits).values()))
        return combine(parts, self.combination, self.reference).float()

    def is_out_of_scope(self, features: Features, logits: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` bool: score strictly above :attr:`threshold`."""
        return self.flag(self.score(features, logits))

    def flag(self, scores: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool for scores from :meth:`score`: strictly above :attr:`threshold` (the one comparison)."""
        return torch.as_tensor(scores) > self.threshold

    def rule(self) -> str:
        """How this detector decides, in one sentence for people (the model card; ``meta["ood"]["rule"]``)."""
        held_out = "validation" if self.threshold_from == "validation" else "held-out training"
        if self.combination == "fisher":
            energy = " and the classifier energy" if self.energy_scale is not None else ""
            return (f"Images more unusual than {self.percentile:g}% of {held_out} images on the Mahalanobis "
                    f"scores on {', '.join(self.layer_names)}{energy} taken together "
                    f"(Fisher's combination of each score's {held_out} p-value, -sum(log p) > "
                    f"{self.threshold:.3g}) are reported as out of scope.")
        return (f"Images whose features lie further from the training images than {self.percentile:g}% of "
                f"{held_out} images (Mahalanobis score on {', '.join(self.layer_names)}"
                f"{' and the classifier energy' if self.energy_scale is not None else ''} > "
                f"{self.threshold:.3g}) are reported as out of scope.")

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The statistics as checkpoint extra tensors (``ood.<layer>.means``, ``ood.<layer>.precision``)."""
        tensors = {}
        for name, layer in self.layers.items():
            tensors[f"{PREFIX}{name}.means"] = layer.means.clone()
            tensors[f"{PREFIX}{name}.precision"] = layer.precision.clone()
        if self.reference is not None:
            tensors[f"{PREFIX}reference"] = self.reference.clone()
        return tensors

    def to_meta(self) -> dict:
        """JSON-able description (stored as ``meta["ood"]``); with :meth:`to_tensors` it rebuilds the detector."""
        return {
            "method": METHOD,
            "covariance": "tied, shrunk toward scaled identity",
            "layers": [{"name": name, "dim": layer.dim, "shrinkage": float(layer.shrinkage),
                        "scale": float(layer.scale)} for name, layer in self.layers.items()],
            "threshold": float(self.threshold),
            "percentile": float(self.percentile),
            "threshold_from": self.threshold_from,
            "rule": self.rule(),   # descriptive only: from_checkpoint never reads it
            "n_train": int(self.n_train),
            "n_val": int(self.n_val),
            "n_classes": self.n_classes,
            **({"energy": {"scale": float(self.energy_scale)}} if self.energy_scale is not None else {}),
            "combination": self.combination,
            **({"reference": {"parts": list(self.part_names), "size": int(self.reference.shape[1])}}
               if self.reference is not None else {}),
        }

    @classmethod
    def from_checkpoint(cls, extra: dict, meta: dict) -> "OODDetector | None":
        """Rebuild from a checkpoint's extra tensors and metadata; ``None`` if it has no OOD statistics.

        Raises ``ValueError`` when the statistics are present but inconsistent (a damaged checkpoint).
        """
        info, extra = (meta or {}).get("ood"), extra or {}
        if not info:
            return None
        method = info.get("method", LEGACY_METHOD)
        if method == LEGACY_METHOD:
            specs = [{"name": FINAL_LAYER, "shrinkage": info.get("shrinkage", 0.0), "scale": 1.0,
                      "means": PREFIX + "means", "precision": PREFIX + "precision"}]
        elif method == METHOD:
            specs = [dict(spec, means=f"{PREFIX}{spec['name']}.means", precision=f"{PREFIX}{spec['name']}.precision")
                     for spec in info.get("layers") or []]
        else:
            raise ValueError(f"unknown out-of-scope method {method!r} in checkpoint")
        if not specs or any(extra.get(spec["means"]) is None or extra.get(spec["precision"]) is None
                            for spec in specs):
            return None
        threshold = float(info["threshold"])
        if not math.isfinite(threshold):
            raise ValueError(f"out-of-scope threshold in checkpoint is not a number: {info['threshold']!r}")
        layers = {spec["name"]: MahalanobisLayer(extra[spec["means"]], extra[spec["precision"]],
                                                 shrinkage=float(spec.get("shrinkage", 0.0)),
                                                 scale=float(spec.get("scale", 1.0))) for spec in specs}
        classes = (meta or {}).get("classes")
        for name, layer in layers.items():
            if classes is not None and layer.n_classes != len(classes):
                raise ValueError(f"out-of-scope statistics of layer {name!r} have {layer.n_classes} class means "
                                 f"for {len(classes)} classes")
        # Checkpoints from before the combination was recorded took the max.
        combination = str(info.get("combination", "max"))
        reference = extra.get(PREFIX + "reference") if combination == "fisher" else None
        detector = cls(layers=layers, threshold=threshold,
                       percentile=float(info.get("percentile", DEFAULT_PERCENTILE)),
                       n_train=int(info.get("n_train", 0)), n_val=int(info.get("n_val", 0)),
                       threshold_from=str(info.get("threshold_from", "validation")), method=method,
                       energy_scale=_energy_scale(info), combination=combination, reference=reference)
        stored_parts = (info.get("reference") or {}).get("parts")
        if stored_parts is not None and tuple(stored_parts) != detector.part_names:
            raise ValueError(f"out-of-scope reference rows are for parts {stored_parts}, the detector has "
                             f"{list(detector.part_names)}")
        return detector

    def _by_layer(self, features: Features) -> Mapping[str, torch.Tensor]:
        if isinstance(features, Mapping):
            missing = [name for name in self.layers if name not in features]
            if missing:
                raise ValueError(f"missing pooled features for layer(s) {', '.join(missing)}; "
                                 f"this detector reads {', '.join(self.layers)}")
            return features
        if len(self.layers) != 1:
            raise ValueError(f"this detector reads {len(self.layers)} layers ({', '.join(self.layers)}): "
                             f"pass {{layer name: pooled features}}")
        return {next(iter(self.layers)): features}


def free_energy(logits: torch.Tensor) -> torch.Tensor:
    """``(B,)`` free energy ``-logsumexp(logits)`` (float32): low for confident answers, -log(C) for flat ones.

    Keeps the autograd graph (training's energy-margin loss needs it); the detector detaches its result."""
    return -torch.logsumexp(torch.as_tensor(logits).float(), dim=1)


def _energy_scale(info: dict) -> float | None:
    energy = info.get("energy")
    if not energy:
        return None
    scale = float(energy["scale"])
    if not math.isfinite(scale):
        raise ValueError(f"out-of-scope energy scale in checkpoint is not a number: {energy['scale']!r}")
    return scale


# --------------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------------

def _percentile(scores: torch.Tensor, percentile: float) -> float:
    """The ``percentile``-th percentile of ``scores``, rounded up to an observed score.

    Rounding up keeps the promise "at most 100 - percentile % flagged" for every sample size: with
    linear interpolation, 186 validation scores put the 95th percentile between the 176th and 177th
    smallest, and the 10 above it are 5.4 %."""
    return float(torch.quantile(scores.double(), percentile / 100.0, interpolation="higher"))


def _threshold(scores: torch.Tensor, percentile: float, margin: float = 0.0) -> float:
    """Halfway between the ``percentile``-th percentile of ``scores`` (see :func:`_percentile`) and the
    next higher score, and at least ``margin`` above that percentile: it flags exactly the held-out images
    the percentile flags.

    Why not the percentile itself: that is one image's own score, and an image *on* the threshold is
    flagged by the slightest rounding difference between how training computed its features and how
    the Predictor does (GPU TF32 convolutions, another batch size or memory layout, ONNX Runtime); this
    was seen on a GPU-trained checkpoint (docs/benchmarks.md). Halfway leaves the widest margin on both
    sides."""
    scores = scores.double()
    kept = _percentile(scores, percentile)
    above = scores[scores > kept]
    halfway = kept if len(above) == 0 else (kept + float(above.min())) / 2.0
    return max(halfway, kept + margin)


def _placed_threshold(held: torch.Tensor, combination: str, reference: torch.Tensor | None, complete: bool,
                      percentile: float) -> tuple[torch.Tensor, float]:
    """``(combined held-out scores, threshold)`` from the held-out relative parts ``(P, N)``: halfway above
    their ``percentile``-th percentile (:func:`_threshold`), and under Fisher with every held-out image in the
    reference at least :func:`_fisher_margin` above it."""
    # Rounded to float32 as :meth:`OODDetector.score` returns it: the threshold is placed among the
    # scores the Predictor will compare with it.
    combined = combine(held, combination, reference, leave_one_out=complete).float()
    margin = _fisher_margin(*reference.shape) if combination == "fisher" and complete else 0.0
    return combined, _threshold(combined, percentile, margin)


def _fisher_margin(parts: int, size: int) -> float:
    """How far above the kept validation score a Fisher threshold must lie: ``parts * ln((size + 1) / size)``,
    plus float32 rounding of the score.

    Why: each validation image is one of the ``size`` reference values, and its threshold-placing score left it
    out (``p = #reference >= s / size``, the count including itself). Scored again later, as the Predictor
    scores any image, each part comes out a hair above or below its own reference value when the features
    are rounded a little differently (another batch size, GPU TF32, ONNX Runtime). A hair above, its own value
    drops out of the count: ``p = (1 + #others >= s) / (1 + size)``, which is ``size / (size + 1)`` times the
    left-out p-value, so the score rises by up to ``ln((size + 1) / size)`` per part. Halfway to the next
    validation score can be less than that (two close scores); this margin keeps those images below the
    threshold (a hair below only lowers the score); 1e-4 more covers the float32 rounding of the score."""
    return parts * math.log1p(1.0 / size) + 1e-4


def _cross_fit_distances(features, labels, n_classes, shrinkage, folds: int) -> torch.Tensor:
    """Honest in-distribution distances for every training row: each from statistics fitted without it.

    The folds depend only on the number of rows (fixed seed), so every layer uses the same folds."""
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(features), generator=generator)
    distances = torch.empty(len(features), dtype=torch.float64)
    for fold in range(folds):
        held = order[fold::folds]
        keep = torch.ones(len(features), dtype=torch.bool)
        keep[held] = False
        if any(int((labels[keep] == c).sum()) == 0 for c in range(n_classes)):
            raise ValueError("too few training features per class to cross-fit the out-of-scope threshold; "
                             "pass validation features")
        means, precision, _ = fit_statistics(features[keep], labels[keep], n_classes, shrinkage)
        distances[held] = MahalanobisLayer(means, precision).distance(features[held])
    return distances


def _as_layers(features: Features, what: str) -> dict[str, torch.Tensor]:
    """``{layer: (N, D) float64}`` from a mapping, or from one tensor (= the final layer)."""
    items = features.items() if isinstance(features, Mapping) else [(FINAL_LAYER, features)]
    layers = {}
    for name, value in items:
        value = torch.as_tensor(value).detach().to("cpu", torch.float64)
        if value.ndim != 2:
            raise ValueError(f"{what} features of layer {name!r} must be (N, D), got {tuple(value.shape)}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{what} features of layer {name!r} contain NaN or infinite values")
        layers[name] = value
    if not layers:
        raise ValueError(f"no {what} features given")
    return layers


def _training_inputs(features: Features, labels, n_classes: int | None):
    """Checked ``({layer: (N, D) float64}, (N,) long labels, number of classes)``."""
    train = _as_layers(features, "training")
    labels = torch.as_tensor(labels).detach().to("cpu", torch.long).flatten()
    if any(len(value) != len(labels) for value in train.values()):
        raise ValueError(f"need N features per layer for N = {len(labels)} labels, got "
                         f"{ {name: len(value) for name, value in train.items()} }")
    n_classes = int(labels.max()) + 1 if n_classes is None else int(n_classes)
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise ValueError(f"labels must be in [0, {n_classes})")
    return train, labels, n_classes


def _validation_inputs(features: Features, train: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Checked validation features on the same layers as ``train``; ``None`` when there are no rows."""
    val = _as_layers(features, "validation")
    if set(val) != set(train):
        raise ValueError(f"validation features have layers {sorted(val)}, training features {sorted(train)}")
    if len({len(value) for value in val.values()}) != 1:
        raise ValueError("validation features need the same number of rows on every layer")
    return None if len(next(iter(val.values()))) == 0 else val


def _checked_combination(combination: str | None, *, with_energy: bool, with_validation: bool) -> str:
    """``combination``, or the default (Fisher with the energy, else max); ``ValueError`` when it cannot be used."""
    combination = ("fisher" if with_energy else "max") if combination is None else combination
    if combination not in COMBINATIONS:
        raise ValueError(f"combination must be one of {', '.join(COMBINATIONS)}, got {combination!r}")
    if combination == "fisher" and not with_validation:
        raise ValueError("Fisher's combination counts p-values among validation scores: pass val_features")
    return combination


def fit_ood(train_features: Features, train_labels: torch.Tensor, val_features: Features | None = None,
            *, percentile: float = DEFAULT_PERCENTILE, shrinkage: float | None = None,
            n_classes: int | None = None, val_logits: torch.Tensor | None = None,
            combination: str | None = None) -> OODDetector:
    """Fit the out-of-scope detector.

    Args:
        train_features: ``{layer name: (N, D) pooled features}`` of the training images (eval mode, no
            augmentation), early to late; one ``(N, D)`` tensor means the final layer alone.
        train_labels: ``(N,)`` integer class labels.
        val_features: the same layers for held-out in-distribution images (the validation set); each
            layer's scale and the threshold are ``percentile``-th percentiles of their scores.
            ``None`` = 5-fold cross-fitted training scores instead.
        percentile: in (0, 100]; at most ``100 - percentile`` % of those held-out images are flagged.
        shrinkage: covariance shrinkage weight in [0, 1]; ``None`` = Ledoit-Wolf, per layer.
        n_classes: number of classes (default ``max(label) + 1``); every class needs features.
        val_logits: ``(N_val, C)`` raw logits of the validation images: the free energy then joins the
            score (its scale: the ``percentile``-th percentile of their energies). Needs ``val_features``.
        combination: ``"max"`` or ``"fisher"`` (module docstring); ``None`` = ``"fisher"`` when the energy is
            a part, else ``"max"`` (what the measurements support). Fisher needs ``val_features``.
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    combination = _checked_combination(combination, with_energy=val_logits is not None,
                                       with_validation=val_features is not None)
    train, labels, n_classes = _training_inputs(train_features, train_labels, n_classes)
    val = None if val_features is None else _validation_inputs(val_features, train)
    n_train = len(labels)
    layers, held_relative = {}, []
    for name, features in train.items():
        means, precision, used = fit_statistics(features, labels, n_classes, shrinkage)
        layer = MahalanobisLayer(means, precision, shrinkage=used)
        if val is not None:
            held = layer.distance(val[name])
        else:
            held = _cross_fit_distances(features, labels, n_classes, shrinkage, CROSS_FIT_FOLDS)
        # The floor keeps a degenerate layer (every held-out image exactly at a class mean) usable.
        layer.scale = max(_percentile(held, percentile), 1e-12)
        layers[name] = layer
        held_relative.append(held / layer.scale)
    energy_scale = None
    if val_logits is not None:
        if val is None or len(val_logits) != len(held_relative[0]):
            raise ValueError("val_logits need validation features with one row per logit row")
        val_energy = free_energy(val_logits).detach().double()
        energy_scale = _percentile(val_energy, percentile)
        held_relative.append(val_energy - energy_scale + 1.0)
    held = torch.stack(held_relative)
    reference, complete = reference_sample(held) if combination == "fisher" else (None, False)
    combined, threshold = _placed_threshold(held, combination, reference, complete, percentile)
    return OODDetector(layers=layers, threshold=threshold, percentile=percentile,
                       n_train=n_train, n_val=0 if val is None else len(combined),
                       threshold_from="train-crossfit" if val is None else "validation", energy_scale=energy_scale,
                       combination=combination, reference=reference)
