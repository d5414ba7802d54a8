"""The MediScan dashboard: Streamlit render functions. The page is :func:`render`.

Run it with::

    streamlit run app.py                         # model from $MEDISCAN_MODEL, else models/best.safetensors
    MEDISCAN_MODEL=path/to/best.safetensors streamlit run app.py

Page structure (top to bottom)::

    title + "not for clinical use" banner
    sidebar: checkpoint path field, model card (classes, weights, training date, test accuracy, ECE)
    no model   -> what is missing, the training command, the expected dataset layout
    model      -> uploader (PNG/JPEG/TIFF/BMP/DICOM, several at once)
                  summary table (only for several uploads)
                  per image: prediction + verdict | probability bars
                             Grad-CAM: class choice, opacity slider, original | heatmap | overlay,
                             faithfulness, downloads (overlay PNG, JSON report)

Costs: the model is loaded once per process (:func:`load_predictor`, keyed by checkpoint path and file
mtime) and shared by every session; the :class:`~mediscan.predictor.Predictor` is thread-safe. Each
(image, explained class) pair runs the model at most once per session (:class:`ExplanationCache`), so
moving the opacity slider or going back to a class already shown only re-blends the overlay.

Privacy: uploads stay in memory (Streamlit keeps them in RAM; nothing here writes or logs them), and the
JSON report holds the file name, the model's output and the model's identity -- no DICOM header field.

No model code and no Flask here: everything model-related goes through :mod:`mediscan.predictor`.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import altair as alt
import cv2
import numpy as np
import pandas as pd
import streamlit as st

from mediscan import NOT_FOR_CLINICAL_USE, __version__
from mediscan.core.checkpoint import CheckpointError
from mediscan.core.imaging import SUPPORTED_SUFFIXES, ImageReadError
from mediscan.core.preprocessing import to_uint8
from mediscan.explain.overlays import colorize  # top-level module of this project (torch/numpy/cv2 only)
from mediscan.inference.predictor import (
    DEFAULT_CHECKPOINT,
    ENV_CHECKPOINT,
    TRAIN_COMMAND,
    Explanation,
    ModelNotFoundError,
    Prediction,
    Predictor,
    resolve_checkpoint_path,
)

__all__ = [
    "render", "load_predictor", "ExplanationCache", "ImageResult", "analysis_report", "probability_chart",
    "summary_table", "faithfulness_sentence", "probability_text", "UPLOAD_TYPES", "DATASET_LAYOUT",
]

PAGE_TITLE = "MediScan: X-ray organ classifier"
#: File types the uploader offers (the decoder sniffs the content; the suffix only filters the dialog).
UPLOAD_TYPES = sorted(suffix.lstrip(".") for suffix in SUPPORTED_SUFFIXES)
#: Shown when there is no model; the class folders are the ones the project trains by default.
DATASET_LAYOUT = """dataset/
├── train/
│   ├── bone/     *.png  *.jpg  *.tif  *.dcm ...
│   ├── brain/
│   ├── heart/
│   └── lungs/
├── val/          same class folders (optional: split off train/ when absent)
└── test/         same class folders"""
DEFAULT_OPACITY = 0.4
#: Images are shown at most this many pixels wide/high: a 3000 px X-ray sent three times per slider move
#: would make the page sluggish. Downloads keep the full resolution.
PREVIEW_MAX_SIDE = 768
VERDICT_LABELS = {"confident": "Confident", "uncertain": "Uncertain", "out_of_scope": "Out of scope",
                  "error": "Unreadable"}
_CACHE_STATE_KEY = "mediscan_explanations"


# --------------------------------------------------------------------------------------------------
# Model loading (once per process, shared across sessions)
# --------------------------------------------------------------------------------------------------

def default_checkpoint_text() -> str:
    """The checkpoint path field's initial value: ``$MEDISCAN_MODEL``, else ``models/best.safetensors``."""
    return os.environ.get(ENV_CHECKPOINT) or str(DEFAULT_CHECKPOINT)


@st.cache_resource(max_entries=2, show_spinner="Loading the model ...")
def _cached_predictor(path: str, mtime_ns: int, size: int) -> Predictor:
    # mtime and size are part of the key only: a retrained checkpoint at the same path is reloaded, and
    # max_entries=2 lets the replaced model be freed.
    del mtime_ns, size
    return Predictor(path)


