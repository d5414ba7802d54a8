"""The DICOM node: the Storage SCP, the analysis thread and delivery of the results.

Threads: pynetdicom's (one per association) receive and check instances into the
:class:`~mediscan.dicom.scp.SeriesCollector`; a monitor moves series that are complete (no instance for
``series_timeout`` seconds, or their association ended) to the analysis queue; one worker analyses them
with the Predictor and delivers the Secondary Capture and SR (:mod:`mediscan.dicom.sender`).

Nothing is dropped silently: a result that cannot be delivered after the retries is kept (and, with an
output folder, written there) and retried -- after the next successful delivery, and every
``redeliver_every`` seconds while the node is idle; :meth:`DicomNode.status`, the status file
(:mod:`mediscan.dicom.status`, read by ``python app.py dicom --status``) and the summary of
:meth:`DicomNode.stop` list what is pending, undelivered or failed. Logs name series by a hash
(:func:`~mediscan.dicom.uids.log_id`), never a UID in clear or a patient field.
"""
from __future__ import annotations

import logging
import os
import queue
import ssl
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from mediscan.dicom import scp
from mediscan.dicom.results import result_datasets, warm_up
from mediscan.dicom.sender import DeliveryError, FolderDestination, deliver
from mediscan.dicom.series import analyse_series
from mediscan.dicom.status import write_status
from mediscan.dicom.tls_server import start_server
from mediscan.dicom.uids import checkpoint_sha256, log_id

__all__ = ["DicomNode", "NodeConfig", "tls_context"]

log = logging.getLogger("mediscan.dicom")
_MAX_BACKLOG = 200


@dataclass
class NodeConfig:
    """Settings of a :class:`DicomNode` (the ``python app.py dicom`` flags)."""

    ae_title: str = "MEDISCAN"
    host: str = "127.0.0.1"
    port: int = 11112
    allow: list[tuple[str, str | None]] = field(default_factory=list)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    max_associations: int = 8
    series_timeout: float = 10.0
    max_slices: int = 16
    max_instance_mb: float = 64.0
    max_held_mb: float = 1024.0
    destination: object | None = None
    out_dir: Path | None = None
    attempts: int = 4
    backoff: float = 1.0
    header_mapping: object | None = None
    status_file: Path | None = None
    redeliver_every: float = 30.0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Undelivered:
    """A result that could not be delivered yet: kept, and retried."""

    name: str                 # the series' log id
    datasets: list
    since: str = field(default_factory=_now)
    attempts: int = 0
    last_error: str = ""

    def to_dict(self) -> dict:
        return {"series": self.name, "since": self.since, "attempts": self.attempts, "last_error": self.last_error}


def tls_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """The server's TLS context (client certificates required when ``ca`` is given); ``ValueError`` names
    the file that cannot be used."""
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"--tls-ca {ca}: cannot load the CA bundle ({exc})") from None
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"--tls-cert {cert} / --tls-key {key}: cannot load the certificate and key "
                         f"({getattr(exc, 'strerror', None) or exc}); both must be PEM files") from None
    if ca:
        context.verify_mode = ssl.CERT_REQUIRED  # only peers with a certificate from this CA
    return context


