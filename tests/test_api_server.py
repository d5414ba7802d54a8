"""The real server (``python app.py flask``) under hostile and heavy traffic, over real sockets.

Limits decided before a body is read (413, 401), chunked bodies cut at the limit, lying Content-Lengths,
head and body timeouts (408), JSON at every status, the connection limit, the API key end to end, and
concurrent clients each getting the answer for their own image. One server (key, 1 MB limit, short
timeouts) serves most tests; each runs in a subprocess with one torch thread.
"""
from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from mediscan.devtools.browser import free_port, wait_for_http
from mediscan.devtools.synthetic import pattern_image, write_tiny_checkpoint
from mediscan.inference.predictor import Predictor

KEY = "s3cret-key"
LIMIT = 2**20                      # --max-content-mb 1
HEAD_TIMEOUT, BODY_TIMEOUT = 2, 2


class RealServer:
    """A running ``python app.py flask`` subprocess: its port, process and log."""

    def __init__(self, port: int, process: subprocess.Popen, log):
        self.port, self.process, self._log = port, process, log

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read()


@contextlib.contextmanager
def real_server(checkpoint, *options: str, api_key: str | None = None):
    """Start ``python app.py flask --port P *options`` serving ``checkpoint``; always stop it."""
    port = free_port()
    env = {**os.environ, "MEDISCAN_MODEL": str(checkpoint), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MEDISCAN_API_KEY", None)
    if api_key:
        env["MEDISCAN_API_KEY"] = api_key
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen([sys.executable, "app.py", "flask", "--port", str(port), *options],
                                   cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        server = RealServer(port, process, log)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/health", process, 120, log=server.log)
            yield server
        finally:
            process.terminate()
            process.wait(30)


def png(label: int = 1, seed: int = 0, side: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pattern_image(label, side, np.random.default_rng(seed))).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("server") / "tiny.safetensors")


@pytest.fixture(scope="module")
def server(checkpoint):
    with real_server(checkpoint, "--max-content-mb", "1", "--threads", "4", "--header-timeout", str(HEAD_TIMEOUT),
                     "--body-timeout", str(BODY_TIMEOUT), api_key=KEY) as running:
        yield running


# ----------------------------------------------------------------------------------------------- raw HTTP

def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def head(method: str, path: str, headers: dict) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def answer(sock: socket.socket) -> tuple[int, dict, dict]:
    """Read one HTTP answer from ``sock``: status, headers (lower-case names) and the JSON body."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    raw = response.read()
    assert response.getheader("Content-Type", "").startswith("application/json"), raw[:300]
    return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(raw)


def assert_error(status, headers, body, expected_status: int, code: str) -> dict:
    assert status == expected_status, body
    assert body["error"]["code"] == code and body["error"]["message"], body
    assert body["error"]["request_id"] == headers["x-request-id"]
    return body["error"]


def upload_head(length: int, **extra) -> bytes:
    return head("POST", "/v1/predict", {"X-API-Key": KEY, "Content-Type": "image/png", "Content-Length": length,
                                        **extra})


# ----------------------------------------------------------------------------------------------- before the body

@pytest.mark.parametrize("expect", [False, True])
def test_a_declared_body_over_the_limit_is_413_before_it_is_sent(server, expect):
    """30 MB declared, nothing sent: the JSON 413 comes at once (and no "100 Continue" invites the body)."""
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(upload_head(30 * 2**20, **({"Expect": "100-continue"} if expect else {})))
        status, headers, body = answer(sock)
        assert time.monotonic() - started < HEAD_TIMEOUT          # not a timeout: decided on the head alone
    error = assert_error(status, headers, body, 413, "payload_too_large")
    assert "1,048,576 bytes" in error["message"] and headers["connection"] == "close"


def test_a_30_mb_upload_gets_json_413_and_the_client_reads_it(server):
    """A client that sends the whole 30 MB anyway (http.client, no Expect) still reads the JSON answer."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/predict", body=b"\0" * (30 * 2**20),
                 headers={"X-API-Key": KEY, "Content-Type": "image/png", "X-Request-ID": "big-1"})
    response = conn.getresponse()
    body = json.loads(response.read())
    assert response.status == 413 and body["error"]["code"] == "payload_too_large"
    assert body["error"]["request_id"] == "big-1"
    conn.close()


