"""Where results go: back to an archive over DICOM (C-STORE SCU), over DICOMweb (STOW-RS), or into a folder.

``--send-to AET@host:port`` or ``--send-to http(s)://host/.../dicom-web``; :func:`deliver` retries a failed
delivery with exponential backoff and raises :class:`DeliveryError` when every attempt failed, so the
caller can report what was not delivered instead of dropping it.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CStoreDestination", "DeliveryError", "FolderDestination", "StowDestination", "deliver",
           "parse_destination"]

log = logging.getLogger("mediscan.dicom")
_AET_RE = re.compile(r"^(?P<aet>[^@\s\\]{1,16})@(?P<host>[^:\s]+):(?P<port>\d{1,5})$")


class DeliveryError(RuntimeError):
    """A result could not be delivered; the message says where and why (no patient field, no UID)."""


@dataclass(frozen=True)
class CStoreDestination:
    """A DICOM Storage SCP: results are sent with C-STORE from ``calling_aet``."""

    ae_title: str
    host: str
    port: int
    calling_aet: str = "MEDISCAN"
    timeout: float = 30.0

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    def send(self, datasets: list) -> None:
        """C-STORE every dataset in one association; raises :class:`DeliveryError` on any failure."""
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for uid in sorted({str(ds.SOPClassUID) for ds in datasets}):
            ae.add_requested_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title)
        if not assoc.is_established:
            raise DeliveryError(f"{self}: association not established (is the archive up and MediScan "
                                f"registered there?)")
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code is None or code not in (0x0000, 0xB000, 0xB007, 0xB006):
                    comment = getattr(status, "ErrorComment", "") if status else "no answer"
                    raise DeliveryError(f"{self}: C-STORE answered {code if code is None else hex(code)} {comment}")
        finally:
            assoc.release()


@dataclass(frozen=True)
class StowDestination:
    """A DICOMweb service: results are stored with STOW-RS (dicomweb-client)."""

    url: str
    timeout: float = 30.0

    def __str__(self) -> str:
        return self.url

    def send(self, datasets: list) -> None:
        """STOW-RS every dataset in one request; raises :class:`DeliveryError` on any failure."""
        from dicomweb_client.api import DICOMwebClient

        try:
            client = DICOMwebClient(url=self.url)
            answer = client.store_instances(datasets)
        except Exception as exc:  # requests / HTTP errors of any kind: one delivery failure
            raise DeliveryError(f"{self}: STOW-RS failed ({type(exc).__name__}: {str(exc)[:200]})") from None
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            raise DeliveryError(f"{self}: STOW-RS refused {len(failed)} instance(s)")


@dataclass(frozen=True)
class FolderDestination:
    """A folder: ``<dir>/<SOP Instance UID>.dcm`` (the same UID overwrites the earlier result)."""

    path: Path

    def __str__(self) -> str:
        return str(self.path)

    def send(self, datasets: list) -> None:
        """Write each dataset as a Part-10 file (atomically: a temporary name, then a rename)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for ds in datasets:
                target = self.path / f"{ds.SOPInstanceUID}.dcm"
                tmp = target.with_suffix(".dcm.tmp")
                ds.save_as(tmp, enforce_file_format=True)
                tmp.replace(target)
        except OSError as exc:
            raise DeliveryError(f"{self}: cannot write the results ({exc.strerror or exc})") from None


def parse_destination(text: str, *, calling_aet: str = "MEDISCAN"):
    """``AET@host:port`` -> :class:`CStoreDestination`; ``http(s)://...`` -> :class:`StowDestination`."""
    if text.startswith(("http://", "https://")):
        return StowDestination(text.rstrip("/"))
    match = _AET_RE.match(text)
    if not match or not 0 < int(match["port"]) < 65536:
        raise ValueError(f"--send-to {text!r}: expected AET@host:port (e.g. ORTHANC@127.0.0.1:4242) or a "
                         f"DICOMweb URL (e.g. http://127.0.0.1:8042/dicom-web)")
    return CStoreDestination(match["aet"], match["host"], int(match["port"]), calling_aet)


def deliver(destination, datasets: list, *, attempts: int = 4, backoff: float = 1.0, what: str = "result") -> None:
    """Send ``datasets``, retrying ``attempts`` times in all with waits of backoff, 2x, 4x ... seconds.
    Raises the last :class:`DeliveryError` when none succeeded."""
    for attempt in range(1, attempts + 1):
        try:
            destination.send(datasets)
            return
        except DeliveryError as exc:
            if attempt == attempts:
                raise
            wait = backoff * 2 ** (attempt - 1)
            log.warning("delivery of %s to %s failed (attempt %d of %d): %s; retrying in %.1f s",
                        what, destination, attempt, attempts, exc, wait)
            time.sleep(wait)
