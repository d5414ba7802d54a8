"""The API's error answers: one JSON shape for every status, from Flask and from the server layer alike.

Every error is ``{"error": {"code", "message", "request_id", ...}}`` with the matching HTTP status --
never an HTML page, never a traceback. The Flask handlers here cover what the app raises; the server
layer (:mod:`mediscan.apps.server`) builds the same body with :func:`error_document` for what it refuses
before the app runs (over-size bodies, a missing API key, slow clients, malformed HTTP).
"""
from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any

from flask import current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from mediscan.core.imaging import ImageReadError

__all__ = ["ApiError", "error_document", "image_error", "register_error_handlers", "request_id",
           "too_large_message", "unauthorized_message", "valid_request_id"]

log = logging.getLogger("mediscan.api")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Werkzeug's exception names -> our codes (anything else: its name in snake_case).
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               408: "request_timeout", 413: "payload_too_large", 415: "unsupported_media_type",
               431: "headers_too_large", 501: "not_implemented"}


class ApiError(Exception):
    """An error answer: HTTP ``status``, machine-readable ``code``, user-facing ``message``, extra fields."""

    def __init__(self, status: int, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


def image_error(error: ImageReadError) -> ApiError:
    """A decoding failure as a 400 ``bad_image`` answer that keeps the reader's reason."""
    return ApiError(400, "bad_image", str(error), reason=error.reason)


def valid_request_id(sent: str | None) -> str:
    """The client's ``X-Request-ID`` when it is sane (short, no spaces or markup), else a fresh one."""
    return sent if sent and _REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex


def request_id() -> str:
    """This Flask request's id (computed once, then kept on ``g``)."""
    rid = g.get("request_id")
    if rid is None:
        rid = g.request_id = valid_request_id(request.headers.get("X-Request-ID", ""))
    return rid


def error_document(code: str, message: str, rid: str, **extra: Any) -> bytes:
    """The JSON bytes of an error answer (what the server layer sends without Flask)."""
    return json.dumps({"error": {"code": code, "message": message, "request_id": rid, **extra}}).encode()


def megabytes(limit: int | None) -> str:
    """A byte limit for people: ``20 MB (20,971,520 bytes)``."""
    return "no limit" if not limit else f"{limit / (1024 * 1024):g} MB ({limit:,} bytes)"


def too_large_message(limit: int | None) -> str:
    """The 413 message, the same from the app and from the server layer."""
    return (f"The request is larger than this server's limit of {megabytes(limit)}. "
            f"Downscale or compress the image, or send fewer files per request.")


def unauthorized_message() -> str:
    return "Missing or wrong API key: send it in the X-API-Key header."


def _error_response(status: int, code: str, message: str, headers=None, **extra: Any):
    response = jsonify({"error": {"code": code, "message": message, "request_id": request_id(), **extra}})
    response.status_code = status
    for name, value in headers or ():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


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
        message = too_large_message(current_app.config.get("MAX_CONTENT_LENGTH"))
    elif status == 404:
        message = f"No such endpoint: {request.path}. See /openapi.json for the API."
    elif status == 405:
        message = f"{request.method} is not allowed on {request.path}."
    return _error_response(status, code, message, headers=error.get_headers())


def _handle_unexpected(error: Exception):
    """Anything else: log the traceback under the request id; the client gets only the id."""
    rid = request_id()
    log.error("request %s: unexpected error", rid, exc_info=(type(error), error, error.__traceback__))
    return _error_response(500, "internal_error",
                           f"Internal error. Quote request id {rid} when reporting it; the details are "
                           f"in the server log.")


def register_error_handlers(app) -> None:
    """Make every error the app raises a JSON answer."""
    app.register_error_handler(ApiError, _handle_api_error)
    app.register_error_handler(HTTPException, _handle_http_exception)
    app.register_error_handler(Exception, _handle_unexpected)
