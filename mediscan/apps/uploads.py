"""Reading a request: the uploaded image(s), in memory only, and the query parameters.

Uploads are processed in memory only: :class:`InMemoryRequest` never spools file parts to a temporary
file, and :mod:`mediscan.apps.server` keeps request bodies in memory too. Memory stays bounded because
the whole body is capped (``MAX_CONTENT_LENGTH``, checked by the server before the body is read).
"""
from __future__ import annotations

import io
import math

from flask import Request, current_app, request

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


class InMemoryRequest(Request):
    """A request whose multipart file parts always live in memory.

    Werkzeug's default spools file parts over 500 kB to a temporary file on disk; medical images must
    never touch the disk, so every part goes to a ``BytesIO``.
    """

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
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
    return ApiError(400, "no_file", f"No image was sent. Send {_BATCH_UPLOADS if batch else _SUPPORTED_UPLOADS}.")


def single_upload() -> tuple[bytes, str]:
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
    files = _multipart_files(("files", "file"))
    if not files:
        raise _no_file(batch=True)
    limit = int(current_app.config["MAX_BATCH_FILES"])
    if len(files) > limit:
        raise ApiError(413, "too_many_files", f"{len(files)} files sent; this server takes at most {limit} per "
                                              f"request. Split them over several requests.", limit=limit)
    return [_read_part(f) for f in files]
