"""Deterministic UIDs for MediScan's results, and how MediScan recognises its own objects.

A result's UIDs are derived from the source SeriesInstanceUID and the checkpoint's sha256 under the
``2.25`` root (a UUID-style integer, PS3.5 B.2), so analysing the same series with the same model again
gives the same Series and SOP Instance UIDs: the archive replaces the earlier result instead of keeping a
second copy. Another checkpoint gives other UIDs, so results of two models sit side by side.

Results carry ``Manufacturer = "MediScan"``; the node never analyses an instance that does (a PACS that
routes a whole study would otherwise send MediScan's own Secondary Capture back to it, endlessly).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["MANUFACTURER", "ResultUIDs", "checkpoint_sha256", "derived_uid", "is_own_instance", "log_id",
           "result_uids"]

MANUFACTURER = "MediScan"
_ROOT = "2.25."


def derived_uid(*parts: str) -> str:
    """A UID under ``2.25`` from the sha256 of ``parts`` (128 bits, as a UUID-derived UID holds)."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return _ROOT + str(int.from_bytes(digest[:16], "big"))


@dataclass(frozen=True)
class ResultUIDs:
    """Series and SOP Instance UIDs of the Secondary Capture and the Structured Report of one series."""

    sc_series: str
    sc_instance: str
    sr_series: str
    sr_instance: str


def result_uids(source_series_uid: str, checkpoint_digest: str) -> ResultUIDs:
    """The result UIDs of ``source_series_uid`` analysed by the checkpoint with sha256 ``checkpoint_digest``."""
    return ResultUIDs(*(derived_uid("mediscan", source_series_uid, checkpoint_digest, what)
                        for what in ("sc-series", "sc-instance", "sr-series", "sr-instance")))


@lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of the checkpoint file (cached while the file is unchanged)."""
    stat = os.stat(path)
    return _digest(os.fspath(path), stat.st_size, stat.st_mtime_ns)


def is_own_instance(ds) -> bool:
    """Whether a received dataset is one of MediScan's results (never to be analysed again)."""
    return str(ds.get("Manufacturer", "") or "").strip() == MANUFACTURER


def log_id(uid: str) -> str:
    """A short stand-in for a UID in logs (logs never carry a UID in clear): 8 hex digits of its sha256."""
    return hashlib.sha256(str(uid).encode("utf-8")).hexdigest()[:8]
