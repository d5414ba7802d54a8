"""Adaptive batching: concurrent /v1/predict requests share one forward pass, each keeps its own answer,
errors and timings. Checked against single-image ``Predictor.predict`` (the unbatched path)."""
from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from mediscan.apps.api import create_app
from mediscan.apps.batching import BatchFailed, Batcher
from mediscan.core.imaging import ImageReadError
from mediscan.devtools.synthetic import pattern_image, write_tiny_checkpoint
from mediscan.inference.predictor import Predictor


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return Predictor(write_tiny_checkpoint(tmp_path_factory.mktemp("batching") / "tiny.safetensors"), "cpu")


def png(label: int, seed: int, side: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pattern_image(label, side, np.random.default_rng(seed))).save(buf, "PNG")
    return buf.getvalue()


def run_together(calls) -> list:
    """Start every call at once (a barrier), return each one's result or exception."""
    barrier = threading.Barrier(len(calls))
    out: list = [None] * len(calls)

    def run(k):
        barrier.wait()
        try:
            out[k] = calls[k]()
        except Exception as exc:        # noqa: BLE001 -- the test looks at it
            out[k] = exc
    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_requests_that_arrive_together_share_one_forward_pass(predictor, monkeypatch):
    images = [png(k % 4, k) for k in range(6)]
    expected = [predictor.predict(data, name=f"img{k}") for k, data in enumerate(images)]
    batch_sizes: list[int] = []
    real = predictor.run_prepared
    monkeypatch.setattr(predictor, "run_prepared",
                        lambda items, **kw: batch_sizes.append(len(items)) or real(items, **kw))
    batcher = Batcher(predictor, window_ms=500, max_batch=8)   # a wide window: all six arrive within it
    results = run_together([lambda k=k: batcher.predict(images[k], f"img{k}") for k in range(6)])
    assert batch_sizes == [6]
    for k, (prediction, size) in enumerate(results):
        assert size == 6 and prediction.source == f"img{k}"
        assert prediction.probabilities == pytest.approx(expected[k].probabilities, abs=1e-5)
        assert prediction.top_class == expected[k].top_class and prediction.verdict == expected[k].verdict
        timings = prediction.timings_ms
        assert {"decode", "preprocess", "queue", "model", "total"} <= set(timings)
        assert timings["total"] >= timings["decode"] + timings["queue"]


def test_max_batch_splits_a_crowd(predictor, monkeypatch):
    batch_sizes: list[int] = []
    real = predictor.run_prepared
    monkeypatch.setattr(predictor, "run_prepared",
                        lambda items, **kw: batch_sizes.append(len(items)) or real(items, **kw))
    batcher = Batcher(predictor, window_ms=500, max_batch=2)
    results = run_together([lambda k=k: batcher.predict(png(1, k), "x") for k in range(5)])
    assert all(not isinstance(r, Exception) for r in results)
    assert sorted(batch_sizes) == [1, 2, 2] and sum(batch_sizes) == 5


def test_a_bad_image_is_its_own_error_and_a_failed_pass_fails_only_its_batch(predictor, monkeypatch):
    batcher = Batcher(predictor, window_ms=300, max_batch=8)
    good, bad = png(2, 0), b"not an image at all"
    results = run_together([lambda: batcher.predict(good, "good"), lambda: batcher.predict(bad, "bad")])
    assert results[0][0].source == "good"
    assert isinstance(results[1], ImageReadError) and results[1].reason == "not_image"

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")
    monkeypatch.setattr(predictor, "run_prepared", broken)
    failed = run_together([lambda: batcher.predict(good, "a"), lambda: batcher.predict(good, "b")])
    assert all(isinstance(r, BatchFailed) and "RuntimeError" in str(r) for r in failed)
    monkeypatch.undo()
    assert batcher.predict(good, "after")[0].source == "after"          # the worker survived


def test_the_api_batches_concurrent_predictions_and_not_heatmaps(predictor):
    app = create_app({"PREDICTOR": predictor, "API_KEY": None, "BATCH_WINDOW_MS": 500})
    images = [png(k % 4, 10 + k) for k in range(4)]
    expected = [predictor.predict(data).probabilities for data in images]

    def post(k, path="/v1/predict"):
        return app.test_client().post(path, data=images[k], content_type="image/png")
    answers = run_together([lambda k=k: post(k) for k in range(4)])
    for k, r in enumerate(answers):
        assert r.status_code == 200 and r.headers["X-Batch-Size"] == "4"
        assert r.get_json()["probabilities"] == pytest.approx(expected[k], abs=1e-5)
        assert r.get_json()["timings_ms"]["queue"] >= 0
    explained = post(0, "/v1/predict?explain=true")
    assert explained.status_code == 200 and "X-Batch-Size" not in explained.headers
    bad = app.test_client().post("/v1/predict", data=b"junk", content_type="image/png")
    assert bad.status_code == 400 and bad.get_json()["error"]["code"] == "bad_image"


