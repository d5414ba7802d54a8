"""MediScan HTTP API: a Flask app factory over the shared :class:`~mediscan.predictor.Predictor`.

Run it with ``python app.py flask`` (waitress, see :mod:`mediscan.serve`), or in tests::

    from mediscan.apps.api import create_app
    app = create_app({"PREDICTOR": predictor})        # or {"CHECKPOINT": "models/best.safetensors"}
    client = app.test_client()
    client.post("/v1/predict", data={"file": (open("chest.png", "rb"), "chest.png")})

Endpoints (documented in ``mediscan/openapi.json``, served at ``/openapi.json``):
``GET /health``, ``GET /v1/model``, ``POST /v1/predict`` (and its prototype alias ``POST /predict``),
``POST /v1/predict/batch``.

Contract kept by every response:

* Errors are JSON ``{"error": {"code", "message", "request_id", ...}}`` with the matching status --
  never an HTML page, never a traceback (unexpected errors are logged server-side with their
  traceback under the request id; the client only gets the id).
* Every response carries ``X-Request-ID`` (the client's own, when it sent a sane one).
* Uploads are processed in memory only: the request class below never spools file parts to a
  temporary file, and :mod:`mediscan.serve` tells waitress not to either. Nothing logged here
  contains image bytes, file names or DICOM fields -- only method, path, status and timing.

Config keys (``create_app(config)``; defaults in :data:`DEFAULTS`):

``CHECKPOINT``        checkpoint path; ``None`` = ``$MEDISCAN_MODEL``, else ``models/best.safetensors``.
``PREDICTOR``         an already-built :class:`Predictor` (tests); wins over ``CHECKPOINT``.
``DEVICE``            torch device for a Predictor built here (``None`` = CUDA if available, else CPU).
``MAX_PIXELS``        pixel limit per image for a Predictor built here (``None`` = the Predictor's default);
                      a small PNG can decode to a huge image, so this caps memory per request.
``MAX_CONTENT_LENGTH`` request body limit in bytes (20 MiB); larger requests get 413.
``MAX_BATCH_FILES``   most files in one ``/v1/predict/batch`` request (16).
``API_KEY``           when set (or ``$MEDISCAN_API_KEY``), every route but ``/health`` needs ``X-API-Key``.
``HEATMAP_GRID``      default side of the ``heatmap_grid`` returned with ``explain=true`` (16).

Concurrency: every request thread calls the one shared Predictor directly. Grouping concurrent requests
into one batched forward pass was measured (``bench/api_load.py``) on the project's 2-core CPU and left
out: 8 % less throughput than plain concurrent calls and 300-400 MB more server memory.
"""
from __future__ import annotations

import base64
import hmac
import io
import json
import logging
import math
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Request, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from mediscan import NOT_FOR_CLINICAL_USE, __version__
from mediscan.core.checkpoint import CheckpointError
from mediscan.core.imaging import ImageReadError
from mediscan.inference.predictor import TRAIN_COMMAND, ModelNotFoundError, Predictor, UnknownClassError

__all__ = ["DEFAULTS", "RAW_IMAGE_TYPES", "ApiError", "create_app", "openapi_spec"]

log = logging.getLogger("mediscan.api")

DEFAULTS: dict[str, Any] = {
    "CHECKPOINT": None,
    "PREDICTOR": None,
    "DEVICE": None,
    "MAX_PIXELS": None,
    "MAX_CONTENT_LENGTH": 20 * 1024 * 1024,
    "MAX_BATCH_FILES": 16,
    "API_KEY": None,
    "HEATMAP_GRID": 16,
}
ENV_API_KEY = "MEDISCAN_API_KEY"
#: Content types accepted for a raw (non-multipart) image body. The format itself is always sniffed from
#: the bytes, so a mislabelled PNG still works; these only keep out bodies that are clearly not images.
RAW_IMAGE_TYPES = frozenset({
    "image/png", "image/x-png", "image/jpeg", "image/jpg", "image/pjpeg", "image/tiff", "image/tif",
    "image/bmp", "image/x-bmp", "image/x-ms-bmp", "application/dicom", "image/dicom",
    "application/octet-stream",
})
_SUPPORTED_UPLOADS = ("multipart/form-data (field 'file') or a raw body typed image/png, image/jpeg, "
                      "image/tiff, image/bmp, application/dicom or application/octet-stream")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}
