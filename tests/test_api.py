"""The Flask API: every endpoint, every error status, API key, request ids, in-memory uploads, the real server.

One tiny random-init checkpoint (input 64) per module; images are made in memory with Pillow / pydicom.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from mediscan import NOT_FOR_CLINICAL_USE
from mediscan.apps.api import create_app
from mediscan.devtools.browser import free_port, wait_for_http
from mediscan.devtools.synthetic import CLASSES, FAKE_PATIENT, dicom_bytes, pattern_image, write_tiny_checkpoint
from mediscan.inference.predictor import TRAIN_COMMAND, VERDICTS, Predictor

# ----------------------------------------------------------------------------------------------- fixtures
# Requests run in the test's own thread here, on one torch thread (conftest's session-wide one_torch_thread).

#: What training would have stored; the model card must report exactly these (hand-picked, distinct) values.
METRICS = {"val": {"accuracy": 0.8125, "macro_f1": 0.79}, "test": {"accuracy": 0.75, "macro_f1": 0.7321,
                                                                      "ece": 0.091, "ece_calibrated": 0.034}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("api") / "tiny.safetensors", metrics=METRICS,
                                 temperature=1.7)


@pytest.fixture(scope="module")
def predictor(checkpoint):
    p = Predictor(checkpoint, "cpu")
    p.explain(png_bytes(), faithfulness=False)       # the first forward pass is slow: pay for it once
    return p


@pytest.fixture
def app(predictor):
    return create_app({"PREDICTOR": predictor, "API_KEY": None})


@pytest.fixture
def client(app):
    return app.test_client()


# ----------------------------------------------------------------------------------------------- images

def gray(height=48, width=56, label=2, seed=0) -> np.ndarray:
    return pattern_image(label, max(height, width), np.random.default_rng(seed))[:height, :width]


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def png_bytes(height=48, width=56) -> bytes:
    return encode(gray(height, width))


def tiff16_bytes() -> bytes:
    return encode(gray().astype(np.uint16) * 257, "TIFF")


def patient_dicom_bytes(arr: np.ndarray | None = None) -> bytes:
    """A Part-10 CR DICOM (12 bits stored) in memory, with fake patient fields that must never be logged."""
    return dicom_bytes((gray() if arr is None else arr).astype(np.uint16) * 16, bits_stored=12, **FAKE_PATIENT)


def upload(data: bytes, name: str = "scan.png", field: str = "file") -> dict:
    return {field: (io.BytesIO(data), name)}


def error_of(response, status: int, code: str) -> dict:
    """Assert a JSON error answer with this status and code; return its error object."""
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    assert response.is_json, response.get_data(as_text=True)[:500]
    error = response.get_json()["error"]
    assert error["code"] == code
    assert error["message"] and "Traceback" not in error["message"]
    assert error["request_id"] == response.headers["X-Request-ID"]
    return error


def without_timings(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "timings_ms"}


# ----------------------------------------------------------------------------------------------- service endpoints

def test_health_reports_the_loaded_model(client, checkpoint):
    r = client.get("/health")
    assert r.status_code == 200 and r.headers["X-Request-ID"]
    body = r.get_json()
    assert body["status"] == "ok" and body["model_loaded"] is True
    assert body["model"] == {"checkpoint": str(checkpoint), "classes": list(CLASSES), "input_size": 64}


def test_model_card(client, checkpoint):
    r = client.get("/v1/model")
    assert r.status_code == 200
    card = r.get_json()
    assert card["classes"] == list(CLASSES) and card["input_size"] == 64
    assert card["checkpoint"] == str(checkpoint) and card["device"] == "cpu"
    assert card["weight_source"] == "none (random initialisation)"
    assert card["version"] and card["not_for_clinical_use"] == NOT_FOR_CLINICAL_USE
    # the metrics stored at training time, split by split; the ECE that describes calibrated answers
    assert (card["test_accuracy"], card["test_macro_f1"], card["val_accuracy"]) == (0.75, 0.7321, 0.8125)
    assert (card["ece"], card["ece_before_calibration"]) == (0.034, 0.091)
    assert card["temperature"] == pytest.approx(1.7) and card["uncertain_below"] == 0.6
    assert card["out_of_scope_check"] is False and card["ood"] is None


def test_openapi_documents_every_route(app, client):
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.") and spec["info"]["x-limits"]["max_batch_files"] == 16
    rules = list(app.url_map.iter_rules())
    assert {rule.rule for rule in rules} == set(spec["paths"])      # no undocumented route, no stale path
    for rule in rules:
        documented = spec["paths"][rule.rule]
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in documented, (rule.rule, method)
    _assert_refs_resolve(spec, spec)


def _assert_refs_resolve(node, spec):
    if isinstance(node, dict):
        if "$ref" in node:
            target = spec
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
        for value in node.values():
            _assert_refs_resolve(value, spec)
    elif isinstance(node, list):
        for value in node:
            _assert_refs_resolve(value, spec)


def test_without_a_model_health_is_200_and_predictions_503(tmp_path):
    app = create_app({"CHECKPOINT": str(tmp_path / "absent.safetensors")})
    client = app.test_client()
    body = client.get("/health").get_json()
    assert body["model_loaded"] is False and body["model"] is None and TRAIN_COMMAND in body["model_error"]
    for response in (client.get("/v1/model"),
                     client.post("/v1/predict", data=png_bytes(), content_type="image/png"),
                     client.post("/predict", data=upload(png_bytes())),
                     client.post("/v1/predict/batch", data=upload(png_bytes(), field="files"))):
        error = error_of(response, 503, "model_not_loaded")
        assert TRAIN_COMMAND in error["message"] and error["train_command"] == TRAIN_COMMAND


def test_an_unusable_checkpoint_also_gives_503(tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\0" * 64)
    client = create_app({"CHECKPOINT": str(broken)}).test_client()
    assert client.get("/health").get_json()["model_loaded"] is False
    error = error_of(client.get("/v1/model"), 503, "model_not_loaded")
    assert "cannot be used" in error["message"]


# ----------------------------------------------------------------------------------------------- predict

def _assert_prediction(body: dict, source: str | None = None):
    assert body["classes"] == list(CLASSES) and body["top_class"] in CLASSES
    assert set(body["probabilities"]) == set(CLASSES)
    assert abs(sum(body["probabilities"].values()) - 1.0) < 1e-4
    assert body["confidence"] == pytest.approx(body["probabilities"][body["top_class"]])
    assert body["verdict"] in VERDICTS and body["verdict_reason"]
    assert {"decode", "preprocess", "model", "total"} <= set(body["timings_ms"])
    if source is not None:
        assert body["source"] == source


def test_predict_multipart(client):
    r = client.post("/v1/predict", data=upload(png_bytes(), "knee.png"))
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    _assert_prediction(body, "knee.png")
    assert body["not_for_clinical_use"] == NOT_FOR_CLINICAL_USE and "explanation" not in body


@pytest.mark.parametrize("content_type, make", [
    ("image/png", png_bytes),
    ("image/jpeg", lambda: encode(gray(), "JPEG")),
    ("image/tiff", tiff16_bytes),
    ("application/dicom", patient_dicom_bytes),
    ("application/octet-stream", png_bytes),
])
def test_predict_raw_body(client, content_type, make):
    r = client.post("/v1/predict?name=raw-upload", data=make(), content_type=content_type)
    assert r.status_code == 200, r.get_json()
    _assert_prediction(r.get_json(), "raw-upload")


def test_prototype_url_gives_the_same_answer(client):
    data = png_bytes()
    new = client.post("/v1/predict", data=upload(data)).get_json()
    old = client.post("/predict", data=upload(data)).get_json()
    assert without_timings(old) == without_timings(new)
    explained_new = client.post("/v1/predict?explain=true", data=data, content_type="image/png").get_json()
    explained_old = client.post("/predict?explain=true", data=data, content_type="image/png").get_json()
    assert without_timings(explained_old) == without_timings(explained_new)


def test_explain_returns_an_overlay_of_the_original_size_and_a_grid(client):
    r = client.post("/v1/predict?explain=true", data=upload(png_bytes(50, 70)))
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    explanation = body["explanation"]
    assert explanation["explained_class"] == body["top_class"]
    overlay = Image.open(io.BytesIO(base64.b64decode(explanation["overlay_png_base64"])))
    assert overlay.format == "PNG" and overlay.size == (70, 50)
    grid = np.asarray(explanation["heatmap_grid"])
    assert grid.shape == (16, 16) and grid.min() >= 0 and grid.max() <= 1
    assert explanation["image_size"] == {"height": 50, "width": 70}


def test_explain_another_class_with_alpha_and_grid(client):
    data = png_bytes()
    r = client.post("/v1/predict?class=lungs&alpha=0.8&grid=4&faithfulness=true", data=data,
                    content_type="image/png")
    assert r.status_code == 200, r.get_json()
    explanation = r.get_json()["explanation"]
    assert explanation["explained_class"] == "lungs" and explanation["overlay_alpha"] == 0.8
    assert np.asarray(explanation["heatmap_grid"]).shape == (4, 4)
    assert "drop_top" in explanation["faithfulness"]
    faint = client.post("/v1/predict?class=lungs&alpha=0", data=data, content_type="image/png").get_json()
    assert faint["explanation"]["overlay_png_base64"] != explanation["overlay_png_base64"]


def test_unknown_class_is_422_with_the_valid_names(client):
    error = error_of(client.post("/v1/predict?explain=true&class=spleen", data=upload(png_bytes())),
                     422, "unknown_class")
    assert error["valid_classes"] == list(CLASSES) and "spleen" in error["message"]


@pytest.mark.parametrize("query", ["alpha=2", "alpha=nan", "alpha=x", "explain=maybe", "grid=0", "grid=1000"])
def test_bad_query_parameters_are_400(client, query):
    error_of(client.post(f"/v1/predict?{query}", data=upload(png_bytes())), 400, "bad_parameter")


# ----------------------------------------------------------------------------------------------- input errors

@pytest.mark.parametrize("data, reason", [
    (png_bytes()[:60], "truncated"),
    (b"<html><body>502 Bad Gateway</body></html>", "not_image"),
    (png_bytes(8, 8), "too_small"),
    (b"", "empty"),
])
def test_undecodable_images_are_400_with_the_reason(client, data, reason):
    error = error_of(client.post("/v1/predict", data=upload(data, "bad.png")), 400, "bad_image")
    assert error["reason"] == reason and "bad.png" in error["message"]


def test_raw_body_decoding_error_is_400(client):
    error = error_of(client.post("/v1/predict", data=png_bytes()[:100], content_type="image/png"), 400, "bad_image")
    assert error["reason"] == "truncated"


@pytest.mark.parametrize("kwargs", [
    {},                                                          # no body at all
    {"data": b"", "content_type": "image/png"},                  # empty raw body
    {"data": {"note": "hello"}},                                 # a url-encoded form without a file
    {"data": {"note": "hello"}, "content_type": "multipart/form-data"},
    {"data": {"file": (io.BytesIO(b""), "")}},                   # a browser form with no file chosen
])
def test_no_file_is_400(client, kwargs):
    error = error_of(client.post("/v1/predict", **kwargs), 400, "no_file")
    assert "file" in error["message"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", "image/gif", "video/mp4"])
def test_unsupported_content_type_is_415(client, content_type):
    error = error_of(client.post("/v1/predict", data=b"some bytes", content_type=content_type),
                     415, "unsupported_media_type")
    assert "image/png" in error["message"]


def test_unknown_path_is_404_and_wrong_method_405(client):
    error_of(client.get("/v2/anything"), 404, "not_found")
    r = client.get("/v1/predict")
    error_of(r, 405, "method_not_allowed")
    assert "POST" in r.headers["Allow"]
    error_of(client.delete("/health"), 405, "method_not_allowed")


def test_body_over_the_size_limit_is_413(predictor):
    client = create_app({"PREDICTOR": predictor, "MAX_CONTENT_LENGTH": 4096}).test_client()
    big = encode(np.random.default_rng(1).integers(0, 255, (100, 100), dtype=np.uint8))
    assert len(big) > 4096
    error = error_of(client.post("/v1/predict", data=big, content_type="image/png"), 413, "payload_too_large")
    assert "4,096" in error["message"]
    error_of(client.post("/v1/predict", data=upload(big)), 413, "payload_too_large")
    assert client.post("/v1/predict", data=png_bytes(), content_type="image/png").status_code == 200


def test_pixel_limit_for_a_predictor_built_by_the_app(checkpoint):
    client = create_app({"CHECKPOINT": str(checkpoint), "MAX_PIXELS": 40 * 40}).test_client()
    error = error_of(client.post("/v1/predict", data=upload(png_bytes(48, 56))), 400, "bad_image")
    assert error["reason"] == "too_large"
    assert client.post("/v1/predict", data=upload(png_bytes(36, 40))).status_code == 200


@pytest.mark.parametrize("window_ms, method", [(0, "predict"), (2, "run_prepared")])   # batching off / on
def test_unexpected_errors_are_500_with_only_a_request_id(predictor, monkeypatch, caplog, window_ms, method):
    client = create_app({"PREDICTOR": predictor, "API_KEY": None, "BATCH_WINDOW_MS": window_ms}).test_client()

    def boom(*args, **kwargs):
        raise RuntimeError("secret internal detail")
    monkeypatch.setattr(predictor, method, boom)
    with caplog.at_level(logging.ERROR, logger="mediscan.api"):
        r = client.post("/v1/predict", data=upload(png_bytes()))
    error = error_of(r, 500, "internal_error")
    assert error["request_id"] in error["message"] and "secret" not in r.get_data(as_text=True)
    logged = [rec for rec in caplog.records if error["request_id"] in rec.getMessage()]
    assert logged and logged[0].exc_info and "secret internal detail" in caplog.text


# ----------------------------------------------------------------------------------------------- batch

def test_batch_returns_one_result_per_file_in_order(client):
    files = [(io.BytesIO(png_bytes()), "a.png"), (io.BytesIO(b"not an image"), "b.png"),
             (io.BytesIO(patient_dicom_bytes()), "c.dcm")]
    r = client.post("/v1/predict/batch", data={"files": files})
    assert r.status_code == 200
    body = r.get_json()
    assert body["count"] == 3 and body["failed"] == 1
    assert [item["filename"] for item in body["results"]] == ["a.png", "b.png", "c.dcm"]
    assert [item["status"] for item in body["results"]] == [200, 400, 200]
    _assert_prediction(body["results"][0]["prediction"], "a.png")
    assert body["results"][1]["error"]["code"] == "bad_image" and body["results"][1]["error"]["reason"] == "not_image"
    single = client.post("/v1/predict", data=upload(png_bytes(), "a.png")).get_json()
    assert body["results"][0]["prediction"]["probabilities"] == pytest.approx(single["probabilities"], abs=1e-5)


def test_batch_accepts_the_file_field_and_enforces_its_limit(predictor):
    client = create_app({"PREDICTOR": predictor, "MAX_BATCH_FILES": 2}).test_client()
    r = client.post("/v1/predict/batch", data={"file": [(io.BytesIO(png_bytes()), "x.png")]})
    assert r.status_code == 200 and r.get_json()["count"] == 1
    three = {"files": [(io.BytesIO(png_bytes()), f"{k}.png") for k in range(3)]}
    error = error_of(client.post("/v1/predict/batch", data=three), 413, "too_many_files")
    assert error["limit"] == 2
    error_of(client.post("/v1/predict/batch", data={"note": "x"}), 400, "no_file")
    error_of(client.post("/v1/predict/batch"), 400, "no_file")
    error_of(client.post("/v1/predict/batch", data=png_bytes(), content_type="image/png"), 415,
             "unsupported_media_type")


# ----------------------------------------------------------------------------------------------- security, ids, privacy

def test_api_key(predictor, monkeypatch):
    client = create_app({"PREDICTOR": predictor, "API_KEY": "s3cret"}).test_client()
    assert client.get("/health").status_code == 200                      # always open
    error_of(client.get("/v1/model"), 401, "unauthorized")
    error_of(client.get("/v1/model", headers={"X-API-Key": "s3cre"}), 401, "unauthorized")
    error_of(client.post("/v1/predict", data=upload(png_bytes())), 401, "unauthorized")
    error_of(client.get("/nowhere"), 401, "unauthorized")               # routes are not revealed either
    assert client.get("/v1/model", headers={"X-API-Key": "s3cret"}).status_code == 200
    ok = client.post("/v1/predict", data=upload(png_bytes()), headers={"X-API-Key": "s3cret"})
    assert ok.status_code == 200

    monkeypatch.setenv("MEDISCAN_API_KEY", "from-env")
    env_client = create_app({"PREDICTOR": predictor}).test_client()
    error_of(env_client.get("/v1/model"), 401, "unauthorized")
    assert env_client.get("/v1/model", headers={"X-API-Key": "from-env"}).status_code == 200
    monkeypatch.delenv("MEDISCAN_API_KEY")
    assert create_app({"PREDICTOR": predictor}).test_client().get("/v1/model").status_code == 200


def test_every_response_has_a_request_id(client):
    ids = {client.get(path).headers["X-Request-ID"] for path in ("/health", "/v1/model", "/missing")}
    assert len(ids) == 3 and all(ids)
    r = client.get("/health", headers={"X-Request-ID": "trace-42.a"})
    assert r.headers["X-Request-ID"] == "trace-42.a"
    r = client.get("/health", headers={"X-Request-ID": "bad id\twith <html>"})
    assert r.headers["X-Request-ID"] != "bad id\twith <html>" and len(r.headers["X-Request-ID"]) == 32


def test_uploads_never_touch_the_disk(client, monkeypatch):
    """A >500 kB multipart upload: Werkzeug would spool it to a temp file; ours stays in memory."""
    def no_disk(*args, **kwargs):
        raise AssertionError("an upload was written to a temporary file")
    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp", "SpooledTemporaryFile"):
        monkeypatch.setattr(tempfile, name, no_disk)
    import werkzeug.formparser
    monkeypatch.setattr(werkzeug.formparser, "SpooledTemporaryFile", no_disk, raising=False)
    monkeypatch.setattr(werkzeug.formparser, "TemporaryFile", no_disk, raising=False)
    big = encode(np.random.default_rng(2).integers(0, 255, (900, 900), dtype=np.uint8))
    assert len(big) > 600_000
    r = client.post("/v1/predict", data=upload(big, "big.png"))
    assert r.status_code == 200, r.get_json()


def test_logs_hold_no_file_names_or_patient_fields(client, caplog):
    with caplog.at_level(logging.DEBUG):
        r = client.post("/v1/predict", data=upload(patient_dicom_bytes(), "Doe_Jane_SECRET123.dcm"))
        client.post("/v1/predict", data=upload(b"garbage", "Doe_Jane.png"))
    assert r.status_code == 200, r.get_json()
    assert "/v1/predict" in caplog.text                                   # requests are logged ...
    for secret in ("Doe", "Jane", "SECRET123", "19700101"):              # ... but nothing about the patient
        assert secret not in caplog.text


# ----------------------------------------------------------------------------------------------- concurrency

def test_concurrent_requests_share_one_predictor(app, predictor):
    images = [encode(gray(label=k, seed=k)) for k in range(4)]
    expected = [predictor.predict(data).probabilities for data in images]
    answers: dict[int, object] = {}

    def call(k):
        path = "/v1/predict?explain=true" if k % 2 else "/v1/predict"     # heatmaps and plain predictions mixed
        answers[k] = app.test_client().post(path, data=images[k], content_type="image/png")
    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for k in range(4):
        assert answers[k].status_code == 200, answers[k].get_json()
        assert answers[k].get_json()["probabilities"] == pytest.approx(expected[k], abs=1e-4)


# ----------------------------------------------------------------------------------------------- serving

def test_serve_defaults_to_localhost_and_keeps_uploads_in_memory(predictor):
    from mediscan.apps.serve import app_config, get_args_parser, guard_of
    from mediscan.apps.server import waitress_settings
    args = get_args_parser().parse_args([])
    assert args.host == "127.0.0.1" and not args.dev and args.batch_window_ms > 0
    config = app_config(args)
    assert config["MAX_CONTENT_LENGTH"] == 20 * 2**20
    guard = guard_of(args, create_app({**config, "PREDICTOR": predictor, "API_KEY": "k"}))
    assert (guard.max_body, guard.api_key, guard.connection_limit) == (20 * 2**20, "k", 100)
    options = waitress_settings(guard, 8, "127.0.0.1", 5000, "x")
    assert options["max_request_body_size"] == guard.max_body + 1       # waitress refuses at >=
    assert options["inbuf_overflow"] > guard.max_body                    # nothing ever spills to a temp file
    assert options["outbuf_overflow"] > options["inbuf_overflow"]


@pytest.mark.parametrize("option", ["--threads=0", "--connection-limit=0", "--header-timeout=0", "--body-timeout=-1",
                                    "--batch-window-ms=-1", "--max-batch=0", "--max-content-mb=0"])
def test_serve_refuses_bad_options(option, capsys):
    from mediscan.apps import serve
    assert serve.main([option]) == 2
    assert option.split("=")[0] in capsys.readouterr().err


def test_dev_server_never_enables_the_debugger(tmp_path, monkeypatch, capsys):
    from flask import Flask

    from mediscan.apps import serve
    calls = []
    monkeypatch.setattr(Flask, "run", lambda self, **kwargs: calls.append(kwargs))
    assert serve.main(["--dev", "--port", "5999", "--checkpoint", str(tmp_path / "none.safetensors")]) == 0
    assert calls == [{"host": "127.0.0.1", "port": 5999, "debug": False, "use_reloader": False,
                      "use_debugger": False, "threaded": True}]
    out = capsys.readouterr().out
    assert "http://127.0.0.1:5999" in out and NOT_FOR_CLINICAL_USE in out and "503" in out


def _multipart(field: str, filename: str, data: bytes, content_type: str = "image/png") -> tuple[bytes, str]:
    boundary = "mediscan-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _wait_for_health(port: int, process: subprocess.Popen, timeout: float = 120.0) -> dict:
    # The server's piped output can only be read without blocking once it has exited.
    body = wait_for_http(f"http://127.0.0.1:{port}/health", process, timeout,
                         log=lambda: process.stdout.read() if process.poll() is not None else "")
    return json.loads(body)


def test_real_server_over_http(checkpoint):
    import psutil
    port = free_port()
    env = {**os.environ, "MEDISCAN_MODEL": str(checkpoint), "PYTHONUNBUFFERED": "1"}
    env.pop("MEDISCAN_API_KEY", None)
    process = subprocess.Popen([sys.executable, "app.py", "flask", "--port", str(port), "--threads", "2",
                                "--max-content-mb", "0.25"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        health = _wait_for_health(port, process)
        assert health["model_loaded"] is True and health["model"]["checkpoint"] == str(checkpoint)
        listening = [c.laddr for c in psutil.Process(process.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(addr.ip == "127.0.0.1" and addr.port == port for addr in listening)

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        body, content_type = _multipart("file", "over-http.png", png_bytes())
        conn.request("POST", "/v1/predict", body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        answer = json.loads(response.read())
        assert response.status == 200, answer
        assert response.getheader("X-Request-ID")
        _assert_prediction(answer, "over-http.png")

        conn.request("POST", "/v1/predict", body=b"\x89PNG\r\n\x1a\nbroken", headers={"Content-Type": "image/png"})
        response = conn.getresponse()
        assert response.status == 400 and json.loads(response.read())["error"]["code"] == "bad_image"

        conn.request("POST", "/v1/predict", body=b"\0" * 300_000, headers={"Content-Type": "image/png"})
        response = conn.getresponse()                                      # over the limit: JSON from the app
        assert response.status == 413 and json.loads(response.read())["error"]["code"] == "payload_too_large"
        conn.close()
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}" in output and NOT_FOR_CLINICAL_USE in output
    assert "over-http.png" not in output                                 # file names are not logged


# ----------------------------------------------------------------------------------------------- form limits, parsing

def test_too_many_file_parts_name_the_file_limit(client):
    """1,001 tiny file parts trip Werkzeug's 1,000-part form limit too; the answer must be the file limit."""
    parts = {"files": [(io.BytesIO(b"\x89PNG"), f"{k}.png") for k in range(1001)]}
    error = error_of(client.post("/v1/predict/batch", data=parts), 413, "too_many_files")
    assert error["limit"] == 16 and "16" in error["message"]
    error = error_of(client.post("/v1/predict", data={"file": [(io.BytesIO(b"x"), f"{k}.png") for k in range(20)]}),
                     400, "too_many_files")
    assert "/v1/predict/batch" in error["message"]


