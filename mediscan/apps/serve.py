"""Run the MediScan HTTP API: ``python app.py flask [options]``.

    python app.py flask                                   # waitress on http://127.0.0.1:5000
    python app.py flask --port 8080 --threads 8 --checkpoint models/best.safetensors
    python app.py flask --dev                             # Flask's own server (debugger always off)
    MEDISCAN_API_KEY=secret python app.py flask --host 0.0.0.0

Binds to 127.0.0.1 unless ``--host`` says otherwise. Starts even without a model: ``/health`` says so and
predictions answer 503 with the training command. Not a medical device.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from mediscan import NOT_FOR_CLINICAL_USE, __version__
from mediscan.apps.api import DEFAULTS, create_app

# Multipart framing around the image(s): bodies up to the app's limit plus this are buffered by waitress
# in memory, so the app (not waitress) answers 413, as JSON.
_FRAMING_SLACK = 1024 * 1024


def get_args_parser() -> argparse.ArgumentParser:
    """The ``flask`` sub-command's options."""
    d = DEFAULTS
    p = argparse.ArgumentParser(prog="python app.py flask", description="Serve the MediScan HTTP API.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    p.add_argument("--threads", type=int, default=8, help="waitress worker threads (default: 8)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint to serve (default: $MEDISCAN_MODEL, else models/best.safetensors)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--max-content-mb", type=float, default=d["MAX_CONTENT_LENGTH"] / 2**20,
                   help=f"request body limit in MB (default: {d['MAX_CONTENT_LENGTH'] / 2**20:g})")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="largest image accepted, in pixels (default: the Predictor's, 64,000,000)")
    p.add_argument("--max-batch-files", type=int, default=d["MAX_BATCH_FILES"],
                   help=f"most files per /v1/predict/batch request (default: {d['MAX_BATCH_FILES']})")
    p.add_argument("--dev", action="store_true",
                   help="use Flask's development server instead of waitress (debugger and reloader stay off)")
    return p


def app_config(args: argparse.Namespace) -> dict:
    """``create_app`` config from the parsed options (the API key only ever comes from the environment)."""
    return {
        "CHECKPOINT": args.checkpoint,
        "DEVICE": args.device,
        "MAX_CONTENT_LENGTH": int(args.max_content_mb * 2**20),
        "MAX_BATCH_FILES": args.max_batch_files,
        "MAX_PIXELS": args.max_pixels,
    }


def waitress_options(args: argparse.Namespace, max_content_length: int) -> dict:
    """waitress settings that keep uploads and answers in memory.

    waitress spools request bodies over ``inbuf_overflow`` (512 kB by default) and responses over
    ``outbuf_overflow`` (1 MB) to temporary files: images and overlays must never touch the disk, so
    both thresholds sit above anything this server accepts or sends. Bodies over ``max_request_body_size``
    are refused by waitress itself (plain-text 413) before the app sees them.
    """
    body_cap = max_content_length + _FRAMING_SLACK
    return {
        "host": args.host,
        "port": args.port,
        "threads": args.threads,
        "max_request_body_size": body_cap,
        "inbuf_overflow": body_cap,
        "outbuf_overflow": 8 * body_cap,     # base64 overlays of big images are larger than the upload
        "ident": f"MediScan/{__version__}",
    }


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _banner(app, args: argparse.Namespace) -> list[str]:
    service = app.extensions["mediscan"]
    url = _url(args.host, args.port)
    server = "Flask development server" if args.dev else f"waitress, {args.threads} threads"
    lines = [f"MediScan API {__version__} on {url} ({server}) -- docs at {url}/openapi.json"]
    if service.predictor is not None:
        p = service.predictor
        lines.append(f"Model: {p.checkpoint_path} (classes: {', '.join(p.classes)}; input {p.input_size}px)")
    else:
        lines.append(f"WARNING: {service.load_error} Until then /v1/predict answers 503.")
    if not _is_loopback(args.host):
        lines.append(f"WARNING: listening on {args.host}, reachable from other machines"
                     + ("" if app.config.get("API_KEY") else "; set MEDISCAN_API_KEY to require a key") + ".")
    lines.append(NOT_FOR_CLINICAL_USE)
    return lines


def main(argv: list[str] | None = None) -> int:
    """Parse the options, build the app (loading the model once) and serve until interrupted."""
    args = get_args_parser().parse_args(argv)
    if (args.threads < 1 or args.max_batch_files < 1 or args.max_content_mb <= 0
            or (args.max_pixels is not None and args.max_pixels < 1)):
        print("error: --threads, --max-batch-files, --max-content-mb and --max-pixels must be positive",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(app_config(args))
    for line in _banner(app, args):
        print(line, flush=True)
    try:
        if args.dev:
            # Never the Werkzeug debugger (it runs arbitrary code for whoever reaches it), never the reloader.
            app.run(host=args.host, port=args.port, debug=False, use_reloader=False, use_debugger=False,
                    threaded=True)
        else:
            import waitress
            waitress.serve(app, **waitress_options(args, app.config["MAX_CONTENT_LENGTH"]))
    except KeyboardInterrupt:
        pass
    return 0
