"""Run the MediScan HTTP API: ``python app.py flask [options]``.

    python app.py flask                                   # waitress on http://127.0.0.1:5000
    python app.py flask --port 8080 --threads 8 --checkpoint models/best.safetensors
    python app.py flask --dev                             # Flask's own server (debugger always off)
    MEDISCAN_API_KEY=secret python app.py flask --host 0.0.0.0
    python app.py flask --connection-limit 200 --header-timeout 5 --batch-window-ms 0   # batching off
    python app.py flask --batch-window-ms 5 --max-batch 16 --batch-workers 2   # wider batches (defaults: 2 ms, 8/16, 2)

The server is waitress behind the guards of :mod:`mediscan.apps.server` (limits decided before a body is
read, bounded memory, timeouts, JSON at every status). Binds to 127.0.0.1 unless ``--host`` says otherwise. Starts even without a model: ``/health`` says so and
predictions answer 503 with the training command. Not a medical device.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import sys

from mediscan import NOT_FOR_CLINICAL_USE, __version__
from mediscan.apps.api import DEFAULTS, ENV_API_KEY, api_key_problem, create_app
from mediscan.apps.server import Guard, make_server
from mediscan.core.runtime import select_device


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
    g = Guard(max_body=0)
    p.add_argument("--connection-limit", type=int, default=g.connection_limit,
                   help=f"most open client connections; more wait to be accepted (default: {g.connection_limit}). "
                        f"Bodies being received take at most this x --max-content-mb of memory")
    p.add_argument("--header-timeout", type=float, default=g.header_timeout,
                   help=f"seconds a request head may take to arrive (default: {g.header_timeout:g})")
    p.add_argument("--body-timeout", type=float, default=g.body_timeout,
                   help=f"seconds a request body may take to arrive after its head (default: {g.body_timeout:g})")
    p.add_argument("--idle-timeout", type=int, default=g.idle_timeout,
                   help=f"seconds an idle keep-alive connection stays open (default: {g.idle_timeout})")
    p.add_argument("--batch-window-ms", type=float, default=d["BATCH_WINDOW_MS"],
                   help=f"concurrent /v1/predict requests arriving within this many ms share one forward pass "
                        f"(default: {d['BATCH_WINDOW_MS']:g}; 0 = off)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="most images per shared forward pass (default: 8 on the CPU, 16 on a GPU)")
    p.add_argument("--batch-workers", type=int, default=d["BATCH_WORKERS"],
                   help=f"shared forward passes that may run at once: while one runs the next is collected "
                        f"(default: {d['BATCH_WORKERS']})")
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
        "BATCH_WINDOW_MS": args.batch_window_ms,
        "MAX_BATCH": args.max_batch,
        "BATCH_WORKERS": args.batch_workers,
    }


def guard_of(args: argparse.Namespace, app) -> Guard:
    """The server layer's limits from the options and the app's config (body limit, API key)."""
    return Guard(max_body=int(app.config["MAX_CONTENT_LENGTH"]), api_key=app.config.get("API_KEY"),
                 header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                 idle_timeout=args.idle_timeout, connection_limit=args.connection_limit)


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
    batching = (f"batching window {args.batch_window_ms:g} ms, {args.batch_workers} batch workers"
                if args.batch_window_ms else "no batching")
    server = ("Flask development server" if args.dev else
              f"waitress, {args.threads} threads, at most {args.connection_limit} connections, {batching}")
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


def _invalid(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, or ``None``."""
    positive = {"--threads": args.threads, "--max-batch-files": args.max_batch_files,
                "--max-content-mb": args.max_content_mb, "--connection-limit": args.connection_limit,
                "--header-timeout": args.header_timeout, "--body-timeout": args.body_timeout,
                "--idle-timeout": args.idle_timeout, "--max-pixels": args.max_pixels,
                "--max-batch": args.max_batch, "--batch-workers": args.batch_workers}
    bad = [name for name, value in positive.items() if value is not None and not 0 < value < math.inf]
    if bad:
        return f"{', '.join(bad)} must be positive (and finite)"
    if not 0 <= args.batch_window_ms < math.inf:
        return "--batch-window-ms must be 0 (off) or positive"
    return _device_problem(args.device) or api_key_problem(os.environ.get(ENV_API_KEY) or None)


def _device_problem(name: str | None) -> str | None:
    """Why ``--device name`` cannot be used (not a torch device, or CUDA on a machine without it), or ``None``."""
    if name is None:
        return None
    try:
        select_device(name, mps=False)      # the Predictor's own chooser: it refuses exactly what it would
    except ValueError as exc:
        return str(exc)
    except RuntimeError:                    # torch's own parse error is a page of device names
        return f"--device {name!r} is not a torch device (use cpu, cuda or cuda:N)"
    return None


def main(argv: list[str] | None = None) -> int:
    """Parse the options, build the app (loading the model once) and serve until interrupted."""
    args = get_args_parser().parse_args(argv)
    problem = _invalid(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
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
            make_server(app, guard_of(args, app), threads=args.threads, host=args.host, port=args.port,
                        ident=f"MediScan/{__version__}").run()
    except KeyboardInterrupt:
        pass
    return 0
