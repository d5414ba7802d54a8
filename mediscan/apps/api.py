"""MediScan HTTP API: a Flask app factory over the shared :class:`~mediscan.inference.predictor.Predictor`.

Run it with ``python app.py flask`` (waitress behind the guards of :mod:`mediscan.apps.server`, see
:mod:`mediscan.apps.serve`), or in tests::

    from mediscan.apps.api import create_app
    app = create_app({"PREDICTOR": predictor})        # or {"CHECKPOINT": "models/best.safetensors"}
    client = app.test_client()
    client.post("/v1/predict", data={"file": (open("chest.png", "rb"), "chest.png")})

Endpoints (documented in ``mediscan/apps/openapi.json``, served at ``/openapi.json``):
``GET /health``, ``GET /v1/model``, ``POST /v1/predict`` (and its prototype alias ``POST /predict``),
``POST /v1/predict/batch``.

Contract kept by every response:

* Errors are JSON ``{"error": {"code", "message", "request_id", ...}}`` with the matching status
  (:mod:`mediscan.apps.errors`) -- never an HTML page, never a traceback.
* Every response carries ``X-Request-ID`` (the client's own, when it sent a sane one).
* Uploads are processed in memory only (:mod:`mediscan.apps.uploads`). Nothing logged here contains
  image bytes, file names or DICOM fields -- only method, path, status and timing.

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
``BATCH_WINDOW_MS``   adaptive batching of concurrent ``/v1/predict`` calls without a heatmap
                      (:mod:`mediscan.apps.batching`): how long a request waits for others; 0 = off.
``MAX_BATCH``         most images per shared forward pass (``None`` = the Predictor's batch size).
``BATCH_WORKERS``     shared forward passes that may run at once (2: one is collected while the other runs).
"""
from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, current_app, g, jsonify, request

from mediscan import NOT_FOR_CLINICAL_USE, __version__
from mediscan.apps.batching import Batcher
from mediscan.apps.errors import ApiError, image_error, register_error_handlers, request_id, unauthorized_message
from mediscan.apps.uploads import RAW_IMAGE_TYPES, InMemoryRequest, batch_uploads, flag, number, single_upload
from mediscan.core.checkpoint import CheckpointError
from mediscan.core.imaging import ImageReadError
from mediscan.inference.predictor import TRAIN_COMMAND, ModelNotFoundError, Predictor, UnknownClassError

__all__ = ["DEFAULTS", "ENV_API_KEY", "RAW_IMAGE_TYPES", "ApiError", "api_key_problem", "create_app", "key_matches",
           "openapi_spec"]

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
    "BATCH_WINDOW_MS": 2.0,
    "MAX_BATCH": None,
    "BATCH_WORKERS": 2,
}
ENV_API_KEY = "MEDISCAN_API_KEY"
_MAX_GRID = 64
# Images per forward pass in /v1/predict/batch: on a CPU bigger batches gain little (about 15 % at 8 on
# 2 cores) and each extra image costs tens of MB of activations.
_BATCH_FORWARD = 8
_OPENAPI_PATH = Path(__file__).with_name("openapi.json")

bp = Blueprint("mediscan_api", __name__)


# --------------------------------------------------------------------------------------------------
# Service state
# --------------------------------------------------------------------------------------------------

@dataclass
class Service:
    """What the routes share: the predictor (or why there is none) and the batcher (``None`` = off)."""

    predictor: Predictor | None
    load_error: str | None
    batcher: Batcher | None = None

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
    window = float(config.get("BATCH_WINDOW_MS") or 0)
    batcher = (Batcher(predictor, window, config.get("MAX_BATCH"), workers=int(config.get("BATCH_WORKERS") or 2))
               if predictor is not None and window > 0 else None)
    return Service(predictor, error, batcher)


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
    problem = api_key_problem(app.config["API_KEY"])
    if problem:                              # a key that can never match would lock every client out
        raise ValueError(problem)
    app.json.sort_keys = False               # keep answers in the documented, readable order
    app.extensions["mediscan"] = _load_service(app.config)
    app.register_blueprint(bp)
    app.before_request(_start_request)
    app.after_request(_finish_request)
    register_error_handlers(app)
    return app


def api_key_problem(key: str | None) -> str | None:
    """Why ``key`` cannot be an API key, or ``None``. Keys must be visible ASCII (``!`` to ``~``): HTTP
    carries header values as bytes that servers decode as latin-1, so a non-ASCII key (``clé``) reaches the
    app differently from how it was configured and could never match, and surrounding or inner blanks are
    trimmed or mangled by clients and proxies."""
    if key and not all("!" <= c <= "~" for c in key):
        return (f"{ENV_API_KEY} must be printable ASCII with no spaces or accents (characters ! to ~): HTTP "
                f"headers carry only those reliably. Choose another key, e.g. the output of "
                f"python -c 'import secrets; print(secrets.token_urlsafe(32))'.")
    return None


def key_matches(sent: str | None, key: str) -> bool:
    """Whether ``sent`` is the API key, in time that does not reveal how much of it was right."""
    return hmac.compare_digest((sent or "").encode("utf-8", "surrogateescape"), str(key).encode("utf-8"))


