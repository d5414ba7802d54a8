"""Load test of the HTTP API: the real waitress server, N concurrent clients, against Predictor.predict().

    python bench/api_load.py                                   # 8 clients x 30 s, random-init 224 px model
    python bench/api_load.py --clients 4 --duration 20         # shrunk
    python bench/api_load.py --rounds 2                        # two load runs, baseline before/after
    python bench/api_load.py --input-size 64 --requests 2000 --duration 600   # RSS check over 2,000 requests
    python bench/api_load.py --checkpoint models/best.safetensors

What it does, in one process (the server is a subprocess on a free 127.0.0.1 port):

1. baseline: one thread calling ``Predictor.predict(png_bytes)`` in a loop for --baseline-seconds
   (decode + preprocess + forward + calibration: what one request costs, minus HTTP), from the main
   thread and from a fresh thread; the faster is the reference;
2. --rounds times: start ``python app.py flask`` (waitress, --threads), warm it up, then --clients
   threads each POST the same PNG (raw body, image/png) to /v1/predict over a kept-alive http.client
   connection until --duration seconds or --requests requests, whichever comes first;
3. the baseline again (the machine is shared: the mean of both is the reference).

Prints requests/s, p50/p99 latency, errors (must be 0), server RSS after warm-up and at the end (growth
must stay under 50 MB over >= 2,000 requests) and served throughput / single-thread predict rate
(goal >= 0.9). Exit status 1 when a request failed. Without --checkpoint a random-init model at
--input-size (default 224) is written to a temporary folder. Not a timed test: figures depend on the
machine and its load, compare ratios within one run.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

from mediscan.inference.predictor import Predictor  # noqa: E402

RSS_LIMIT_MB = 50.0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint (default: a random-init model, --input-size)")
    p.add_argument("--input-size", type=int, default=224, help="input size of the random-init model")
    p.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per run")
    p.add_argument("--requests", type=int, default=0, help="stop a run after this many requests (0 = no limit)")
    p.add_argument("--threads", type=int, default=8, help="waitress threads")
    p.add_argument("--rounds", type=int, default=1, help="load runs (each with a fresh server)")
    p.add_argument("--baseline-seconds", type=float, default=10.0, help="length of each baseline measurement")
    p.add_argument("--image-size", type=int, default=512, help="side of the uploaded PNG")
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests per client before measuring")
    return p


# ----------------------------------------------------------------------------------------------- setup

def random_checkpoint(folder: Path, input_size: int) -> Path:
    """A random-init model at ``input_size``, with out-of-scope statistics so that scoring is timed too."""
    from mediscan.core.checkpoint import new_metadata, save_checkpoint
    from mediscan.core.model import build_model
    from mediscan.core.ood import fit_ood
    from mediscan.core.preprocessing import PreprocessConfig

    torch.manual_seed(0)
    model, source = build_model(4, weights="none")
    gen = torch.Generator().manual_seed(0)
    detector = fit_ood(torch.rand(256, 1024, generator=gen), torch.arange(256) % 4, torch.rand(64, 1024, generator=gen))
    meta = new_metadata(["bone", "brain", "heart", "lungs"], PreprocessConfig(input_size), source,
                        ood=detector.to_meta())
    return save_checkpoint(folder / f"random{input_size}.safetensors", model, meta, detector.to_tensors())


def test_png(size: int) -> bytes:
    """A smooth 8-bit grayscale PNG with a bright blob (decode and resize are part of every request)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    blob = np.exp(-((yy - 0.45) ** 2 + (xx - 0.55) ** 2) / 0.05)
    noise = np.random.default_rng(0).normal(0, 0.03, blob.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip((0.1 + 0.8 * blob + noise) * 255, 0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------- baseline

def baseline_rate(predictor: Predictor, image: bytes, seconds: float) -> float:
    """Single-thread ``Predictor.predict()`` calls per second over ``seconds`` (after warm-up calls)."""
    for _ in range(3):
        predictor.predict(image)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or count < 3:
        predictor.predict(image)
        count += 1
    return count / (time.perf_counter() - started)


def baseline_rates(predictor: Predictor, image: bytes, seconds: float) -> dict[str, float]:
    """The baseline from the main thread and from a fresh thread (where the server's requests run).

    On a loaded machine torch's OpenMP team can be far slower when driven from the main thread than
    from a new one, so both are measured and the faster one is the reference: the ratio is never
    flattered by a slow baseline.
    """
    rates = {"main thread": baseline_rate(predictor, image, seconds)}
    box: list[float] = []
    worker = threading.Thread(target=lambda: box.append(baseline_rate(predictor, image, seconds)))
    worker.start()
    worker.join()
    rates["new thread"] = box[0]
    return rates


# ----------------------------------------------------------------------------------------------- server

class Server:
    """``python app.py flask`` as a subprocess on a free localhost port."""

    def __init__(self, checkpoint: Path, threads: int):
        self.port = free_port()
        command = [sys.executable, "app.py", "flask", "--port", str(self.port), "--threads", str(threads),
                   "--checkpoint", str(checkpoint)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("MEDISCAN_API_KEY", None)
        self.log = tempfile.TemporaryFile("w+")          # the server's request log: not needed on screen
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.rss = psutil.Process(self.process.pid)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"server exited with {self.process.returncode}:\n{self.log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if json.load(r)["model_loaded"]:
                        return
                    raise SystemExit("server started without a model")
            except OSError:
                time.sleep(0.3)
        raise SystemExit("server did not become ready")

    def rss_mb(self) -> float:
        return self.rss.memory_info().rss / 2**20

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


# ----------------------------------------------------------------------------------------------- load

class Load:
    """Shared counters of one load run (guarded by a lock; the clients only append)."""

    def __init__(self, limit: int):
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.limit = limit

    def claim(self) -> bool:
        """True while the request budget lasts (always, without one)."""
        with self.lock:
            return not self.limit or len(self.latencies) + len(self.errors) < self.limit

    def record(self, latency_s: float | None, error: str | None = None) -> None:
        with self.lock:
            if error is None:
                self.latencies.append(latency_s)
            else:
                self.errors.append(error)


def post_image(conn: http.client.HTTPConnection, image: bytes) -> str | None:
    """One POST /v1/predict; ``None`` when the answer is a 200 with a prediction, else what went wrong."""
    conn.request("POST", "/v1/predict", body=image, headers={"Content-Type": "image/png"})
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        return f"HTTP {response.status}: {body[:200]!r}"
    if "top_class" not in json.loads(body):
        return f"no top_class in {body[:200]!r}"
    return None


def client_loop(port: int, image: bytes, stop_at: float, load: Load) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        while time.perf_counter() < stop_at and load.claim():
            started = time.perf_counter()
            try:
                error = post_image(conn, image)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            load.record(time.perf_counter() - started, error)
    finally:
        conn.close()


def drive(port: int, image: bytes, clients: int, duration: float, limit: int) -> tuple[Load, float]:
    """Run ``clients`` threads against the server; returns the counters and the wall time."""
    load = Load(limit)
    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(port, image, started + duration, load))
               for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return load, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000.0 if values else float("nan")


def run_load(name: str, args, checkpoint: Path, image: bytes) -> dict:
    """Start a server, warm it up, load it, measure; returns the figures."""
    server = Server(checkpoint, args.threads)
    try:
        server.wait_ready()
        drive(server.port, image, args.clients, 1e9, args.warmup * args.clients)   # warm-up: allocator, oneDNN
        rss_before = server.rss_mb()
        load, wall = drive(server.port, image, args.clients, args.duration, args.requests)
        rss_after = server.rss_mb()
    finally:
        server.stop()
    done = len(load.latencies)
    return {"run": name, "requests": done, "errors": len(load.errors), "first_errors": load.errors[:3],
            "rps": done / wall, "p50": percentile(load.latencies, 50), "p99": percentile(load.latencies, 99),
            "rss_before": rss_before, "rss_after": rss_after}


# ----------------------------------------------------------------------------------------------- main

def report(results: list[dict], base: list[dict[str, float]]) -> int:
    reference = statistics.mean(max(rates.values()) for rates in base)
    for when, rates in zip(("before", "after"), base):
        print(f"single-thread Predictor.predict() {when} the load: "
              + ", ".join(f"{rate:.2f} images/s ({where})" for where, rate in rates.items()))
    print(f"reference (mean of the faster of each): {reference:.2f} images/s")
    print(f"{'run':<14}{'requests':>9}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>7}"
          f"{'RSS MB start':>13}{'end':>7}{'growth':>8}{'ratio':>7}")
    failed = 0
    for r in results:
        growth = r["rss_after"] - r["rss_before"]
        print(f"{r['run']:<14}{r['requests']:>9}{r['rps']:>8.2f}{r['p50']:>9.0f}{r['p99']:>9.0f}{r['errors']:>7}"
              f"{r['rss_before']:>13.0f}{r['rss_after']:>7.0f}{growth:>+8.1f}{r['rps'] / reference:>7.2f}")
        for message in r["first_errors"]:
            print(f"    error: {message}")
        failed += r["errors"]
        if r["requests"] < 2000:
            print(f"    note: {r['requests']} requests (< 2,000): the RSS growth figure covers only these")
        elif growth > RSS_LIMIT_MB:
            print(f"    FAIL: RSS grew {growth:.0f} MB over {r['requests']} requests (limit {RSS_LIMIT_MB:.0f} MB)")
    if len(results) > 1:
        rates = [r["rps"] for r in results]
        print(f"mean over {len(rates)} runs: {statistics.mean(rates):.2f} req/s "
              f"(ratio {statistics.mean(rates) / reference:.2f})")
    print("goal: errors = 0, ratio >= 0.90, RSS growth < 50 MB over >= 2,000 requests")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    image = test_png(args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint(Path(tmp), args.input_size)
        predictor = Predictor(checkpoint, "cpu")
        print(f"{checkpoint} (input {predictor.input_size}px), {args.image_size}px PNG of {len(image):,} bytes, "
              f"{args.clients} clients x {args.duration:g} s{f' or {args.requests} requests' if args.requests else ''}, "
              f"waitress {args.threads} threads, torch {torch.get_num_threads()} threads, {os.cpu_count()} CPUs",
              flush=True)
        base = [baseline_rates(predictor, image, args.baseline_seconds)]
        print(f"baseline: {base[0]}", flush=True)
        results = []
        for round_ in range(1, args.rounds + 1):
            label = f"run {round_}"
            results.append(run_load(label, args, checkpoint, image))
            print(f"{label}: {results[-1]['rps']:.2f} req/s, {results[-1]['errors']} errors", flush=True)
        base.append(baseline_rates(predictor, image, args.baseline_seconds))
    return report(results, base)


if __name__ == "__main__":
    sys.exit(main())
