"""Out-of-scope detector: per-layer Mahalanobis distance with a tied, shrunk covariance (mediscan.ood).

Synthetic features only (no model): four Gaussian clusters stand in for the four organ classes; a
second, independent set of clusters stands in for an earlier backbone layer.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from mediscan.core.ood import FINAL_LAYER, MahalanobisLayer, OODDetector, fit_ood, ledoit_wolf_shrinkage

N_CLASSES = 4


def clustered(n: int, dim: int, seed: int, centers: torch.Tensor | None = None):
    """``n`` features around four class centres (anisotropic noise, like real feature spreads)."""
    gen = torch.Generator().manual_seed(seed)
    if centers is None:
        centers = torch.randn(N_CLASSES, dim, generator=torch.Generator().manual_seed(1234)) * 4
    scales = torch.linspace(0.3, 2.0, dim)           # some directions vary a lot, some hardly
    labels = torch.arange(n) % N_CLASSES
    features = centers[labels] + torch.randn(n, dim, generator=gen) * scales
    return features, labels


def only_layer(detector: OODDetector) -> MahalanobisLayer:
    """The statistics of a one-layer detector (fitted on a plain tensor: the final layer)."""
    assert detector.layer_names == (FINAL_LAYER,)
    return detector.layers[FINAL_LAYER]


def flagged(detector: OODDetector, features) -> float:
    """Fraction of rows flagged, as an exact Python fraction (a float32 mean would round 40/800 up)."""
    flags = detector.is_out_of_scope(features)
    return int(flags.sum()) / len(flags)


@pytest.fixture(scope="module")
def fitted():
    """Detector fitted on 800 training features, threshold from 800 validation features (64-d)."""
    train, labels = clustered(800, 64, seed=0)
    val, _ = clustered(800, 64, seed=1)
    return fit_ood(train, labels, val), val


def test_validation_images_flagged_at_most_five_percent(fitted):
    detector, val = fitted
    assert detector.threshold_from == "validation" and detector.n_val == 800
    assert flagged(detector, val) <= 0.05


@pytest.mark.parametrize("n_val", [20, 186, 199, 801])
def test_at_most_five_percent_of_validation_flagged_for_any_size(n_val):
    train, labels = clustered(400, 16, seed=5)
    val, _ = clustered(n_val, 16, seed=6)
    detector = fit_ood(train, labels, val)
    assert flagged(detector, val) <= 0.05
    assert flagged(detector, val) >= (math.floor(0.05 * n_val) - 1) / n_val   # and not needlessly fewer


def test_fresh_in_distribution_features_mostly_in_scope(fitted):
    detector, _ = fitted
    fresh, _ = clustered(2000, 64, seed=2)
    # 5 % expected; the margin covers sampling noise of the 95th percentile of 800 scores.
    assert flagged(detector, fresh) <= 0.075


def test_far_away_features_are_flagged(fitted):
    detector, _ = fitted
    gen = torch.Generator().manual_seed(3)
    far = torch.randn(200, 64, generator=gen) * 4 + 25          # another region of feature space
    between = torch.randn(200, 64, generator=gen) * 0.1          # near the origin, between the clusters
    assert detector.is_out_of_scope(far).all()
    assert flagged(detector, between) >= 0.95


def test_score_is_zero_at_class_means_and_grows_along_a_ray(fitted):
    detector, _ = fitted
    means = only_layer(detector).means
    assert torch.allclose(detector.score(means), torch.zeros(N_CLASSES), atol=1e-2)
    direction = torch.randn(64, generator=torch.Generator().manual_seed(4))
    ray = means[0] + torch.arange(1, 6).float()[:, None] * 5 * direction
    scores = detector.score(ray)
    assert scores.shape == (5,) and scores.dtype == torch.float32
    assert (scores.diff() > 0).all()


def test_the_threshold_keeps_a_margin_from_every_validation_score(fitted):
    """Training computes the validation features once; inference recomputes them with other rounding
    (GPU TF32, another batch size, ONNX Runtime). A threshold equal to the 95th-percentile image's own
    score would flag that image on the slightest upward noise, so it lies halfway to the next score."""
    detector, val = fitted
    scores = detector.score(val).double()
    largest_kept = float(scores[scores <= detector.threshold].max())
    smallest_flagged = float(scores[scores > detector.threshold].min())
    assert largest_kept < detector.threshold < smallest_flagged
    assert detector.threshold - largest_kept == pytest.approx((smallest_flagged - largest_kept) / 2)
    assert int((scores > detector.threshold).sum()) == 39          # those above the 95th percentile, as before


def test_score_matches_the_definition(fitted):
    """min_c sqrt((x - mu_c)^T P (x - mu_c)) / scale, computed the slow way."""
    detector, val = fitted
    layer = only_layer(detector)
    x = val[:5].double()
    p = layer.precision.double()
    expected = torch.stack([
        torch.stack([((xi - mu.double()) @ p @ (xi - mu.double())).sqrt() for mu in layer.means]).min()
        for xi in x]) / layer.scale
    assert torch.allclose(detector.score(val[:5]).double(), expected, rtol=1e-4)
    # One layer: the scale is the 95th-percentile validation distance, so that image scores 1.0 and the
    # threshold lies halfway between it and the next higher validation score.
    scores = detector.score(val).double()
    next_higher = float(scores[scores > 1.0].min())
    assert detector.threshold == pytest.approx((1.0 + next_higher) / 2.0)


def test_more_dimensions_than_samples_is_handled_by_shrinkage():
    """1024-d features from 200 images: the plain covariance is singular; the shrunk one is not."""
    train, labels = clustered(200, 1024, seed=5)
    val, _ = clustered(200, 1024, seed=6)
    # 200 residual vectors span at most 200 of the 1024 dimensions: the sample covariance is singular.
    detector = fit_ood(train, labels, val)
    assert 0.0 < only_layer(detector).shrinkage <= 1.0
    assert torch.isfinite(only_layer(detector).precision).all()
    fresh, _ = clustered(400, 1024, seed=7)
    assert flagged(detector, fresh) <= 0.12
    far = torch.randn(50, 1024) * 4 + 10
    assert detector.is_out_of_scope(far).all()


def test_dead_feature_dimensions_do_not_break_fitting():
    """ReLU-pooled features often have units that are zero for every image."""
    train, labels = clustered(300, 32, seed=8)
    train = train.clamp_min(0)
    train[:, :8] = 0.0
    detector = fit_ood(train, labels)
    assert torch.isfinite(only_layer(detector).precision).all() and math.isfinite(detector.threshold)
    assert torch.isfinite(detector.score(train)).all()


def test_threshold_without_validation_uses_cross_fitted_scores():
    """Training scores are optimistic (the statistics were fitted to them); cross-fitting is not."""
    train, labels = clustered(600, 64, seed=9)
    detector = fit_ood(train, labels)
    assert detector.threshold_from == "train-crossfit" and detector.n_val == 0
    in_sample = float(torch.quantile(detector.score(train).double(), 0.95))
    assert detector.threshold > in_sample
    fresh, _ = clustered(2000, 64, seed=10)
    assert flagged(detector, fresh) <= 0.08


def test_percentile_controls_the_flagged_fraction():
    train, labels = clustered(400, 16, seed=11)
    val, _ = clustered(1000, 16, seed=12)
    strict = fit_ood(train, labels, val, percentile=99.0)
    loose = fit_ood(train, labels, val, percentile=80.0)
    assert only_layer(strict).scale > only_layer(loose).scale
    assert flagged(strict, val) <= 0.01
    assert flagged(loose, val) <= 0.20


def test_fixed_shrinkage_is_used_as_given():
    train, labels = clustered(200, 16, seed=13)
    assert only_layer(fit_ood(train, labels, shrinkage=0.25)).shrinkage == 0.25
    with pytest.raises(ValueError):
        fit_ood(train, labels, shrinkage=1.5)


def test_ledoit_wolf_extremes():
    gen = torch.Generator().manual_seed(14)
    isotropic = torch.randn(100, 50, generator=gen)             # truth is a scaled identity: shrink fully
    assert ledoit_wolf_shrinkage(isotropic - isotropic.mean(0)) > 0.8
    skewed = torch.randn(5000, 5, generator=gen) * torch.tensor([0.1, 1, 3, 10, 30])
    assert ledoit_wolf_shrinkage(skewed - skewed.mean(0)) < 0.01  # many samples, far from identity


def test_ledoit_wolf_matches_scikit_learn():
    sklearn_covariance = pytest.importorskip("sklearn.covariance")
    x = np.random.default_rng(15).normal(size=(120, 30)) * np.linspace(0.2, 3, 30)
    x -= x.mean(0)
    expected = sklearn_covariance.ledoit_wolf_shrinkage(x, assume_centered=True)
    assert ledoit_wolf_shrinkage(torch.from_numpy(x)) == pytest.approx(expected, rel=1e-9)


def test_round_trip_through_checkpoint_tensors_and_json(fitted):
    detector, val = fitted
    tensors = detector.to_tensors()
    assert tensors and all(name.startswith("ood.") for name in tensors)
    meta = json.loads(json.dumps({"classes": list("abcd"), "ood": detector.to_meta()}))
    for key in ("method", "threshold", "percentile", "n_train", "n_val", "layers"):
        assert key in meta["ood"]
    assert [layer["name"] for layer in meta["ood"]["layers"]] == [FINAL_LAYER]
    restored = OODDetector.from_checkpoint(load_tensors(save_tensors(tensors)), meta)
    assert restored.threshold == detector.threshold
    assert restored.percentile == detector.percentile and restored.n_train == 800
    assert torch.equal(restored.score(val[:20]), detector.score(val[:20]))


def test_from_checkpoint_without_statistics_is_none(fitted):
    detector, _ = fitted
    assert OODDetector.from_checkpoint({}, {"classes": ["a", "b"]}) is None
    assert OODDetector.from_checkpoint(detector.to_tensors(), {}) is None       # meta lost: not usable
    assert OODDetector.from_checkpoint({}, {"ood": detector.to_meta()}) is None  # tensors lost


def test_from_checkpoint_rejects_inconsistent_statistics(fitted):
    detector, _ = fitted
    with pytest.raises(ValueError, match="class"):
        OODDetector.from_checkpoint(detector.to_tensors(), {"classes": ["a", "b"], "ood": detector.to_meta()})
    with pytest.raises(ValueError, match="precision"):
        MahalanobisLayer(torch.zeros(2, 4), torch.eye(3))
    with pytest.raises(ValueError, match="scale"):
        MahalanobisLayer(torch.zeros(2, 3), torch.eye(3), scale=0.0)
    with pytest.raises(ValueError, match="same number of class means"):
        OODDetector({"a": MahalanobisLayer(torch.zeros(2, 3), torch.eye(3)),
                     "b": MahalanobisLayer(torch.zeros(3, 3), torch.eye(3))}, threshold=1.0)


def test_input_validation(fitted):
    detector, _ = fitted
    with pytest.raises(ValueError, match="shape"):
        detector.score(torch.zeros(3, 10))
    train, labels = clustered(40, 8, seed=16)
    with pytest.raises(ValueError, match="no training features"):
        fit_ood(train, labels, n_classes=5)
    with pytest.raises(ValueError, match="NaN"):
        fit_ood(torch.full((8, 4), float("nan")), torch.arange(8) % 2)
    with pytest.raises(ValueError, match="percentile"):
        fit_ood(train, labels, percentile=0)


@settings(max_examples=25, deadline=None)
@given(shift=st.floats(-50, 50), scale=st.floats(0.1, 10))
def test_scores_are_invariant_to_shifting_and_scaling_all_features(shift, scale):
    """Mahalanobis distance is affine-invariant for a common shift and scale (shrinkage target scales too)."""
    train, labels = clustered(120, 8, seed=17)
    query, _ = clustered(10, 8, seed=18)
    base = fit_ood(train, labels, train, shrinkage=0.1)
    moved = fit_ood(train * scale + shift, labels, train * scale + shift, shrinkage=0.1)
    assert torch.allclose(moved.score(query * scale + shift), base.score(query), rtol=1e-3, atol=1e-3)
    assert only_layer(moved).scale == pytest.approx(only_layer(base).scale, rel=1e-3)


# --------------------------------------------------------------------------------------------------
# several layers
# --------------------------------------------------------------------------------------------------

def two_layers(n: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """An "early" 16-d layer and the final 64-d layer, with different scales, for the same rows."""
    final, labels = clustered(n, 64, seed=seed)
    early, _ = clustered(n, 16, seed=seed + 100, centers=torch.randn(N_CLASSES, 16,
                                                                     generator=torch.Generator().manual_seed(7)))
    return {"early": early * 30.0, FINAL_LAYER: final}, labels


@pytest.fixture(scope="module")
def layered():
    train, labels = two_layers(800, seed=20)
    val, _ = two_layers(800, seed=21)
    return fit_ood(train, labels, val), val


def test_layers_keep_their_order_and_each_gets_its_own_scale(layered):
    detector, val = layered
    assert detector.layer_names == ("early", FINAL_LAYER)
    per_layer = detector.layer_scores(val)
    for name, relative in per_layer.items():
        # Each layer's distances are divided by that layer's own 95th percentile on validation.
        assert float(torch.quantile(relative, 0.95, interpolation="higher")) == pytest.approx(1.0)
    # The score is the largest relative distance.
    assert torch.equal(detector.score(val), torch.stack(list(per_layer.values())).max(0).values.float())
    assert detector.threshold >= 1.0
    assert flagged(detector, val) <= 0.05


def test_an_input_odd_on_one_layer_only_is_flagged(layered):
    """The reason for several layers: a photo can look ordinary to the final layer and odd to an early one."""
    detector, _ = layered
    fresh, _ = two_layers(300, seed=22)
    assert flagged(detector, fresh) <= 0.09
    odd_early = dict(fresh, early=fresh["early"] + 200.0)
    odd_final = {**fresh, FINAL_LAYER: fresh[FINAL_LAYER] + 25.0}
    assert detector.is_out_of_scope(odd_early).all()
    assert detector.is_out_of_scope(odd_final).all()


def test_cross_fitting_with_several_layers():
    train, labels = two_layers(600, seed=23)
    detector = fit_ood(train, labels)
    assert detector.threshold_from == "train-crossfit"
    fresh, _ = two_layers(1500, seed=24)
    assert flagged(detector, fresh) <= 0.08


def test_several_layers_round_trip_through_checkpoint_tensors_and_json(layered):
    detector, val = layered
    tensors = detector.to_tensors()
    assert set(tensors) == {"ood.early.means", "ood.early.precision", "ood.norm5.means", "ood.norm5.precision"}
    meta = json.loads(json.dumps({"classes": list("abcd"), "ood": detector.to_meta()}))
    restored = OODDetector.from_checkpoint(load_tensors(save_tensors(tensors)), meta)
    assert restored.layer_names == detector.layer_names and restored.threshold == detector.threshold
    assert torch.equal(restored.score(val), detector.score(val))
    del tensors["ood.early.precision"]                      # a layer's statistics lost: not usable
    assert OODDetector.from_checkpoint(tensors, meta) is None


def test_checkpoints_from_before_several_layers_still_load(fitted):
    """Method "mahalanobis-tied": ood.means / ood.precision, score = raw distance, threshold as stored."""
    detector, val = fitted
    layer = only_layer(detector)
    raw_threshold = 7.5
    meta = {"classes": list("abcd"), "ood": {"method": "mahalanobis-tied", "threshold": raw_threshold,
                                             "percentile": 95.0, "shrinkage": layer.shrinkage, "n_train": 800}}
    old = OODDetector.from_checkpoint({"ood.means": layer.means, "ood.precision": layer.precision}, meta)
    assert old.layer_names == (FINAL_LAYER,) and old.method == "mahalanobis-tied"
    assert old.threshold == raw_threshold and old.layers[FINAL_LAYER].scale == 1.0
    torch.testing.assert_close(old.score(val[:10]), (detector.score(val[:10]).double() * layer.scale).float())


def test_layer_mismatches_are_explained(layered):
    detector, val = layered
    with pytest.raises(ValueError, match="missing pooled features for layer"):
        detector.score({FINAL_LAYER: val[FINAL_LAYER]})
    with pytest.raises(ValueError, match="reads 2 layers"):
        detector.score(val[FINAL_LAYER])
    train, labels = two_layers(100, seed=25)
    with pytest.raises(ValueError, match="validation features have layers"):
        fit_ood(train, labels, {FINAL_LAYER: val[FINAL_LAYER]})
    with pytest.raises(ValueError, match="N features per layer"):
        fit_ood(dict(train, early=train["early"][:50]), labels)


def test_the_rule_is_written_once_and_an_old_stored_rule_still_loads(layered):
    """meta["ood"]["rule"] is the detector's own sentence (the model card quotes the same one); a checkpoint
    that stored the older wording loads unchanged, because the stored sentence is never read back."""
    detector, val = layered
    meta = detector.to_meta()
    assert meta["rule"] == detector.rule() == (
        f"Images whose features lie further from the training images than 95% of validation images "
        f"(Mahalanobis score on early, norm5 > {detector.threshold:.3g}) are reported as out of scope.")
    meta["rule"] = ("out of scope when the largest per-layer Mahalanobis distance to the nearest class mean, "
                    "each divided by its layer's 95th percentile of held-out distances, exceeds the 95th "
                    "percentile of held-out in-distribution scores")
    old = OODDetector.from_checkpoint(detector.to_tensors(), {"classes": list("abcd"), "ood": meta})
    assert old.threshold == detector.threshold
    torch.testing.assert_close(old.score(val), detector.score(val))
    scores = detector.score(val)
    assert torch.equal(detector.flag(scores), scores > detector.threshold)
    assert torch.equal(detector.is_out_of_scope(val), scores > detector.threshold)


# ------------------------------------------------------------------ energy part (outlier-exposure checkpoints)

def _energy_fit(seed: int = 0, combination: str | None = None):
    train, train_labels = clustered(400, 6, seed)
    val, _ = clustered(200, 6, seed + 1)
    val_logits = torch.randn(200, N_CLASSES, generator=torch.Generator().manual_seed(seed + 2)) * 3
    return fit_ood(train, train_labels, val, val_logits=val_logits, combination=combination), val, val_logits


def test_the_energy_part_is_scaled_by_its_validation_percentile_and_joins_the_max():
    detector, val, val_logits = _energy_fit(combination="max")
    energy = -torch.logsumexp(val_logits.double(), 1)               # independent of the module's helper
    assert detector.energy_scale == pytest.approx(float(np.quantile(energy.numpy(), 0.95, method="higher")))
    parts = detector.layer_scores(val, val_logits)
    assert set(parts) == {FINAL_LAYER, "energy"}
    assert torch.allclose(parts["energy"], energy - detector.energy_scale + 1.0, atol=1e-5)
    expected = torch.maximum(only_layer_scores(detector, val), energy - detector.energy_scale + 1.0)
    assert torch.allclose(detector.score(val, val_logits).double(), expected, atol=1e-4)
    assert float(detector.is_out_of_scope(val, val_logits).float().mean()) <= 0.05
    flat = torch.full((1, N_CLASSES), -20.0)                        # no class wants it: very high energy
    assert bool(detector.is_out_of_scope(val[:1] * 0 + val.mean(0), flat)[0])


def only_layer_scores(detector: OODDetector, features: torch.Tensor) -> torch.Tensor:
    layer = detector.layers[FINAL_LAYER]
    return layer.distance(features) / layer.scale


def test_the_energy_part_round_trips_and_needs_the_logits():
    detector, val, val_logits = _energy_fit(3)
    again = OODDetector.from_checkpoint(detector.to_tensors(), {"ood": json.loads(json.dumps(detector.to_meta()))})
    assert again.energy_scale == pytest.approx(detector.energy_scale)
    assert torch.equal(again.score(val, val_logits), detector.score(val, val_logits))
    assert "energy" in detector.rule()
    with pytest.raises(ValueError, match="pass the logits"):
        detector.score(val)
    plain = fit_ood(*clustered(400, 6, 3), clustered(200, 6, 4)[0])
    assert plain.energy_scale is None and "energy" not in plain.to_meta()


# ------------------------------------------------------------------ Fisher's combination of the parts

def _p_value(reference: np.ndarray, score: float, *, itself: bool = False) -> float:
    """Plain counting: (1 + #reference >= score) / (1 + #reference); ``itself``: score is one of them, left out."""
    at_least = sum(1 for value in reference if value >= score) - (1 if itself else 0)
    size = len(reference) - (1 if itself else 0)
    return (1 + at_least) / (1 + size)


def test_with_the_energy_the_parts_are_combined_by_fishers_method_on_validation_p_values():
    from scipy.stats import combine_pvalues
    detector, val, val_logits = _energy_fit(5)
    assert detector.combination == "fisher" and detector.to_meta()["combination"] == "fisher"
    parts = {name: scores.numpy() for name, scores in detector.layer_scores(val, val_logits).items()}
    assert list(parts) == [FINAL_LAYER, "energy"]
    # Validation against itself, each image left out of its own reference, then the threshold rule.
    loo = np.array([combine_pvalues([_p_value(parts[n], parts[n][i], itself=True) for n in parts],
                                    method="fisher").statistic / 2 for i in range(len(val))], dtype=np.float32)
    kept = float(np.quantile(loo, 0.95, method="higher"))
    margin = 2 * math.log(201 / 200) + 1e-4     # two parts, 200 reference scores (the rounding margin below)
    expected = max((kept + float(loo[loo > kept].min())) / 2, kept + margin)
    assert detector.threshold == pytest.approx(expected, rel=1e-6)
    assert flagged_with(detector, val, val_logits) <= 0.05
    # New images: p-values among all 200 validation scores, Fisher's statistic / 2 = -sum(log p).
    new, _ = clustered(30, 6, seed=9)
    new_logits = torch.randn(30, N_CLASSES, generator=torch.Generator().manual_seed(10)) * 3
    new_parts = {name: scores.numpy() for name, scores in detector.layer_scores(new, new_logits).items()}
    expected = [combine_pvalues([_p_value(parts[n], new_parts[n][i]) for n in parts], method="fisher").statistic / 2
                for i in range(30)]
    np.testing.assert_allclose(detector.score(new, new_logits).numpy(), expected, rtol=1e-5)
    assert "Fisher" in detector.rule() and "energy" in detector.rule()


def test_a_fisher_threshold_keeps_validation_images_below_it_when_their_parts_round_a_hair_higher():
    """Each validation image is one of the reference values; its threshold-placing score left it out. Rescored
    with its parts a hair higher (features rounded differently), it loses its own value from each count and
    its score rises by ln(201/200) per part: more than halfway to the next score when two scores lie close.
    Parts are ranks here, so the p-values are counted by hand (scipy's Fisher statistic / 2)."""
    from scipy.stats import combine_pvalues

    from mediscan.core.ood import _placed_threshold
    rise = 2 * math.log(201 / 200)
    for seed in range(200):          # a validation set whose two scores around the 95th percentile are close
        gen = torch.Generator().manual_seed(seed)
        held = torch.stack([torch.randperm(200, generator=gen), torch.randperm(200, generator=gen)]).double()
        loo = np.array([combine_pvalues([_p_value(held[j].numpy(), float(held[j, i]), itself=True) for j in (0, 1)],
                                        method="fisher").statistic / 2 for i in range(200)], dtype=np.float32)
        kept = float(np.quantile(loo, 0.95, method="higher"))
        if (float(loo[loo > kept].min()) - kept) / 2 < rise:
            break
    else:
        pytest.fail("no validation set with two close scores around the 95th percentile")
    reference = held.sort(dim=1).values
    _, threshold = _placed_threshold(held, "fisher", reference, True, 95.0)
    assert threshold >= kept + rise
    i = int(np.flatnonzero(loo == kept)[0])
    raised = [(1 + sum(v >= float(held[j, i]) + 1e-9 for v in held[j].numpy())) / 201 for j in (0, 1)]
    assert -sum(math.log(p) for p in raised) == pytest.approx(kept + rise, abs=1e-4)
    assert -sum(math.log(p) for p in raised) < threshold       # still not flagged
    assert (loo > threshold).mean() <= 0.05


def flagged_with(detector: OODDetector, features, logits) -> float:
    flags = detector.is_out_of_scope(features, logits)
    return int(flags.sum()) / len(flags)


def test_fisher_flags_an_image_unusual_on_every_part_that_the_max_lets_through():
    """Both parts at their validation 93rd percentile: below the max's threshold (with two independent parts,
    about each one's 97.5th percentile), but two p-values of 0.07 together (-sum(log p) = 5.3) are rarer than
    95 % of validation (about 4.7 for two independent parts)."""
    gen = torch.Generator().manual_seed(0)
    train, train_labels = clustered(400, 6, 0)
    val, _ = clustered(200, 6, 1)
    val_logits = torch.randn(200, N_CLASSES, generator=gen) * 3
    fisher = fit_ood(train, train_labels, val, val_logits=val_logits)
    largest = fit_ood(train, train_labels, val, val_logits=val_logits, combination="max")
    parts = fisher.layer_scores(val, val_logits)
    distance, energy = (float(np.quantile(parts[n].numpy(), 0.93)) for n in (FINAL_LAYER, "energy"))
    # A point at that distance from its nearest class mean, along a direction the covariance measures,
    # and logits with that energy: solve both by bisection against the detector's own parts.
    layer = fisher.layers[FINAL_LAYER]
    direction = torch.randn(1, 6, generator=gen)
    centre = layer.means[:1]
    low, high = 0.0, 100.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if float(layer.distance(centre + mid * direction)) / layer.scale < distance else (low, mid)
    image = centre + low * direction
    flat_logit = -(energy + fisher.energy_scale - 1.0) - math.log(N_CLASSES)   # E = -(c + log 4)
    logits = torch.full((1, N_CLASSES), flat_logit)
    got = fisher.layer_scores(image, logits)
    assert float(got[FINAL_LAYER]) == pytest.approx(distance, rel=1e-3)
    assert float(got["energy"]) == pytest.approx(energy, rel=1e-3)
    assert not bool(largest.is_out_of_scope(image, logits)[0])
    assert bool(fisher.is_out_of_scope(image, logits)[0])


def test_fisher_round_trips_and_a_damaged_reference_is_refused():
    detector, val, val_logits = _energy_fit(3)
    tensors, meta = detector.to_tensors(), json.loads(json.dumps(detector.to_meta()))
    assert tensors["ood.reference"].shape == (2, 200) and meta["reference"]["parts"] == [FINAL_LAYER, "energy"]
    again = OODDetector.from_checkpoint(load_tensors(save_tensors(tensors)), {"ood": meta})
    assert again.combination == "fisher" and again.threshold == detector.threshold
    assert torch.equal(again.score(val, val_logits), detector.score(val, val_logits))
    without = {k: v for k, v in tensors.items() if k != "ood.reference"}
    with pytest.raises(ValueError, match="validation scores for each of its 2 parts"):
        OODDetector.from_checkpoint(without, {"ood": meta})
    with pytest.raises(ValueError, match="reference rows are for parts"):
        OODDetector.from_checkpoint(tensors, {"ood": dict(meta, reference={"parts": ["norm5", "x"], "size": 200})})
    older = {k: v for k, v in meta.items() if k not in ("combination", "reference")}  # written before Fisher
    assert OODDetector.from_checkpoint(tensors, {"ood": older}).combination == "max"


def test_without_the_energy_the_max_stays_and_bad_combinations_are_named():
    train, labels = clustered(400, 6, 3)
    val, _ = clustered(200, 6, 4)
    plain = fit_ood(train, labels, val)
    assert plain.combination == "max" and plain.reference is None and "ood.reference" not in plain.to_tensors()
    assert fit_ood(train, labels, val, combination="fisher").combination == "fisher"
    with pytest.raises(ValueError, match="combination must be one of max, fisher"):
        fit_ood(train, labels, val, combination="mean")
    with pytest.raises(ValueError, match="pass val_features"):
        fit_ood(train, labels, combination="fisher")


def test_a_large_validation_set_keeps_a_reference_of_evenly_spaced_order_statistics(monkeypatch):
    from mediscan.core import combination
    monkeypatch.setattr(combination, "REFERENCE_SIZE", 50)
    train, labels = clustered(400, 6, 0)
    val, _ = clustered(800, 6, 1)
    logits = torch.randn(800, N_CLASSES, generator=torch.Generator().manual_seed(2)) * 3
    detector = fit_ood(train, labels, val, val_logits=logits)
    assert detector.reference.shape == (2, 50)
    full = np.sort(np.stack([s.numpy() for s in detector.layer_scores(val, logits).values()]), axis=1)
    picks = np.round(np.linspace(0, 799, 50)).astype(int)
    np.testing.assert_allclose(detector.reference.numpy(), full[:, picks], rtol=1e-12)
    assert 0.03 <= flagged_with(detector, val, logits) <= 0.07     # the promise, up to the reference's resolution
