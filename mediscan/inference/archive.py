"""Folder and archive inference that streams: lazy listing, a bounded decode pool ahead of the model, full
batches, CSV rows flushed per batch, ``--resume``, and sharding over ``torchrun`` ranks.

    runner = ArchiveJob(root, csv_path, batch_size=8, resume=True)
    outcome = run_archive(predictor, runner, join_ranks())      # None on ranks other than 0

Memory stays flat: files are listed one folder at a time (each folder's names sorted for a stable order),
at most ``prefetch`` decoded images wait for the model, rows leave memory when their batch is written, and
the resume set holds 8 bytes per file already done. A crash loses at most the batch in flight.

Several processes (``torchrun --nproc_per_node N test_single_image.py ARCHIVE --csv out.csv``): every rank
walks the same listing and keeps the files whose path hash falls on it (a file's rank depends on its path
alone, so no file is done twice even if ranks list at slightly different moments); each rank writes its own
part file under ``out.csv.parts/``; rank 0 merges the parts into ``out.csv`` in listing order and deletes
them. The archive and the CSV's folder must be on a filesystem that every rank sees at the same path.
"""
from __future__ import annotations

import csv
import os
import shutil
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import torch

from mediscan.core.imaging import looks_like_image_file
from mediscan.core.ranks import ProcessRank
from mediscan.inference.archive_csv import (
    ENCODING,
    DoneSet,
    Summary,
    check_checkpoint_record,
    csv_fields,
    error_row,
    merge_csvs,
    path_hash,
    prediction_row,
    read_done,
    record_path_for,
    repair_tail,
    summarize_csv,
    write_checkpoint_record,
)
from mediscan.inference.onnx_backend import file_sha256

__all__ = ["ArchiveInputError", "Ranks", "join_ranks", "leave_ranks", "iter_archive", "own_outputs", "ArchiveJob",
           "ArchiveOutcome", "run_archive", "parts_dir_for"]

#: How long a rank waits at a barrier for the others. Ranks finish their shards at different times (one
#: may have hours more work after a resume), and torch's default of 30 minutes would abort the job.
BARRIER_TIMEOUT = timedelta(days=7)


class ArchiveInputError(ValueError):
    """The folder cannot be listed or holds no image file."""


# -------------------------------------------------------------------------------------------- ranks

class Ranks(ProcessRank):
    """This process's place among the ``torchrun`` processes, with its share of the archive."""

    def owns(self, path: str) -> bool:
        """Whether this rank processes ``path`` (a hash of the path: deterministic, independent of order)."""
        return not self.enabled or path_hash(path) % self.world_size == self.rank

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            dist.barrier()