@pytest.mark.parametrize("form", [{"note": "x" * 600_000}, {f"field{k}": "v" for k in range(1001)}],
                         ids=["600-kB-text-field", "1001-text-fields"])
def test_form_limits_are_not_called_the_body_limit(client, form):
    """A body well under the 20 MB limit that breaks Flask's form limits (500 kB per text field, 1,000
    parts) is told so, not that it exceeded the body limit."""
    error = error_of(client.post("/v1/predict", data={"file": (io.BytesIO(png_bytes()), "a.png"), **form}),
                     413, "payload_too_large")
    assert "20 MB" not in error["message"] and "text field" in error["message"]
    assert "500,000" in error["message"] and "1,000" in error["message"]


def test_two_files_in_other_fields_are_too_many_not_none(client):
    data = {"a": (io.BytesIO(png_bytes()), "a.png"), "b": (io.BytesIO(png_bytes()), "b.png")}
    error_of(client.post("/v1/predict", data=data), 400, "too_many_files")
    assert client.post("/v1/predict", data={"a": (io.BytesIO(png_bytes()), "a.png")}).status_code == 200


@pytest.mark.parametrize("body, content_type", [
    (b"garbage", "multipart/form-data; boundary=xyz"),
    (b"garbage", "multipart/form-data"),                          # no boundary at all
])
def test_an_unparseable_multipart_body_is_bad_request(client, body, content_type):
    for path in ("/v1/predict", "/v1/predict/batch"):
        error = error_of(client.post(path, data=body, content_type=content_type), 400, "bad_request")
        assert "could not be parsed" in error["message"]