_MAX_GRID = 64
# Images per forward pass in /v1/predict/batch: on a CPU bigger batches gain little (about 15 % at 8 on
# 2 cores) and each extra image costs tens of MB of activations.
_BATCH_FORWARD = 8
_OPENAPI_PATH = Path(__file__).with_name("openapi.json")

bp = Blueprint("mediscan_api", __name__)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------

class ApiError(Exception):
    """An error answer: HTTP ``status``, machine-readable ``code``, user-facing ``message``, extra fields."""

    def __init__(self, status: int, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


def _image_error(error: ImageReadError) -> ApiError:
    return ApiError(400, "bad_image", str(error), reason=error.reason)


def _error_body(code: str, message: str, **extra: Any) -> dict:
    return {"error": {"code": code, "message": message, "request_id": _request_id(), **extra}}


def _error_response(status: int, code: str, message: str, headers=None, **extra: Any):
    response = jsonify(_error_body(code, message, **extra))
    response.status_code = status
    for name, value in headers or ():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


# Werkzeug's exception names -> our codes (anything else: its name in snake_case).
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 415: "unsupported_media_type"}


def _handle_api_error(error: ApiError):
    return _error_response(error.status, error.code, error.message, **error.extra)


def _handle_http_exception(error: HTTPException):
    """404, 405, 413 ... raised by Flask/Werkzeug itself, as JSON (keeps headers such as ``Allow``)."""
    status = error.code or 500
    if status < 400:                          # a routing redirect is not an error: answer it as it is
        return error.get_response()
    code = _HTTP_CODES.get(status) or re.sub(r"\W+", "_", (error.name or "error").lower()).strip("_")
    message = error.description or error.name or "HTTP error"
    if status == 413:
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        message = (f"The request is larger than this server's limit of {_megabytes(limit)}. "
                   f"Downscale or compress the image, or send fewer files per request.")
    elif status == 404:
        message = f"No such endpoint: {request.path}. See /openapi.json for the API."
    elif status == 405:
        message = f"{request.method} is not allowed on {request.path}."
    return _error_response(status, code, message, headers=error.get_headers())


def _handle_unexpected(error: Exception):
    """Anything else: log the traceback under the request id; the client gets only the id."""
    rid = _request_id()
    log.error("request %s: unexpected error", rid, exc_info=(type(error), error, error.__traceback__))
    return _error_response(500, "internal_error",
                           f"Internal error. Quote request id {rid} when reporting it; the details are "
                           f"in the server log.")


def _megabytes(limit: int | None) -> str:
    return "no limit" if not limit else f"{limit / (1024 * 1024):g} MB ({limit:,} bytes)"


# --------------------------------------------------------------------------------------------------
# In-memory uploads
# --------------------------------------------------------------------------------------------------

class InMemoryRequest(Request):
    """A request whose multipart file parts always live in memory.

    Werkzeug's default spools file parts over 500 kB to a temporary file on disk; medical images must
    never touch the disk, so every part goes to a ``BytesIO``. Memory stays bounded because the whole
    body is capped by ``MAX_CONTENT_LENGTH`` (checked before and while reading).
    """

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


# --------------------------------------------------------------------------------------------------
# Service state
# --------------------------------------------------------------------------------------------------

@dataclass
class Service:
    """What the routes share: the predictor, or why there is none."""

    predictor: Predictor | None
    load_error: str | None

    def require_predictor(self) -> Predictor:
        if self.predictor is None:
            raise ApiError(503, "model_not_loaded", self.load_error or "No model is loaded.",
                           train_command=TRAIN_COMMAND)
        return self.predictor