def load_predictor(path_text: str | None) -> Predictor:
    """The shared :class:`Predictor` for the checkpoint at ``path_text`` (empty = the Predictor's default).

    Raises :class:`ModelNotFoundError` when there is no file, :class:`CheckpointError` when it is unusable.
    """
    path = resolve_checkpoint_path(path_text or None).resolve()
    stat = path.stat()
    return _cached_predictor(str(path), stat.st_mtime_ns, stat.st_size)


def model_key(predictor: Predictor) -> str:
    """Identifies the loaded weights, so cached explanations never outlive a model switch."""
    path = Path(predictor.checkpoint_path)
    try:
        return f"{path}:{path.stat().st_mtime_ns}"
    except OSError:
        return str(path)


# --------------------------------------------------------------------------------------------------
# Per-session explanation cache
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CachedExplanation:
    """An explanation at full resolution (downloads) plus a small copy for the page (previews)."""

    full: Explanation
    preview: Explanation

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.full.image, self.full.heatmap,
                                           self.preview.image, self.preview.heatmap))


def preview_of(explanation: Explanation, max_side: int = PREVIEW_MAX_SIDE) -> Explanation:
    """The same explanation with image and heatmap shrunk to at most ``max_side`` pixels."""
    height, width = explanation.image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return explanation
    size = (max(1, round(width * scale)), max(1, round(height * scale)))   # cv2 wants (width, height)
    image = cv2.resize(explanation.image, size, interpolation=cv2.INTER_AREA)
    heatmap = cv2.resize(explanation.heatmap, size, interpolation=cv2.INTER_AREA)
    return dataclasses.replace(explanation, image=image, heatmap=heatmap)


class ExplanationCache:
    """A bounded LRU of explanations keyed by (model, image-bytes hash, explained class).

    Lives in ``st.session_state`` (see :func:`session_cache`): results of one user's images stay in that
    user's session and disappear with it. Bounded by entry count and by bytes, because full-resolution
    X-rays are tens of MB each.
    """

    def __init__(self, max_entries: int = 24, max_bytes: int = 512 * 2**20):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, CachedExplanation] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple) -> CachedExplanation | None:
        """The cached entry (marked as recently used), or ``None``."""
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: tuple, item: CachedExplanation) -> None:
        """Store ``item``, evicting the least recently used entries beyond the bounds (never ``item``)."""
        self._items[key] = item
        self._items.move_to_end(key)
        while len(self._items) > 1 and (len(self._items) > self.max_entries or self._total_bytes() > self.max_bytes):
            self._items.popitem(last=False)

    def _total_bytes(self) -> int:
        # Several keys may share one entry (the default-class alias); count each object once.
        return sum(item.nbytes for item in {id(i): i for i in self._items.values()}.values())

    def explain(self, predictor: Predictor, data: bytes, class_name: str | None, *, name: str,
                model: str, digest: str) -> CachedExplanation:
        """The explanation of ``data`` for ``class_name`` (``None`` = predicted class), computing it only once.

        ``digest`` is the SHA-256 of ``data`` (the caller already has it). Raises what
        :meth:`Predictor.explain` raises (:class:`ImageReadError` for a bad image).
        """
        key = (model, digest, class_name)
        cached = self.get(key)
        if cached is not None:
            return cached
        explanation = predictor.explain(data, class_name, name=name)
        item = CachedExplanation(explanation, preview_of(explanation))
        self.put(key, item)
        if class_name is None:   # choosing the predicted class by name later must not run the model again
            self.put((model, digest, explanation.explained_class), item)
        return item


def session_cache() -> ExplanationCache:
    """This session's :class:`ExplanationCache` (created on first use)."""
    if _CACHE_STATE_KEY not in st.session_state:
        st.session_state[_CACHE_STATE_KEY] = ExplanationCache()
    return st.session_state[_CACHE_STATE_KEY]


# --------------------------------------------------------------------------------------------------
# Pure helpers (no Streamlit calls): results, chart, table, report
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageResult:
    """One upload after analysis: its default (predicted-class) explanation, or the reason it failed."""

    name: str
    file_id: str
    digest: str
    data: bytes = dataclasses.field(repr=False)
    default: CachedExplanation | None = None
    error: str | None = None

    @property
    def prediction(self) -> Prediction | None:
        return None if self.default is None else self.default.full.prediction