# ----------------------------------------------------------------------------------------------- memory per request

def test_a_batch_keeps_at_most_one_full_size_image_alive(predictor, monkeypatch):
    """The prediction-only path drops each decoded image's pixels once its model input is made: when the
    next file is decoded, no earlier full-size image may still be alive (eight 64-megapixel images would be
    8 x 256 MB). The answers stay exactly those of one image at a time."""
    import weakref

    import mediscan.inference.predictor as predictor_module
    real_read, alive, most = predictor_module.read_image, [], []

    def tracked_read(*args, **kwargs):
        most.append(sum(ref() is not None for ref in alive))      # earlier images still alive now
        decoded = real_read(*args, **kwargs)
        alive.append(weakref.ref(decoded.pixels))
        return decoded
    monkeypatch.setattr(predictor_module, "read_image", tracked_read)
    images = [encode(gray(label=k % 4, seed=k)) for k in range(8)]
    r = create_app({"PREDICTOR": predictor, "BATCH_WINDOW_MS": 0}).test_client().post(
        "/v1/predict/batch", data={"files": [(io.BytesIO(data), f"{k}.png") for k, data in enumerate(images)]})
    assert r.status_code == 200, r.get_json()
    assert most == [0] * 8
    monkeypatch.setattr(predictor_module, "read_image", real_read)
    expected = [without_timings(predictor.predict(data, name=f"{k}.png").to_dict()) for k, data in enumerate(images)]
    assert [without_timings(item["prediction"]) for item in r.get_json()["results"]] == expected