def test_a_chunked_body_is_counted_and_cut_at_the_limit(server):
    chunk = b"\0" * 65536
    with connect(server) as sock:
        sock.sendall(head("POST", "/v1/predict", {"X-API-Key": KEY, "Content-Type": "image/png",
                                                  "Transfer-Encoding": "chunked"}))
        sent = 0
        with contextlib.suppress(OSError):       # the server may stop reading (and close) once past the limit
            while sent < 3 * LIMIT:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        assert_error(*answer(sock), 413, "payload_too_large")


def test_a_chunked_body_under_the_limit_is_served(server):
    data = png()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (data[:100], data[100:])) + b"0\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(head("POST", "/v1/predict", {"X-API-Key": KEY, "Content-Type": "image/png",
                                                  "Transfer-Encoding": "chunked"}) + chunks)
        status, _, body = answer(sock)
    assert status == 200 and body["top_class"]


def test_a_body_without_the_key_is_401_before_it_is_sent(server):
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(head("POST", "/v1/predict", {"Content-Type": "image/png", "Content-Length": 900_000,
                                                  "Expect": "100-continue"}))
        status, headers, body = answer(sock)
        assert time.monotonic() - started < HEAD_TIMEOUT
    assert_error(status, headers, body, 401, "unauthorized")
    with connect(server) as sock:                                   # a wrong key: the same
        sock.sendall(head("POST", "/v1/predict/batch", {"X-API-Key": KEY[:-1], "Content-Length": 5000,
                                                        "Content-Type": "multipart/form-data; boundary=x"}))
        assert_error(*answer(sock), 401, "unauthorized")


