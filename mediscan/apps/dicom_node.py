"""Run MediScan as a DICOM node: ``python app.py dicom [options]``.

    python app.py dicom --out results/                                   # store SC + SR in a folder
    python app.py dicom --send-to ORTHANC@127.0.0.1:4242                 # C-STORE them back into the PACS
    python app.py dicom --send-to http://127.0.0.1:8042/dicom-web        # or STOW-RS them
    python app.py dicom --port 11112 --allow ORTHANC@127.0.0.1 --max-slices 16 --series-timeout 10
    python app.py dicom --status [--port 11112 | --status-file FILE]     # what is pending / undelivered

A Storage SCP (AE title MEDISCAN, port 11112, bound to 127.0.0.1 unless --host says otherwise) that answers
C-ECHO, analyses each received series and sends back a Secondary Capture (Grad-CAM overlay, label,
verdict, "NOT FOR DIAGNOSTIC USE") and a Structured Report. SIGTERM / Ctrl-C stops receiving, analyses
what is pending, delivers, and prints the summary (what could not be delivered, if anything). Exit code 0,
or 1 when results remain undelivered, 2 for bad options, 3 without a model. Not a medical device.

The node keeps a status file up to date (:mod:`mediscan.dicom.status`); ``--status`` prints it from
another shell and exits 0 when nothing waits or failed, 1 when results are undelivered, series failed or
the node died, 2 when there is no status file. Full guide: docs/dicom.md.
"""
from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from pathlib import Path

from mediscan import NOT_FOR_CLINICAL_USE, __version__
from mediscan.apps.exit_codes import EXIT_BAD_INPUT, EXIT_NO_MODEL, EXIT_OK
from mediscan.core.dicom_header import HeaderMapError, HeaderMapping
from mediscan.dicom.node import DicomNode, NodeConfig, tls_context
from mediscan.dicom.sender import parse_destination
from mediscan.dicom.status import StatusError, default_status_path, describe, needs_attention, read_status

log = logging.getLogger("mediscan.dicom")


def get_args_parser() -> argparse.ArgumentParser:
    """The ``dicom`` sub-command's options."""
    d = NodeConfig()
    p = argparse.ArgumentParser(prog="python app.py dicom", description="Run MediScan as a DICOM Storage SCP.")
    p.add_argument("--ae-title", default=d.ae_title, help=f"this node's AE title (default: {d.ae_title})")
    p.add_argument("--port", type=int, default=d.port, help=f"port (default: {d.port})")
    p.add_argument("--host", default=d.host, help=f"address to bind (default: {d.host}, this machine only)")
    p.add_argument("--allow", action="append", default=[], metavar="AET[@host]",
                   help="accept only these calling AEs (repeatable; default: any)")
    p.add_argument("--tls-cert", help="PEM certificate: serve DICOM over TLS (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", help="PEM CA bundle: require client certificates signed by it")
    p.add_argument("--max-associations", type=int, default=d.max_associations,
                   help=f"most simultaneous associations (default: {d.max_associations})")
    p.add_argument("--series-timeout", type=float, default=d.series_timeout,
                   help=f"a series is complete after this many seconds without an instance, or when its "
                        f"association ends (default: {d.series_timeout:g})")
    p.add_argument("--max-slices", type=int, default=d.max_slices,
                   help=f"most instances analysed per series, evenly spaced (default: {d.max_slices})")
    p.add_argument("--max-instance-mb", type=float, default=d.max_instance_mb,
                   help=f"larger instances are answered 'out of resources' (default: {d.max_instance_mb:g})")
    p.add_argument("--max-held-mb", type=float, default=d.max_held_mb,
                   help=f"memory for received instances awaiting analysis (default: {d.max_held_mb:g})")
    p.add_argument("--send-to", metavar="AET@host:port | http(s)://.../dicom-web",
                   help="store the results there (C-STORE or STOW-RS)")
    p.add_argument("--out", type=Path, help="also (or only) write the results into this folder")
    p.add_argument("--checkpoint", default=None,
                   help="model (default: $MEDISCAN_MODEL, else models/best.safetensors)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--header-map", type=Path, help="JSON file overriding the header-check mapping table")
    p.add_argument("--retries", type=int, default=d.attempts - 1,
                   help=f"delivery retries, with exponential backoff (default: {d.attempts - 1})")
    p.add_argument("--redeliver-every", type=float, default=d.redeliver_every,
                   help=f"seconds between attempts to deliver results still waiting (default: {d.redeliver_every:g})")
    p.add_argument("--status-file", type=Path,
                   help="where the node keeps its status (default: $XDG_STATE_HOME/mediscan/dicom-node-PORT.json)")
    p.add_argument("--status", action="store_true",
                   help="print the status of the node on --port (or --status-file) and exit")
    return p


