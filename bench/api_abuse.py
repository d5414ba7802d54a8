"""Hostile clients against the real API server: memory stays bounded and comes back, others still get answers.

    python bench/api_abuse.py                               # 40 x 20 MB held uploads, 100 slow heads, 50-upload burst
    python bench/api_abuse.py --uploads 10 --slow 20 --burst 10 --no-baseline     # shrunk

The server is ``python app.py flask`` with ``MEDISCAN_API_KEY`` set (a random-init 64 px model: the
model is not what is measured), ``--connection-limit`` large enough for every hostile client plus the
normal ones, and ``--body-timeout`` longer than the run so that held uploads stay held. In one run:

0. warm-up; server RSS; latency of a normal request (a keyed 48 px PNG on a fresh connection, median of 3);
1. --uploads clients each send the head and all but the last 10 bytes of a --upload-mb body, and hold;
   RSS growth once they are all received, and a normal request's latency meanwhile;
2. --slow clients send a request head one byte a second (slowloris) on top of that; a normal request's
   latency meanwhile; after --header-timeout each must have been answered 408 and dropped;
3. a burst of --burst clients sends --upload-mb uploads without the key: each must get JSON 401, and
   RSS must not grow by their bodies (they are refused before being read);
4. everyone leaves: RSS a few seconds later (goal: back within 10 % of the held growth of the start).

The stated bound is ``connection_limit x max body`` for bodies being received. With --baseline (default)
phase 1 and 4 are repeated against plain waitress as the server ran before the guards (bodies buffered by
waitress in memory, ``waitress.serve`` with the old settings), for the before/after comparison.
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
from PIL import Image

from mediscan.devtools.browser import free_port
from mediscan.devtools.synthetic import pattern_image, write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-key"
_PLAIN_WAITRESS = """\
import sys, waitress
from mediscan.apps.api import create_app
cap = 21 * 2**20
waitress.serve(create_app(), host="127.0.0.1", port=int(sys.argv[1]), threads=8,
               max_request_body_size=cap, inbuf_overflow=cap, outbuf_overflow=8 * cap)
