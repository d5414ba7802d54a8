"""Dashboard tests through Streamlit's AppTest (the real app.py, in this process, no browser).

The model is a tiny random DenseNet121 checkpoint (64 px input) made here; its metrics are invented so the
model card has something to show. AppTest drives the real file uploader (``set_value``), the class choice
and the opacity slider. Model calls are counted by wrapping :meth:`Predictor.explain` / ``__init__``.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from conftest import ROOT
from mediscan import NOT_FOR_CLINICAL_USE
from mediscan.apps import dashboard
from mediscan.devtools.synthetic import CLASSES, FAKE_PATIENT, dicom_bytes, pattern_image, write_tiny_checkpoint
from mediscan.inference.predictor import TRAIN_COMMAND, Predictor

APP = str(ROOT / "app.py")
METRICS = {"test": {"accuracy": 0.9125, "ece": 0.081, "ece_calibrated": 0.0234}}


def write_checkpoint(path, seed: int = 0):
    """A tiny random checkpoint carrying the invented METRICS (for the model card)."""
    return write_tiny_checkpoint(path, seed=seed, metrics=METRICS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("model") / "tiny.safetensors")


def png_bytes(label: int, size: int = 72, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pattern_image(label, size, np.random.default_rng(seed))).save(buffer, "PNG")
    return buffer.getvalue()


def dicom_with_patient(size: int = 64) -> bytes:
    """A CR DICOM (12 bits stored) in memory carrying fake patient fields that must never reach a report."""
    pixels = pattern_image(2, size, np.random.default_rng(3)).astype(np.uint16) * 16
    return dicom_bytes(pixels, bits_stored=12, **FAKE_PATIENT)


@pytest.fixture
def app(monkeypatch, checkpoint):
    monkeypatch.setenv("MEDISCAN_MODEL", str(checkpoint))
    return AppTest.from_file(APP, default_timeout=60)


@pytest.fixture
def explain_calls(monkeypatch):
    """Counts model runs made through Predictor.explain (the only call the dashboard makes)."""
    calls: list[str | None] = []
    original = Predictor.explain

    def counting(self, image, class_name=None, **kwargs):
        calls.append(class_name)
        return original(self, image, class_name, **kwargs)

    monkeypatch.setattr(Predictor, "explain", counting)
    return calls


def texts(at, kind: str) -> str:
    return "\n".join(str(element.value) for element in getattr(at, kind))


def run_ok(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


# ------------------------------------------------------------------------------------ page states


def test_page_with_model_shows_title_disclaimer_model_card_and_uploader(app):
    run_ok(app)
    assert "MediScan" in app.title[0].value
    assert "Not for clinical use" in app.warning[0].value and NOT_FOR_CLINICAL_USE in app.warning[0].value
    side = app.sidebar
    assert side.text_input(key="checkpoint_path").value == os.environ["MEDISCAN_MODEL"]
    card = texts(side, "markdown")
    assert "bone, brain, heart, lungs" in card and "none" in card and "UTC" in card
    metrics = {m.label: m.value for m in side.metric}
    assert metrics == {"Test accuracy": "91.2%", "Calibration error (ECE)": "2.3%"}
    uploader = app.file_uploader(key="uploads")
    assert uploader.accept_multiple_files
    assert {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm"} <= set(uploader.allowed_type)
    assert "Upload one or more" in texts(app, "info")


def test_no_model_page_explains_what_to_do_and_keeps_the_path_field(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere" / "best.safetensors"
    monkeypatch.setenv("MEDISCAN_MODEL", str(missing))
    at = run_ok(AppTest.from_file(APP, default_timeout=60))
    assert "No trained model yet" in texts(at, "header")
    assert str(missing) in texts(at, "markdown")
    code = texts(at, "code")
    assert TRAIN_COMMAND in code
    for folder in ("dataset/", "train/", "val/", "test/", "bone/", "brain/", "heart/", "lungs/"):
        assert folder in code
    assert not at.file_uploader and not at.sidebar.metric
    assert "Not for clinical use" in at.warning[0].value

    # The path field still works: pointing it at a checkpoint brings the model up.
    checkpoint = write_checkpoint(tmp_path / "found.safetensors", seed=1)
    at.sidebar.text_input(key="checkpoint_path").set_value(str(checkpoint))
    run_ok(at)
    assert at.file_uploader and "No trained model yet" not in texts(at, "header")
    assert str(checkpoint) in texts(at.sidebar, "caption")


def test_unusable_checkpoint_gets_its_own_message(monkeypatch, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"this is not a checkpoint")
    monkeypatch.setenv("MEDISCAN_MODEL", str(broken))
    at = run_ok(AppTest.from_file(APP, default_timeout=60))
    assert "cannot be used" in texts(at, "header")
    assert str(broken) in at.error[0].value
    assert TRAIN_COMMAND in texts(at, "code")


# ------------------------------------------------------------------------------------ analysis


def test_one_upload_shows_prediction_verdict_chart_gradcam_and_downloads(app, checkpoint):
    run_ok(app)
    data = png_bytes(3)
    app.file_uploader(key="uploads").set_value(("chest.png", data, "image/png"))
    run_ok(app)

    expected = dashboard.load_predictor(str(checkpoint)).predict(data, name="chest.png")   # the app's instance
    metrics = {m.label: m.value for m in app.main.metric}
    organ_label = "Predicted organ" if expected.verdict == "confident" else "Best guess"
    assert metrics[organ_label] == expected.top_class
    assert metrics["Calibrated confidence"] == dashboard.probability_text(expected.confidence)
    verdict_box = {"confident": app.success, "uncertain": app.warning, "out_of_scope": app.error}[expected.verdict]
    assert any(expected.verdict_reason in box.value for box in verdict_box)
    assert not app.dataframe                                   # no summary table for a single image
    assert [s.value for s in app.main.subheader] == ["chest.png"]
    assert len(app.get("vega_lite_chart")) == 1
    assert [img.captions[0] for img in app.image] == [
        "Original", f"Heatmap: {expected.top_class}", "Overlay (40% heatmap)"]
    assert app.selectbox[0].value == expected.top_class and list(app.selectbox[0].options) == [
        f"{c} (predicted)" if c == expected.top_class else c for c in CLASSES]
    assert "Faithfulness score" in texts(app, "markdown")
    labels = [b.label for b in app.download_button]
    assert labels == ["Download overlay (PNG)", "Download report (JSON)"]


def test_several_uploads_get_a_summary_and_a_bad_file_its_own_error(app, checkpoint):
    run_ok(app)
    app.file_uploader(key="uploads").set_value([
        ("a.png", png_bytes(0), "image/png"),
        ("notes.png", b"just some text, not an image", "image/png"),
        ("b.png", png_bytes(1, seed=5), "image/png"),
    ])
    run_ok(app)
    table = app.dataframe[0].value
    assert list(table.columns) == ["File", "Class", "Confidence", "Verdict"]
    assert list(table["File"]) == ["a.png", "notes.png", "b.png"]
    assert table.loc[1, "Verdict"] == "Unreadable" and np.isnan(table.loc[1, "Confidence"])
    assert set(table.loc[[0, 2], "Class"]) <= set(CLASSES)
    # Each row and each card against the Predictor's own answer for the same bytes (the app's instance):
    # the table holds the confidence in percent rounded to 0.1, the card its probability_text.
    predictor = dashboard.load_predictor(str(checkpoint))
    expected = [predictor.predict(png_bytes(0), name="a.png"), predictor.predict(png_bytes(1, seed=5), name="b.png")]
    assert list(table.loc[[0, 2], "Class"]) == [p.top_class for p in expected]
    assert list(table.loc[[0, 2], "Confidence"]) == pytest.approx([round(p.confidence * 100, 1) for p in expected],
                                                                  abs=1e-6)
    shown = [m.value for m in app.main.metric if m.label == "Calibrated confidence"]
    assert shown == [dashboard.probability_text(p.confidence) for p in expected]
    assert [s.value for s in app.main.subheader] == ["Summary of 3 images", "a.png", "notes.png", "b.png"]
    errors = [e.value for e in app.error if "notes.png" in e.value]
    assert len(errors) == 1 and errors[0].startswith("Cannot read image 'notes.png'")
    assert len(app.image) == 6                           # both good images fully analysed


def test_slider_and_class_changes_never_rerun_the_model_for_a_seen_image(app, explain_calls):
    run_ok(app)
    app.file_uploader(key="uploads").set_value(("x.png", png_bytes(2), "image/png"))
    run_ok(app)
    assert explain_calls == [None]                             # one forward pass: prediction + map
    predicted = app.selectbox[0].value
    other = next(c for c in CLASSES if c != predicted)

    app.slider[0].set_value(0.75)
    run_ok(app)
    assert explain_calls == [None]
    assert app.image[2].captions[0] == "Overlay (75% heatmap)"

    app.selectbox[0].set_value(other)
    run_ok(app)
    assert explain_calls == [None, other]                      # a class never shown before: one run
    assert app.image[1].captions[0] == f"Heatmap: {other}"

    for step in (lambda: app.slider[0].set_value(0.2), lambda: app.selectbox[0].set_value(predicted),
                 lambda: app.selectbox[0].set_value(other), lambda: app.slider[0].set_value(0.9)):
        step()
        run_ok(app)
    assert explain_calls == [None, other]                      # everything else came from the cache


def test_model_is_loaded_once_per_process_and_reloaded_when_the_file_changes(monkeypatch, tmp_path):
    checkpoint = write_checkpoint(tmp_path / "shared.safetensors", seed=2)
    monkeypatch.setenv("MEDISCAN_MODEL", str(checkpoint))
    loads: list[str] = []
    original = Predictor.__init__

    def counting(self, checkpoint=None, *args, **kwargs):
        loads.append(str(checkpoint))
        original(self, checkpoint, *args, **kwargs)

    monkeypatch.setattr(Predictor, "__init__", counting)
    for _ in range(2):                                          # two sessions, several reruns each
        at = run_ok(AppTest.from_file(APP, default_timeout=60))
        run_ok(at)
    assert len(loads) == 1
    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))   # "retrained" in place
    run_ok(AppTest.from_file(APP, default_timeout=60))
    assert len(loads) == 2


# ------------------------------------------------------------------------------------ pure helpers


def test_report_has_model_output_and_identity_but_no_dicom_patient_fields(checkpoint):
    predictor = dashboard.load_predictor(str(checkpoint))
    explanation = predictor.explain(dicom_with_patient(), name="scan.dcm")
    report = dashboard.analysis_report("scan.dcm", explanation, predictor.model_card(), opacity=0.55)
    text = json.dumps(report)                                  # must be JSON-serialisable as is
    for secret in ("Doe", "Jane", "SECRET123", "19700101"):
        assert secret not in text
    assert report["file_name"] == "scan.dcm"
    assert report["prediction"]["top_class"] in CLASSES
    assert set(report["prediction"]["probabilities"]) == set(CLASSES)
    assert report["prediction"]["verdict"] in ("confident", "uncertain", "out_of_scope")
    assert report["model"]["checkpoint"] == str(checkpoint) and report["model"]["test_accuracy"] == 0.9125
    assert report["explanation"]["overlay_opacity"] == 0.55
    assert report["not_for_clinical_use"] == NOT_FOR_CLINICAL_USE
    assert explanation.overlay_png(0.55).startswith(b"\x89PNG")


def test_probability_chart_is_sorted_and_labelled():
    prediction = types.SimpleNamespace(probabilities={"bone": 0.1, "brain": 0.6, "heart": 0.05, "lungs": 0.25},
                                       top_class="brain")
    frame = dashboard.probability_chart(prediction).data
    assert list(frame["class"]) == ["brain", "lungs", "bone", "heart"]
    assert list(frame["label"]) == ["60.0%", "25.0%", "10.0%", "5.0%"]
    assert list(frame["predicted"]) == [True, False, False, False]


def test_probability_text_never_rounds_to_certainty():
    assert dashboard.probability_text(0.8734) == "87.3%"
    assert dashboard.probability_text(0.99996) == ">99.9%" and dashboard.probability_text(1.0) == "100.0%"
    assert dashboard.probability_text(0.00004) == "<0.1%" and dashboard.probability_text(0.0) == "0.0%"


def test_explanation_cache_is_bounded_and_counts_shared_entries_once():
    item = types.SimpleNamespace(nbytes=40)
    cache = dashboard.ExplanationCache(max_entries=3, max_bytes=100)
    for key in "abc":
        cache.put((key,), item)                                # one object under three keys: 40 bytes
    assert len(cache) == 3
    cache.get(("a",))                                          # a is now the most recently used
    cache.put(("d",), types.SimpleNamespace(nbytes=50))
    assert cache.get(("b",)) is None and cache.get(("a",)) is item
    cache.put(("e",), types.SimpleNamespace(nbytes=90))       # over the byte budget: only e fits
    assert len(cache) == 1 and cache.get(("e",)) is not None


def test_faithfulness_sentence_reads_naturally():
    explanation = types.SimpleNamespace(explained_class="lungs", faithfulness={"drop_top": 0.42, "drop_random": -0.03})
    score, sentence = dashboard.faithfulness_sentence(explanation)
    assert score == pytest.approx(0.45)
    assert "lowers the model's probability of 'lungs' by 42 points" in sentence
    assert "raises it by 3 points" in sentence
    assert dashboard.faithfulness_sentence(types.SimpleNamespace(explained_class="x", faithfulness={})) is None
    _, sentence = dashboard.faithfulness_sentence(
        types.SimpleNamespace(explained_class="x", faithfulness={"drop_top": 0.011, "drop_random": 0.001}))
    assert "by 1 point;" in sentence and "barely changes it." in sentence


# ------------------------------------------------------------------------------------ app.py entry


def test_app_py_dispatches_flask_to_the_api(monkeypatch):
    import app as entry  # importing it outside Streamlit renders nothing
    received = []
    monkeypatch.setitem(sys.modules, "mediscan.apps.serve",
                        types.SimpleNamespace(main=lambda argv: received.append(argv) or 7))
    assert entry.main(["flask", "--port", "5001"]) == 7
    assert received == [["--port", "5001"]]


def test_python_app_py_without_a_command_prints_usage():
    done = subprocess.run([sys.executable, APP], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert "streamlit run app.py" in done.stderr and "python app.py flask" in done.stderr
    assert "streamlit" not in done.stdout
