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

Costs: the model is loaded once per process (``dashboard_state.load_predictor``, keyed by checkpoint path
and file mtime) and shared by every session; the :class:`~mediscan.inference.predictor.Predictor` is thread-safe. Each
(image, explained class) pair runs the model at most once per session (:class:`ExplanationCache`), so
moving the opacity slider or going back to a class already shown only re-blends the overlay.

Privacy: uploads stay in memory (Streamlit keeps them in RAM; nothing here writes or logs them), and the
JSON report holds the file name, the model's output and the model's identity -- no DICOM header field.

No model code and no Flask here: everything model-related goes through :mod:`mediscan.inference.predictor`.
"""
from __future__ import annotations

import json

import numpy as np
import streamlit as st

from mediscan import NOT_FOR_CLINICAL_USE, __version__
from mediscan.apps.dashboard_content import (
    ImageResult,
    analysis_report,
    dicom_facts,
    faithfulness_sentence,
    file_stem,
    percent,
    probability_chart,
    probability_text,
    summary_table,
    training_date,
    upload_digest,
)
from mediscan.apps.dashboard_state import (
    ExplanationCache,
    default_checkpoint_text,
    load_predictor,
    model_key,
    session_cache,
)
from mediscan.core.checkpoint import CheckpointError
from mediscan.core.imaging import SUPPORTED_SUFFIXES, ImageReadError
from mediscan.core.preprocessing import to_uint8
from mediscan.explain.overlays import colorize
from mediscan.inference.predictor import (
    DEFAULT_CHECKPOINT,
    ENV_CHECKPOINT,
    TRAIN_COMMAND,
    Explanation,
    ModelNotFoundError,
    Prediction,
    Predictor,
)

__all__ = [
    "render", "load_predictor", "ExplanationCache", "ImageResult", "analysis_report", "probability_chart",
    "summary_table", "faithfulness_sentence", "dicom_facts", "probability_text", "UPLOAD_TYPES", "DATASET_LAYOUT",
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
                  f"**Input:** {card.get('input_size')} px · **Device:** {card.get('device')}  \n"
                  f"**DICOM modalities:** {', '.join(card.get('modalities') or []) or 'unknown'}")
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
        if not prediction.analysed:        # stopped by the modality gate: no probabilities, no heatmap
            render_verdict(prediction)
            render_dicom(prediction)
            return
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
    render_dicom(prediction)
    for note in prediction.warnings:
        st.caption(f"Note: {note}")


def render_dicom(prediction: Prediction) -> None:
    """Modality, BodyPartExamined and the header check of a DICOM upload (never a patient field)."""
    for line in dicom_facts(prediction):
        st.markdown(line)


def render_verdict(prediction: Prediction) -> None:
    """Green for confident, amber for uncertain, red for out of scope, each with what it means."""
    reason = prediction.verdict_reason
    if prediction.verdict == "confident":
        st.success(f"**Confident.** {reason}", icon=":material/check_circle:")
    elif not prediction.analysed:
        st.error(f"**Out of scope: not analysed.** {reason}", icon=":material/block:")
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