class DicomNode:
    """Receive studies, analyse each series, store the results back. ``start()`` returns at once."""

    def __init__(self, predictor, config: NodeConfig, *, version: str = "0"):
        self.predictor, self.config, self.version = predictor, config, version
        self.digest = checkpoint_sha256(predictor.checkpoint_path)
        self.collector = scp.SeriesCollector(max_slices=config.max_slices,
                                             max_held_bytes=int(config.max_held_mb * 2**20))
        self.stats = {"received": 0, "refused": 0, "not_analysed": 0, "series_analysed": 0,
                      "series_failed": 0, "results_delivered": 0}
        self.undelivered: list[Undelivered] = []  # awaiting a retry (only the worker thread changes it)
        self.failed: list[str] = []                # series that gave no result, with the reason
        self._work: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._started, self._running, self._next_redelivery = _now(), False, 0.0
        self._analysing = 0          # the series the worker holds now (0 or 1)
        self._bound_port = config.port
        self._server = None
        self._threads: list[threading.Thread] = []
        self.ae = scp.build_ae(config.ae_title, max_associations=config.max_associations, allow=config.allow)

    # ------------------------------------------------------------------------------------------ life cycle

    def start(self) -> DicomNode:
        """Start the server and the monitor and worker threads."""
        cfg = self.config
        store = lambda event: scp.store_handler(  # noqa: E731 - pynetdicom calls handler(event, *args)
            event, self.collector, max_instance_bytes=int(cfg.max_instance_mb * 2**20),
            max_pixels=self.predictor.max_pixels, stats=self.stats, modalities=self.predictor.modalities)
        handlers = [(scp.evt.EVT_C_STORE, store), (scp.evt.EVT_REQUESTED, scp.allow_handler, [cfg.allow]),
                    (scp.evt.EVT_RELEASED, self._association_ended), (scp.evt.EVT_ABORTED, self._association_ended)]
        ssl_context = tls_context(cfg.tls_cert, cfg.tls_key, cfg.tls_ca) if cfg.tls_cert else None
        self._server = start_server(self.ae, (cfg.host, cfg.port), evt_handlers=handlers, ssl_context=ssl_context)
        self._running, self._bound_port = True, self._server.server_address[1]
        self._write_status()
        for target in (self._monitor, self._worker):
            thread = threading.Thread(target=target, name=f"mediscan-{target.__name__[1:]}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("DICOM node %s listening on %s:%d%s", cfg.ae_title, cfg.host, self.port,
                 " (TLS)" if cfg.tls_cert else "")
        return self

    @property
    def port(self) -> int:
        """The port the server listens on (the configured one, or the one the OS chose for port 0)."""
        return self._bound_port

    def stop(self) -> dict:
        """Stop receiving, analyse every series still pending, deliver, and return the summary."""
        if self._server is not None:
            # Associations still open would hold shutdown() until their sender gives up: abort them (what
            # they delivered is kept and analysed below; their senders see the abort and retry the rest).
            for assoc in list(self.ae.active_associations):
                assoc.abort()
            self._server.shutdown()
            self._server = None
        for series in self.collector.pop():
            self._work.put(series)
        self._work.join()
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._running = False
        summary = self.status()
        self._write_status()
        if summary["undelivered"] or summary["failed"]:
            log.error("stopped with %d undelivered result(s) %s and %d series without a result %s",
                      len(summary["undelivered"]), [u["series"] for u in summary["undelivered"]],
                      len(summary["failed"]), summary["failed"])
        return summary

    def status(self) -> dict:
        """Counts, plus the series waiting, the undelivered results (log id, since, attempts, last error) and
        the failed series (log id: reason)."""
        return {**self.stats, "pending_series": len(self.collector) + self._work.qsize() + self._analysing,
                "held_mb": round(self.collector.held_bytes / 2**20, 1),
                "undelivered": [u.to_dict() for u in list(self.undelivered)], "failed": list(self.failed)}

    def _write_status(self) -> dict | None:
        """Write the status file (when configured): :meth:`status` plus who and where this node is."""
        cfg = self.config
        if cfg.status_file is None:
            return None
        status = {**self.status(), "pid": os.getpid(), "ae_title": cfg.ae_title, "host": cfg.host,
                  "port": self.port, "tls": bool(cfg.tls_cert), "running": self._running, "started": self._started,
                  "destination": str(cfg.destination or cfg.out_dir), "updated": _now()}
        try:
            write_status(cfg.status_file, status)
        except OSError as exc:  # the node keeps serving; the log says why the file is stale
            log.error("cannot write the status file %s: %s", cfg.status_file, exc.strerror or exc)
        return status

    # ------------------------------------------------------------------------------------------ threads

    def _association_ended(self, event) -> None:
        for series in self.collector.pop(association=id(event.assoc)):
            self._work.put(series)

    def _monitor(self) -> None:
        written, last = None, 0.0
        while not self._stop.wait(min(0.2, self.config.series_timeout / 4)):
            for series in self.collector.pop(idle_for=self.config.series_timeout):
                self._work.put(series)
            if self.config.status_file is not None and time.monotonic() - last >= 1.0:
                current = self.status()
                if current != written:   # rewrite only what changed, at most once a second
                    self._write_status()
                    written, last = current, time.monotonic()

    def _worker(self) -> None:
        try:
            warm_up()   # highdicom's first SC/SR costs seconds: pay them now, not on the first series
        except Exception:  # a failed warm-up only means a slower first result
            log.debug("warm-up of the DICOM writers failed", exc_info=True)
        while not self._stop.is_set():
            try:
                series = self._work.get(timeout=0.2)
            except queue.Empty:
                if self.undelivered and time.monotonic() >= self._next_redelivery:
                    self._redeliver()
                continue
            self._analysing = 1
            try:
                self._process(series)
            finally:
                self._analysing = 0
                self.collector.release(series.held_bytes)
                series.kept.clear()
                self._work.task_done()

    def _process(self, series) -> None:
        name = log_id(series.series_uid)
        try:
            result = analyse_series(self.predictor, series, max_slices=self.config.max_slices,
                                    mapping=self.config.header_mapping)
            datasets = None if result is None else result_datasets(
                result, checkpoint_sha256=self.digest, version=self.version)
        except Exception as exc:  # one bad series must not stop the node: report it, keep serving
            log.exception("series %s: analysis failed", name)
            self._fail(name, f"analysis failed ({type(exc).__name__})")
            return
        if datasets is None:
            self._fail(name, f"none of its {series.received} instance(s) could be analysed")
            return
        self.stats["series_analysed"] += 1
        log.info("series %s: %s (%s), header check %s, %d of %d instance(s) analysed, %d refused", name,
                 result.finding.top_class, result.finding.verdict, result.finding.header_status,
                 result.finding.analysed, series.received, series.failed)
        self._deliver(name, datasets)

    def _fail(self, name: str, reason: str) -> None:
        self.stats["series_failed"] += 1
        self.failed.append(f"{name}: {reason}")

    def _deliver(self, name: str, datasets: list) -> None:
        cfg = self.config
        if cfg.out_dir is not None:
            try:
                FolderDestination(cfg.out_dir).send(datasets)
            except DeliveryError as exc:
                log.error("series %s: %s", name, exc)
        if cfg.destination is None:
            self.stats["results_delivered"] += cfg.out_dir is not None
            return
        item = Undelivered(name, datasets)
        try:
            item.attempts = cfg.attempts
            deliver(cfg.destination, datasets, attempts=cfg.attempts, backoff=cfg.backoff, what=f"series {name}")
        except DeliveryError as exc:
            log.error("series %s: result not delivered (%s); kept, retried every %g s", name, exc,
                      cfg.redeliver_every)
            item.last_error = str(exc)[:300]
            self.undelivered = self.undelivered + [item]
            self._next_redelivery = time.monotonic() + cfg.redeliver_every
        else:
            self.stats["results_delivered"] += 1
            self._redeliver()   # the destination is back: what waited goes now
        if len(self.undelivered) > _MAX_BACKLOG:  # bounded: the oldest go, loudly (they are in --out if given)
            for old in self.undelivered[:-_MAX_BACKLOG]:
                self._fail(old.name, "result dropped: destination unreachable and the backlog is full")
            self.undelivered = self.undelivered[-_MAX_BACKLOG:]

    def _redeliver(self) -> None:
        """One attempt per waiting result, oldest first, stopping at the first failure (still down)."""
        cfg = self.config
        while self.undelivered:
            item = self.undelivered[0]
            item.attempts += 1
            try:
                cfg.destination.send(item.datasets)
            except DeliveryError as exc:
                item.last_error = str(exc)[:300]
                self._next_redelivery = time.monotonic() + cfg.redeliver_every
                return
            log.info("series %s: delivered after %d attempt(s)", item.name, item.attempts)
            self.undelivered = self.undelivered[1:]
            self.stats["results_delivered"] += 1