def upload_digest(data: bytes) -> str:
    """SHA-256 of the upload's bytes: the cache key for its explanations."""
    return hashlib.sha256(data).hexdigest()


def probability_chart(prediction: Prediction, text_color: str = "#e8eaed") -> alt.Chart:
    """Horizontal bars of every class probability, highest first, each labelled with its percentage.

    ``text_color`` colours the percentage labels (Vega's default black is unreadable on the dark theme).
    """
    frame = pd.DataFrame({"class": list(prediction.probabilities),
                          "probability": [float(p) for p in prediction.probabilities.values()]})
    frame = frame.sort_values("probability", ascending=False, kind="stable").reset_index(drop=True)
    frame["label"] = [probability_text(p) for p in frame["probability"]]
    frame["predicted"] = frame["class"] == prediction.top_class
    order = list(frame["class"])
    # The x domain runs past 100 % so the label of a near-certain class still fits right of its bar.
    base = alt.Chart(frame).encode(
        y=alt.Y("class:N", sort=order, title=None, axis=alt.Axis(labelFontSize=14, labelLimit=160)),
        x=alt.X("probability:Q", title="Calibrated probability", scale=alt.Scale(domain=[0, 1.18]),
                axis=alt.Axis(format="%", values=[0, 0.25, 0.5, 0.75, 1.0])),
        tooltip=[alt.Tooltip("class:N", title="Class"), alt.Tooltip("label:N", title="Probability")],
    )
    bars = base.mark_bar(cornerRadiusEnd=3).encode(
        color=alt.Color("predicted:N", legend=None,
                        scale=alt.Scale(domain=[True, False], range=["#ff4b4b", "#5c6b80"])))
    labels = base.mark_text(align="left", dx=5, fontSize=13, color=text_color).encode(text="label:N")
    return (bars + labels).properties(height=36 * len(order) + 20)


def summary_table(results: list[ImageResult]) -> pd.DataFrame:
    """One row per upload: file, class, confidence (percent, ``None`` when unreadable) and verdict."""
    rows = []
    for result in results:
        prediction = result.prediction
        rows.append({
            "File": result.name,
            "Class": prediction.top_class if prediction else "-",
            "Confidence": round(prediction.confidence * 100, 1) if prediction else None,
            "Verdict": VERDICT_LABELS[prediction.verdict if prediction else "error"],
        })
    return pd.DataFrame(rows, columns=["File", "Class", "Confidence", "Verdict"])


def faithfulness_sentence(explanation: Explanation) -> tuple[float, str] | None:
    """(score, one sentence on how to read it), or ``None`` when the explanation has no faithfulness.

    The score is ``drop_top - drop_random`` in probability points: how much more hiding the hottest
    20 % of the image hurts the explained class than hiding a random 20 %.
    """
    faith = explanation.faithfulness
    if not faith or "drop_top" not in faith or "drop_random" not in faith:
        return None
    top, rand = float(faith["drop_top"]), float(faith["drop_random"])
    probability = f"the model's probability of '{explanation.explained_class}'"
    sentence = (f"Hiding the 20 % of the image that the map marks hottest {_change(top, probability)}; "
                f"hiding a random 20 % {_change(rand, 'it')}. A faithful map scores clearly above zero (its "
                f"hot region matters more than a random one); near zero or below, the map does not show "
                f"what drives this prediction.")
    return top - rand, sentence


def _change(drop: float, what: str) -> str:
    points = round(drop * 100)   # an int: never "-0"
    if points == 0:
        return f"barely changes {what}"
    unit = "point" if abs(points) == 1 else "points"
    return f"{'lowers' if points > 0 else 'raises'} {what} by {abs(points)} {unit}"


