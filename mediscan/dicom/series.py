"""Series: instances grouped by SeriesInstanceUID while they arrive, sampled, and analysed as one answer.

A node cannot know how many instances a series has until it is complete, so it keeps an evenly spaced
subset as they arrive: every ``stride``-th instance, the stride doubling whenever more than twice
``max_slices`` are kept. Memory per series stays bounded whatever its length (a 2,000-slice CT keeps at most
``2 * max_slices`` instances), and the subset stays spread over the whole series. When the series is
complete, ``max_slices`` of the kept instances, evenly spaced in InstanceNumber order, are analysed.

The series answer averages the calibrated probabilities of its analysed instances and takes the verdict
rules the Predictor applies to one image (:func:`mediscan.core.verdicts.verdict`): out of scope when most
of its instances are, uncertain below the Predictor's confidence threshold, else confident. Instances the
modality gate stopped (:mod:`mediscan.core.modality_gate`: no class, no probabilities) are left out of the
average; a series whose every instance was stopped is ``out_of_scope`` with the gate's sentence, no class,
and the representative image without a heatmap.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from mediscan.core.decoded import DecodedImage, header_only
from mediscan.core.dicom_header import HeaderCheck, header_check
from mediscan.core.imaging import ImageReadError, read_image
from mediscan.core.modality_gate import gate_unreadable
from mediscan.core.verdicts import series_verdict
from mediscan.dicom.structured_report import SeriesFinding

__all__ = ["Instance", "PendingSeries", "SeriesResult", "analyse_series", "decode_instance", "held_size",
           "sample_evenly"]


#: What an instance costs beside its pixels (its header without pixel data, the bookkeeping), for the bound.
INSTANCE_OVERHEAD_BYTES = 16 * 1024


@dataclass
class Instance:
    """One received instance: the image decoded when it arrived (in memory, never written to disk), its header
    without pixel data, and its place in the series.

    Why decoded, not the encoded bytes: the C-STORE handler decodes every instance anyway, to answer truthfully
    whether it can be used, and decoding a compressed radiograph costs more than the network does with it (a
    3000 x 2500 JPEG 2000 CR: about 0.9 s to decode, 0.06 s for the forward pass and Grad-CAM at 224 px).
    Keeping the encoded bytes meant decoding it a second time on the single analysis thread."""

    image: DecodedImage  # header-only (no pixels) for an instance the modality gate answers from its header
    header: object  # pydicom Dataset without pixel data
    arrival: int
    instance_number: int | None = None

    @property
    def order(self) -> tuple:
        return (self.instance_number is None, self.instance_number or 0, self.arrival)

    @property
    def nbytes(self) -> int:
        """Memory this instance holds, as the collector's bound counts it."""
        return held_size(self.image)


def held_size(image: DecodedImage) -> int:
    """What keeping ``image`` for its series' analysis costs, as the collector's memory bound counts it."""
    return image.pixels.nbytes + INSTANCE_OVERHEAD_BYTES


def decode_instance(data: bytes, *, name: str, max_pixels: int, modalities: tuple[str, ...]) -> DecodedImage:
    """An instance decoded as its series' analysis needs it. Header-only when its pixels cannot be used but
    its header puts it outside ``modalities`` (an ultrasound cine in MPEG-4 ...): the modality gate answers
    it from the header. Raises :class:`ImageReadError` for any other unusable image."""
    try:
        return read_image(data, name=name, max_pixels=max_pixels)
    except ImageReadError as exc:
        if gate_unreadable(exc, modalities) is not None:
            return header_only(exc)
        raise


@dataclass
class PendingSeries:
    """A series being received."""

    series_uid: str
    max_slices: int
    received: int = 0
    failed: int = 0
    kept: list[Instance] = field(default_factory=list)
    stride: int = 1
    last_arrival: float = field(default_factory=time.monotonic)
    association: int | None = None

    @property
    def held_bytes(self) -> int:
        return sum(i.nbytes for i in self.kept)

    def add(self, image: DecodedImage, header, association: int | None) -> int:
        """Record an instance; returns the change in bytes held (dropped ones give a negative part)."""
        before = self.held_bytes
        arrival, self.received = self.received, self.received + 1
        self.last_arrival, self.association = time.monotonic(), association
        if arrival % self.stride == 0:
            number = header.get("InstanceNumber")
            self.kept.append(Instance(image, header, arrival, int(number) if number not in (None, "") else None))
        while len(self.kept) > 2 * self.max_slices:
            self.stride *= 2
            self.kept = [i for i in self.kept if i.arrival % self.stride == 0]
        return self.held_bytes - before


def sample_evenly(items: list, k: int) -> list:
    """``k`` items evenly spaced over ``items`` (first and last included), or all of them when fewer."""
    if len(items) <= k:
        return list(items)
    picks = np.unique(np.linspace(0, len(items) - 1, k).round().astype(int))
    return [items[i] for i in picks]