def _start_request():
    g.started = time.perf_counter()
    request_id()
    key = current_app.config.get("API_KEY")
    if key and request.endpoint != "mediscan_api.health" and not key_matches(request.headers.get("X-API-Key"), key):
        raise ApiError(401, "unauthorized", unauthorized_message())


def _finish_request(response):
    response.headers["X-Request-ID"] = request_id()
    if g.get("batch_size"):
        response.headers["X-Batch-Size"] = str(g.batch_size)
    elapsed = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000.0
    # Method, path, status and time only: never file names, image bytes or DICOM fields.
    log.info("%s %s %s %d %.1fms", request_id(), request.method, request.path, response.status_code, elapsed)
    return response


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
    predictor = _service().predictor
    return jsonify(openapi_spec(current_app.config, None if predictor is None else predictor.classes))


@bp.get("/v1/model")
def model_card():
    """The model card: classes, input size, weight source, metrics, version, not-for-clinical-use line."""
    return jsonify(_service().require_predictor().model_card())


@bp.post("/v1/predict")
@bp.post("/predict")       # the original prototype's URL: same handler, same answer
def predict():
    """Classify one image; ``?explain=true`` (or ``?class=NAME``) adds the Grad-CAM heatmap."""
    started = time.perf_counter()
    service = _service()
    predictor = service.require_predictor()
    class_name = request.args.get("class") or None
    explain = flag("explain", default=class_name is not None)
    alpha = number("alpha", 0.4, 0.0, 1.0)
    grid = number("grid", int(current_app.config["HEATMAP_GRID"]), 1, _MAX_GRID, kind=int)
    faithful = flag("faithfulness")
    if class_name is not None:
        _check_class(predictor, class_name)
    data, name = single_upload()
    if explain:
        body = _explain(predictor, data, name, class_name, alpha, grid, faithful)
    else:
        body = _predict_one(service, data, name)
    body["timings_ms"]["request"] = round((time.perf_counter() - started) * 1000.0, 3)
    body["not_for_clinical_use"] = NOT_FOR_CLINICAL_USE
    return jsonify(body)


@bp.post("/v1/predict/batch")
def predict_batch():
    """Classify several images; one result or error object each, in order (200 even if some fail)."""
    predictor = _service().require_predictor()
    uploads = batch_uploads()
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


def _predict_one(service: Service, data: bytes, name: str) -> dict:
    """One prediction: through the batcher when batching is on (sharing a forward pass), else directly."""
    try:
        if service.batcher is None:
            return service.predictor.predict(data, name=name).to_dict()
        prediction, g.batch_size = service.batcher.predict(data, name)
        return prediction.to_dict()
    except ImageReadError as exc:
        raise image_error(exc) from None


def _explain(predictor: Predictor, data: bytes, name: str, class_name: str | None, alpha: float,
             grid: int, faithful: bool) -> dict:
    try:
        explanation = predictor.explain(data, class_name, name=name, faithfulness=faithful)
    except ImageReadError as exc:
        raise image_error(exc) from None
    except UnknownClassError as exc:         # checked already; kept so a race can never become a 500
        raise ApiError(422, "unknown_class", str(exc), valid_classes=list(predictor.classes)) from None
    details = explanation.to_dict(include_overlay=False, grid=grid)
    body = details.pop("prediction")
    details["heatmap_grid_size"] = grid
    details["overlay_alpha"] = alpha
    if explanation.has_pixels:
        details["overlay_png_base64"] = base64.b64encode(explanation.overlay_png(alpha)).decode("ascii")
    body["explanation"] = details
    return body


def _batch_item(index: int, name: str, result) -> dict:
    if isinstance(result, ImageReadError):
        error = {"code": "bad_image", "reason": result.reason, "message": str(result)}
        return {"index": index, "filename": name, "status": 400, "error": error}
    return {"index": index, "filename": name, "status": 200, "prediction": result.to_dict()}


# --------------------------------------------------------------------------------------------------
# OpenAPI
# --------------------------------------------------------------------------------------------------

def openapi_spec(config=None, classes=None) -> dict:
    """The OpenAPI document (``mediscan/apps/openapi.json``) with the version, this server's limits and,
    when a model is loaded, its class names as the values ``class`` may take."""
    spec = json.loads(_OPENAPI_PATH.read_text(encoding="utf-8"))
    spec["info"]["version"] = __version__
    if config is not None:
        limits = spec["info"].setdefault("x-limits", {})
        limits["max_content_length"] = config.get("MAX_CONTENT_LENGTH")
        limits["max_batch_files"] = config.get("MAX_BATCH_FILES")
        limits["api_key_required"] = bool(config.get("API_KEY"))
        if config.get("MAX_BATCH_FILES"):       # the schema states the limit the server enforces (413 above it)
            files = spec["components"]["requestBodies"]["Images"]["content"]["multipart/form-data"]["schema"]
            files["properties"]["files"]["maxItems"] = int(config["MAX_BATCH_FILES"])
    if classes:
        spec["components"]["parameters"]["class"]["schema"]["enum"] = list(classes)
    return spec