def analysis_report(file_name: str, explanation: Explanation, card: dict, *, opacity: float) -> dict:
    """The JSON report of one analysis: file name, model output, explanation and model identity.

    Holds no DICOM header field and no pixel data: only the upload's name and what the model said.
    """
    prediction = explanation.prediction.to_dict()
    prediction.pop("source", None)   # the upload name is reported once, as file_name
    model_fields = ("checkpoint", "architecture", "weight_source", "created", "classes", "input_size",
                    "temperature", "test_accuracy", "ece", "out_of_scope_check", "trained_with_version")
    return {
        "report": "MediScan analysis",
        "not_for_clinical_use": NOT_FOR_CLINICAL_USE,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "file_name": file_name,
        "image_size": {"height": int(explanation.image.shape[0]), "width": int(explanation.image.shape[1])},
        "prediction": prediction,
        "explanation": {
            "explained_class": explanation.explained_class,
            "method": explanation.method,
            "faithfulness": {k: round(float(v), 6) for k, v in explanation.faithfulness.items()},
            "overlay_opacity": float(opacity),
        },
        "model": {name: card.get(name) for name in model_fields},
        "software": {"mediscan": __version__},
    }


def file_stem(name: str) -> str:
    """A safe base name for download files derived from the upload's name."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("._")
    return stem or "image"


def probability_text(p: float) -> str:
    """``0.873`` -> ``"87.3%"``; never claims certainty that rounding made up (``">99.9%"``, ``"<0.1%"``)."""
    p = float(p)
    if 0.999 < p < 1.0 and f"{p:.1%}" == "100.0%":
        return ">99.9%"
    if 0.0 < p < 0.001 and f"{p:.1%}" == "0.0%":
        return "<0.1%"
    return f"{p:.1%}"


def percent(value: Any) -> str:
    """``0.973`` -> ``"97.3%"``; ``None`` -> ``"not measured"``."""
    return "not measured" if value is None else f"{float(value):.1%}"


def training_date(created: Any) -> str:
    """The checkpoint's ``created`` timestamp as ``YYYY-MM-DD HH:MM UTC`` (raw text if unparsable)."""
    if not created:
        return "unknown"
    try:
        moment = _dt.datetime.fromisoformat(str(created))
    except ValueError:
        return str(created)
    if moment.tzinfo is not None:
        moment = moment.astimezone(_dt.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def chart_text_color() -> str:
    """Light text on the dark theme (the default), dark text when the browser reports a light theme."""
    return "#31333f" if getattr(st.context.theme, "type", None) == "light" else "#e8eaed"


# --------------------------------------------------------------------------------------------------
# Render functions
# --------------------------------------------------------------------------------------------------

def render() -> None:
    """The whole page (what ``streamlit run app.py`` shows)."""
    st.set_page_config(page_title="MediScan", page_icon=":material/radiology:", layout="wide",
                       menu_items={"Get help": None, "Report a bug": None,
                                   "About": f"MediScan {__version__}. {NOT_FOR_CLINICAL_USE}"})
    render_header()
    path_text = render_checkpoint_field()
    try:
        predictor = load_predictor(path_text)
    except ModelNotFoundError:
        render_no_model(path_text)
        return
    except CheckpointError as error:
        render_bad_checkpoint(error)
        return
    render_model_card(predictor.model_card())
    uploads = render_uploader()
    if not uploads:
        st.info("Upload one or more X-ray images above to classify them and see where the model looked.")
        return
    results = analyse_uploads(predictor, uploads)
    if len(results) > 1:
        render_summary(results)
    for result in results:
        render_result(predictor, result)


def render_header() -> None:
    """Title, one-line purpose and the "not for clinical use" banner."""
    st.title(":material/radiology: MediScan")
    # No class names here: they come from the checkpoint (the sidebar's model card lists them).
    st.markdown("Which organ does an X-ray show? A DenseNet121 classifier with calibrated confidence "
                "and Grad-CAM heatmaps of where it looked.")
    st.warning(f"**Not for clinical use.** {NOT_FOR_CLINICAL_USE}", icon=":material/warning:")


def render_checkpoint_field() -> str:
    """The sidebar's checkpoint path field; returns its text."""
    st.sidebar.header("Model")
    return st.sidebar.text_input(
        "Checkpoint file", value=default_checkpoint_text(), key="checkpoint_path",
        help=f"A .safetensors checkpoint written by training (or its folder). Defaults to "
             f"${ENV_CHECKPOINT} when set, else {DEFAULT_CHECKPOINT}.").strip()


def render_model_card(card: dict) -> None:
    """The model card in the sidebar: classes, weights, training date, test accuracy, calibration error."""
    side = st.sidebar
    side.subheader("Model card")
    side.markdown(f"**Classes:** {', '.join(card['classes'])}  \n"
                  f"**Weights:** {card.get('weight_source') or 'unknown'}  \n"
                  f"**Trained:** {training_date(card.get('created'))}  \n"
                  f"**Input:** {card.get('input_size')} px · **Device:** {card.get('device')}")
    side.metric("Test accuracy", percent(card.get("test_accuracy")),
                    help="Share of the held-out test images classified correctly when the model was trained.")
    side.metric("Calibration error (ECE)", percent(card.get("ece")),
               help="Expected calibration error (ECE) after temperature scaling: how far the stated "
                    "confidence is from the real hit rate on average. Lower is better.")
    side.caption(card.get("out_of_scope") or "")
    side.caption(f"Checkpoint: `{card.get('checkpoint')}` · MediScan {card.get('version')}")


def render_no_model(path_text: str) -> None:
    """The friendly page shown when there is no checkpoint yet."""
    where = path_text or default_checkpoint_text()
    st.header("No trained model yet")
    st.markdown(f"MediScan needs a trained checkpoint and found none at `{where}`. "
                f"Train one (it writes `{DEFAULT_CHECKPOINT}`), or enter the path of an existing "
                f"checkpoint in the **Checkpoint file** field in the sidebar.")
    st.markdown("**1. Put your labelled X-rays in this layout** (one folder per class):")
    st.code(DATASET_LAYOUT, language=None)
    st.markdown("**2. Train** (from the project folder):")
    st.code(TRAIN_COMMAND, language="bash")
    st.markdown("**3. Reload this page.** The model is loaded once and shared by every visitor.")


def render_bad_checkpoint(error: CheckpointError) -> None:
    """A checkpoint exists but cannot be used (corrupt, another architecture ...)."""
    st.header("This checkpoint cannot be used")
    st.error(str(error))
    st.markdown("Point the **Checkpoint file** field in the sidebar to another checkpoint, or train a new one:")
    st.code(TRAIN_COMMAND, language="bash")


def render_uploader() -> list:
    """The upload widget (several files); returns the uploaded files (in memory, never written to disk)."""
    uploads = st.file_uploader(
        "Upload X-ray images", type=UPLOAD_TYPES, accept_multiple_files=True, key="uploads",
        help="PNG, JPEG, BMP, TIFF (8 or 16 bit) or DICOM. Images are analysed in memory and not stored.")
    return list(uploads or [])


def analyse_uploads(predictor: Predictor, uploads: list) -> list[ImageResult]:
    """Predict (and explain the predicted class of) every upload; one bad file never stops the others."""
    cache, model = session_cache(), model_key(predictor)
    results = []
    for upload in uploads:
        data = upload.getvalue()
        digest = upload_digest(data)
        common = dict(name=upload.name, file_id=str(upload.file_id), digest=digest, data=data)
        try:
            with st.spinner(f"Analysing {upload.name} ..."):
                item = cache.explain(predictor, data, None, name=upload.name, model=model, digest=digest)
        except ImageReadError as error:
            results.append(ImageResult(**common, error=str(error)))
        except Exception as error:  # noqa: BLE001 -- one failing image must not hide the other results
            results.append(ImageResult(**common, error=f"Could not analyse '{upload.name}' "
                                                       f"({type(error).__name__}: {error})."))
        else:
            results.append(ImageResult(**common, default=item))
    return results


def render_summary(results: list[ImageResult]) -> None:
    """The table above the details when several images were uploaded."""
    st.subheader(f"Summary of {len(results)} images")
    st.dataframe(
        summary_table(results), hide_index=True,
        column_config={"Confidence": st.column_config.ProgressColumn(
            "Confidence", min_value=0.0, max_value=100.0, format="%.1f%%",
            help="Calibrated probability of the predicted class")})


def render_result(predictor: Predictor, result: ImageResult) -> None:
    """Everything about one upload, in its own bordered box."""
    with st.container(border=True):
        st.subheader(result.name)
        if result.error is not None:
            st.error(result.error)
            return
        prediction = result.prediction
        left, right = st.columns([2, 3], gap="large")
        with left:
            render_prediction(prediction)
        with right:
            st.altair_chart(probability_chart(prediction, chart_text_color()), width="stretch")
        render_gradcam(predictor, result)


def render_prediction(prediction: Prediction) -> None:
    """The predicted organ, its calibrated confidence and the verdict with a plain-language note."""
    label = "Predicted organ" if prediction.verdict == "confident" else "Best guess"
    organ, confidence = st.columns(2)
    organ.metric(label, prediction.top_class)
    confidence.metric("Calibrated confidence", probability_text(prediction.confidence),
                      help="Temperature-scaled probability: of many images given this confidence, about "
                           "this share should be right.")
    render_verdict(prediction)
    for note in prediction.warnings:
        st.caption(f"Note: {note}")


def render_verdict(prediction: Prediction) -> None:
    """Green for confident, amber for uncertain, red for out of scope, each with what it means."""
    reason = prediction.verdict_reason
    if prediction.verdict == "confident":
        st.success(f"**Confident.** {reason}", icon=":material/check_circle:")
    elif prediction.verdict == "uncertain":
        st.warning(f"**Uncertain: treat this answer as a guess.** {reason}", icon=":material/help:")
    else:
        st.error(f"**Out of scope: this may not be an X-ray of a kind the model knows.** The organ shown "
                 f"above is probably meaningless. {reason}", icon=":material/block:")


def render_gradcam(predictor: Predictor, result: ImageResult) -> None:
    """Class choice, opacity slider, original | heatmap | overlay, faithfulness and downloads."""
    st.markdown("##### Grad-CAM: where the model looked")
    prediction = result.prediction
    classes = list(predictor.classes)
    choose, opacity = st.columns(2)
    class_name = choose.selectbox(
        "Explain class", classes, index=classes.index(prediction.top_class), key=f"class-{result.file_id}",
        format_func=lambda c: f"{c} (predicted)" if c == prediction.top_class else c,
        help="Show the regions that speak for this class.")
    alpha = opacity.slider("Heatmap opacity", 0.0, 1.0, DEFAULT_OPACITY, 0.05, key=f"opacity-{result.file_id}")

    if class_name == prediction.top_class:
        item = result.default
    else:
        item = session_cache().explain(predictor, result.data, class_name, name=result.name,
                                       model=model_key(predictor), digest=result.digest)
    preview = item.preview
    original, heat, blended = st.columns(3)
    original.image(to_uint8(preview.image), caption="Original", width="stretch", alt=f"{result.name} as uploaded")
    heat.image(colorize(preview.heatmap), caption=f"Heatmap: {class_name}", width="stretch",
               alt=f"Grad-CAM heatmap for {class_name}: red = most important for the model")
    blended.image(preview.overlay(alpha), caption=f"Overlay ({alpha:.0%} heatmap)", width="stretch",
                  alt=f"Grad-CAM heatmap for {class_name} over the image")
    if not np.any(item.full.heatmap > 0):
        st.caption(f"The heatmap is empty: nothing in this image stands out as evidence for '{class_name}' "
                   f"(the model's evidence is spread evenly, or there is none).")
    render_faithfulness(item.full)
    render_downloads(predictor, result, item.full, alpha)


def render_faithfulness(explanation: Explanation) -> None:
    """The faithfulness score and one sentence on how to read it."""
    found = faithfulness_sentence(explanation)
    if found is None:
        return
    score, sentence = found
    st.markdown(f"**Faithfulness score: {round(score * 100):+d} points.** {sentence}")


def render_downloads(predictor: Predictor, result: ImageResult, explanation: Explanation, alpha: float) -> None:
    """Overlay PNG (full resolution) and JSON report; both are built only when clicked."""
    stem = file_stem(result.name)
    card = predictor.model_card()
    png, report = st.columns(2)
    # Deferred (callable) data: encoding a full-resolution PNG on every slider move would be wasted work,
    # and on_click="ignore" keeps a download from re-running the page.
    png.download_button(
        "Download overlay (PNG)", data=lambda: explanation.overlay_png(alpha),
        file_name=f"{stem}_gradcam_{explanation.explained_class}.png", mime="image/png",
        key=f"png-{result.file_id}", on_click="ignore", icon=":material/image:")
    report.download_button(
        "Download report (JSON)",
        data=lambda: json.dumps(analysis_report(result.name, explanation, card, opacity=alpha), indent=2),
        file_name=f"{stem}_mediscan.json", mime="application/json",
        key=f"json-{result.file_id}", on_click="ignore", icon=":material/description:")
