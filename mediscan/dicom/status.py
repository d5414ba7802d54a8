"""The DICOM node's status file, and ``python app.py dicom --status``, which reads it.

The node keeps a small JSON file up to date (at start, at most once a second while something changes, and
at exit with ``"running": false``), written atomically: a temporary file in the same folder, then
``os.replace``, so a reader never sees half a file. A separate process reads it; there is no HTTP port and
no DICOM query to open for this, and the last state survives the node (killed or stopped).

What it says: counts (received, refused, not analysed, series analysed / failed, results delivered), the
series still pending (receiving or waiting for analysis), the results that could not be delivered yet
(destination, attempts, last error, since when: they are retried, and kept), and the series that gave no
result, with the reason. Series are named by :func:`~mediscan.dicom.uids.log_id` (8 hex digits of the UID's
sha256), never by a UID in clear; no patient field is ever in it.

Default place: ``$XDG_STATE_HOME/mediscan/dicom-node-<port>.json`` (``~/.local/state/...`` when unset),
or ``--status-file FILE``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from mediscan.core.atomic_file import atomic_write_bytes

__all__ = ["StatusError", "default_status_path", "describe", "needs_attention", "read_status", "write_status"]


class StatusError(ValueError):
    """The status file cannot be read; the message says which file and what to do."""


def default_status_path(port: int) -> Path:
    """Where a node on ``port`` writes its status unless ``--status-file`` says otherwise."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "mediscan" / f"dicom-node-{int(port)}.json"


def write_status(path: str | os.PathLike, status: dict) -> None:
    """Write ``status`` as JSON to ``path`` atomically (temporary file + rename in the same folder)."""
    atomic_write_bytes(Path(path), json.dumps(status, indent=1, sort_keys=True).encode("utf-8"))


def read_status(path: str | os.PathLike) -> dict:
    """The status a node wrote to ``path``; :class:`StatusError` says what is wrong."""
    path = Path(path)
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StatusError(f"No DICOM node status at '{path}': no node has run with this status file. Start one "
                          f"(python app.py dicom ...), or name its file with --status-file / its port with "
                          f"--port.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StatusError(f"Cannot read the DICOM node status '{path}': {exc}.") from None
    if not isinstance(status, dict) or "undelivered" not in status:
        raise StatusError(f"'{path}' is not a MediScan DICOM node status file.")
    return status


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def needs_attention(status: dict) -> bool:
    """Whether results are undelivered, series failed, or the node died without writing its summary."""
    died = status.get("running") and not _alive(status.get("pid"))
    return bool(status.get("undelivered") or status.get("failed") or died)


def describe(status: dict) -> str:
    """The status as a few plain lines for a person."""
    node = f"{status.get('ae_title')} on {status.get('host')}:{status.get('port')} (pid {status.get('pid')})"
    if not status.get("running"):
        state = f"stopped at {status.get('updated')}"
    elif _alive(status.get("pid")):
        state = f"running since {status.get('started')}, status of {status.get('updated')}"
    else:
        state = f"NOT running: it stopped without writing its summary (killed?); last status {status.get('updated')}"
    lines = [f"MediScan DICOM node {node}: {state}",
             f"results to {status.get('destination')}",
             "instances: {received} received, {refused} refused, {not_analysed} accepted without analysis".format(
                 **{k: status.get(k, 0) for k in ("received", "refused", "not_analysed")}),
             "series: {pending_series} pending, {series_analysed} analysed, {series_failed} without a result; "
             "{results_delivered} result(s) delivered".format(**{k: status.get(k, 0) for k in (
                 "pending_series", "series_analysed", "series_failed", "results_delivered")})]
    undelivered = status.get("undelivered") or []
    lines.append(f"undelivered: {len(undelivered)} result(s)" + (" (kept, retried)" if undelivered else ""))
    for item in undelivered:
        lines.append(f"  series {item['series']}: {item['attempts']} attempt(s) since {item['since']}, "
                     f"last error: {item['last_error']}")
    failed = status.get("failed") or []
    lines.append(f"failed: {len(failed)} series without a result")
    lines += [f"  series {entry}" for entry in failed]
    return "\n".join(lines)
