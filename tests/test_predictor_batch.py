"""The batched path keeps every answer with its own image: distinct images in one call (several batches, a
partial last batch, a bad file in the middle), each row compared with the single-image prediction of the same
file and with softmax(model(x) / T) computed here, outside the Predictor.

The images differ enough that any two rows' probabilities are far apart (checked), so an answer given to
the wrong image -- rows swapped, shifted, or one row copied to all -- cannot pass.
"""
from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from mediscan.core.imaging import ImageReadError
from mediscan.core.preprocessing import preprocess
from mediscan.devtools.synthetic import detector_around, pattern_image, tiny_model, write_tiny_checkpoint
from mediscan.inference.predictor import Predictor

CLASSES = ["bone", "brain", "heart", "lungs"]
SIZE = 64
TEMPERATURE = 1.5


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def distinct_images(n: int) -> list[bytes]:
    """n different PNGs: the four synthetic textures at several sizes and noise draws, plus a gradient."""
    rng = np.random.default_rng(11)
    images = [png(pattern_image(k % 4, size=48 + 8 * (k % 3), rng=rng)) for k in range(n - 1)]
    ramp = np.tile(np.linspace(0, 255, 80, dtype=np.uint8), (60, 1))
    return images + [png(ramp)]


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    model = tiny_model(CLASSES, seed=3)
    batch = torch.stack([preprocess(np.asarray(Image.open(io.BytesIO(data)).convert("L"), np.float32) / 255,
                                    SIZE)[0] for data in distinct_images(7)])
    with torch.no_grad():                          # a head centred on these images: clearly different answers
        pooled = model.head.pool_features(model.features(batch))
        model.head.fc.weight.mul_(0.02)
        model.head.fc.bias.copy_(-model.head.fc.weight @ pooled.mean(0))
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.safetensors", classes=CLASSES,
                                 input_size=SIZE, model=model, detector=detector_around(model, batch[:4]),
                                 temperature=TEMPERATURE)
    return Predictor(path, device="cpu", backend="torch")


def direct_probabilities(predictor: Predictor, data: bytes) -> np.ndarray:
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("L"), np.float32) / 255.0
    with torch.no_grad():
        logits = predictor.model(preprocess(pixels, SIZE)[0][None])
    return torch.softmax(logits / TEMPERATURE, dim=1)[0].numpy()


def row(prediction) -> np.ndarray:
    return np.array([prediction.probabilities[name] for name in CLASSES])


def test_each_row_of_a_batch_is_its_own_images_prediction(predictor):
    images = distinct_images(7)
    inputs = images[:3] + [b"not an image"] + images[3:]            # a bad file in the middle
    names = [f"img{k}.png" for k in range(len(inputs))]
    batched = predictor.predict_many(inputs, batch_size=3, names=names)
    assert isinstance(batched[3], ImageReadError) and "img3.png" in str(batched[3])
    good = [(k, r) for k, r in enumerate(batched) if k != 3]
    singles = [predictor.predict(inputs[k], name=names[k]) for k, _ in good]
    rows = [row(r) for _, r in good]
    for (a, ra), (b, rb) in itertools.combinations(zip(range(len(rows)), rows), 2):
        assert np.abs(ra - rb).max() > 1e-3, (a, b)                  # every image gets a different answer
    for (k, result), single in zip(good, singles):
        assert result.source == names[k] == single.source
        np.testing.assert_allclose(row(result), row(single), atol=1e-6, err_msg=names[k])
        np.testing.assert_allclose(row(result), direct_probabilities(predictor, inputs[k]), atol=1e-6)
        assert (result.top_class, result.verdict) == (single.top_class, single.verdict)
        assert result.confidence == pytest.approx(single.confidence, abs=1e-6)
        assert result.confidence == pytest.approx(row(result).max(), abs=1e-7)
        assert result.ood_score == pytest.approx(single.ood_score, rel=1e-5, abs=1e-6)
    scores = [r.ood_score for _, r in good]
    assert len({round(s, 3) for s in scores}) == len(scores)         # out-of-scope scores differ too


def test_batch_size_does_not_change_any_answer(predictor):
    images = distinct_images(5)
    one_pass = predictor.predict_many(images, batch_size=8)
    for batch_size in (1, 2):
        for a, b in zip(one_pass, predictor.predict_many(images, batch_size=batch_size)):
            np.testing.assert_allclose(row(a), row(b), atol=1e-6)
            assert a.ood_score == pytest.approx(b.ood_score, rel=1e-5, abs=1e-6)


def test_batched_timings_share_the_forward_pass(predictor):
    seen: list[int] = []
    results = predictor.predict_many(distinct_images(4), batch_size=4, progress=seen.append)
    assert seen == [4]
    shares = {r.timings_ms["model"] for r in results}
    assert len(shares) == 1 and shares.pop() > 0                      # one pass, split evenly
    for r in results:
        t = r.timings_ms
        assert t["total"] == pytest.approx(t["decode"] + t["preprocess"] + t["model"], rel=1e-6)


def test_each_explanation_of_a_batch_is_its_own_images_map(predictor):
    images = distinct_images(5)
    batched = predictor.explain_many(images, batch_size=2)
    maps = [e.heatmap for e in batched]
    for a, b in itertools.combinations(range(len(maps)), 2):
        if maps[a].shape == maps[b].shape:
            assert np.abs(maps[a] - maps[b]).max() > 1e-3, (a, b)
    for data, result in zip(images, batched):
        single = predictor.explain(data, faithfulness=False)
        assert result.explained_class == single.explained_class == result.prediction.top_class
        assert result.method == "gradcam" and result.faithfulness == {}
        np.testing.assert_allclose(row(result.prediction), row(single.prediction), atol=1e-6)
        assert result.heatmap.shape == single.heatmap.shape == result.image.shape
        np.testing.assert_allclose(result.heatmap, single.heatmap, atol=1e-5)
        np.testing.assert_array_equal(result.image, single.image)
