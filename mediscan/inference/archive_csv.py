"""The folder-mode CSV: its columns, one row per file, the set of files already done (``--resume``), crash
repair, the merge of per-rank part files, and the summary, all streamed (nothing grows with the archive).

Rows are in the archive's listing order (:func:`row_key`: path components compared one by one, which is
the order of a depth-first walk with each folder sorted by name). Every file that a writer produces is in
that order, so a k-way merge of them (:func:`merge_csvs`) is the listing order again, in constant memory.
"""
from __future__ import annotations

import csv
import hashlib
import heapq
import json
import os
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from mediscan.core.verdicts import series_verdict

__all__ = ["DICOM_COLUMNS", "ENCODING", "ResumeError", "csv_fields", "error_row", "prediction_row", "path_hash",
           "DoneSet",
           "row_key", "repair_tail", "check_header", "read_done", "merge_csvs", "Summary", "summarize_csv",
           "SeriesRecord", "SERIES_COLUMNS", "series_row", "write_series_csv", "record_path_for",
           "check_checkpoint_record", "write_checkpoint_record"]

#: How every results file is written and read back: UTF-8, with the bytes of a file name that is not UTF-8
#: (Linux allows any bytes) kept as surrogates, so that such a row round-trips and its path hash stays the same.
ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}

#: Columns for DICOM inputs (empty for other files): the identifiers of the instance and what its header says
#: it shows, plus the header cross-check (``agrees`` / ``disagrees`` / ``no_header`` / ``not_mapped``).
DICOM_COLUMNS = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "modality", "body_part_examined",
                 "header_check")
#: Where each DICOM column may sit in a Prediction's ``dicom`` dict (snake_case or DICOM keyword).
_DICOM_KEYS = {"study_instance_uid": ("study_instance_uid", "study_uid", "StudyInstanceUID"),
               "series_instance_uid": ("series_instance_uid", "series_uid", "SeriesInstanceUID"),
               "sop_instance_uid": ("sop_instance_uid", "sop_uid", "SOPInstanceUID"),
               "modality": ("modality", "Modality"),
               "body_part_examined": ("body_part_examined", "BodyPartExamined")}


class ResumeError(ValueError):
    """A CSV that ``--resume`` cannot continue (other classes or columns); the message says why and what to do."""


def csv_fields(classes: Sequence[str]) -> list[str]:
    """The CSV header for a model with ``classes``."""
    return ["path", "class", "confidence", *(f"p_{name}" for name in classes), "verdict", "ood_score", "error",
            *DICOM_COLUMNS]


def _one_line(text: str) -> str:
    # Rows never span lines, so a crash can only cut the last line, which repair_tail() then drops.
    return " ".join(str(text).splitlines())


def error_row(path: str, message: str, classes: Sequence[str]) -> list[str]:
    """The row of a file that could not be read: verdict ``error`` and the reason."""
    return [path, "", "", *("" for _ in classes), "error", "", _one_line(message), *("" for _ in DICOM_COLUMNS)]


def prediction_row(path: str, prediction, classes: Sequence[str]) -> list[str]:
    """The row of a predicted file (``prediction``: a Prediction, or an Explanation holding one). A file the
    modality gate stopped has verdict ``out_of_scope`` and empty class, confidence and probability cells (the
    network never saw it); its Modality cell says why."""
    prediction = getattr(prediction, "prediction", prediction)
    ood = "" if prediction.ood_score is None else f"{prediction.ood_score:.3f}"
    if prediction.top_class is None:
        scores = ["", "", *("" for _ in classes)]
    else:
        scores = [prediction.top_class, f"{prediction.confidence:.4f}",
                  *(f"{prediction.probabilities[name]:.4f}" for name in classes)]
    return [path, *scores, prediction.verdict, ood, "", *_dicom_cells(prediction)]


def _dicom_cells(prediction) -> list[str]:
    """The DICOM columns from the prediction's ``dicom`` dict and ``header_check`` (empty when absent)."""
    header = getattr(prediction, "dicom", None) or {}
    if hasattr(header, "to_dict"):               # a DicomHeader rather than its dict
        header = header.to_dict()
    cells = []
    for column in DICOM_COLUMNS[:-1]:
        value = next((header[key] for key in _DICOM_KEYS[column] if header.get(key) not in (None, "")), "")
        cells.append(_one_line(value))
    check = getattr(prediction, "header_check", None)
    check = getattr(check, "status", check)      # a HeaderCheck rather than its dict
    if isinstance(check, dict):                  # {"status": ..., "value": ...} or similar: the status is the cell
        check = check.get("status") or check.get("result") or check.get("check")
    cells.append("" if check is None else _one_line(check))
    return cells


