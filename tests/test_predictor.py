"""Predictor: every input format and every bad input through the one inference path, calibration,
verdicts, the out-of-scope wiring, batching and thread safety.

A tiny random-initialised checkpoint (64 px input) is built once per module; images are written here.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mediscan.core.checkpoint import CheckpointError
from mediscan.core.imaging import ImageReadError, read_image
from mediscan.core.preprocessing import preprocess
from mediscan.core.verdicts import verdict
from mediscan.devtools import synthetic
from mediscan.devtools.synthetic import detector_around, tiny_model, write_tiny_checkpoint
from mediscan.inference.predictor import (
    DEFAULT_CHECKPOINT,
    ENV_CHECKPOINT,
    TRAIN_COMMAND,
    Explanation,
    ModelNotFoundError,
    Prediction,
    Predictor,
    UnknownClassError,
    resolve_checkpoint_path,
)

CLASSES = ["bone", "brain", "heart", "lungs"]
SIZE = 64
H, W = 72, 96          # non-square on purpose: heatmaps must come back at the original size
TEMPERATURE = 2.0


# --------------------------------------------------------------------------------------------------
# synthetic images
# --------------------------------------------------------------------------------------------------

def xray_like(height: int = H, width: int = W, seed: int = 0) -> np.ndarray:
    """(H, W) float in [0, 1]: a bright blob on a dark background with a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx = height * rng.uniform(0.35, 0.65), width * rng.uniform(0.35, 0.65)
    blob = np.exp(-(((yy - cy) / (0.3 * height)) ** 2 + ((xx - cx) / (0.25 * width)) ** 2))
    return np.clip(0.1 + 0.8 * blob + rng.normal(0, 0.03, blob.shape), 0, 1).astype(np.float32)


def to_u8(image01: np.ndarray) -> np.ndarray:
    return np.round(image01 * 255).astype(np.uint8)


def to_u16(image01: np.ndarray, top: int = 4095) -> np.ndarray:
    """12-bit data stored in 16 bits, as detectors write it."""
    return np.round(image01 * top).astype(np.uint16)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


#: A minimal uncompressed 16-bit DICOM (``pixels`` (frames, H, W) or (H, W); None = no pixel data), with a
#: patient name that must never reach a result.
dicom_bytes = functools.partial(synthetic.dicom_bytes, patient_name="Test^Patient")


def jpeg_with_exif_orientation(upright01: np.ndarray) -> bytes:
    """Stored rotated 90 degrees counter-clockwise with EXIF orientation 6 ("rotate 90 CW to view")."""
    stored = Image.fromarray(to_u8(np.rot90(upright01, 1)))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=98, exif=exif)


def palette_png(image01: np.ndarray) -> bytes:
    im = Image.fromarray(to_u8(image01), "P")
    im.putpalette([v for i in range(256) for v in (i, i, i)])
    return encode(im, "PNG")


# --------------------------------------------------------------------------------------------------
# the tiny checkpoint
# --------------------------------------------------------------------------------------------------

def build_tiny_model():
    """Random DenseNet121 whose head favours 'bone' (bias) but still depends on the image (small weights)."""
    model = tiny_model(CLASSES, seed=0)
    with torch.no_grad():
        model.head.fc.weight.mul_(0.05)
        model.head.fc.bias.copy_(torch.tensor([4.0, 0.0, -1.0, -2.0]))
    return model


def fit_detector_on(model, images01: list[np.ndarray]):
    """OOD statistics around the features of ``images01`` (image k = class k), jittered copies."""
    batch = torch.stack([preprocess(image, SIZE)[0] for image in images01])
    return detector_around(model, batch)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """``with_ood`` (temperature 2, OOD fitted around four reference images) and ``plain`` (T=1, no OOD)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    model = build_tiny_model()
    detector = fit_detector_on(model, [xray_like(seed=k) for k in range(4)])
    metrics = {"val": {"n": 8, "accuracy": 0.75, "ece": 0.2, "ece_calibrated": 0.05},
               "test": {"n": 8, "accuracy": 0.625, "macro_f1": 0.6, "ece": 0.25, "ece_calibrated": 0.08}}
    return {"with_ood": write_tiny_checkpoint(folder / "best.safetensors", classes=CLASSES, input_size=SIZE,
                                              model=model, detector=detector, temperature=TEMPERATURE,
                                              metrics=metrics),
            "plain": write_tiny_checkpoint(folder / "plain.safetensors", classes=CLASSES, input_size=SIZE,
                                           model=model)}


@pytest.fixture(scope="module")
def predictor(checkpoints) -> Predictor:
    return Predictor(checkpoints["with_ood"], device="cpu")


@pytest.fixture(scope="module")
def plain_predictor(checkpoints) -> Predictor:
    return Predictor(checkpoints["plain"], device="cpu")


def reference_probabilities(predictor: Predictor, image01: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(model(x) / T) computed directly, outside the Predictor."""
    x = preprocess(image01, SIZE)[0][None]
    with torch.no_grad():
        return torch.softmax(predictor.model(x) / temperature, dim=1)[0].numpy()