def _allow(entries: list[str]) -> list[tuple[str, str | None]]:
    """``AET[@host]`` -> (AET, IP address or None); hosts are resolved once, here."""
    out = []
    for entry in entries:
        aet, _, host = entry.partition("@")
        if not aet or len(aet) > 16:
            raise ValueError(f"--allow {entry!r}: an AE title is 1 to 16 characters")
        out.append((aet, socket.gethostbyname(host) if host else None))
    return out


def node_config(args: argparse.Namespace) -> NodeConfig:
    """A :class:`NodeConfig` from the options; ``ValueError`` says what is wrong."""
    positive = {"--max-associations": args.max_associations, "--series-timeout": args.series_timeout,
                "--max-slices": args.max_slices, "--max-instance-mb": args.max_instance_mb,
                "--max-held-mb": args.max_held_mb}
    positive["--redeliver-every"] = args.redeliver_every
    bad = [name for name, value in positive.items() if not value > 0]
    if bad:
        raise ValueError(f"{', '.join(bad)} must be positive")
    if args.send_to is None and args.out is None:
        raise ValueError("say where the results go: --send-to AET@host:port, --send-to http(s)://.../dicom-web, "
                         "or --out DIR")
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_ca and not args.tls_cert):
        raise ValueError("--tls-cert and --tls-key go together (and --tls-ca needs them)")
    if args.tls_cert:
        tls_context(args.tls_cert, args.tls_key, args.tls_ca)   # a bad file is an error now, not at listen
    mapping = HeaderMapping.from_file(args.header_map) if args.header_map else None
    destination = parse_destination(args.send_to, calling_aet=args.ae_title) if args.send_to else None
    return NodeConfig(ae_title=args.ae_title, host=args.host, port=args.port, allow=_allow(args.allow),
                      tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca,
                      max_associations=args.max_associations, series_timeout=args.series_timeout,
                      max_slices=args.max_slices, max_instance_mb=args.max_instance_mb,
                      max_held_mb=args.max_held_mb, destination=destination, out_dir=args.out,
                      attempts=max(0, args.retries) + 1, header_mapping=mapping,
                      status_file=args.status_file or default_status_path(args.port),
                      redeliver_every=args.redeliver_every)


def quiet_libraries() -> None:
    """highdicom and pynetdicom log UIDs (and pynetdicom, at debug level, whole datasets): keep them to
    warnings, so that MediScan's log carries no UID in clear and no patient field."""
    for name in ("highdicom", "pynetdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)


def print_status(args: argparse.Namespace) -> int:
    """``--status``: print the status file of the node on ``--port`` (or ``--status-file``)."""
    try:
        status = read_status(args.status_file or default_status_path(args.port))
    except StatusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(describe(status))
    return 1 if needs_attention(status) else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Parse the options, load the model, serve until SIGTERM / Ctrl-C, then drain and summarise."""
    args = get_args_parser().parse_args(argv)
    if args.status:
        return print_status(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    quiet_libraries()
    try:
        config = node_config(args)
    except (ValueError, HeaderMapError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from mediscan.core.checkpoint import CheckpointError
    from mediscan.inference.predictor import Predictor
    try:
        predictor = Predictor(args.checkpoint, args.device)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_MODEL
    try:
        node = DicomNode(predictor, config, version=__version__).start()
    except OSError as exc:
        print(f"error: cannot listen on {config.host}:{config.port} ({exc.strerror or exc})", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"MediScan DICOM node {config.ae_title} on {config.host}:{node.port}; results to "
          f"{config.destination or config.out_dir}. {NOT_FOR_CLINICAL_USE}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    summary = node.stop()
    print(f"stopped: {summary}", flush=True)
    return 1 if summary["undelivered"] or summary["failed"] else EXIT_OK
