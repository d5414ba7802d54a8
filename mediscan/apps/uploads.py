"""Reading a request: the uploaded image(s), in memory only, and the query parameters.

Uploads are processed in memory only: :class:`InMemoryRequest` never spools file parts to a temporary
file, and :mod:`mediscan.apps.server` keeps request bodies in memory too. Memory stays bounded because
the whole body is capped (``MAX_CONTENT_LENGTH``, checked by the server before the body is read).
"""
from __future__ import annotations

import io
import math

from flask import Request, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from mediscan.apps.errors import ApiError

__all__ = ["RAW_IMAGE_TYPES", "InMemoryRequest", "batch_uploads", "flag", "number", "single_upload"]

#: Content types accepted for a raw (non-multipart) image body. The format itself is always sniffed from
#: the bytes, so a mislabelled PNG still works; these only keep out bodies that are clearly not images.
RAW_IMAGE_TYPES = frozenset({
    "image/png", "image/x-png", "image/jpeg", "image/jpg", "image/pjpeg", "image/tiff", "image/tif",
    "image/bmp", "image/x-bmp", "image/x-ms-bmp", "application/dicom", "image/dicom",
    "application/octet-stream",
})
_SUPPORTED_UPLOADS = ("multipart/form-data (field 'file') or a raw body typed image/png, image/jpeg, "
                      "image/tiff, image/bmp, application/dicom or application/octet-stream")
_BATCH_UPLOADS = "multipart/form-data with the images in repeated 'files' fields"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


class TooManyFileParts(Exception):
    """Raised while parsing a multipart body, as soon as it holds more file parts than the server takes."""

    def __init__(self, limit: int):
        super().__init__(f"more than {limit} file parts")
        self.limit = limit


class InMemoryRequest(Request):
    """A request whose multipart file parts always live in memory, and whose body is parsed strictly.

    Werkzeug's default spools file parts over 500 kB to a temporary file on disk; medical images must
    never touch the disk, so every part goes to a ``BytesIO``. Werkzeug's parser also swallows a body it
    cannot parse (it looks like a form without files); ours raises, so that the client hears why. File
    parts are counted as they arrive and parsing stops past ``MAX_BATCH_FILES`` (:class:`TooManyFileParts`),
    so that the answer names the file limit rather than Werkzeug's general form limits.
    """

    _file_parts = 0

    def make_form_data_parser(self):
        parser = super().make_form_data_parser()
        parser.silent = False                # ValueError for an unparseable body, not an empty form
        return parser

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        self._file_parts += 1
        limit = int(current_app.config["MAX_BATCH_FILES"])
        if self._file_parts > limit:
            raise TooManyFileParts(limit)
        return io.BytesIO()


# ----------------------------------------------------------------------------------------------- query

def flag(name: str, default: bool = False) -> bool:
    """Boolean query parameter ``name`` (true/false, 1/0, yes/no, on/off); 400 for anything else."""
    raw = request.args.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ApiError(400, "bad_parameter", f"Query parameter '{name}' must be true or false, not {raw[:40]!r}.")


def number(name: str, default, low, high, kind=float):
    """Numeric query parameter ``name`` in ``[low, high]`` (finite); 400 for anything else."""
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


# ----------------------------------------------------------------------------------------------- bodies

def _multipart_files(fields, batch: bool = False) -> list:
    """Uploaded files under ``fields`` (in order), skipping the empty part a form sends when no file was chosen."""
    if not _has_body():
        raise _no_file(batch)
    try:
        files = request.files
    except ValueError as exc:               # a body that claims to be multipart but is not parseable
        raise ApiError(400, "bad_request", f"The multipart body could not be parsed ({exc}). Send "
                                           f"{_BATCH_UPLOADS if batch else _SUPPORTED_UPLOADS}.") from None
    except TooManyFileParts as exc:
        raise _too_many_files(batch, exc.limit) from None
    except RequestEntityTooLarge:
        if not _within_body_limit():        # the body limit itself: the generic 413 says so
            raise
        raise ApiError(413, "payload_too_large", _form_limits_message()) from None  # Werkzeug's form limits
    return [f for name in fields for f in files.getlist(name) if f.filename or _part_size(f)]


def _too_many_files(batch: bool, limit: int = 1, sent: int | None = None) -> ApiError:
    """400 (one-image endpoint) or 413 with ``limit`` (batch endpoint); ``sent=None``: parsing stopped early."""
    if not batch:
        return ApiError(400, "too_many_files", "This endpoint takes one image (field 'file'); "
                                               "use /v1/predict/batch for several.")
    count = f"More than {limit}" if sent is None else f"{sent}"
    return ApiError(413, "too_many_files", f"{count} files sent; this server takes at most {limit} per request. "
                                           f"Split them over several requests.", limit=limit)


def _within_body_limit() -> bool:
    limit, length = current_app.config.get("MAX_CONTENT_LENGTH"), request.content_length
    return length is not None and (not limit or length <= limit)


def _form_limits_message() -> str:
    fields, parts = current_app.config["MAX_FORM_MEMORY_SIZE"], current_app.config["MAX_FORM_PARTS"]
    return (f"The form has a text field over {fields:,} bytes or more than {parts:,} parts. Send each image as "
            f"a file part (with a file name) and leave out other form fields.")


def _part_size(storage) -> int:
    stream = storage.stream
    return stream.getbuffer().nbytes if isinstance(stream, io.BytesIO) else 1


def _read_part(storage) -> tuple[bytes, str]:
    return storage.read(), storage.filename or "upload"


def _no_file(batch: bool = False) -> ApiError:
    return ApiError(400, "no_file", f"No image was sent. Send {_BATCH_UPLOADS if batch else _SUPPORTED_UPLOADS}.")


def single_upload() -> tuple[bytes, str]:
    """The one image of a predict request: multipart field ``file`` (or the only file), or the raw body."""
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        files = _multipart_files(("file",))
        if not files:                        # tolerate another field name when it is the only file
            files = _multipart_files(list(request.files.keys()))
        if not files:
            raise _no_file()
        if len(files) > 1:
            raise _too_many_files(batch=False)
        return _read_part(files[0])
    if mimetype in RAW_IMAGE_TYPES:
        data = request.get_data(cache=False)
        if not data:
            raise _no_file()
        return data, request.args.get("name") or "upload"
    raise _not_an_upload()


def _not_an_upload(batch: bool = False) -> ApiError:
    """The error for a body that is neither multipart nor an accepted raw image type."""
    how = _BATCH_UPLOADS if batch else _SUPPORTED_UPLOADS
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


def batch_uploads() -> list[tuple[bytes, str]]:
    """The files of a batch request (fields ``files`` and ``file``), at most ``MAX_BATCH_FILES``."""
    if request.mimetype != "multipart/form-data":
        raise _not_an_upload(batch=True)
    files = _multipart_files(("files", "file"), batch=True)
    if not files:
        raise _no_file(batch=True)
    limit = int(current_app.config["MAX_BATCH_FILES"])
    if len(files) > limit:
        raise _too_many_files(True, limit, len(files))
    return [_read_part(f) for f in files]