def probs(prediction: Prediction) -> np.ndarray:
    return np.array([prediction.probabilities[name] for name in CLASSES])


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------

def test_loads_checkpoint_facts(predictor, checkpoints):
    assert predictor.classes == tuple(CLASSES)
    assert predictor.input_size == SIZE and predictor.temperature == TEMPERATURE
    assert predictor.checkpoint_path == checkpoints["with_ood"]
    assert predictor.device.type == "cpu" and not predictor.model.training
    assert predictor.ood is not None and predictor.meta["temperature"] == TEMPERATURE


def test_model_card(predictor, plain_predictor):
    card = predictor.model_card()
    json.dumps(card)
    assert card["classes"] == CLASSES and card["temperature"] == TEMPERATURE
    assert card["test_accuracy"] == 0.625 and card["ece"] == 0.08 and card["ece_before_calibration"] == 0.25
    assert card["weight_source"].startswith("none") and card["created"] and card["version"]
    assert card["out_of_scope_check"] is True
    assert "not" in card["not_for_clinical_use"].lower() and "clinical" in card["not_for_clinical_use"].lower()
    plain = plain_predictor.model_card()
    assert plain["out_of_scope_check"] is False
    assert "no out-of-scope" in plain["out_of_scope"] and plain["test_accuracy"] is None


def test_missing_checkpoint_names_path_and_training_command(tmp_path, monkeypatch):
    missing = tmp_path / "nothing.safetensors"
    with pytest.raises(ModelNotFoundError) as info:
        Predictor(missing)
    assert isinstance(info.value, CheckpointError)
    assert str(missing) in str(info.value) and TRAIN_COMMAND in str(info.value)
    monkeypatch.delenv(ENV_CHECKPOINT, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="models/best.safetensors"):
        resolve_checkpoint_path()


def test_checkpoint_resolution_order(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_CHECKPOINT, str(checkpoints["plain"]))
    assert resolve_checkpoint_path() == checkpoints["plain"]
    assert resolve_checkpoint_path(checkpoints["with_ood"]) == checkpoints["with_ood"]
    assert resolve_checkpoint_path(checkpoints["with_ood"].parent).name == "best.safetensors"  # a folder
    monkeypatch.delenv(ENV_CHECKPOINT)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / DEFAULT_CHECKPOINT).write_bytes(checkpoints["plain"].read_bytes())
    assert resolve_checkpoint_path() == DEFAULT_CHECKPOINT


def test_corrupt_checkpoint_is_a_checkpoint_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(CheckpointError) as info:
        Predictor(bad)
    assert not isinstance(info.value, ModelNotFoundError)


# --------------------------------------------------------------------------------------------------
# prediction, calibration, verdicts
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_image() -> np.ndarray:
    return xray_like(seed=0)


@pytest.fixture(scope="module")
def reference_png(reference_image) -> bytes:
    return encode(Image.fromarray(to_u8(reference_image)), "PNG")


@pytest.fixture(scope="module")
def reference_prediction(predictor, reference_png) -> Prediction:
    return predictor.predict(reference_png, name="ref.png")


def test_prediction_fields_and_json(reference_prediction):
    p = reference_prediction
    assert p.source == "ref.png" and p.classes == tuple(CLASSES)
    assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert p.top_class == max(p.probabilities, key=p.probabilities.get)
    assert p.confidence == p.probabilities[p.top_class]
    assert p.verdict in ("confident", "uncertain", "out_of_scope") and p.verdict_reason.endswith(".")
    assert {"decode", "preprocess", "model", "total"} <= set(p.timings_ms)
    record = json.loads(json.dumps(p.to_dict()))
    assert record["probabilities"] == pytest.approx(p.probabilities) and record["verdict"] == p.verdict