"""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--uploads", type=int, default=40, help="clients holding an almost complete upload")
    p.add_argument("--upload-mb", type=float, default=20.0, help="size of each held upload (MiB)")
    p.add_argument("--slow", type=int, default=100, help="slow-head (slowloris) clients")
    p.add_argument("--burst", type=int, default=50, help="unauthenticated uploads sent at once")
    p.add_argument("--connection-limit", type=int, default=200, help="the server's --connection-limit")
    p.add_argument("--header-timeout", type=float, default=10.0, help="the server's --header-timeout")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="repeat the held uploads against plain waitress (the server before the guards)")
    return p


# ----------------------------------------------------------------------------------------------- server

class Server:
    """A server subprocess on a free port, with its RSS."""

    def __init__(self, command: list[str], port: int, checkpoint: Path):
        env = {**os.environ, "MEDISCAN_MODEL": str(checkpoint), "MEDISCAN_API_KEY": KEY, "OMP_NUM_THREADS": "1",
               "PYTHONUNBUFFERED": "1"}
        self.port, self.log = port, tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.process.pid)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"server exited:\n{self.log.read()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                return
            except OSError:
                time.sleep(0.3)
        raise SystemExit("server did not start")

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def settled_rss(self, seconds: float = 20.0) -> float:
        """RSS once it stops changing (two readings 0.5 s apart within 2 MB), or after ``seconds``."""
        last, deadline = self.rss_mb(), time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = self.rss_mb()
            if abs(now - last) < 2:
                return now
            last = now
        return last

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pattern_image(1, 48, np.random.default_rng(0))).save(buf, "PNG")
    return buf.getvalue()


def normal_latency(port: int, image: bytes, tries: int = 3) -> float:
    """Median seconds for a keyed POST /v1/predict on a fresh connection (raises if it is not a 200)."""
    times = []
    for _ in range(tries):
        started = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/v1/predict", body=image, headers={"X-API-Key": KEY, "Content-Type": "image/png"})
        response = conn.getresponse()
        body = response.read()
        conn.close()
        if response.status != 200:
            raise SystemExit(f"a normal request failed: {response.status} {body[:200]!r}")
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------- hostile clients

def head(length: int, key: str | None) -> bytes:
    lines = ["POST /v1/predict HTTP/1.1", "Host: 127.0.0.1", "Content-Type: image/png", f"Content-Length: {length}"]
    lines += [f"X-API-Key: {key}"] if key else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def hold_uploads(port: int, count: int, size: int) -> list[socket.socket]:
    """``count`` connections that each sent all but 10 bytes of a ``size``-byte upload (and wait)."""
    body = b"\0" * (size - 10)
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        sock.sendall(head(size, KEY) + body)
        socks.append(sock)
    return socks


class SlowHeads:
    """``count`` slowloris clients: one byte of a request head per second each, from one thread."""

    def __init__(self, port: int, count: int):
        self.socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
        self.stop, self.cut = threading.Event(), 0
        self.thread = threading.Thread(target=self._drip)
        self.thread.start()

    def _drip(self) -> None:
        line, position = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 400, 0
        while not self.stop.wait(1.0):
            for sock in list(self.socks):
                try:
                    sock.sendall(line[position % len(line):][:1])
                except OSError:
                    self.socks.remove(sock)
                    self.cut += 1
            position += 1

    def answered_408(self) -> int:
        """How many got a 408 answer (the rest were dropped or are still open)."""
        count = 0
        for sock in self.socks:
            sock.settimeout(0.2)
            try:
                count += sock.recv(64).startswith(b"HTTP/1.1 408")
            except OSError:
                pass
        return count

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for sock in self.socks:
            sock.close()


def unauthenticated_burst(port: int, count: int, size: int) -> tuple[int, float]:
    """``count`` keyless uploads at once: how many got JSON 401, and the slowest answer (s)."""
    results: list[tuple[bool, float]] = []
    body = b"\0" * size

    def one():
        started = time.perf_counter()
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        try:
            sock.sendall(head(size, None))
            try:
                sock.sendall(body)             # refused before reading: the send may be cut short
            except OSError:
                pass
            response = http.client.HTTPResponse(sock)
            response.begin()
            ok = response.status == 401 and json.loads(response.read())["error"]["code"] == "unauthorized"
        except (OSError, http.client.HTTPException, ValueError):
            ok = False
        finally:
            sock.close()
        results.append((ok, time.perf_counter() - started))
    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(ok for ok, _ in results), max(t for _, t in results)


# ----------------------------------------------------------------------------------------------- runs

def held_uploads_phase(server: Server, args, image: bytes) -> dict:
    """Phase 1 (and 4 when nothing else runs): RSS with the uploads held, and after they leave."""
    size = int(args.upload_mb * 2**20)
    before = server.settled_rss()
    socks = hold_uploads(server.port, args.uploads, size)
    held = server.settled_rss()
    latency = normal_latency(server.port, image)
    return {"before": before, "held": held, "latency": latency, "socks": socks}


def release(server: Server, socks: list[socket.socket]) -> float:
    for sock in socks:
        sock.close()
    time.sleep(1.0)
    return server.settled_rss()


def guarded_run(args, checkpoint: Path, image: bytes) -> dict:
    port = free_port()
    command = [sys.executable, "app.py", "flask", "--port", str(port), "--threads", "8",
               "--connection-limit", str(args.connection_limit), "--header-timeout", str(args.header_timeout),
               "--body-timeout", "600", "--max-content-mb", str(args.upload_mb + 1)]
    server = Server(command, port, checkpoint)
    try:
        normal_latency(port, image)                                   # warm-up
        idle_latency = normal_latency(port, image)
        out = held_uploads_phase(server, args, image)
        slow = SlowHeads(port, args.slow)
        time.sleep(2.0)
        out["slow_latency"] = normal_latency(port, image)
        before_burst = server.rss_mb()
        out["burst_ok"], out["burst_slowest"] = unauthenticated_burst(port, args.burst, int(args.upload_mb * 2**20))
        out["burst_growth"] = server.rss_mb() - before_burst
        time.sleep(max(0.0, args.header_timeout + 3 - 2.0))
        out["slow_408"] = slow.answered_408() + 0
        out["slow_cut"] = slow.cut
        slow.close()
        out["after"] = release(server, out.pop("socks"))
        out["idle_latency"] = idle_latency
        out["after_latency"] = normal_latency(port, image)
    finally:
        server.stop()
    return out


def plain_waitress_run(args, checkpoint: Path, image: bytes) -> dict:
    port = free_port()
    server = Server([sys.executable, "-c", _PLAIN_WAITRESS, str(port)], port, checkpoint)
    try:
        normal_latency(port, image)
        out = held_uploads_phase(server, args, image)
        out["after"] = release(server, out.pop("socks"))
    finally:
        server.stop()
    return out


def report(args, guarded: dict, plain: dict | None) -> int:
    bound = args.connection_limit * (args.upload_mb + 1)
    growth = guarded["held"] - guarded["before"]
    left = guarded["after"] - guarded["before"]
    print(f"bound on buffered bodies: {args.connection_limit} connections x {args.upload_mb + 1:g} MB = {bound:,.0f} MB")
    print(f"guarded server: RSS {guarded['before']:.0f} MB -> {guarded['held']:.0f} MB with {args.uploads} held "
          f"{args.upload_mb:g} MB uploads (+{growth:.0f} MB, {growth / max(args.uploads, 1):.1f} MB each) -> "
          f"{guarded['after']:.0f} MB after they left ({left:+.0f} MB)")
    print(f"normal request: {guarded['idle_latency'] * 1000:.0f} ms idle, {guarded['latency'] * 1000:.0f} ms with the "
          f"uploads held, {guarded['slow_latency'] * 1000:.0f} ms with {args.slow} slow heads too, "
          f"{guarded['after_latency'] * 1000:.0f} ms after")
    print(f"slow heads: {guarded['slow_408']} answered 408, {guarded['slow_cut']} found closed, of {args.slow} "
          f"(header timeout {args.header_timeout:g} s)")
    print(f"unauthenticated burst: {guarded['burst_ok']}/{args.burst} got JSON 401, slowest in "
          f"{guarded['burst_slowest'] * 1000:.0f} ms, RSS {guarded['burst_growth']:+.0f} MB meanwhile "
          f"(their bodies: {args.burst * args.upload_mb:,.0f} MB)")
    if plain:
        p_growth, p_left = plain["held"] - plain["before"], plain["after"] - plain["before"]
        print(f"plain waitress (before the guards): +{p_growth:.0f} MB held, {p_left:+.0f} MB after they left")
    ok = (growth < bound and left < 0.1 * max(growth, 1) + 10 and guarded["burst_ok"] == args.burst
          and guarded["burst_growth"] < 0.1 * args.burst * args.upload_mb + 10
          and guarded["slow_408"] + guarded["slow_cut"] == args.slow)
    print("goal: growth under the bound, returned after they leave, every unauthenticated upload 401 without "
          f"buffering, every slow head cut, normal requests answered throughout -> {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    image = png()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_tiny_checkpoint(Path(tmp) / "tiny.safetensors")
        print(f"{args.uploads} held uploads of {args.upload_mb:g} MB, {args.slow} slow heads, burst of {args.burst}, "
              f"{os.cpu_count()} CPUs", flush=True)
        guarded = guarded_run(args, checkpoint, image)
        plain = plain_waitress_run(args, checkpoint, image) if args.baseline else None
    return report(args, guarded, plain)


if __name__ == "__main__":
    sys.exit(main())