# ----------------------------------------------------------------------------------------------- startup errors

@pytest.mark.parametrize("key", ["clé", "two words", "tab\there", "ключ"])
def test_an_api_key_that_http_cannot_carry_is_refused_at_startup(key, monkeypatch, capsys):
    from mediscan.apps import serve
    monkeypatch.setenv("MEDISCAN_API_KEY", key)
    assert serve.main(["--checkpoint", "none.safetensors"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: MEDISCAN_API_KEY") and "ASCII" in err and "Traceback" not in err
    assert key not in err                                        # the secret itself is not echoed
    with pytest.raises(ValueError, match="ASCII"):
        create_app({"API_KEY": key, "CHECKPOINT": "none.safetensors"})


@pytest.mark.parametrize("options, expected", [
    (["--device", "bogus"], "--device 'bogus' is not a torch device"),
    (["--max-content-mb", "inf"], "--max-content-mb must be positive"),
    (["--max-content-mb", "nan"], "--max-content-mb must be positive"),
    (["--batch-window-ms", "inf"], "--batch-window-ms"),
])
def test_bad_startup_options_are_one_line_errors(checkpoint, options, expected):
    """In a real process: a one-line ``error:`` on stderr and exit 2, never a traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDISCAN_MODEL": str(checkpoint)}   # a model to load
    env.pop("MEDISCAN_API_KEY", None)
    done = subprocess.run([sys.executable, "app.py", "flask", "--port", str(free_port()), *options], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {expected}") and "Traceback" not in done.stderr, done.stderr


def test_cuda_without_a_gpu_is_a_one_line_error(monkeypatch, capsys):
    import torch

    from mediscan.apps import serve
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(serve, "make_server", lambda *a, **k: pytest.fail("the server started on a missing GPU"))
    assert serve.main(["--device", "cuda", "--checkpoint", "none.safetensors"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda: CUDA is not available") and "--device cpu" in err