def test_probabilities_use_the_checkpoint_temperature(predictor, plain_predictor, reference_image,
                                                      reference_png, reference_prediction):
    decoded = to_u8(reference_image) / np.float32(255)      # what the 8-bit PNG decodes to
    expected = reference_probabilities(predictor, decoded, TEMPERATURE)
    np.testing.assert_allclose(probs(reference_prediction), expected, atol=1e-4)
    uncalibrated = plain_predictor.predict(reference_png)
    np.testing.assert_allclose(probs(uncalibrated), reference_probabilities(predictor, decoded, 1.0), atol=1e-4)
    # T > 1 softens: the same logits, less confident.
    assert reference_prediction.top_class == uncalibrated.top_class
    assert reference_prediction.confidence < uncalibrated.confidence


def test_ood_score_is_the_detector_score_of_the_pooled_features(predictor, reference_image, reference_prediction):
    assert predictor.ood.layer_names == ("denseblock1", "norm5")     # the default: an early and the final layer
    x = preprocess(to_u8(reference_image) / np.float32(255), SIZE)[0][None]
    with torch.no_grad():
        _, pooled = predictor.model.tapped_features(x, predictor.ood.layer_names)
    expected = float(predictor.ood.score(pooled)[0])
    assert reference_prediction.ood_score == pytest.approx(expected, rel=1e-3)


def test_in_scope_reference_image_versus_noise_and_blank(predictor, reference_prediction):
    """The detector was fitted around the reference images: they pass, unrelated inputs do not."""
    assert reference_prediction.verdict != "out_of_scope"
    rng = np.random.default_rng(1)
    noise = encode(Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8)), "PNG")
    blank = encode(Image.new("L", (W, H), 255), "PNG")
    for result in predictor.predict_many([noise, blank], names=["noise", "blank"]):
        assert result.verdict == "out_of_scope", result
        assert result.ood_score > predictor.ood.threshold
        assert "does not resemble" in result.verdict_reason


def test_verdict_rules(predictor, reference_png, reference_prediction):
    strict = copy.copy(predictor)             # shares the model; the fixture stays untouched
    strict.ood = dataclasses.replace(predictor.ood, threshold=-1.0)
    assert strict.predict(reference_png).verdict == "out_of_scope"

    picky = copy.copy(predictor)
    picky.uncertain_below = 0.999
    p = picky.predict(reference_png)
    assert p.verdict == "uncertain" and "unsure" in p.verdict_reason and p.top_class in p.verdict_reason

    relaxed = copy.copy(predictor)
    relaxed.uncertain_below = 0.0
    assert relaxed.predict(reference_png).verdict == "confident"


def test_the_verdict_function_in_words():
    """The one verdict function: colour first, then the detector, then confidence; sentences as users read them."""
    args = dict(uncertain_below=0.6, has_detector=True, ood_score=3.25, ood_threshold=1.5)
    assert verdict("lungs", 0.9, is_colour=True, colourfulness=0.42, flagged=True, **args) == (
        "out_of_scope", "This is a colour image (colourfulness 0.42, above 0.1) and X-rays are grayscale, so the "
        "'lungs' prediction should not be trusted. Upload the original grayscale radiograph.")
    assert verdict("lungs", 0.3, flagged=True, **args) == (
        "out_of_scope", "This image does not resemble the X-rays the model was trained on (out-of-scope score "
        "3.25 is above the limit of 1.50), so the 'lungs' prediction should not be trusted.")
    assert verdict("heart", 0.59, **args) == (
        "uncertain", "The model is unsure: its best guess 'heart' has only 59% confidence, below the 60% "
        "needed for a confident answer.")
    assert verdict("heart", 0.6, **args).reason == (
        "The model says 'heart' with 60% confidence, and the image resembles the training images.")
    assert verdict("heart", 0.6, uncertain_below=0.6).reason == (
        "The model says 'heart' with 60% confidence, but this model cannot tell whether the image is an X-ray "
        "at all.")


