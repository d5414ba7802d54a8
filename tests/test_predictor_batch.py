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


def test_the_shares_of_one_pass_add_up_to_at_most_its_time(predictor):
    """Each row's ``model`` time is the pass divided by the rows: together no more than the call took."""
    import time
    images = distinct_images(4)
    predictor.predict_many(images, batch_size=4)                     # warm-up
    started = time.perf_counter()
    results = predictor.predict_many(images, batch_size=4)
    wall_ms = (time.perf_counter() - started) * 1000
    assert 0 < sum(r.timings_ms["model"] for r in results) <= wall_ms


def test_each_rows_out_of_scope_verdict_follows_its_own_score(predictor):
    """The detector's flag, recomputed here per row from the row's score and the threshold: a batch that mixes
    flagged and unflagged images keeps each row's own verdict."""
    results = predictor.predict_many(distinct_images(7), batch_size=7)
    flagged = [r.ood_score > predictor.ood.threshold for r in results]
    assert any(flagged) and not all(flagged)
    assert [r.verdict == "out_of_scope" for r in results] == flagged


def test_explaining_another_class_maps_that_class(predictor):
    image = distinct_images(2)[0]
    maps = {name: predictor.explain(image, class_name=name, faithfulness=False) for name in CLASSES}
    assert [e.explained_class for e in maps.values()] == CLASSES
    heatmaps = [e.heatmap for e in maps.values()]
    assert any(not np.allclose(a, b) for a, b in itertools.combinations(heatmaps, 2))
    with torch.no_grad():                                            # the class Grad-CAM explains by default
        top = int(predictor.model(preprocess(np.asarray(Image.open(io.BytesIO(image)).convert("L"),
                                                        np.float32) / 255.0, SIZE)[0][None]).argmax())
    np.testing.assert_allclose(predictor.explain(image, faithfulness=False).heatmap, heatmaps[top], atol=1e-6)


def test_faithfulness_is_measured_on_the_batch_that_was_explained(predictor):
    result = predictor.explain(distinct_images(2)[0]).faithfulness
    assert set(result) >= {"prob", "prob_top_removed", "prob_random_removed"}
    assert all(0.0 <= result[k] <= 1.0 for k in ("prob", "prob_top_removed", "prob_random_removed"))


def gated_dicom() -> bytes:
    """A 64 x 64 ultrasound DICOM: outside every checkpoint's default modalities."""
    import pydicom
    from pydicom import uid
    from mediscan.devtools.synthetic import dicom_bytes
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(pattern_image(1, 64).astype(np.uint16) * 256)))
    ds.Modality = "US"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = uid.UltrasoundImageStorage
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_gated_rows_get_their_own_answer_and_an_empty_map_in_any_batch(predictor):
    images = distinct_images(3)
    mixed = [images[0], gated_dicom(), images[1], gated_dicom()]
    only_gated = predictor.run_prepared([predictor.prepare(gated_dicom()) for _ in range(2)], with_maps=True)
    for batch in (predictor.explain_many(mixed, batch_size=4), only_gated):
        for e in batch:
            if e.prediction.top_class is None:
                assert e.prediction.verdict == "out_of_scope" and e.prediction.verdict_reason.startswith("Modality US")
                assert e.explained_class is None and e.method == "gradcam" and e.image.shape == (64, 64)
                assert not e.heatmap.any()
    explained = predictor.explain_many(mixed, batch_size=4)
    for k in (0, 2):
        single = predictor.explain(mixed[k], faithfulness=False)
        assert explained[k].explained_class == single.explained_class
        np.testing.assert_allclose(explained[k].heatmap, single.heatmap, atol=1e-5)
    answers = predictor.run_prepared([predictor.prepare(x) for x in mixed])
    assert [a.top_class is None for a in answers] == [False, True, False, True]


def test_a_checkpoint_without_a_detector_scores_and_flags_no_row(tmp_path):
    """No out-of-scope statistics: every row of a batch has no score and no detector flag, so gray images are
    never out of scope, and the rows still match their single-image answers."""
    plain = Predictor(write_tiny_checkpoint(tmp_path / "plain.safetensors", classes=CLASSES, input_size=SIZE),
                      device="cpu", backend="torch")
    images = distinct_images(4)
    together = plain.predict_many(images, batch_size=4)
    assert [r.ood_score for r in together] == [None] * 4
    assert all(r.verdict != "out_of_scope" for r in together)
    for mine, data in zip(together, images):
        np.testing.assert_allclose(row(mine), row(plain.predict(data)), atol=1e-6)


def test_progress_counts_every_input_once_and_names_must_match(predictor):
    images = distinct_images(3)
    with_bad = [images[0], b"not an image", images[1], b"", images[2]]
    seen: list[int] = []
    results = predictor.predict_many(with_bad, batch_size=2, progress=seen.append)
    assert sum(seen) == len(with_bad) and all(k >= 1 for k in seen)
    assert [isinstance(r, ImageReadError) for r in results] == [False, True, False, True, False]
    with pytest.raises(ValueError, match="2 names for 3 images"):
        predictor.predict_many(images, names=["a", "b"])