def _load_service(config) -> Service:
    """Build the Predictor once; a missing or broken checkpoint leaves the API up, answering 503."""
    predictor, error = config.get("PREDICTOR"), None
    if predictor is None:
        try:
            limit = {"max_pixels": int(config["MAX_PIXELS"])} if config.get("MAX_PIXELS") else {}
            predictor = Predictor(config.get("CHECKPOINT"), config.get("DEVICE"), **limit)
        except ModelNotFoundError as exc:
            error = f"No model is loaded. {exc} Then restart the server."
        except CheckpointError as exc:
            error = f"No model is loaded: the checkpoint cannot be used ({exc}). Then restart the server."
    if error:
        log.warning("%s", error)
    return Service(predictor, error)


def _service() -> Service:
    return current_app.extensions["mediscan"]


# --------------------------------------------------------------------------------------------------
# App factory
# --------------------------------------------------------------------------------------------------

def create_app(config: dict | None = None) -> Flask:
    """Build the Flask app. ``config`` overrides :data:`DEFAULTS` (see the module docstring for keys).

    The model is loaded here, once, and shared by all request threads. Without a usable checkpoint the
    app still starts: ``/health`` says ``"model_loaded": false`` and predictions answer 503.
    """
    app = Flask(__name__, static_folder=None)     # an API: no /static route
    app.request_class = InMemoryRequest
    app.config.update(DEFAULTS)
    app.config["API_KEY"] = os.environ.get(ENV_API_KEY) or None
    app.config.update(config or {})
    app.json.sort_keys = False               # keep answers in the documented, readable order
    app.extensions["mediscan"] = _load_service(app.config)
    app.register_blueprint(bp)
    app.before_request(_start_request)
    app.after_request(_finish_request)
    app.register_error_handler(ApiError, _handle_api_error)
    app.register_error_handler(HTTPException, _handle_http_exception)
    app.register_error_handler(Exception, _handle_unexpected)
    return app


def _request_id() -> str:
    rid = g.get("request_id")
    if rid is None:
        sent = request.headers.get("X-Request-ID", "")
        rid = g.request_id = sent if _REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex
    return rid


def _start_request():
    g.started = time.perf_counter()
    _request_id()
    key = current_app.config.get("API_KEY")
    if key and request.endpoint != "mediscan_api.health":
        sent = request.headers.get("X-API-Key", "")
        # compare_digest: the time taken does not reveal how much of the key was right
        if not hmac.compare_digest(sent.encode("utf-8", "surrogateescape"), str(key).encode("utf-8")):
            raise ApiError(401, "unauthorized", "Missing or wrong API key: send it in the X-API-Key header.")


def _finish_request(response):
    response.headers["X-Request-ID"] = _request_id()
    elapsed = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000.0
    # Method, path, status and time only: never file names, image bytes or DICOM fields.
    log.info("%s %s %s %d %.1fms", _request_id(), request.method, request.path, response.status_code, elapsed)
    return response


# --------------------------------------------------------------------------------------------------
# Request parsing
# --------------------------------------------------------------------------------------------------

def _flag(name: str, default: bool = False) -> bool:
    raw = request.args.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ApiError(400, "bad_parameter", f"Query parameter '{name}' must be true or false, not {raw[:40]!r}.")


def _number(name: str, default, low, high, kind=float):
    raw = request.args.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not low <= value <= high:
        raise ApiError(400, "bad_parameter", f"Query parameter '{name}' must be a number from {low} to {high}, "
                                             f"not {raw[:40]!r}.")
    return value


def _multipart_files(fields) -> list:
    """Uploaded files under ``fields`` (in order), skipping the empty part a form sends when no file was chosen."""
    try:
        files = request.files
    except ValueError as exc:               # a body that claims to be multipart but is not parseable
        raise ApiError(400, "bad_request", f"The multipart body could not be parsed ({exc}).") from None
    return [f for name in fields for f in files.getlist(name) if f.filename or _part_size(f)]