def join_ranks() -> Ranks:
    """Join the process group ``torchrun`` describes in the environment (gloo: only barriers go over it,
    so it works beside CPU and GPU ranks alike); a plain run is rank 0 of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    import torch.distributed as dist
    ranks = Ranks(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    return ranks


def leave_ranks(ranks: Ranks) -> None:
    if ranks.enabled:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def rank_device(ranks: Ranks) -> str | None:
    """One GPU per rank on a machine that has GPUs (``cuda:LOCAL_RANK``); ``None`` (the default) otherwise."""
    if ranks.enabled and torch.cuda.is_available():
        return f"cuda:{ranks.local_rank % torch.cuda.device_count()}"
    return None


# -------------------------------------------------------------------------------------------- listing

def iter_archive(root: Path, skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, str | None]]:
    """``(relative path, None)`` for every image file under ``root``, lazily, in listing order (depth
    first, each folder's entries sorted by name: the order of sorting the paths); a folder that cannot be
    listed gives ``("folder/", reason)`` instead of stopping. Symlinked folders are not followed (no loops);
    only regular files are considered (a FIFO or device would block the reader). Relative paths in ``skip``
    (files or folders: the run's own outputs, see :func:`own_outputs`) are left out."""
    stack: list[tuple[str, Iterator[str], set[str]]] = []
    prefix, entries, folders, problem = _scan(root, "")
    if problem:
        yield "", problem
        return
    stack.append((prefix, entries, folders))
    while stack:
        prefix, entries, folders = stack[-1]
        name = next(entries, None)
        if name is None:
            stack.pop()
            continue
        relative = prefix + name
        if relative in skip:
            continue
        if name in folders:
            sub_prefix, sub_entries, sub_folders, problem = _scan(root, relative + "/")
            if problem:
                yield relative + "/", problem
            else:
                stack.append((sub_prefix, sub_entries, sub_folders))
        elif looks_like_image_file(root / relative):
            yield relative, None


def _scan(root: Path, prefix: str) -> tuple[str, Iterator[str], set[str], str | None]:
    """One folder: its sorted file and folder names (names only: a million-file folder costs its names)."""
    names, folders = [], set()
    try:
        with os.scandir(root / prefix if prefix else root) as scan:
            for entry in scan:
                if entry.is_dir(follow_symlinks=False):
                    folders.add(entry.name)
                elif not entry.is_file():       # FIFOs, sockets, devices, dangling links
                    continue
                names.append(entry.name)
    except OSError as exc:
        return prefix, iter(()), set(), f"Cannot list the folder {root / prefix}: {exc.strerror or exc}."
    names.sort()
    return prefix, iter(names), folders, None


def own_outputs(job: "ArchiveJob") -> frozenset[str]:
    """The run's outputs that lie under ``job.root``, as listing paths: the listing is lazy, so without this an
    overlay written into a folder not listed yet (or the CSV) would come back as an input and be classified.

    Raises :class:`ArchiveInputError` when the overlays would land among the inputs themselves (``overlays``
    is ``root`` or a folder above it): those cannot be told from the images by path."""
    root = job.root.resolve()
    if job.overlays is not None and root.is_relative_to(job.overlays.resolve()):
        raise ArchiveInputError(f"--overlays {job.overlays} is the input folder {job.root} or a folder above it, so "
                                f"the overlay PNGs would be written among the images. Choose a folder outside "
                                f"{job.root} (or a new sub-folder of it, which is then not read as input).")
    outputs = [job.csv_path, parts_dir_for(job.csv_path), record_path_for(job.csv_path)]
    outputs += [] if job.overlays is None else [job.overlays]
    inside = set()
    for path in outputs:
        resolved = path.resolve()
        if resolved.is_relative_to(root) and resolved != root:
            inside.add("/".join(resolved.relative_to(root).parts))
    return frozenset(inside)


# -------------------------------------------------------------------------------------------- the job

@dataclass(frozen=True)
class ArchiveJob:
    """What to run: ``root`` folder -> ``csv_path``; ``overlays``: also one overlay PNG per image there;
    ``workers`` decode threads (default: up to 4), ``prefetch`` decoded images waiting for the model at most
    (default: 2 batches + workers)."""

    root: Path
    csv_path: Path
    batch_size: int
    resume: bool = False
    overlays: Path | None = None
    alpha: float = 0.4
    workers: int | None = None
    prefetch: int | None = None


@dataclass(frozen=True)
class ArchiveOutcome:
    """What rank 0 reports: the summary (read back from the CSV) and how many rows an earlier run had."""

    csv_path: Path
    summary: Summary
    resumed: int
    written: int
    duplicates: int = 0      # rows found in two part files (written once)


def parts_dir_for(csv_path: Path) -> Path:
    """Where the ranks write their part files before rank 0 merges them."""
    return csv_path.with_name(csv_path.name + ".parts")


def run_archive(predictor, job: ArchiveJob, ranks: Ranks = Ranks(), *,
                progress: Callable[[int], None] | None = None, per_series: bool = False) -> ArchiveOutcome | None:
    """Predict every image under ``job.root`` into ``job.csv_path`` (see the module docstring).

    Returns the outcome on rank 0 (``None`` elsewhere). Raises :class:`ArchiveInputError` for a folder
    that cannot be listed or has no images and :class:`~mediscan.inference.archive_csv.ResumeError` for a CSV that ``--resume``
    cannot continue -- both before anything is written. ``progress(n)`` is called after each batch.
    """
    if job.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {job.batch_size}")
    listing = iter_archive(job.root, own_outputs(job))
    first = next(listing, None)
    if first is not None and first[0] == "":
        raise ArchiveInputError(first[1])
    if first is None:
        raise ArchiveInputError(f"no image files under {job.root} (looked for PNG, JPEG, BMP, TIFF and DICOM, "
                                f"recursively).")
    fields = csv_fields(predictor.classes)
    plan = _plan(job, ranks, fields, str(predictor.checkpoint_path), file_sha256(predictor.checkpoint_path))
    pending = (item for item in _chain(first, listing) if ranks.owns(item[0])
               and (not plan.done or path_hash(item[0]) not in plan.done))
    written = duplicates = 0
    with _RowWriter(plan.target, fields, plan.append) as writer:
        for rows in _predicted_rows(predictor, job, pending):
            writer.write(rows)
            written += len(rows)
            if progress is not None:
                progress(len(rows))
    if plan.merge:
        ranks.barrier()                  # every part is complete
        if ranks.is_main:
            sources = ([job.csv_path] if job.resume and job.csv_path.is_file() else []) + _parts(job.csv_path)
            duplicates = merge_csvs(sources, job.csv_path, fields, str(predictor.checkpoint_path))
            shutil.rmtree(parts_dir_for(job.csv_path), ignore_errors=True)
    if not ranks.is_main:
        return None
    summary = summarize_csv(job.csv_path, predictor.classes, per_series=per_series)
    return ArchiveOutcome(job.csv_path, summary, len(plan.done), written, duplicates)


def _chain(first, rest):
    yield first
    yield from rest


# -------------------------------------------------------------------------------------------- outputs

@dataclass(frozen=True)
class _Plan:
    target: Path         # the file this rank appends to: the CSV itself, or its part file
    append: bool         # keep what ``target`` holds (resuming into the CSV itself)
    merge: bool          # part files: rank 0 merges them into the CSV at the end
    done: DoneSet        # files an earlier run finished


def _parts(csv_path: Path) -> list[Path]:
    folder = parts_dir_for(csv_path)
    return sorted(folder.glob("part-*.csv")) if folder.is_dir() else []


def _plan(job: ArchiveJob, ranks: Ranks, fields: list[str], checkpoint: str, sha256: str) -> _Plan:
    """Decide where this rank writes and what is done already; no rank writes a row before every rank has
    read the done set (two barriers), so all ranks skip the same files. A resume by another checkpoint than
    the one recorded beside the CSV is refused by every rank before anything is touched."""
    csv_path, parts_dir = job.csv_path, parts_dir_for(job.csv_path)
    # Rows of unknown origin (a CSV from before the record existed) are resumed, but never certified.
    certify = True
    if job.resume and (csv_path.is_file() or _parts(csv_path)):
        certify = check_checkpoint_record(csv_path, checkpoint, sha256)
        if not certify and ranks.is_main:
            print(f"warning: {csv_path} has no checkpoint record ({record_path_for(csv_path).name}), so it cannot "
                  f"be checked that {checkpoint} wrote its rows; resuming anyway. Leave out --resume to start "
                  f"over if another model wrote them.", file=sys.stderr)
    if ranks.is_main:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        if not job.resume:
            shutil.rmtree(parts_dir, ignore_errors=True)   # a killed run's parts must not join this one
            # Nor the old CSV: with part files it would stay until the final merge, and a run killed before
            # then would leave the old model's rows under this checkpoint's record.
            csv_path.unlink(missing_ok=True)
            record_path_for(csv_path).unlink(missing_ok=True)
        else:
            for path in [csv_path] * csv_path.is_file() + _parts(csv_path):
                repair_tail(path)                          # a row cut by a crash is redone
    ranks.barrier()
    done, earlier = DoneSet(), _parts(csv_path) if job.resume else []
    if job.resume:
        done = read_done([csv_path] * csv_path.is_file() + earlier, fields, checkpoint)
    merge = ranks.enabled or bool(earlier)
    generation = 1 + max((int(path.name.split("-")[1][1:]) for path in earlier), default=0)
    ranks.barrier()
    if ranks.is_main and certify:
        write_checkpoint_record(csv_path, checkpoint, sha256)
    if not merge:
        return _Plan(csv_path, job.resume, False, done)
    parts_dir.mkdir(parents=True, exist_ok=True)
    return _Plan(parts_dir / f"part-g{generation:04d}-r{ranks.rank:05d}.csv", False, True, done)


class _RowWriter:
    """Rows appended to one CSV file and flushed per batch (a crash loses at most the batch in flight)."""

    def __init__(self, path: Path, fields: list[str], append: bool):
        keep = append and path.is_file() and path.stat().st_size > 0
        self.handle = open(path, "a" if keep else "w", newline="", **ENCODING)
        self.writer = csv.writer(self.handle)
        if not keep:
            self.write([fields])

    def write(self, rows: list[list[str]]) -> None:
        self.writer.writerows(rows)
        self.handle.flush()

    def __enter__(self) -> "_RowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


# -------------------------------------------------------------------------------------------- the pipeline

class _Failed:
    """A file that could not be read: its error message."""

    def __init__(self, message: str):
        self.message = message


def _prepare(predictor, path: Path):
    """Decode + preprocess one file in a worker thread; a bad file becomes :class:`_Failed`, never an exception."""
    from mediscan.core.imaging import ImageReadError
    try:
        return predictor.prepare(path)
    except ImageReadError as exc:
        return _Failed(str(exc))
    except Exception as exc:  # noqa: BLE001 -- one strange file must not stop an archive run
        return _Failed(f"Cannot read image {path}: unexpected {type(exc).__name__} while decoding ({exc}).")


def _decoded(predictor, job: ArchiveJob, pending) -> Iterator[tuple[str, object]]:
    """``(path, prepared item | _Failed)`` in listing order, decoded by a thread pool at most ``prefetch``
    files ahead of the consumer (bounded memory; the model never waits for a file it could have had)."""
    workers = job.workers or min(4, os.cpu_count() or 1)
    depth = job.prefetch or 2 * job.batch_size + workers
    window: deque[tuple[str, Future | _Failed]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="mediscan-decode") as pool:
        for path, problem in pending:
            window.append((path, _Failed(problem) if problem else pool.submit(_prepare, predictor, job.root / path)))
            if len(window) >= depth:
                yield _settled(window.popleft())
        while window:
            yield _settled(window.popleft())


def _settled(entry):
    path, value = entry
    return path, value.result() if isinstance(value, Future) else value


def _chunks(items, batch_size: int) -> Iterator[list]:
    """Runs of items holding ``batch_size`` readable files (the model gets full batches; failed files ride
    along in order), the last one shorter; a long run of failures is cut so that it cannot grow unbounded."""
    chunk, good = [], 0
    for item in items:
        chunk.append(item)
        good += not isinstance(item[1], _Failed)
        if good == batch_size or len(chunk) >= 16 * batch_size:
            yield chunk
            chunk, good = [], 0
    if chunk:
        yield chunk


def _predicted_rows(predictor, job: ArchiveJob, pending) -> Iterator[list[list[str]]]:
    """One list of CSV rows per batch, in listing order (and the overlays of that batch written)."""
    classes = predictor.classes
    with_maps = job.overlays is not None
    for chunk in _chunks(_decoded(predictor, job, pending), job.batch_size):
        readable = [item for _, item in chunk if not isinstance(item, _Failed)]
        results = iter(predictor.run_prepared(readable, with_maps=with_maps) if readable else ())
        rows = []
        for path, item in chunk:
            if isinstance(item, _Failed):
                rows.append(error_row(path, item.message, classes))
                continue
            result = next(results)
            rows.append(prediction_row(path, result, classes))
            if with_maps and result.has_pixels:
                _write_overlay(result, job.overlays / path, job.alpha)
        yield rows


def _write_overlay(explanation, target: Path, alpha: float) -> None:
    """``<overlays>/<relative path>.png``."""
    target = target.with_name(target.name + ".png")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(explanation.overlay_png(alpha))
