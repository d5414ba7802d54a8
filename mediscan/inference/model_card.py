"""The model card: JSON-ready facts about a loaded model, for the dashboard's and the API's "about" views."""
from __future__ import annotations

from mediscan import NOT_FOR_CLINICAL_USE, __version__
from mediscan.core.modality_gate import modality_rule
from mediscan.core.verdicts import out_of_scope_rule

__all__ = ["model_card"]


def model_card(predictor) -> dict:
    """The card of a :class:`~mediscan.inference.predictor.Predictor`: what it loaded and how it decides."""
    meta = predictor.meta
    metrics = meta.get("metrics") or {}
    test, val = _split_metrics(metrics, "test"), _split_metrics(metrics, "val")
    calibration = test or val
    return {
        "classes": list(predictor.classes),
        "checkpoint": str(predictor.checkpoint_path),
        "architecture": meta.get("architecture"),
        "input_size": predictor.input_size,
        "weight_source": meta.get("weight_source"),
        "created": meta.get("created"),
        "test_accuracy": test.get("accuracy"),
        "test_macro_f1": test.get("macro_f1"),
        "val_accuracy": val.get("accuracy"),
        # Predictions are temperature-scaled, so the ECE that describes them is the calibrated one
        # (on the test split when there was one, else on validation).
        "ece": calibration.get("ece_calibrated", calibration.get("ece")),
        "ece_before_calibration": calibration.get("ece"),
        "temperature": predictor.temperature,
        "uncertain_below": predictor.uncertain_below,
        "out_of_scope_check": predictor.ood is not None,
        "out_of_scope": out_of_scope_rule(predictor.ood),
        "ood": meta.get("ood") or None,
        "modalities": list(predictor.modalities),
        "modality_gate": modality_rule(predictor.modalities),
        "device": str(predictor.device),
        "backend": predictor.backend,
        "version": __version__,
        "library_versions": meta.get("versions"),
        "not_for_clinical_use": NOT_FOR_CLINICAL_USE,
    }


def _split_metrics(metrics: dict, split: str) -> dict:
    """One split's headline metrics; training stores ``{"val": {...}, "test": {...} or None}``.

    Flat ``{"test_accuracy": ...}`` records (hand-made checkpoints) are understood too.
    """
    nested = metrics.get(split)
    if isinstance(nested, dict):
        return nested
    prefix = f"{split}_"
    return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