def test_model_card_states_the_out_of_scope_rule(predictor):
    """The API's and dashboard's "out_of_scope" sentence, written out by hand from the detector's numbers."""
    ood = predictor.ood
    assert predictor.model_card()["out_of_scope"] == (
        f"Images whose features lie further from the training images than {ood.percentile:g}% of validation "
        f"images (Mahalanobis score on {', '.join(ood.layer_names)} > {ood.threshold:.3g}) are reported as out "
        f"of scope. Colour images (colourfulness > 0.1) are out of scope: X-rays are grayscale.")


def test_one_image_is_a_batch_of_one(predictor, reference_png):
    """predict / explain and predict_many / explain_many give the same answer, to the last bit."""
    single, batched = predictor.explain(reference_png, faithfulness=False), predictor.explain_many([reference_png])[0]
    assert single.prediction.probabilities == batched.prediction.probabilities
    assert single.prediction.ood_score == batched.prediction.ood_score
    assert single.prediction.verdict_reason == batched.prediction.verdict_reason
    np.testing.assert_array_equal(single.heatmap, batched.heatmap)
    assert predictor.predict(reference_png).probabilities == predictor.predict_many([reference_png])[0].probabilities


def test_without_ood_statistics_only_colour_is_out_of_scope(plain_predictor, reference_image):
    assert plain_predictor.ood is None
    noise = np.random.default_rng(2).integers(0, 256, (H, W), dtype=np.uint8)
    p = plain_predictor.predict(encode(Image.fromarray(noise), "PNG"))
    assert p.verdict != "out_of_scope" and p.ood_score is None
    assert plain_predictor.predict(tinted_png(reference_image)).verdict == "out_of_scope"


def tinted_png(image01: np.ndarray) -> bytes:
    """The image as an orange-and-blue duotone: the same structure, unmistakably a colour picture."""
    gray = to_u8(image01).astype(np.float32)
    rgb = np.stack([gray, 0.6 * gray, 255 - gray], -1)
    return encode(Image.fromarray(rgb.astype(np.uint8)), "PNG")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_colour_images_are_out_of_scope_whatever_the_detector_says(predictor, reference_image, fmt):
    relaxed = copy.copy(predictor)
    relaxed.ood = dataclasses.replace(predictor.ood, threshold=float("inf"))   # the detector passes everything
    coloured = tinted_png(reference_image)
    if fmt == "JPEG":
        coloured = encode(Image.open(io.BytesIO(coloured)), "JPEG", quality=85)
    p = relaxed.predict(coloured)
    assert p.verdict == "out_of_scope" and "colour image" in p.verdict_reason and "grayscale" in p.verdict_reason
    # The same gray pixels in an RGB JPEG (chroma noise from compression) are not a colour image.
    gray_rgb = encode(Image.fromarray(np.stack([to_u8(reference_image)] * 3, -1)), "JPEG", quality=85)
    assert relaxed.predict(gray_rgb).verdict != "out_of_scope"


# --------------------------------------------------------------------------------------------------
# every input format
# --------------------------------------------------------------------------------------------------

def test_png_path_bytes_stream_and_decoded_image_agree(predictor, tmp_path, reference_png, reference_prediction):
    path = tmp_path / "scan.png"
    path.write_bytes(reference_png)
    by_path = predictor.predict(path)
    by_stream = predictor.predict(io.BytesIO(reference_png), name="upload.png")
    by_decoded = predictor.predict(read_image(reference_png), name="decoded")
    assert by_path.source == str(path) and by_stream.source == "upload.png" and by_decoded.source == "decoded"
    for p in (by_path, by_stream, by_decoded):
        np.testing.assert_allclose(probs(p), probs(reference_prediction), atol=1e-5)


@pytest.mark.parametrize("kind", ["rgb", "rgba_opaque", "palette"])
def test_colour_and_palette_pngs_become_the_same_grayscale(predictor, reference_image, reference_prediction, kind):
    gray = to_u8(reference_image)
    if kind == "rgb":
        data = encode(Image.fromarray(np.stack([gray] * 3, -1)), "PNG")
    elif kind == "rgba_opaque":
        data = encode(Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 255)])), "PNG")
    else:
        data = palette_png(reference_image)
    np.testing.assert_allclose(probs(predictor.predict(data)), probs(reference_prediction), atol=1e-5)


