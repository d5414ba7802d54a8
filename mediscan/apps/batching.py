"""Adaptive batching: concurrent ``/v1/predict`` requests share one forward pass.

Each request thread decodes its own upload (so a bad image is that request's own 400, and decoding
runs in parallel), then hands the decoded image to :class:`Batcher`. One worker thread takes what has
queued: it waits at most ``window_ms`` after the first image for more to arrive, up to ``max_batch``
images, and runs them through :meth:`Predictor.predict_many` -- the same batched path as the batch
endpoint and the folder CLI. While the model is busy, new requests queue up, so under load batches fill
by themselves and an idle server adds at most ``window_ms`` to a lone request.

Every request still gets its own answer (its row of the batch), its own errors and its own timings:
``decode`` (its own, in its thread), ``preprocess`` (its own), ``queue`` (waiting for its batch to start),
``model`` (its share of the batch's forward pass) and ``total``; :func:`Batcher.predict` also returns the
size of the batch it ran in.

The worker thread starts with the first request and ends after ``idle_s`` without one, so apps built and
dropped (tests) leave no thread behind for long.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field

from mediscan.core.imaging import DecodedImage, read_image
from mediscan.inference.predictor import Predictor
from mediscan.inference.results import Prediction

__all__ = ["BatchFailed", "Batcher"]


class BatchFailed(RuntimeError):
    """The shared forward pass failed; raised in every request of that batch (the cause is chained)."""


@dataclass
class _Job:
    decoded: DecodedImage
    name: str
    queued_at: float
    done: threading.Event = field(default_factory=threading.Event)
    result: Prediction | None = None
    error: BaseException | None = None
    batch_size: int = 0
    started_at: float = 0.0


class Batcher:
    """Group concurrent predictions into batched forward passes on one shared :class:`Predictor`.

    Args:
        predictor: the model to run.
        window_ms: how long the first image of a batch waits for company (> 0).
        max_batch: most images per forward pass (``None`` = the predictor's ``batch_size``).
        idle_s: the worker thread ends after this long without work (a new request restarts it).
    """

    def __init__(self, predictor: Predictor, window_ms: float, max_batch: int | None = None,
                 idle_s: float = 30.0):
        if window_ms <= 0:
            raise ValueError(f"window_ms must be > 0 (0 means no batching: do not build a Batcher), got {window_ms}")
        self.predictor = predictor
        self.window_s = float(window_ms) / 1000.0
        self.max_batch = predictor.batch_size if max_batch is None else int(max_batch)
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.idle_s = float(idle_s)
        self._cond = threading.Condition()
        self._queue: list[_Job] = []
        self._worker: threading.Thread | None = None

    def predict(self, data: bytes, name: str) -> tuple[Prediction, int]:
        """Decode ``data`` here, predict it in the next batch; returns the prediction and the batch size.

        Raises :class:`ImageReadError` (this upload cannot be decoded) or :class:`BatchFailed`.
        """
        started = time.perf_counter()
        decoded = read_image(data, name=name, max_pixels=self.predictor.max_pixels)
        decode_ms = (time.perf_counter() - started) * 1000.0
        job = _Job(decoded, name, time.perf_counter())
        self._submit(job)
        job.done.wait()
        if job.error is not None:
            raise BatchFailed(f"the batched forward pass failed ({type(job.error).__name__})") from job.error
        timings = {**job.result.timings_ms, "decode": decode_ms,
                   "queue": (job.started_at - job.queued_at) * 1000.0,
                   "total": (time.perf_counter() - started) * 1000.0}
        return dataclasses.replace(job.result, timings_ms=timings), job.batch_size

    def _submit(self, job: _Job) -> None:
        with self._cond:
            self._queue.append(job)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="mediscan-batcher", daemon=True)
                self._worker.start()
            self._cond.notify()

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Job] | None:
        """Wait for work; then up to ``window_s`` after the oldest job for the batch to fill."""
        with self._cond:
            while not self._queue:
                if not self._cond.wait(self.idle_s) and not self._queue:
                    self._worker = None          # under the lock: a new job starts a new worker
                    return None
            deadline = self._queue[0].queued_at + self.window_s
            while len(self._queue) < self.max_batch:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = self._queue[:self.max_batch]
            del self._queue[:self.max_batch]
            return batch

    def _run(self, batch: list[_Job]) -> None:
        """One forward pass for ``batch``; every job gets its own row, or the shared failure."""
        started = time.perf_counter()
        try:
            results = self.predictor.predict_many([job.decoded for job in batch], names=[job.name for job in batch],
                                                  batch_size=len(batch))
        except Exception as exc:             # noqa: BLE001 -- handed to each request, logged there as a 500
            results = [exc] * len(batch)
        for job, result in zip(batch, results):
            if isinstance(result, Prediction):
                job.result = result
            else:                            # cannot be a decoding error: the images are decoded already
                job.error = result
            job.batch_size, job.started_at = len(batch), started
            job.done.set()