@dataclass
class SeriesResult:
    """What a series' analysis gives: the finding, the header check, the representative instance (its header
    and Grad-CAM overlay) and the headers of every analysed instance (the SR's evidence)."""

    finding: SeriesFinding
    header_check: HeaderCheck | None  # None when the modality gate stopped every instance
    representative: object
    overlay: np.ndarray
    evidence: list
    study_uid: str


def _series_verdict(predictor, good: list, probs: np.ndarray):
    """The Predictor's verdict rules on the averaged probabilities: colour / out of scope when most of the
    analysed instances are (see the module docstring)."""
    top = int(np.argmax(probs))
    decoded = [d for _, d, _ in good]
    threshold = None if predictor.ood is None else float(predictor.ood.threshold)
    scores = [p.ood_score for p, _, _ in good if p.ood_score is not None]
    return series_verdict(predictor.classes[top], float(probs[top]), uncertain_below=predictor.uncertain_below,
                          analysed=len(good), colour_votes=sum(d.is_colour for d in decoded),
                          flagged_votes=0 if threshold is None else sum(s > threshold for s in scores),
                          colourfulness=float(np.mean([d.colourfulness for d in decoded])),
                          ood_score=float(np.mean(scores)) if scores else None, ood_threshold=threshold,
                          has_detector=predictor.ood is not None)


def _explain_all(predictor, decoded: list, used: list) -> tuple[list, dict]:
    """(rows of (prediction, decoded, instance), {class: Explanation}) from batched passes that give each
    instance's prediction and its map of its own class -- so the representative's map usually comes free,
    without a second forward pass. Only the best-scoring map per class is kept (memory: a few maps of the
    original size, not one per instance)."""
    rows, maps = [], {}
    for start in range(0, len(decoded), predictor.batch_size):
        chunk = decoded[start:start + predictor.batch_size]
        for e, d, inst in zip(predictor.explain_many(chunk), chunk, used[start:start + predictor.batch_size]):
            if isinstance(e, Exception):
                continue
            rows.append((e.prediction, d, inst))
            c = e.explained_class
            if c is not None and (c not in maps or e.prediction.probabilities[c] > maps[c].prediction.probabilities[c]):
                maps[c] = e
    return rows, maps


def _gated_result(series: PendingSeries, stopped: list) -> SeriesResult:
    """Every instance was stopped by the modality gate: out of scope with the gate's sentence, no class."""
    prediction, image, inst = stopped[0]
    finding = SeriesFinding(None, {}, "out_of_scope", prediction.verdict_reason, None, "", 0, series.series_uid,
                            gated=len(stopped))
    gray = (np.clip(image.pixels, 0.0, 1.0) * 255).astype(np.uint8)
    study_uid = str(inst.header.get("StudyInstanceUID", ""))
    return SeriesResult(finding, None, inst.header, np.repeat(gray[:, :, None], 3, axis=2),
                        [i.header for _, _, i in stopped], study_uid)


def analyse_series(predictor, series: PendingSeries, *, max_slices: int, mapping=None) -> SeriesResult | None:
    """Classify ``max_slices`` evenly spaced instances of ``series`` (decoded when they arrived); ``None`` when
    it kept none (every instance then got a failure status when it arrived)."""
    chosen = sample_evenly(sorted(series.kept, key=lambda i: i.order), max_slices)
    if not chosen:
        return None
    rows, maps = _explain_all(predictor, [i.image for i in chosen], chosen)
    good = [row for row in rows if row[0].probabilities]          # the network saw these
    stopped = [row for row in rows if not row[0].probabilities]   # the modality gate stopped these
    if not good:
        return _gated_result(series, stopped) if stopped else None
    probs = np.mean([[p.probabilities[c] for c in predictor.classes] for p, _, _ in good], axis=0)
    top = predictor.classes[int(np.argmax(probs))]
    name, reason = _series_verdict(predictor, good, probs)
    rep = max(good, key=lambda g: g[0].probabilities[top])
    own = maps.get(top)
    if own is None or own.image is not rep[1].pixels:   # its map was of another class: one more pass
        own = predictor.explain(rep[1], top, faithfulness=False)
    overlay = own.overlay()
    check = header_check(rep[1].dicom, top, predictor.classes, mapping or getattr(predictor, "header_mapping", None))
    value = f"{check.field}={check.value}" if check.field else ""
    finding = SeriesFinding(top, {c: float(p) for c, p in zip(predictor.classes, probs)}, name, reason,
                            check.status, value, len(good), series.series_uid, gated=len(stopped))
    study_uid = str(rep[2].header.get("StudyInstanceUID", ""))
    return SeriesResult(finding, check, rep[2].header, overlay, [i.header for _, _, i in good], study_uid)
