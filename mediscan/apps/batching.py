"""Adaptive batching: concurrent ``/v1/predict`` requests share one forward pass.

Each request thread decodes *and preprocesses* its own upload (:meth:`Predictor.prepare`: a bad image is
that request's own 400, and this work runs in parallel, never in the model's way), then hands the
prepared image to :class:`Batcher`. Worker threads take what has queued: a worker waits at most
``window_ms`` after the oldest image for more to arrive, up to ``max_batch`` images, and runs them
through :meth:`Predictor.run_prepared` -- the same batched path as the batch endpoint and the folder CLI.

Two workers by default (``workers``): with one, the model sat idle from the end of a batch until the
next one had been collected, and every client of that batch was then answered, sent its next request
and decoded it at the same moment while the model waited for them (measured 0.92x the unbatched
throughput at 8 clients on 2 CPU cores). With two, one batch is being collected, or its rows calibrated
and answered, while the other runs, so the model always has work while requests are waiting; each
batch still holds whatever arrived while the other one ran. Figures: docs/benchmarks.md ("The API under
load and abuse").

Every request still gets its own answer (its row of the batch), its own errors and its own timings:
``decode`` and ``preprocess`` (its own, in its thread), ``queue`` (waiting for its batch to start),
``model`` (its share of the batch's forward pass) and ``total``; :func:`Batcher.predict` also returns the
size of the batch it ran in. An input the modality gate stops never reaches the network, so it is
answered in its own thread without joining a batch (batch size 0).

Workers start with the first requests and end after ``idle_s`` without one, so apps built and dropped
(tests) leave no thread behind for long.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field

from mediscan.inference.predictor import Predictor, PreparedImage
from mediscan.inference.results import Prediction

__all__ = ["DEFAULT_WORKERS", "BatchFailed", "Batcher"]

#: Batches that may be in flight at once (see the module docstring for why two).
DEFAULT_WORKERS = 2


class BatchFailed(RuntimeError):
    """The shared forward pass failed; raised in every request of that batch (the cause is chained)."""


@dataclass
class _Job:
    item: PreparedImage
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
        idle_s: a worker thread ends after this long without work (a new request restarts it).
        workers: batches in flight at once (>= 1).
    """

    def __init__(self, predictor: Predictor, window_ms: float, max_batch: int | None = None,
                 idle_s: float = 30.0, workers: int = DEFAULT_WORKERS):
        if window_ms <= 0:
            raise ValueError(f"window_ms must be > 0 (0 means no batching: do not build a Batcher), got {window_ms}")
        self.predictor = predictor
        self.window_s = float(window_ms) / 1000.0
        self.max_batch = predictor.batch_size if max_batch is None else int(max_batch)
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = int(workers)
        self.idle_s = float(idle_s)
        self._cond = threading.Condition()
        self._queue: list[_Job] = []
        self._alive = 0                      # worker threads running (guarded by _cond)

    def predict(self, data: bytes, name: str) -> tuple[Prediction, int]:
        """Decode and preprocess ``data`` here, predict it in the next batch; returns the prediction and
        the batch size (0: the modality gate answered it without the network).

        Raises :class:`ImageReadError` (this upload cannot be decoded) or :class:`BatchFailed`.
        """
        started = time.perf_counter()
        item = self.predictor.prepare(data, name)
        if item.stop is not None:            # out of scope by its header: nothing to batch
            return self.predictor.run_prepared([item])[0], 0
        # Queued jobs keep only the model input: a crowd of large uploads must not hold their full-size pixels.
        job = _Job(item.without_pixels(), time.perf_counter())
        del item                             # or this thread holds the full-size pixels while it waits
        self._submit(job)
        job.done.wait()
        if job.error is not None:
            raise BatchFailed(f"the batched forward pass failed ({type(job.error).__name__})") from job.error
        timings = {**job.result.timings_ms, "queue": (job.started_at - job.queued_at) * 1000.0,
                   "total": (time.perf_counter() - started) * 1000.0}
        return dataclasses.replace(job.result, timings_ms=timings), job.batch_size

    def _submit(self, job: _Job) -> None:
        with self._cond:
            self._queue.append(job)
            if self._alive < self.workers:
                self._alive += 1
                threading.Thread(target=self._work, name=f"mediscan-batcher-{self._alive}", daemon=True).start()
            self._cond.notify()

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Job] | None:
        """Wait for work; then up to ``window_s`` after the oldest job for the batch to fill. ``None``:
        ``idle_s`` passed without work and this worker ends."""
        with self._cond:
            while True:
                while not self._queue:
                    if not self._cond.wait(self.idle_s) and not self._queue:
                        self._alive -= 1          # under the lock: a new job starts a new worker
                        return None
                deadline = self._queue[0].queued_at + self.window_s
                while self._queue and len(self._queue) < self.max_batch:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._queue:                   # another worker may have taken them meanwhile
                    batch = self._queue[:self.max_batch]
                    del self._queue[:self.max_batch]
                    return batch

    def _run(self, batch: list[_Job]) -> None:
        """One forward pass for ``batch``; every job gets its own row, or the shared failure."""
        started = time.perf_counter()
        try:
            results = self.predictor.run_prepared([job.item for job in batch])
        except Exception as exc:             # noqa: BLE001 -- handed to each request, logged there as a 500
            results = [exc] * len(batch)
        for job, result in zip(batch, results):
            if isinstance(result, Prediction):
                job.result = result
            else:                            # cannot be a decoding error: the images are decoded already
                job.error = result
            job.batch_size, job.started_at = len(batch), started
            job.done.set()
