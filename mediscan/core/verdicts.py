"""The verdict on one prediction (confident / uncertain / out_of_scope) and the words that explain it.

It lives in ``core`` so that every layer that turns model outputs into a verdict -- the Predictor, and
training or evaluation when they report on a split -- uses this one function and this one wording.

Rules, in this order:

* ``out_of_scope`` -- the file is a colour image (radiographs are grayscale), or the out-of-scope detector
  flagged it (:meth:`mediscan.core.ood.OODDetector.is_out_of_scope`: it does not resemble the training
  images). Without a detector only the colour check applies.
* ``uncertain`` -- the calibrated confidence is below ``uncertain_below``.
* ``confident`` -- otherwise.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from mediscan.core.imaging import COLOUR_LIMIT

if TYPE_CHECKING:
    from mediscan.core.ood import OODDetector

__all__ = ["VERDICTS", "DEFAULT_UNCERTAIN_BELOW", "Verdict", "verdict", "series_verdict", "out_of_scope_rule"]

VERDICTS = ("confident", "uncertain", "out_of_scope")
#: Calibrated confidence under which the verdict is ``uncertain`` unless the caller says otherwise.
DEFAULT_UNCERTAIN_BELOW = 0.6

_COLOUR_RULE = f"Colour images (colourfulness > {COLOUR_LIMIT:g}) are out of scope: X-rays are grayscale."


class Verdict(NamedTuple):
    """A verdict name (one of :data:`VERDICTS`) and one plain-language sentence explaining it."""

    name: str
    reason: str


def verdict(top_class: str, confidence: float, *, uncertain_below: float, is_colour: bool = False,
            colourfulness: float | None = 0.0, has_detector: bool = False, flagged: bool = False,
            ood_score: float | None = None, ood_threshold: float | None = None) -> Verdict:
    """The verdict on one prediction.

    Args:
        top_class, confidence: the most probable class and its calibrated probability.
        uncertain_below: confidence under which the answer is ``uncertain``.
        is_colour, colourfulness: whether the decoded file was a colour picture, and how colourful
            (:attr:`mediscan.core.imaging.DecodedImage.is_colour` decides; the number is for the reason, and
            left out of it when ``None``: not known).
        has_detector: whether an out-of-scope detector was consulted at all.
        flagged: the detector's answer (:meth:`~mediscan.core.ood.OODDetector.is_out_of_scope`);
            ``ood_score`` and ``ood_threshold`` are quoted in the reason when it flagged the image.
    """
    if is_colour:
        measured = "" if colourfulness is None else f"{colourfulness:.2f}, "
        return Verdict("out_of_scope", (
            f"This is a colour image (colourfulness {measured}above {COLOUR_LIMIT:g}) "
            f"and X-rays are grayscale, so the '{top_class}' prediction should not be trusted. Upload "
            f"the original grayscale radiograph."))
    if flagged:
        return Verdict("out_of_scope", (
            f"This image does not resemble the X-rays the model was trained on (out-of-scope score "
            f"{ood_score:.2f} is above the limit of {ood_threshold:.2f}), so the '{top_class}' "
            f"prediction should not be trusted."))
    percent = f"{confidence:.0%}"
    if confidence < uncertain_below:
        return Verdict("uncertain", (
            f"The model is unsure: its best guess '{top_class}' has only {percent} confidence, below "
            f"the {uncertain_below:.0%} needed for a confident answer."))
    check = ("and the image resembles the training images" if has_detector
             else "but this model cannot tell whether the image is an X-ray at all")
    return Verdict("confident", f"The model says '{top_class}' with {percent} confidence, {check}.")


def series_verdict(top_class: str, confidence: float, *, uncertain_below: float, analysed: int,
                   colour_votes: int = 0, flagged_votes: int = 0, colourfulness: float | None = None,
                   ood_score: float | None = None, ood_threshold: float | None = None,
                   has_detector: bool = False) -> Verdict:
    """The verdict on a series from the mean probabilities of its ``analysed`` instances (``top_class`` and
    ``confidence`` are the mean's): out of scope when most of them are colour pictures (``colour_votes``) or
    were flagged by the detector (``flagged_votes``), else :func:`verdict`'s rules on the mean. The DICOM node
    and the folder CLI's ``--per-series`` summary both answer a series this way. ``ood_score`` is the mean
    score (quoted in the reason), ``colourfulness`` the mean colourfulness (``None``: not known)."""
    return verdict(top_class, confidence, uncertain_below=uncertain_below, is_colour=colour_votes * 2 > analysed,
                   colourfulness=colourfulness, has_detector=has_detector,
                   flagged=ood_threshold is not None and flagged_votes * 2 > analysed,
                   ood_score=ood_score, ood_threshold=ood_threshold)


def out_of_scope_rule(detector: "OODDetector | None") -> str:
    """How a model with ``detector`` (``None``: none) decides ``out_of_scope``, in words, colour check included.

    The detector's own sentence is :meth:`~mediscan.core.ood.OODDetector.rule` (also stored in the
    checkpoint's ``meta["ood"]["rule"]``)."""
    if detector is not None:
        return f"{detector.rule()} {_COLOUR_RULE}"
    return (f"This checkpoint has no out-of-scope statistics, so only the colour check applies: "
            f"{_COLOUR_RULE} Any grayscale image, even a photo of a page of text, gets one of the "
            f"organ classes. Retrain to add the out-of-scope check.")