def test_every_route_but_health_needs_the_key_end_to_end(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    routes = [("GET", "/v1/model", None, {}), ("GET", "/openapi.json", None, {}), ("GET", "/nowhere", None, {}),
              ("POST", "/v1/predict", png(), {"Content-Type": "image/png"}),
              ("POST", "/predict", png(), {"Content-Type": "image/png"})]
    for method, path, data, headers in routes:
        for key, expected in ((None, 401), ("wrong", 401), (KEY, 404 if path == "/nowhere" else 200)):
            sent = {**headers, **({"X-API-Key": key} if key else {})}
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            body = json.loads(response.read())
            assert response.status == expected, (method, path, key, body)
            if expected == 401:
                assert body["error"]["code"] == "unauthorized"
            conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200                          # always open


# ----------------------------------------------------------------------------------------------- lying clients

def test_a_content_length_longer_than_the_body_times_out_with_408(server):
    with connect(server) as sock:
        sock.sendall(upload_head(1000) + b"only a few bytes")
        started = time.monotonic()
        status, headers, body = answer(sock)
        waited = time.monotonic() - started
    error = assert_error(status, headers, body, 408, "request_timeout")
    assert "body" in error["message"] and BODY_TIMEOUT - 0.5 < waited < BODY_TIMEOUT + 4


def test_a_content_length_shorter_than_the_body(server):
    """The declared bytes are the body (a cut-off PNG: 400); the rest is the start of a next request whose
    head never ends (binary, no blank line): 408 once the head timeout passes. JSON both times."""
    data = png()
    with connect(server) as sock:
        sock.sendall(upload_head(40) + data)
        first = answer(sock)
        second = answer(sock)
    assert_error(*first, 400, "bad_image")
    assert "head" in assert_error(*second, 408, "request_timeout")["message"]


def test_a_slow_head_times_out_with_408_and_a_silent_client_is_dropped(server):
    with connect(server) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")         # ... and never finishes the head
        error = assert_error(*answer(sock), 408, "request_timeout")
    assert "head" in error["message"]
    with connect(server) as sock:
        started = time.monotonic()
        assert sock.recv(100) == b""                                       # closed without a word
        assert HEAD_TIMEOUT - 0.5 < time.monotonic() - started < HEAD_TIMEOUT + 4


@pytest.mark.parametrize("request_bytes, status, code", [
    (b"NONSENSE\r\n\r\n", 400, "bad_request"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n", 431, "headers_too_large"),
    (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "not_implemented"),
    (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400, "bad_request"),
])
def test_malformed_http_gets_json_too(server, request_bytes, status, code):
    with connect(server) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(request_bytes)
        assert_error(*answer(sock), status, code)


# ----------------------------------------------------------------------------------------------- load

def test_concurrent_clients_each_get_the_answer_for_their_own_image(server, checkpoint):
    images = [png(label=k % 4, seed=k) for k in range(6)]
    expected = [Predictor(checkpoint, "cpu").predict(data).probabilities for data in images]
    answers: dict[tuple[int, int], tuple[int, dict, str | None]] = {}

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        for round_ in range(3):                                   # kept-alive connection, several requests
            conn.request("POST", f"/v1/predict?name=img{k}", body=images[k],
                         headers={"X-API-Key": KEY, "Content-Type": "image/png"})
            response = conn.getresponse()
            answers[k, round_] = response.status, json.loads(response.read()), response.getheader("X-Batch-Size")
        conn.close()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(answers) == 3 * len(images)
    for (k, _), (status, body, _) in answers.items():
        assert status == 200 and body["source"] == f"img{k}", body
        assert body["probabilities"] == pytest.approx(expected[k], abs=1e-4)
        assert {"decode", "preprocess", "queue", "model", "total"} <= set(body["timings_ms"])
    assert max(int(size) for _, _, size in answers.values()) > 1, "concurrent requests never shared a batch"


def test_the_connection_limit_holds_and_the_head_timeout_frees_it(checkpoint):
    """3 connections allowed: 3 silent clients fill them; a 4th is answered only once they are dropped."""
    with real_server(checkpoint, "--connection-limit", "3", "--header-timeout", "3") as limited:
        silent = [socket.create_connection(("127.0.0.1", limited.port)) for _ in range(3)]
        time.sleep(0.5)                                                    # accepted before the 4th comes
        try:
            started = time.monotonic()
            conn = http.client.HTTPConnection("127.0.0.1", limited.port, timeout=60)
            conn.request("GET", "/health")
            assert conn.getresponse().status == 200
            waited = time.monotonic() - started
        finally:
            for sock in silent:
                sock.close()
    assert 2.0 < waited < 10, waited


# ----------------------------------------------------------------------------------------------- answers in memory

def noise_jpeg(side: int = 3000, quality: int = 3) -> bytes:
    """A small upload whose overlay is huge: JPEG keeps noise cheaply, a PNG overlay of it cannot."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (side, side), dtype=np.uint8)).save(
        buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_a_large_overlay_answer_never_goes_to_disk(checkpoint, monkeypatch):
    """An explain answer many times the size of its upload (the base64 PNG overlay of a 9-megapixel image)
    is sent from memory: waitress would otherwise move an answer buffer over its overflow to a temp file."""
    from mediscan.apps.api import create_app
    from mediscan.apps.server import Guard, make_server
    written = []

    def no_disk(*args, **kwargs):
        written.append(args)
        raise AssertionError("an answer was written to a temporary file")
    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp", "SpooledTemporaryFile"):
        monkeypatch.setattr(tempfile, name, no_disk)
    data = noise_jpeg()
    limit = len(data) + 64 * 1024                      # the upload just fits
    app = create_app({"PREDICTOR": Predictor(checkpoint, "cpu"), "API_KEY": None, "MAX_CONTENT_LENGTH": limit})
    port = free_port()
    server = make_server(app, Guard(max_body=limit), threads=1, port=port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/v1/predict?explain=true", body=data, headers={"Content-Type": "image/jpeg"})
        response = conn.getresponse()
        raw = response.read()
        conn.close()
    finally:
        server.close()
        thread.join(10)
    assert not written
    assert response.status == 200, raw[:300]
    assert len(raw) > 8 * (limit + 2**20)              # bigger than any bound tied to the body limit
    assert json.loads(raw)["explanation"]["image_size"] == {"height": 3000, "width": 3000}