@pytest.fixture(scope="module")
def sixteen_bit_prediction(predictor, reference_image) -> Prediction:
    return predictor.predict(encode(Image.fromarray(to_u16(reference_image)), "PNG"))


def test_16bit_png_tiff_and_dicom_agree(predictor, reference_image, sixteen_bit_prediction):
    data16 = to_u16(reference_image)
    tiff = predictor.predict(encode(Image.fromarray(data16), "TIFF"))
    dicom = predictor.predict(dicom_bytes(data16))
    np.testing.assert_allclose(probs(tiff), probs(sixteen_bit_prediction), atol=1e-5)
    np.testing.assert_allclose(probs(dicom), probs(sixteen_bit_prediction), atol=1e-5)


def test_dicom_monochrome1_is_inverted_back(predictor, reference_image, sixteen_bit_prediction):
    """MONOCHROME1 stores bright as low values: inverted data + MONOCHROME1 == the original image."""
    inverted = 65535 - to_u16(reference_image, top=65535)
    p = predictor.predict(dicom_bytes(inverted, photometric="MONOCHROME1"))
    np.testing.assert_allclose(probs(p), probs(sixteen_bit_prediction), atol=2e-3)


def test_multiframe_dicom_uses_first_frame_with_a_warning(predictor, reference_image, sixteen_bit_prediction):
    frames = np.stack([to_u16(reference_image), np.zeros((H, W), np.uint16)])
    p = predictor.predict(dicom_bytes(frames, frames=2), name="cine.dcm")
    assert any("frame" in w for w in p.warnings)
    np.testing.assert_allclose(probs(p), probs(sixteen_bit_prediction), atol=1e-5)
    assert "Test^Patient" not in json.dumps(p.to_dict())


def test_jpeg_exif_orientation_is_applied_before_the_model(predictor, reference_image):
    explanation = predictor.explain(jpeg_with_exif_orientation(reference_image), faithfulness=False)
    assert explanation.image.shape == (H, W) and explanation.heatmap.shape == (H, W)
    assert np.abs(explanation.image - reference_image).mean() < 0.02      # upright, JPEG-close


# --------------------------------------------------------------------------------------------------
# every bad input
# --------------------------------------------------------------------------------------------------

