"""What the Predictor returns: :class:`Prediction` (one image's answer) and :class:`Explanation` (+ its heatmap).

Both are plain frozen dataclasses with a JSON-ready ``to_dict``; the CLI, the API and the dashboard print
or send exactly that.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Prediction", "Explanation"]


@dataclass(frozen=True)
class Prediction:
    """What the model says about one image.

    Attributes:
        source: the image's label (file path, upload name, or ``name=`` given by the caller).
        classes: class names in the model's output order.
        probabilities: ``{class: probability}``, temperature-calibrated, summing to 1; empty when the
            modality gate stopped the input (:mod:`mediscan.core.modality_gate`: it never reached the network).
        top_class: the most probable class (reported even when the verdict is not ``confident``); ``None``
            when the modality gate stopped the input.
        confidence: its probability (``None`` when the gate stopped the input).
        verdict: ``"confident"``, ``"uncertain"`` or ``"out_of_scope"``.
        verdict_reason: one plain-language sentence explaining the verdict.
        ood_score: out-of-scope score, higher = stranger (the largest of the per-layer Mahalanobis distances,
            each relative to validation images; with ``Predictor.ood.combination == "fisher"``, Fisher's
            ``-sum(log p)`` over their and the energy's validation p-values); above
            ``Predictor.ood.threshold`` is out of scope. ``None`` when the checkpoint has no out-of-scope statistics.
        timings_ms: ``decode``, ``preprocess``, ``model`` (forward + calibration + OOD) and ``total``
            milliseconds (in batched calls ``model`` is this image's share of the batch).
        warnings: non-fatal notes from decoding (multi-frame DICOM, ignored EXIF, ...).
        dicom: for DICOM input, the header summary (:meth:`mediscan.core.dicom_header.DicomHeader.to_dict`:
            Study/Series/SOP Instance UID, Modality, BodyPartExamined; never a patient field); ``None`` otherwise.
        header_check: for DICOM input, how the header compares with ``top_class``
            (:meth:`mediscan.core.dicom_header.HeaderCheck.to_dict`: status agrees / disagrees / no_header /
            not_mapped, the field and value read, the classes it allows); ``None`` for other input and for
            input the modality gate stopped (there is no class to compare).
    """

    source: str
    classes: tuple[str, ...]
    probabilities: dict[str, float]
    top_class: str | None
    confidence: float | None
    verdict: str
    verdict_reason: str
    ood_score: float | None
    timings_ms: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    dicom: dict | None = None
    header_check: dict | None = None

    @property
    def is_out_of_scope(self) -> bool:
        return self.verdict == "out_of_scope"

    @property
    def analysed(self) -> bool:
        """Whether the network saw the input (``False``: the modality gate stopped it)."""
        return self.top_class is not None

    def to_dict(self) -> dict:
        """JSON-ready dict (plain str/float/list/None values only)."""
        return {
            "source": self.source,
            "classes": list(self.classes),
            "probabilities": {k: float(v) for k, v in self.probabilities.items()},
            "top_class": self.top_class,
            "confidence": None if self.confidence is None else float(self.confidence),
            "verdict": self.verdict,
            "verdict_reason": self.verdict_reason,
            "ood_score": None if self.ood_score is None else float(self.ood_score),
            "timings_ms": {k: round(float(v), 3) for k, v in self.timings_ms.items()},
            "warnings": list(self.warnings),
            "dicom": None if self.dicom is None else dict(self.dicom),
            "header_check": None if self.header_check is None else dict(self.header_check),
        }


@dataclass(frozen=True)
class Explanation:
    """A prediction plus the Grad-CAM heatmap for one class, mapped back onto the original image.

    Attributes:
        prediction: the :class:`Prediction` from the same forward pass.
        explained_class: the class the heatmap is for (the predicted one unless asked otherwise); ``None``
            when the modality gate stopped the input (the heatmap is then all zeros: the network never ran).
        method: the CAM method (``"gradcam"`` or ``"gradcam++"``).
        image: ``(H, W)`` float32 in [0, 1], the image as decoded (original size and orientation).
        heatmap: ``(H, W)`` float32 in [0, 1] on the same pixels; zero outside the square the model saw.
        faithfulness: ``prob`` (explained class), ``prob_top_removed``, ``prob_random_removed``,
            ``drop_top``, ``drop_random`` -- hiding the hottest 20 % of the input should hurt the
            prediction more than hiding a random 20 % if the map is faithful (plain softmax probabilities
            of the model, without temperature). Empty when not computed.
    """

    prediction: Prediction
    explained_class: str | None
    method: str
    image: np.ndarray
    heatmap: np.ndarray
    faithfulness: dict[str, float] = field(default_factory=dict)

    @property
    def has_pixels(self) -> bool:
        """Whether there is an image to draw on (``False`` for a header-only DICOM object -- a report, an
        undecodable cine -- which the modality gate stopped: no overlay, an all-zero grid)."""
        return self.image.size > 0

    def overlay(self, alpha: float = 0.4, colormap: str = "jet") -> np.ndarray:
        """``(H, W, 3)`` RGB uint8: the heatmap blended over the image. Cheap: no model call. An input the
        modality gate stopped has no heatmap: its overlay is the image alone (no colour wash of an empty map)."""
        from mediscan.explain.overlays import overlay
        if self.explained_class is None:
            alpha = 0.0
        return overlay(self.image, self.heatmap, alpha=alpha, colormap=colormap)

    def overlay_png(self, alpha: float = 0.4, colormap: str = "jet") -> bytes:
        """The overlay encoded as PNG bytes (for downloads and HTTP responses)."""
        from mediscan.explain.overlays import png_bytes
        return png_bytes(self.overlay(alpha, colormap))

    def heatmap_grid(self, size: int) -> list[list[float]]:
        """The heatmap averaged down to ``size`` x ``size`` cells (rounded), for compact JSON. A header-only
        DICOM object (no pixels; the modality gate stopped it) has an all-zero grid, as every stopped input."""
        import cv2
        if not self.has_pixels:
            return [[0.0] * size for _ in range(size)]
        small = cv2.resize(np.asarray(self.heatmap, np.float32), (size, size), interpolation=cv2.INTER_AREA)
        return np.round(small, 4).tolist()

    def to_dict(self, include_overlay: bool = False, grid: int | None = None) -> dict:
        """JSON-ready dict: the prediction, explained class, method, faithfulness and image size.

        ``grid=N`` adds ``heatmap_grid`` (N x N floats in [0, 1]); ``include_overlay=True`` adds
        ``overlay_png_base64`` (the default overlay as a base64 PNG).
        """
        out = {
            "prediction": self.prediction.to_dict(),
            "explained_class": self.explained_class,
            "method": self.method,
            "faithfulness": {k: float(v) for k, v in self.faithfulness.items()},
            "image_size": {"height": int(self.image.shape[0]), "width": int(self.image.shape[1])},
        }
        if grid:
            out["heatmap_grid"] = self.heatmap_grid(int(grid))
        if include_overlay and self.has_pixels:
            out["overlay_png_base64"] = base64.b64encode(self.overlay_png()).decode("ascii")
        return out
