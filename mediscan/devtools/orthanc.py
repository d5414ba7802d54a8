"""A real Orthanc for the DICOM node's tests and benchmark: Debian's ``orthanc`` (+ ``orthanc-dicomweb``)
started with a temporary configuration (its own storage folder, free ports, MediScan registered as a
modality), never the system service or /etc/orthanc; the dcmtk / dicom3tools checks; throwaway TLS
certificates. Development helper, not part of the product.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mediscan.devtools.browser import _stop, _tail, free_port, wait_for_http

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")


def orthanc_missing() -> str | None:
    """Why a real Orthanc cannot be started here (``None`` when it can)."""
    if not (os.access(ORTHANC, os.X_OK) or shutil.which("Orthanc")):
        return "Debian's orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    if dicomweb_plugin() is None:
        return "Debian's orthanc-dicomweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return None


def dicomweb_plugin() -> str | None:
    """Path of the DICOMweb plugin library, if installed."""
    for folder in DICOMWEB_PLUGIN_DIRS:
        for path in sorted(Path(folder).glob("libOrthancDicomWeb.so*")) if Path(folder).is_dir() else ():
            return str(path)
    return None


@dataclass
class Orthanc:
    """A running Orthanc: its REST ``url``, DICOM ``port`` and AE title ``aet``."""

    url: str
    port: int
    aet: str

    def request(self, method: str, path: str, body=None, *, timeout: float = 60.0):
        """A REST call; JSON in and out (raw bytes for ``/file`` paths)."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as answer:
            raw = answer.read()
        return raw if path.endswith("/file") else (json.loads(raw) if raw else None)

    def upload(self, part10: bytes) -> dict:
        """POST /instances: store one DICOM file."""
        return self.request("POST", "/instances", part10)

    def study_instances(self, study_uid: str) -> list[dict]:
        """The instances of the study with this StudyInstanceUID (empty list when Orthanc has none)."""
        found = self.request("POST", "/tools/lookup", study_uid.encode())
        studies = [f["ID"] for f in found or [] if f["Type"] == "Study"]
        return self.request("GET", f"/studies/{studies[0]}/instances") if studies else []

    def wait_for(self, study_uid: str, count: int, timeout: float = 60.0) -> list[dict]:
        """Poll until the study holds ``count`` instances; returns them (``TimeoutError`` otherwise)."""
        deadline = time.monotonic() + timeout
        while True:
            instances = self.study_instances(study_uid)
            if len(instances) >= count or time.monotonic() > deadline:
                if len(instances) < count:
                    raise TimeoutError(f"the study holds {len(instances)} instances after {timeout:.0f} s, "
                                       f"not {count}")
                return instances
            time.sleep(0.2)


def _config(storage: Path, http_port: int, dicom_port: int, modalities: dict) -> dict:
    return {
        "Name": "mediscan-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
        "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "HttpServerEnabled": True, "DicomServerEnabled": True,
        "DicomModalities": modalities, "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
        "OverwriteInstances": True, "StableAge": 1, "Plugins": [dicomweb_plugin()],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "StorageCompression": False,
        "DicomScuTimeout": 30, "SaveJobs": False,
    }


@contextlib.contextmanager
def orthanc_server(tmp: Path, *, modalities: dict | None = None, timeout: float = 60.0) -> Iterator[Orthanc]:
    """Start Orthanc with its configuration and storage under ``tmp``; stop it (by its pid) on exit.

    ``modalities`` maps names to ``[AET, host, port]`` (Orthanc's DicomModalities).
    """
    tmp.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = tmp / "orthanc.json"
    config.write_text(json.dumps(_config(tmp / "storage", http_port, dicom_port, modalities or {})))
    log = tmp / "orthanc.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([ORTHANC, str(config)], stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        url = f"http://127.0.0.1:{http_port}"
        wait_for_http(url + "/system", process, timeout, name="Orthanc", log=lambda: _tail(log))
        yield Orthanc(url, dicom_port, "ORTHANC")
    finally:
        _stop(process)



#: dcmtk's tools the tests and benchmarks run. pynetdicom installs Python apps of the same names (storescu,
#: echoscu ...) that can come first on PATH: a test meant to use a second, independent DICOM implementation
#: would then talk to the node through the node's own library. So they are found by what they are.
DCMTK_TOOLS = ("storescu", "echoscu", "dcmcjpeg")


@functools.lru_cache(maxsize=None)
def dcmtk(name: str) -> str | None:
    """Absolute path of dcmtk's program ``name`` (the first on PATH that says it is dcmtk's), else ``None``."""
    for folder in os.get_exec_path():
        path = os.path.join(folder, name)
        if os.path.isfile(path) and os.access(path, os.X_OK) and _is_dcmtk(path):
            return path
    return None


def _is_dcmtk(path: str) -> bool:
    try:
        run = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "$dcmtk:" in run.stdout + run.stderr


def tools_missing(*names: str) -> str | None:
    """Why one of the command-line tools ``names`` (dcmtk's storescu, dicom3tools' dciodvfy ...) is missing.
    dcmtk's tools are looked up with :func:`dcmtk`: a same-named program of another package does not count."""
    packages = {"storescu": "dcmtk", "echoscu": "dcmtk", "dcmcjpeg": "dcmtk", "dciodvfy": "dicom3tools"}
    for name in names:
        if name in DCMTK_TOOLS and dcmtk(name) is None:
            other = shutil.which(name)
            return (f"dcmtk's {name} is not installed (apt-get install dcmtk)"
                    + (f"; {other} is another program of that name" if other else ""))
        if name not in DCMTK_TOOLS and shutil.which(name) is None:
            return f"{name} is not installed (apt-get install {packages.get(name, name)})"
    return None


def skip_unless_installed(missing: str | None) -> None:
    """Skip the calling test, saying why, when ``missing`` names a missing package -- and fail instead in CI
    (``CI`` set), whose .ci/run installs those packages: a skip there would hide a broken install."""
    import pytest

    if missing and os.environ.get("CI"):
        pytest.fail(f"{missing}; .ci/run installs it, so in CI this test must run")
    if missing:
        pytest.skip(missing)


def dciodvfy_errors(path: str | os.PathLike) -> list[str]:
    """The ``Error`` lines dicom3tools' dciodvfy prints for a DICOM file (warnings are not counted)."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def make_tls_certificates(folder: Path) -> dict[str, str]:
    """A throwaway CA and, signed by it, a server certificate for 127.0.0.1 and a client certificate: PEM
    files in ``folder``; returns their paths (``ca``, ``server``, ``server_key``, ``client``, ``client_key``).
    For the DICOM node's TLS tests (``cryptography``, a test dependency)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(name, key, issuer=None, issuer_key=None, *, ca=False, ip=None):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ip:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                                            critical=False)
        return builder.sign(issuer_key or key, hashes.SHA256())

    paths = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("MediScan test CA", ca_key, ca=True)
    for name, key, cert in [("ca", ca_key, ca)] + [
            (who, k, issue(who, k, ca.subject, ca_key, ip="127.0.0.1" if who == "server" else None))
            for who, k in (("server", ec.generate_private_key(ec.SECP256R1())),
                           ("client", ec.generate_private_key(ec.SECP256R1())))]:
        paths[name] = folder / f"{name}.pem"
        paths[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[name + "_key"] = folder / f"{name}.key"
        paths[name + "_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    return {k: str(v) for k, v in paths.items()}
