"""Load test of the HTTP API: the real waitress server, N concurrent clients, against Predictor.predict().

    python bench/api_load.py                                   # 8 clients x 30 s, random-init 224 px model
    python bench/api_load.py --clients 4 --duration 20         # shrunk
    python bench/api_load.py --rounds 2                        # two load runs, baseline before/after
    python bench/api_load.py --input-size 64 --requests 2000 --duration 600   # RSS check over 2,000 requests
    python bench/api_load.py --checkpoint models/best.safetensors
    python bench/api_load.py --device cuda --clients 32 --duration 30    # on a GPU: batching off vs on
    python bench/api_load.py --modes off,on1,on                # also batching with one batch worker (the old way)

What it does, in one process (the server is a subprocess on a free 127.0.0.1 port):

1. baseline: one thread calling ``Predictor.predict(png_bytes)`` in a loop for --baseline-seconds
   (decode + preprocess + forward + calibration: what one request costs, minus HTTP), from the main
   thread and from a fresh thread; the faster is the reference;
2. --rounds times, for batching off (``--batch-window-ms 0``) and on (``--batch-window-ms`` --window):
   start ``python app.py flask`` (--threads), warm it up, then --clients threads each POST the same PNG
   (raw body, image/png) to /v1/predict over a kept-alive http.client connection until --duration
   seconds or --requests requests, whichever comes first;
3. the baseline again (the machine is shared: the mean of both is the reference).

Prints requests/s, p50/p99 latency, errors (must be 0), server RSS after warm-up and at the end (growth
must stay under 50 MB over >= 2,000 requests) and served throughput / single-thread predict rate
(goal >= 0.9), and batching on against off: throughput ratio (goal >= 1 on a CPU at 8 clients, >= 5 on a
GPU at 32) and p99 ratio (goal <= 1.5), with the mean batch size the server reported. Exit status 1 when a request failed. Without --checkpoint a random-init model at
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
    p.add_argument("--window", type=float, default=2.0, help="--batch-window-ms of the batching-on runs")
    p.add_argument("--max-batch", type=int, default=None, help="--max-batch of the batching-on runs")
    p.add_argument("--batch-workers", type=int, default=None,
                   help="--batch-workers of the batching-on runs (default: the server's)")
    p.add_argument("--device", default="cpu", help="torch device of the server (and of the baseline)")
    p.add_argument("--modes", default="off,on",
                   help="batching modes to run, in order: off, on, and on1 (batching with one batch worker: "
                        "the behaviour before two workers)")
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

    def __init__(self, checkpoint: Path, threads: int, extra: list[str] = ()):
        self.port = free_port()
        command = [sys.executable, "app.py", "flask", "--port", str(self.port), "--threads", str(threads),
                   "--checkpoint", str(checkpoint), *extra]
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
        self.batch_sizes: list[int] = []
        self.limit = limit

    def claim(self) -> bool:
        """True while the request budget lasts (always, without one)."""
        with self.lock:
            return not self.limit or len(self.latencies) + len(self.errors) < self.limit

    def record(self, latency_s: float | None, error: str | None = None, batch: int = 1) -> None:
        with self.lock:
            if error is None:
                self.latencies.append(latency_s)
                self.batch_sizes.append(batch)
            else:
                self.errors.append(error)


def post_image(conn: http.client.HTTPConnection, image: bytes) -> tuple[str | None, int]:
    """One POST /v1/predict: (``None`` for a 200 with a prediction, else what went wrong; the batch size)."""
    conn.request("POST", "/v1/predict", body=image, headers={"Content-Type": "image/png"})
    response = conn.getresponse()
    body = response.read()
    batch = int(response.getheader("X-Batch-Size") or 1)
    if response.status != 200:
        return f"HTTP {response.status}: {body[:200]!r}", batch
    if "top_class" not in json.loads(body):
        return f"no top_class in {body[:200]!r}", batch
    return None, batch


def client_loop(port: int, image: bytes, stop_at: float, load: Load) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        while time.perf_counter() < stop_at and load.claim():
            started = time.perf_counter()
            batch = 1
            try:
                error, batch = post_image(conn, image)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            load.record(time.perf_counter() - started, error, batch)
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


def server_options(args, mode: str) -> list[str]:
    """The ``python app.py flask`` options of one batching mode."""
    options = ["--device", args.device]
    if mode == "off":
        return options + ["--batch-window-ms", "0"]
    options += ["--batch-window-ms", str(args.window)]
    workers = 1 if mode == "on1" else args.batch_workers
    options += ["--batch-workers", str(workers)] if workers else []
    return options + (["--max-batch", str(args.max_batch)] if args.max_batch else [])


def run_load(name: str, args, checkpoint: Path, image: bytes, mode: str = "off") -> dict:
    """Start a server, warm it up, load it, measure; returns the figures."""
    server = Server(checkpoint, args.threads, server_options(args, mode))
    try:
        server.wait_ready()
        drive(server.port, image, args.clients, 1e9, args.warmup * args.clients)   # warm-up: allocator, oneDNN
        rss_before = server.rss_mb()
        load, wall = drive(server.port, image, args.clients, args.duration, args.requests)
        rss_after = server.rss_mb()
    finally:
        server.stop()
    done = len(load.latencies)
    return {"run": name, "mode": mode, "requests": done, "errors": len(load.errors), "first_errors": load.errors[:3],
            "mean_batch": statistics.mean(load.batch_sizes) if load.batch_sizes else float("nan"),
            "rps": done / wall, "p50": percentile(load.latencies, 50), "p99": percentile(load.latencies, 99),
            "rss_before": rss_before, "rss_after": rss_after}


# ----------------------------------------------------------------------------------------------- main

def report(results: list[dict], base: list[dict[str, float]]) -> int:
    reference = statistics.mean(max(rates.values()) for rates in base)
    for when, rates in zip(("before", "after"), base):
        print(f"single-thread Predictor.predict() {when} the load: "
              + ", ".join(f"{rate:.2f} images/s ({where})" for where, rate in rates.items()))
    print(f"reference (mean of the faster of each): {reference:.2f} images/s")
    print(f"{'run':<18}{'requests':>9}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'batch':>6}{'errors':>7}"
          f"{'RSS MB start':>13}{'end':>7}{'growth':>8}{'ratio':>7}")
    failed = 0
    for r in results:
        growth = r["rss_after"] - r["rss_before"]
        print(f"{r['run']:<18}{r['requests']:>9}{r['rps']:>8.2f}{r['p50']:>9.0f}{r['p99']:>9.0f}"
              f"{r['mean_batch']:>6.2f}{r['errors']:>7}"
              f"{r['rss_before']:>13.0f}{r['rss_after']:>7.0f}{growth:>+8.1f}{r['rps'] / reference:>7.2f}")
        for message in r["first_errors"]:
            print(f"    error: {message}")
        failed += r["errors"]
        if r["requests"] < 2000:
            print(f"    note: {r['requests']} requests (< 2,000): the RSS growth figure covers only these")
        elif growth > RSS_LIMIT_MB:
            print(f"    FAIL: RSS grew {growth:.0f} MB over {r['requests']} requests (limit {RSS_LIMIT_MB:.0f} MB)")
    compare_modes(results)
    print("goal: errors = 0, ratio >= 0.90, RSS growth < 50 MB over >= 2,000 requests; batching on vs off: "
          "throughput >= 1x (CPU, 8 clients) / >= 5x (GPU, 32 clients), p99 <= 1.5x")
    return 1 if failed else 0


def compare_modes(results: list[dict]) -> None:
    """Mean throughput and p99 of each batching mode, and on against off."""
    by_mode = {mode: [r for r in results if r["mode"] == mode] for mode in ("off", "on", "on1")}
    means = {mode: (statistics.mean(r["rps"] for r in runs), statistics.mean(r["p99"] for r in runs))
             for mode, runs in by_mode.items() if runs}
    for mode, (rps, p99) in means.items():
        print(f"batching {mode}: mean {rps:.2f} req/s, p99 {p99:.0f} ms over {len(by_mode[mode])} run(s)")
    for mode in ("on", "on1"):
        if mode in means and "off" in means:
            print(f"batching {mode} / off: throughput x{means[mode][0] / means['off'][0]:.2f}, "
                  f"p99 x{means[mode][1] / means['off'][1]:.2f}")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    image = test_png(args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint(Path(tmp), args.input_size)
        predictor = Predictor(checkpoint, args.device)
        print(f"{checkpoint} (input {predictor.input_size}px), {args.image_size}px PNG of {len(image):,} bytes, "
              f"{args.clients} clients x {args.duration:g} s{f' or {args.requests} requests' if args.requests else ''}, "
              f"waitress {args.threads} threads, torch {torch.get_num_threads()} threads, {os.cpu_count()} CPUs",
              flush=True)
        base = [baseline_rates(predictor, image, args.baseline_seconds)]
        print(f"baseline: {base[0]}", flush=True)
        results = []
        for round_ in range(1, args.rounds + 1):
            for mode in args.modes.split(","):      # off and on alternate, so drift hits both alike
                label = f"run {round_} batch {mode}"
                results.append(run_load(label, args, checkpoint, image, mode))
                print(f"{label}: {results[-1]['rps']:.2f} req/s, {results[-1]['errors']} errors", flush=True)
        base.append(baseline_rates(predictor, image, args.baseline_seconds))
    return report(results, base)


if __name__ == "__main__":
    sys.exit(main())
