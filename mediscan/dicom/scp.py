"""The Storage SCP: receive instances fast, check them, and group them by series for the analysis thread.

pynetdicom runs each C-STORE handler on its association's thread, so the handler only decodes and files the
instance (pitfall 13 of the design notes); the model runs elsewhere (:mod:`mediscan.dicom.node`), on the
decoded image the handler kept, so no instance is decoded twice. Memory is bounded: an instance over
``max_instance_bytes`` (encoded), or one whose decoded image would take the held total over
``max_held_bytes``, is answered 0xA700 "out of resources" (the sender retries later), never queued.

Answers (Error Comment says why, in at most 64 characters):

* 0x0000 -- stored for analysis; also for non-image objects of a routed study (SR, presentation states,
  KOS, SEG, RT ...) and MediScan's own results, which are accepted and not analysed, with a log line;
* 0xA700 -- over the size limit, or the work queue is full;
* 0xC000 -- an image that cannot be used: no pixel data, truncated, undecodable, no SeriesInstanceUID, or so
  large decoded that it could never fit in ``max_held_bytes`` (retrying would not help). An image
  whose header the modality gate stops (an ultrasound cine in MPEG-4, a mammogram without pixel data) is stored
  for analysis instead: its series is answered out of scope from the header, as the decodable ones are.

Every storage SOP class is offered with every transfer syntax pynetdicom knows, compressed ones included:
an archive that cannot transcode (Debian's Orthanc and JPEG 2000) would otherwise send nothing.
"""
from __future__ import annotations

import io
import logging
import threading
import time

import pydicom
from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from mediscan.core.decoded import DecodedImage
from mediscan.core.imaging import ImageReadError
from mediscan.core.modality_gate import DEFAULT_MODALITIES
from mediscan.dicom.series import PendingSeries, decode_instance, held_size
from mediscan.dicom.uids import is_own_instance, log_id

__all__ = ["OUT_OF_RESOURCES", "CANNOT_UNDERSTAND", "SeriesCollector", "build_ae", "is_image_storage",
           "store_handler"]

log = logging.getLogger("mediscan.dicom")
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


def is_image_storage(sop_class_uid: str) -> bool:
    """Whether a SOP class holds images to analyse (CT, MR, CR, DX, XA, US, SC, enhanced ...), not an SR,
    presentation state, KOS, segmentation, RT object, waveform or document."""
    return "Image Storage" in UID(str(sop_class_uid)).name


class SeriesCollector:
    """Series being received, keyed by SeriesInstanceUID; thread-safe; bounded by the bytes it holds."""

    def __init__(self, *, max_slices: int, max_held_bytes: int):
        self.max_slices, self.max_held_bytes = max_slices, max_held_bytes
        self._series: dict[str, PendingSeries] = {}
        self._lock = threading.Lock()
        self.held_bytes = 0

    def add(self, series_uid: str, image: DecodedImage, header, association: int) -> bool:
        """File a decoded instance; ``False`` (and nothing filed) when it would exceed the memory bound."""
        with self._lock:
            if self.held_bytes + held_size(image) > self.max_held_bytes:
                return False
            series = self._series.setdefault(series_uid, PendingSeries(series_uid, self.max_slices))
            self.held_bytes += series.add(image, header, association)
            return True

    def count_failure(self, series_uid: str) -> None:
        """Note an instance of ``series_uid`` that was refused (it counts in the series' summary)."""
        with self._lock:
            self._series.setdefault(series_uid, PendingSeries(series_uid, self.max_slices)).failed += 1

    def pop(self, *, idle_for: float | None = None, association: int | None = None) -> list[PendingSeries]:
        """Remove and return the complete series: idle for ``idle_for`` seconds, last sent on
        ``association`` (which has ended), or -- with neither -- all of them."""
        now = time.monotonic()
        with self._lock:
            done = [uid for uid, s in self._series.items()
                    if (idle_for is None and association is None)
                    or (idle_for is not None and now - s.last_arrival >= idle_for)
                    or (association is not None and s.association == association)]
            return [self._series.pop(uid) for uid in done]

    def release(self, nbytes: int) -> None:
        """Give back the bytes of a series whose analysis has finished."""
        with self._lock:
            self.held_bytes = max(0, self.held_bytes - nbytes)

    def __len__(self) -> int:
        with self._lock:
            return len(self._series)