def _truncated_jpeg() -> bytes:
    data = encode(Image.fromarray(to_u8(xray_like(seed=5))), "JPEG", quality=90)
    return data[: len(data) // 2]


BAD_INPUTS = {
    "missing": lambda tmp: tmp / "does-not-exist.png",
    "empty": lambda tmp: b"",
    "not_image": lambda tmp: b"this is not an image, just some text\n" * 4,
    "truncated": lambda tmp: _truncated_jpeg(),
    "no_pixel_data": lambda tmp: dicom_bytes(None),
    "too_small": lambda tmp: encode(Image.new("L", (20, 100)), "PNG"),
}


@pytest.mark.parametrize("reason", sorted(BAD_INPUTS))
def test_bad_inputs_raise_a_specific_image_read_error(predictor, tmp_path, reason):
    with pytest.raises(ImageReadError) as info:
        predictor.predict(BAD_INPUTS[reason](tmp_path), name=None)
    assert info.value.reason == reason
    assert str(info.value).startswith("Cannot read image") and info.value.hint


def test_decompression_bomb_is_refused_by_max_pixels(predictor):
    guarded = copy.copy(predictor)
    guarded.max_pixels = 50 * 50
    with pytest.raises(ImageReadError) as info:
        guarded.predict(encode(Image.new("L", (100, 100)), "PNG"), name="bomb.png")
    assert info.value.reason == "too_large" and "bomb.png" in str(info.value)


def test_predict_many_keeps_going_past_bad_inputs(predictor, tmp_path, reference_png, reference_prediction):
    inputs = [reference_png, b"", BAD_INPUTS["truncated"](tmp_path), reference_png, tmp_path / "gone.png"]
    seen = []
    results = predictor.predict_many(inputs, batch_size=2, names=["a", "b", "c", "d", None], progress=seen.append)
    assert [type(r).__name__ for r in results] == ["Prediction", "ImageReadError", "ImageReadError",
                                                    "Prediction", "ImageReadError"]
    assert [r.reason for r in results if isinstance(r, ImageReadError)] == ["empty", "truncated", "missing"]
    assert results[0].source == "a" and results[3].source == "d" and sum(seen) == len(inputs)
    np.testing.assert_allclose(probs(results[0]), probs(reference_prediction), atol=1e-4)   # batched == single


def test_batched_calls_default_to_eight_images_per_pass_on_the_cpu(predictor, reference_png):
    """Batch 16 was slower than one image at a time on a CPU (activations outgrow the caches); 8 was not."""
    assert predictor.device.type == "cpu" and predictor.batch_size == 8
    seen = []
    results = predictor.predict_many([reference_png] * 19, progress=seen.append)
    assert seen == [8, 8, 3] and len(results) == 19
    with pytest.raises(ValueError, match="batch_size"):
        predictor.predict_many([reference_png], batch_size=0)


# --------------------------------------------------------------------------------------------------
# explanations
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def explanation(predictor, reference_png) -> Explanation:
    return predictor.explain(reference_png, "heart", name="ref.png")


def test_explanation_is_mapped_onto_the_original_image(explanation, reference_prediction):
    assert explanation.explained_class == "heart" and explanation.method == "gradcam"
    assert explanation.image.shape == (H, W) and explanation.heatmap.shape == (H, W)
    assert explanation.heatmap.dtype == np.float32
    assert 0.0 <= explanation.heatmap.min() and explanation.heatmap.max() <= 1.0
    side, left = H, (W - H) // 2
    assert not explanation.heatmap[:, :left].any() and not explanation.heatmap[:, left + side:].any()
    # Same forward pass semantics as predict(): the prediction does not depend on the explained class.
    np.testing.assert_allclose(probs(explanation.prediction), probs(reference_prediction), atol=1e-5)
    assert explanation.prediction.verdict == reference_prediction.verdict


def test_explanation_faithfulness_and_overlays(explanation):
    assert {"prob", "drop_top", "drop_random"} <= set(explanation.faithfulness)
    rgb = explanation.overlay(alpha=0.5)
    assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
    png = explanation.overlay_png()
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size == (W, H)
    record = json.loads(json.dumps(explanation.to_dict(include_overlay=True, grid=8)))
    assert record["explained_class"] == "heart" and record["image_size"] == {"height": H, "width": W}
    assert np.array(record["heatmap_grid"]).shape == (8, 8) and record["overlay_png_base64"]
    assert "heatmap_grid" not in explanation.to_dict()


def test_explain_defaults_to_the_predicted_class(predictor, reference_png, reference_prediction):
    e = predictor.explain(reference_png, faithfulness=False)
    assert e.explained_class == reference_prediction.top_class and e.faithfulness == {}


def test_unknown_class_names_the_valid_ones(predictor, reference_png):
    with pytest.raises(UnknownClassError) as info:
        predictor.explain(reference_png, "liver")
    assert isinstance(info.value, ValueError)
    assert all(name in str(info.value) for name in CLASSES)


def test_explain_many_gives_maps_for_the_predicted_class(predictor, reference_png):
    results = predictor.explain_many([reference_png, b"junk bytes"], batch_size=4)
    assert isinstance(results[0], Explanation) and isinstance(results[1], ImageReadError)
    assert results[0].heatmap.shape == (H, W)
    assert results[0].explained_class == results[0].prediction.top_class


# --------------------------------------------------------------------------------------------------
# thread safety
# --------------------------------------------------------------------------------------------------

def test_eight_threads_get_the_same_results_as_serial(predictor):
    images = [encode(Image.fromarray(to_u8(xray_like(seed=10 + k))), "PNG") for k in range(4)]
    serial = [predictor.explain(image, faithfulness=False) for image in images]
    start = threading.Barrier(8)

    def work(k: int):
        start.wait()          # all threads inside the model at the same time
        return predictor.explain(images[k % 4], faithfulness=False)

    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(work, range(8)))
    for k, result in enumerate(threaded):
        expected = serial[k % 4]
        np.testing.assert_allclose(probs(result.prediction), probs(expected.prediction), atol=1e-5)
        np.testing.assert_allclose(result.heatmap, expected.heatmap, atol=1e-4)
        assert result.prediction.ood_score == pytest.approx(expected.prediction.ood_score, rel=1e-4)
    # Nothing was left behind on the shared model.
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in predictor.model.modules())
    assert all(p.grad is None for p in predictor.model.parameters()) and not predictor.model.training