def _part_size(storage) -> int:
    stream = storage.stream
    return stream.getbuffer().nbytes if isinstance(stream, io.BytesIO) else 1


def _read_part(storage) -> tuple[bytes, str]:
    return storage.read(), storage.filename or "upload"


def _no_file(batch: bool = False) -> ApiError:
    how = "multipart/form-data with the images in repeated 'files' fields" if batch else _SUPPORTED_UPLOADS
    return ApiError(400, "no_file", f"No image was sent. Send {how}.")


def _single_upload() -> tuple[bytes, str]:
    """The one image of a predict request: multipart field ``file`` (or the only file), or the raw body."""
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        files = _multipart_files(("file",))
        if not files:                        # tolerate another field name when it is the only file
            others = _multipart_files(list(request.files.keys()))
            files = others if len(others) == 1 else []
        if not files:
            raise _no_file()
        if len(files) > 1:
            raise ApiError(400, "too_many_files", "This endpoint takes one image; use /v1/predict/batch for several.")
        return _read_part(files[0])
    if mimetype in RAW_IMAGE_TYPES:
        data = request.get_data(cache=False)
        if not data:
            raise _no_file()
        return data, request.args.get("name") or "upload"
    raise _not_an_upload()


def _not_an_upload(batch: bool = False) -> ApiError:
    """The error for a body that is neither multipart nor an accepted raw image type."""
    how = "multipart/form-data with the images in repeated 'files' fields" if batch else _SUPPORTED_UPLOADS
    if not _has_body():
        return _no_file(batch)
    if request.mimetype == "application/x-www-form-urlencoded":   # a form without a file, or curl --data-binary
        curl = ("-F files=@a.png -F files=@b.png" if batch
                else "-F file=@scan.png, or --data-binary @scan.png -H 'Content-Type: image/png'")
        return ApiError(400, "no_file", f"No image was sent (a form without a file). Send {how}; with curl: {curl}.")
    return ApiError(415, "unsupported_media_type",
                    f"Content type {request.mimetype or '(none)'!r} is not accepted here. Send {how}.")


def _has_body() -> bool:
    return bool(request.content_length) or "chunked" in request.headers.get("Transfer-Encoding", "").lower()


def _batch_uploads() -> list[tuple[bytes, str]]:
    """The files of a batch request (fields ``files`` and ``file``), at most ``MAX_BATCH_FILES``."""
    if request.mimetype != "multipart/form-data":
        raise _not_an_upload(batch=True)
    files = _multipart_files(("files", "file"))
    if not files:
        raise _no_file(batch=True)
    limit = int(current_app.config["MAX_BATCH_FILES"])
    if len(files) > limit:
        raise ApiError(413, "too_many_files", f"{len(files)} files sent; this server takes at most {limit} per "
                                              f"request. Split them over several requests.", limit=limit)
    return [_read_part(f) for f in files]


# --------------------------------------------------------------------------------------------------
# Routes
# --------------------------------------------------------------------------------------------------

@bp.get("/health")
def health():
    """Liveness, and which model (if any) is loaded. Always 200; open even when an API key is set."""
    service = _service()
    predictor = service.predictor
    model = None if predictor is None else {
        "checkpoint": str(predictor.checkpoint_path),
        "classes": list(predictor.classes),
        "input_size": predictor.input_size,
    }
    body = {"status": "ok", "model_loaded": predictor is not None, "model": model, "version": __version__}
    if predictor is None:
        body["model_error"] = service.load_error
    return jsonify(body)


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI 3 description of this API, with this server's limits filled in."""
    return jsonify(openapi_spec(current_app.config))


@bp.get("/v1/model")
def model_card():
    """The model card: classes, input size, weight source, metrics, version, not-for-clinical-use line."""
    return jsonify(_service().require_predictor().model_card())


