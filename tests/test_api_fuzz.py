"""Fuzzing the API: whatever arrives -- random bytes, odd content types and headers, cut-off PNG/JPEG files,
strange query strings and paths -- the answer is JSON and never a 500."""
from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mediscan.apps.api import RAW_IMAGE_TYPES, create_app
from mediscan.devtools.synthetic import pattern_image, write_tiny_checkpoint
from mediscan.inference.predictor import Predictor

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
EXPECTED = {200, 400, 401, 404, 405, 413, 415, 422}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny.safetensors")
    # A small body limit, so that the 413 path is fuzzed too.
    app = create_app({"PREDICTOR": Predictor(path, "cpu"), "MAX_CONTENT_LENGTH": 64 * 1024, "API_KEY": None})
    return app.test_client()


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pattern_image(1, 48, np.random.default_rng(3))).save(buf, fmt)
    return buf.getvalue()


PNG, JPEG = _encoded("PNG"), _encoded("JPEG")


def check(response) -> dict:
    """Never a 500, never HTML: a JSON object, an error object whenever the status says so."""
    assert response.status_code in EXPECTED, (response.status_code, response.get_data()[:300])
    assert response.is_json, response.get_data()[:300]
    body = response.get_json()
    assert isinstance(body, dict)
    if response.status_code >= 400:
        assert body["error"]["code"] and body["error"]["message"]
        assert body["error"]["request_id"] == response.headers["X-Request-ID"]
    return body


header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)
content_types = st.one_of(
    st.sampled_from(sorted(RAW_IMAGE_TYPES) + ["multipart/form-data", "multipart/form-data; boundary=x",
                                                "text/plain", "application/json", "image/gif", ""]),
    header_text,
)


@FUZZ
@given(body=st.binary(max_size=4096), content_type=content_types,
       path=st.sampled_from(["/v1/predict", "/predict", "/v1/predict/batch"]))
def test_random_bodies_with_any_content_type(client, body, content_type, path):
    check(client.post(path, data=body, headers={"Content-Type": content_type}))


@FUZZ
@given(data=st.data(), fmt=st.sampled_from(["png", "jpeg"]), multipart=st.booleans())
def test_truncated_images_are_400_not_500(client, data, fmt, multipart):
    original = PNG if fmt == "png" else JPEG
    cut = data.draw(st.integers(0, len(original) - 1), label="cut")
    truncated = original[:cut]
    if multipart:
        response = client.post("/v1/predict", data={"file": (io.BytesIO(truncated), f"cut.{fmt}")})
    else:
        response = client.post("/v1/predict", data=truncated, content_type=f"image/{fmt}")
    body = check(response)
    if response.status_code != 200:     # a JPEG cut near its end can still decode; anything else must be 400
        assert response.status_code == 400 and body["error"]["code"] in {"bad_image", "no_file"}


@FUZZ
@given(flip=st.lists(st.tuples(st.integers(0, len(PNG) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_corrupted_png_bytes(client, flip):
    damaged = bytearray(PNG)
    for position, value in flip:
        damaged[position] = value
    check(client.post("/v1/predict", data=bytes(damaged), content_type="image/png"))


@settings(FUZZ, max_examples=30)     # each example runs the model (often with a heatmap): fewer of them
@given(query=st.dictionaries(st.sampled_from(["explain", "class", "alpha", "grid", "faithfulness", "name", "x"]),
                             header_text, max_size=4),
       headers=st.dictionaries(st.sampled_from(["X-Request-ID", "X-API-Key", "Accept", "Content-Disposition",
                                                "Transfer-Encoding", "X-Filename"]), header_text, max_size=3))
def test_random_query_strings_and_headers(client, query, headers):
    headers = {k: v for k, v in headers.items() if not (k == "Transfer-Encoding" and v.strip())}
    check(client.post("/v1/predict", query_string=query, headers=headers,
                      data={"file": (io.BytesIO(PNG), "q.png")}))


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
       path=st.one_of(st.sampled_from(["/health", "/v1/model", "/openapi.json", "/v1/predict", "/predict",
                                       "/v1/predict/batch", "/", "/v1", "/static/x"]),
                      st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=30).map(lambda s: "/" + s)))
def test_any_method_and_path(client, method, path):
    check(client.open(path, method=method))


@FUZZ
@given(parts=st.lists(st.tuples(st.sampled_from(["files", "file", "other"]), st.binary(max_size=512),
                                st.text(max_size=20)), max_size=20))
def test_batch_with_random_parts(client, parts):
    form = {}
    for field, payload, name in parts:
        form.setdefault(field, []).append((io.BytesIO(payload), name))
    body = check(client.post("/v1/predict/batch", data=form, content_type="multipart/form-data"))
    if "results" in body:
        assert [item["index"] for item in body["results"]] == list(range(body["count"]))


# ----------------------------------------------------------------------------------------------- the contract
# schemathesis against the live server (``python app.py flask``), every check on, bounded examples.

import schemathesis  # noqa: E402  (kept with the tests that use it)
from hypothesis import Phase  # noqa: E402

from test_api_server import real_server  # noqa: E402

CONTRACT_EXAMPLES = 20           # per operation (x 5 operations)
#: One check is configured, none turned off: a batch over the schema's ``maxItems`` (the server's
#: MAX_BATCH_FILES) is refused with 413 ``too_many_files``, as the API documents, so 413 counts as a
#: rejection of invalid data next to schemathesis' default list.
CONTRACT_CONFIG = schemathesis.config.SchemathesisConfig.from_dict({"checks": {"negative_data_rejection": {
    "expected-statuses": ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429",
                          "5XX"]}}})


@st.composite
def _radiograph(draw, formats=("PNG", "JPEG", "BMP", "TIFF")) -> bytes:
    """What the API's binary fields mean: a decodable grayscale image, each side >= 32 px."""
    fmt = draw(st.sampled_from(formats))
    side = draw(st.integers(32, 72))
    image = pattern_image(draw(st.integers(0, 3)), side, np.random.default_rng(draw(st.integers(0, 2**16))))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt)
    return buf.getvalue()


def _register_image_strategies() -> None:
    """JSON Schema cannot say "a decodable image of at least 32 x 32 pixels" (the schema says it in words),
    so schemathesis is taught what a schema-valid image is; without this its 1 x 1 PNG sample would be
    reported as a valid request the server rejects (it answers 400 too_small, as documented)."""
    schemathesis.openapi.format("binary", _radiograph())
    for media_type, formats in (("image/png", ("PNG",)), ("image/jpeg", ("JPEG",)), ("image/tiff", ("TIFF",)),
                                ("image/bmp", ("BMP",)), ("application/dicom", ("PNG",)),
                                ("application/octet-stream", ("PNG", "JPEG"))):
        schemathesis.openapi.media_type(media_type, _radiograph(formats))


_register_image_strategies()


@pytest.fixture(scope="module")
def live_schema(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("contract") / "tiny.safetensors")
    with real_server(path, "--max-content-mb", "1", "--threads", "2") as server:
        yield schemathesis.openapi.from_url(f"http://127.0.0.1:{server.port}/openapi.json", config=CONTRACT_CONFIG)


contract = schemathesis.pytest.from_fixture("live_schema")


@contract.parametrize()
@settings(max_examples=CONTRACT_EXAMPLES, deadline=None, derandomize=True,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_the_server_keeps_its_openapi_contract(case):
    """Every check schemathesis has, none turned off: no 5xx, documented statuses and content types,
    answers that match their schemas, schema-valid requests accepted, invalid ones rejected."""
    case.call_and_validate(timeout=60)