def test_batching_off_calls_the_predictor_directly(predictor):
    app = create_app({"PREDICTOR": predictor, "API_KEY": None, "BATCH_WINDOW_MS": 0})
    assert app.extensions["mediscan"].batcher is None
    r = app.test_client().post("/v1/predict", data=png(0, 1), content_type="image/png")
    assert r.status_code == 200 and "X-Batch-Size" not in r.headers and "queue" not in r.get_json()["timings_ms"]


@pytest.mark.parametrize("kwargs", [{"window_ms": 0}, {"window_ms": 5, "max_batch": 0}, {"window_ms": 5, "workers": 0}])
def test_bad_settings_are_refused(predictor, kwargs):
    with pytest.raises(ValueError):
        Batcher(predictor, **kwargs)


def test_a_second_batch_runs_while_the_first_is_still_in_the_model(predictor, monkeypatch):
    """Two workers: the model is never left idle while requests wait for a batch that is still running."""
    entered, release = threading.Event(), threading.Event()
    real = predictor.run_prepared

    def first_call_blocks(items, **kw):
        if not entered.is_set():
            entered.set()
            assert release.wait(60), "the test never released the first batch"
        return real(items, **kw)
    monkeypatch.setattr(predictor, "run_prepared", first_call_blocks)
    batcher = Batcher(predictor, window_ms=5, max_batch=8, workers=2)
    first: list = []
    holder = threading.Thread(target=lambda: first.append(batcher.predict(png(0, 1), "first")))
    holder.start()
    assert entered.wait(60)
    second: list = []
    other = threading.Thread(target=lambda: second.append(batcher.predict(png(1, 2), "second")))
    other.start()
    other.join(20)           # a tiny model answers in well under a second
    finished_while_blocked = bool(second)
    release.set()
    holder.join(60)
    other.join(60)
    assert finished_while_blocked, "the second request waited for the first batch to leave the model"
    assert second[0][0].source == "second" and second[0][1] == 1 and first[0][0].source == "first"


def test_decoding_and_preprocessing_run_in_the_request_threads(predictor, monkeypatch):
    threads: list[str] = []
    real = predictor.prepare
    monkeypatch.setattr(predictor, "prepare",
                        lambda *a, **kw: threads.append(threading.current_thread().name) or real(*a, **kw))
    batcher = Batcher(predictor, window_ms=300, max_batch=8)
    results = run_together([lambda k=k: batcher.predict(png(k % 4, k), f"p{k}") for k in range(3)])
    assert [r[0].source for r in results] == ["p0", "p1", "p2"] and {r[1] for r in results} == {3}
    assert len(threads) == 3 and not any(name.startswith("mediscan-batcher") for name in threads)
    assert all(r[0].timings_ms["preprocess"] > 0 for r in results)


def test_serve_passes_batch_workers_to_the_batcher_and_refuses_zero(predictor, capsys):
    from mediscan.apps import serve
    assert serve.main(["--batch-workers=0"]) == 2 and "--batch-workers" in capsys.readouterr().err
    chosen = create_app({**serve.app_config(serve.get_args_parser().parse_args(["--batch-workers", "3"])),
                         "PREDICTOR": predictor})
    default = create_app({**serve.app_config(serve.get_args_parser().parse_args([])), "PREDICTOR": predictor})
    assert chosen.extensions["mediscan"].batcher.workers == 3
    assert default.extensions["mediscan"].batcher.workers == 2          # the documented default (docs/api.md)


def test_a_request_waiting_in_the_batch_window_does_not_hold_its_full_size_pixels(predictor, monkeypatch):
    """While a request waits for its batch, only the model input may stay alive: a crowd of large uploads
    waiting together must not hold their full-size decoded images (a 7.8 kB PNG can decode to 256 MB)."""
    import gc
    import time
    import weakref

    import mediscan.inference.predictor as predictor_module
    real_read, refs, decoded = predictor_module.read_image, [], threading.Event()

    def tracked_read(*args, **kwargs):
        image = real_read(*args, **kwargs)
        refs.append(weakref.ref(image.pixels))
        decoded.set()
        return image
    monkeypatch.setattr(predictor_module, "read_image", tracked_read)
    batcher = Batcher(predictor, window_ms=3000, max_batch=8)      # it waits 3 s for company that never comes
    data = png(1, 3)
    out = []
    waiting = threading.Thread(target=lambda: out.append(batcher.predict(data, "big.png")))
    waiting.start()
    assert decoded.wait(30)
    time.sleep(0.3)                                                 # decoded, prepared, now waiting
    gc.collect()
    alive = refs[0]() is not None
    waiting.join(60)
    assert not alive, "the waiting request still holds its full-size pixels"
    monkeypatch.setattr(predictor_module, "read_image", real_read)
    assert out[0][0].to_dict()["probabilities"] == predictor.predict(data, name="big.png").to_dict()["probabilities"]