@bp.post("/v1/predict")
@bp.post("/predict")       # the original prototype's URL: same handler, same answer
def predict():
    """Classify one image; ``?explain=true`` (or ``?class=NAME``) adds the Grad-CAM heatmap."""
    started = time.perf_counter()
    predictor = _service().require_predictor()
    class_name = request.args.get("class") or None
    explain = _flag("explain", default=class_name is not None)
    alpha = _number("alpha", 0.4, 0.0, 1.0)
    grid = _number("grid", int(current_app.config["HEATMAP_GRID"]), 1, _MAX_GRID, kind=int)
    faithful = _flag("faithfulness")
    if class_name is not None:
        _check_class(predictor, class_name)
    data, name = _single_upload()
    if explain:
        body = _explain(predictor, data, name, class_name, alpha, grid, faithful)
    else:
        body = _predict_one(predictor, data, name)
    body["timings_ms"]["request"] = round((time.perf_counter() - started) * 1000.0, 3)
    body["not_for_clinical_use"] = NOT_FOR_CLINICAL_USE
    return jsonify(body)


@bp.post("/v1/predict/batch")
def predict_batch():
    """Classify several images; one result or error object each, in order (200 even if some fail)."""
    predictor = _service().require_predictor()
    uploads = _batch_uploads()
    results = predictor.predict_many([data for data, _ in uploads], names=[name for _, name in uploads],
                                     batch_size=min(len(uploads), _BATCH_FORWARD))
    items = [_batch_item(index, name, result) for index, ((_, name), result) in enumerate(zip(uploads, results))]
    failed = sum(1 for item in items if item["status"] != 200)
    return jsonify({"count": len(items), "failed": failed, "results": items,
                    "not_for_clinical_use": NOT_FOR_CLINICAL_USE})


# --------------------------------------------------------------------------------------------------
# Route helpers
# --------------------------------------------------------------------------------------------------

def _check_class(predictor: Predictor, class_name: str) -> None:
    try:
        predictor.class_index(class_name)
    except UnknownClassError as exc:
        raise ApiError(422, "unknown_class", str(exc), valid_classes=list(predictor.classes)) from None


def _predict_one(predictor: Predictor, data: bytes, name: str) -> dict:
    try:
        return predictor.predict(data, name=name).to_dict()
    except ImageReadError as exc:
        raise _image_error(exc) from None


def _explain(predictor: Predictor, data: bytes, name: str, class_name: str | None, alpha: float,
             grid: int, faithful: bool) -> dict:
    try:
        explanation = predictor.explain(data, class_name, name=name, faithfulness=faithful)
    except ImageReadError as exc:
        raise _image_error(exc) from None
    except UnknownClassError as exc:         # checked already; kept so a race can never become a 500
        raise ApiError(422, "unknown_class", str(exc), valid_classes=list(predictor.classes)) from None
    details = explanation.to_dict(include_overlay=False, grid=grid)
    body = details.pop("prediction")
    details["heatmap_grid_size"] = grid
    details["overlay_alpha"] = alpha
    details["overlay_png_base64"] = _b64(explanation.overlay_png(alpha))
    body["explanation"] = details
    return body


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _batch_item(index: int, name: str, result) -> dict:
    if isinstance(result, ImageReadError):
        error = {"code": "bad_image", "reason": result.reason, "message": str(result)}
        return {"index": index, "filename": name, "status": 400, "error": error}
    return {"index": index, "filename": name, "status": 200, "prediction": result.to_dict()}


# --------------------------------------------------------------------------------------------------
# OpenAPI
# --------------------------------------------------------------------------------------------------

def openapi_spec(config=None) -> dict:
    """The OpenAPI document (``mediscan/openapi.json``) with the version and this server's limits."""
    spec = json.loads(_OPENAPI_PATH.read_text(encoding="utf-8"))
    spec["info"]["version"] = __version__
    if config is not None:
        limits = spec["info"].setdefault("x-limits", {})
        limits["max_content_length"] = config.get("MAX_CONTENT_LENGTH")
        limits["max_batch_files"] = config.get("MAX_BATCH_FILES")
        limits["api_key_required"] = bool(config.get("API_KEY"))
    return spec