def _status(code: int, comment: str = ""):
    answer = pydicom.Dataset()
    answer.Status = code
    if comment:
        answer.ErrorComment = comment[:64]
    return answer


def _decode_instance(data: bytes, max_pixels: int, modalities: tuple[str, ...]) -> DecodedImage | str:
    """The decoded instance (:func:`~mediscan.dicom.series.decode_instance`), else a short reason for the
    Error Comment."""
    try:
        return decode_instance(data, name="received instance", max_pixels=max_pixels, modalities=modalities)
    except ImageReadError as exc:
        return {"no_pixel_data": "no pixel data", "truncated": "truncated pixel data",
                "unsupported": "unsupported encoding", "too_large": "image too large",
                "too_small": "image too small"}.get(exc.reason, "undecodable pixel data")


def store_handler(event, collector: SeriesCollector, *, max_instance_bytes: int, max_pixels: int, stats: dict,
                  modalities: tuple[str, ...] = DEFAULT_MODALITIES):
    """The EVT_C_STORE handler (see the module docstring for the answers); ``modalities``: the checkpoint's
    (:func:`mediscan.core.modality_gate.checkpoint_modalities`)."""
    data = event.encoded_dataset(include_meta=True)
    if len(data) > max_instance_bytes:
        stats["refused"] += 1
        return _status(OUT_OF_RESOURCES, f"instance over the {max_instance_bytes >> 20} MB limit")
    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:  # any parse failure of the sender's bytes is "cannot understand"
        stats["refused"] += 1
        return _status(CANNOT_UNDERSTAND, "the dataset cannot be parsed")
    sop_class = str(header.get("SOPClassUID", event.request.AffectedSOPClassUID))
    if is_own_instance(header) or not is_image_storage(sop_class):
        stats["not_analysed"] += 1
        log.info("accepted, not analysed: %s (%s)", UID(sop_class).name,
                 "MediScan's own result" if is_own_instance(header) else "not an image")
        return 0x0000
    series_uid = str(header.get("SeriesInstanceUID", "") or "")
    image = "no SeriesInstanceUID" if not series_uid else _decode_instance(data, max_pixels, modalities)
    del data                # the decoded image is what is kept; the encoded bytes can go now
    if isinstance(image, str):
        stats["refused"] += 1
        if series_uid:
            collector.count_failure(series_uid)
        log.warning("refused an instance of series %s: %s", log_id(series_uid), image)
        return _status(CANNOT_UNDERSTAND, f"MediScan cannot use this image: {image}")
    if held_size(image) > collector.max_held_bytes:
        # It would never fit: "out of resources" would have the sender retry it for ever.
        stats["refused"] += 1
        collector.count_failure(series_uid)
        log.warning("refused an instance of series %s: %d MB decoded, more than --max-held-mb",
                    log_id(series_uid), image.pixels.nbytes >> 20)
        return _status(CANNOT_UNDERSTAND, "decoded image larger than the node's --max-held-mb")
    if not collector.add(series_uid, image, header, id(event.assoc)):
        stats["refused"] += 1
        return _status(OUT_OF_RESOURCES, "MediScan's work queue is full; retry later")
    stats["received"] += 1
    return 0x0000


def build_ae(ae_title: str, *, max_associations: int, allow: list[tuple[str, str | None]]) -> AE:
    """The Application Entity: every storage SOP class with every transfer syntax, plus Verification."""
    ae = AE(ae_title=ae_title)
    ae.maximum_associations = max_associations
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    if allow:
        ae.require_calling_aet = sorted({aet for aet, _ in allow})
    return ae


def allow_handler(event, allow: list[tuple[str, str | None]]) -> None:
    """EVT_REQUESTED: reject a calling AE whose ``AET@host`` entry names another host."""
    if not allow:
        return
    calling = str(event.assoc.requestor.primitive.calling_ae_title).strip()
    address = event.assoc.requestor.address
    if not any(aet == calling and host in (None, address) for aet, host in allow):
        log.warning("rejected an association from AE %r at %s: not in --allow", calling, address)
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)


__all__ += ["allow_handler", "evt"]
