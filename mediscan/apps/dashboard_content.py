"""What the dashboard shows, as pure functions (no Streamlit calls): per-upload results, the probability
chart, the summary table, the faithfulness sentence, the JSON report and the number formats.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import altair as alt
import pandas as pd

from mediscan import NOT_FOR_CLINICAL_USE, __version__
from mediscan.apps.dashboard_state import CachedExplanation
from mediscan.inference.predictor import Explanation, Prediction

VERDICT_LABELS = {"confident": "Confident", "uncertain": "Uncertain", "out_of_scope": "Out of scope",
                  "error": "Unreadable"}

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
        analysed = prediction is not None and prediction.analysed
        rows.append({
            "File": result.name,
            "Class": prediction.top_class if analysed else ("not analysed" if prediction else "-"),
            "Confidence": round(prediction.confidence * 100, 1) if analysed else None,
            "Verdict": VERDICT_LABELS[prediction.verdict if prediction else "error"],
        })
    return pd.DataFrame(rows, columns=["File", "Class", "Confidence", "Verdict"])


#: How the dashboard words each header-check status (:data:`mediscan.core.dicom_header.STATUSES`).
HEADER_CHECK_LABELS = {"agrees": "agrees with the prediction", "disagrees": "disagrees with the prediction",
                       "no_header": "no body part in the header", "not_mapped": "header value not in the mapping table"}


def dicom_facts(prediction: Prediction) -> list[str]:
    """Markdown lines for a DICOM upload: Modality, BodyPartExamined and the header check with the value it
    read (nothing for other uploads; never a patient field or a UID)."""
    if prediction.dicom is None:
        return []
    header = prediction.dicom
    lines = [(f"**DICOM header:** Modality `{header.get('modality') or '(empty)'}`, BodyPartExamined "
              f"`{header.get('body_part_examined') or '(empty)'}`")]
    check = prediction.header_check
    if check is not None:
        based = f" ({check['field']} `{check['value']}`)" if check.get("field") else ""
        lines.append(f"**Header check:** {check['status']}: {HEADER_CHECK_LABELS.get(check['status'], '')}{based}")
    return lines


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

    Holds no pixel data and no patient field; of a DICOM header only Modality and BodyPartExamined (with the
    header check), never a UID: only the upload's name and what the model said.
    """
    prediction = explanation.prediction.to_dict()
    prediction.pop("source", None)   # the upload name is reported once, as file_name
    if prediction.get("dicom") is not None:
        prediction["dicom"] = {key: prediction["dicom"].get(key) for key in ("modality", "body_part_examined")}
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