# -------------------------------------------------------------------------------------------- order, done set

def row_key(path: str) -> tuple[str, ...]:
    """Sort key of a row's path: the listing order (each folder's entries by name, depth first)."""
    return tuple(path.split("/"))


def path_hash(path: str) -> int:
    """A stable 64-bit hash of a relative path (shards the archive over ranks; keys the done set)."""
    return int.from_bytes(hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")


@dataclass
class DoneSet:
    """The files already in the CSV, as sorted 64-bit path hashes: 8 bytes a file (8 MB for a million).

    Two different paths share a hash with probability about n^2 / 2^65 (3e-8 for a million files); such a
    file would be skipped as done.
    """

    hashes: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))

    def __len__(self) -> int:
        return int(self.hashes.size)

    def __contains__(self, path_hash_value: int) -> bool:
        index = int(np.searchsorted(self.hashes, np.uint64(path_hash_value)))
        return index < self.hashes.size and int(self.hashes[index]) == path_hash_value


def repair_tail(path: Path) -> None:
    """Drop a last line cut off by a crash (a file that does not end in a newline), so that appending
    and reading see whole rows only."""
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb+") as handle:
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        position = size
        while position > 0:
            start = max(0, position - (1 << 16))
            handle.seek(start)
            block = handle.read(position - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                handle.truncate(start + newline + 1)
                return
            position = start
        handle.truncate(0)


def check_header(path: Path, header: list[str], expected: list[str], checkpoint: str) -> None:
    """Refuse to resume ``path`` when its columns are not the ones this model writes, saying why."""
    if header == expected:
        return
    theirs = [name[2:] for name in header if name.startswith("p_")]
    ours = [name[2:] for name in expected if name.startswith("p_")]
    if theirs != ours:
        why = (f"it holds probabilities for the classes {', '.join(theirs) or '(none)'}, but the checkpoint "
               f"{checkpoint} predicts {', '.join(ours)}")
    else:
        missing = [name for name in expected if name not in header]
        extra = [name for name in header if name not in expected]
        why = (f"its columns are not the ones this version writes (missing: {', '.join(missing) or 'none'}; "
               f"unexpected: {', '.join(extra) or 'none'}; or in another order)")
    raise ResumeError(f"Cannot resume {path}: {why}. Resume with the checkpoint that wrote it, write to another "
                      f"file with --csv, or leave out --resume to start over.")


def _rows(path: Path, expected: list[str], checkpoint: str) -> Iterator[list[str]]:
    """The rows of one results file (header checked; a file that is empty or only a header has none)."""
    with open(path, newline="", **ENCODING) as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return
        check_header(path, header, expected, checkpoint)
        yield from reader


def read_done(paths: Iterable[Path], expected: list[str], checkpoint: str) -> DoneSet:
    """The hashes of every path in the given results files (each checked against ``expected``)."""
    collected = array("Q")
    for path in paths:
        for row in _rows(path, expected, checkpoint):
            if row:
                collected.append(path_hash(row[0]))
    hashes = np.frombuffer(collected, dtype=np.uint64).copy() if collected else np.empty(0, np.uint64)
    hashes.sort()
    return DoneSet(hashes)


def merge_csvs(sources: Sequence[Path], target: Path, expected: list[str], checkpoint: str) -> int:
    """Merge results files (each in listing order) into ``target`` in listing order, one row per path,
    atomically (a temporary file renamed over ``target`` at the end). Returns how many rows were dropped
    as repeats of the row before (the first of them is kept)."""
    temporary = target.with_name(f".{target.name}.merging")
    streams = [_rows(path, expected, checkpoint) for path in sources]
    with open(temporary, "w", newline="", **ENCODING) as handle:
        writer = csv.writer(handle)
        writer.writerow(expected)
        previous, dropped = None, 0
        for row in heapq.merge(*streams, key=lambda row: row_key(row[0])):
            if row and row[0] == previous:          # e.g. kept twice by a merge interrupted before cleaning up
                dropped += 1
            elif row:
                writer.writerow(row)
                previous = row[0]
    os.replace(temporary, target)
    return dropped


# -------------------------------------------------------------------------------------------- checkpoint record

def record_path_for(csv_path: Path) -> Path:
    """The sidecar naming the checkpoint that wrote ``csv_path``: ``results.csv`` -> ``results.csv.checkpoint.json``."""
    return csv_path.with_name(csv_path.name + ".checkpoint.json")


def write_checkpoint_record(csv_path: Path, checkpoint: str, sha256: str) -> None:
    """Record which checkpoint writes ``csv_path`` (its path and the sha256 of its bytes), atomically.

    A sidecar rather than a column: the CSV keeps the columns it always had, and the record costs one file,
    not 64 characters a row."""
    target = record_path_for(csv_path)
    temporary = target.with_name(f".{target.name}.writing")
    temporary.write_text(json.dumps({"csv": csv_path.name, "checkpoint": checkpoint, "checkpoint_sha256": sha256},
                                    indent=1) + "\n", **ENCODING)
    os.replace(temporary, target)


def check_checkpoint_record(csv_path: Path, checkpoint: str, sha256: str) -> bool:
    """Refuse to resume ``csv_path`` when its sidecar says another checkpoint (other bytes) wrote it; ``True``
    when the sidecar names this one.

    No sidecar (a CSV written before this check existed, or copied without it): nothing to compare, so the
    resume goes on and ``False`` is returned. The caller must not then write a sidecar: it would certify
    rows whose checkpoint nobody knows."""
    record_path = record_path_for(csv_path)
    if not record_path.is_file():
        return False
    try:
        record = json.loads(record_path.read_text(**ENCODING))
        theirs = str(record["checkpoint_sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ResumeError(f"Cannot resume {csv_path}: its checkpoint record {record_path} is unreadable ({exc}). "
                          f"Delete {record_path} if you are sure {checkpoint} wrote the CSV, write to another "
                          f"file with --csv, or leave out --resume to start over.") from None
    if theirs != sha256:
        raise ResumeError(f"Cannot resume {csv_path}: it was written by the checkpoint {record.get('checkpoint')} "
                          f"(sha256 {theirs[:12]}...), but {checkpoint} has sha256 {sha256[:12]}... (another or a "
                          f"retrained model; mixing their rows would mix two models' answers). Resume with the "
                          f"checkpoint that wrote it, write to another file with --csv, or leave out --resume "
                          f"to start over.")
    return True


# -------------------------------------------------------------------------------------------- summary

@dataclass
class Summary:
    """Counts over a results CSV (computed by reading it: the run keeps no results in memory)."""

    files: int = 0
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    per_class: Counter = field(default_factory=Counter)
    per_verdict: Counter = field(default_factory=Counter)
    series: dict = field(default_factory=dict)

    def lines(self, shown_errors: int = 10) -> list[str]:
        """The summary as printed at the end of a folder run."""
        lines = [f"{self.files} files: {self.files - self.error_count} predicted, {self.error_count} errors"]
        if self.per_class:
            lines.append("per class:   " + ", ".join(f"{k} {v}" for k, v in sorted(self.per_class.items())))
            lines.append("per verdict: " + ", ".join(f"{k} {v}" for k, v in sorted(self.per_verdict.items())))
        lines += [f"  error: {message}" for message in self.errors[:shown_errors]]
        if self.error_count > shown_errors:
            lines.append(f"  ... and {self.error_count - shown_errors} more errors (see the CSV)")
        return lines


def summarize_csv(path: Path, classes: Sequence[str], per_series: bool = False, shown_errors: int = 10, *,
                  ood_threshold: float | None = None) -> Summary:
    """Count files, errors, classes and verdicts in the CSV at ``path``; with ``per_series``, also gather each
    DICOM series' :class:`SeriesRecord` (one small record per series, not per file; ``ood_threshold``, the
    detector's limit, tells flagged rows from colour ones)."""
    summary = Summary()
    with open(path, newline="", **ENCODING) as handle:
        for row in csv.DictReader(handle):
            summary.files += 1
            if row["error"]:
                summary.error_count += 1
                if len(summary.errors) < shown_errors:
                    summary.errors.append(f"{row['path']}: {row['error']}" if row["path"] not in row["error"]
                                          else row["error"])
                continue
            summary.per_class[row["class"] or "(not analysed)"] += 1
            summary.per_verdict[row["verdict"]] += 1
            if per_series and row.get("series_instance_uid"):
                uid = row["series_instance_uid"]
                if uid not in summary.series:
                    summary.series[uid] = SeriesRecord(row["study_instance_uid"], row["modality"],
                                                       row["body_part_examined"], [0.0] * len(classes))
                summary.series[uid].add(row, classes, ood_threshold)
    return summary


@dataclass
class SeriesRecord:
    """What the per-series summary keeps of one series while the CSV streams past: counts and sums only."""

    study_instance_uid: str
    modality: str
    body_part_examined: str
    sums: list[float]
    instances: int = 0
    analysed: int = 0            # rows the network saw (the others were stopped by the modality gate)
    colour_votes: int = 0        # analysed rows out of scope without a detector flag: colour pictures
    flagged_votes: int = 0       # analysed rows whose out-of-scope score is above the limit
    score_sum: float = 0.0
    scored: int = 0
    header_checks: Counter = field(default_factory=Counter)

    def add(self, row: dict, classes: Sequence[str], ood_threshold: float | None) -> None:
        """Count one CSV row of this series."""
        self.instances += 1
        if row["header_check"]:
            self.header_checks[row["header_check"]] += 1
        if not row["class"]:
            return
        self.analysed += 1
        self.sums = [total + float(row[f"p_{name}"]) for total, name in zip(self.sums, classes)]
        score = float(row["ood_score"]) if row["ood_score"] else None
        if score is not None:
            self.score_sum, self.scored = self.score_sum + score, self.scored + 1
        flagged = score is not None and ood_threshold is not None and score > ood_threshold
        self.flagged_votes += flagged
        # The verdict rules test colour before the detector, so an out-of-scope row the detector did not flag
        # is a colour picture (one it flagged may be both; it counts as flagged).
        self.colour_votes += row["verdict"] == "out_of_scope" and not flagged


#: Columns of the per-series summary (``<csv stem>.series.csv``).
SERIES_COLUMNS = ("study_instance_uid", "series_instance_uid", "modality", "body_part_examined", "instances",
                  "analysed", "class", "confidence")


def series_row(uid: str, record: SeriesRecord, classes: Sequence[str], *, uncertain_below: float,
               ood_threshold: float | None, has_detector: bool) -> list:
    """One series' row: its counts, the class and confidence of its mean probabilities, those means, the
    verdict by the DICOM node's series rule (:func:`mediscan.core.verdicts.series_verdict`) and how its
    instances' headers compared. A series the modality gate stopped entirely is out of scope, no class."""
    head = [record.study_instance_uid, uid, record.modality, record.body_part_examined, record.instances,
            record.analysed]
    checks = ", ".join(f"{name} {count}" for name, count in sorted(record.header_checks.items()))
    if not record.analysed:
        return [*head, "", "", *("" for _ in classes), "out_of_scope", checks]
    means = [total / record.analysed for total in record.sums]
    top = max(range(len(classes)), key=means.__getitem__)
    decision = series_verdict(classes[top], means[top], uncertain_below=uncertain_below, analysed=record.analysed,
                              colour_votes=record.colour_votes, flagged_votes=record.flagged_votes,
                              ood_score=record.score_sum / record.scored if record.scored else None,
                              ood_threshold=ood_threshold, has_detector=has_detector)
    return [*head, classes[top], f"{means[top]:.4f}", *(f"{mean:.4f}" for mean in means), decision.name, checks]


def write_series_csv(summary: Summary, target: Path, classes: Sequence[str], *, uncertain_below: float,
                     ood_threshold: float | None = None, has_detector: bool = False) -> None:
    """One row per DICOM series (:func:`series_row`), sorted by SeriesInstanceUID."""
    with open(target, "w", newline="", **ENCODING) as handle:
        writer = csv.writer(handle)
        writer.writerow([*SERIES_COLUMNS, *(f"p_{name}" for name in classes), "verdict", "header_check"])
        for uid, record in sorted(summary.series.items()):
            writer.writerow(series_row(uid, record, classes, uncertain_below=uncertain_below,
                                       ood_threshold=ood_threshold, has_detector=has_detector))
