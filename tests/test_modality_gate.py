"""The modality gate (issue 18): a DICOM whose Modality or SOP class the checkpoint was not trained on is
``out_of_scope`` before any network runs; the rest of its batch still runs; old checkpoints get the default.

Expected values are written out here (SOP class UIDs from pydicom, the default modality list by hand), never
read from the code under test.
"""
from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid as dicom_uid

from mediscan.core.checkpoint import CheckpointError, new_metadata, save_checkpoint
from mediscan.core.dicom_header import DicomHeader
from mediscan.core.modality_gate import checkpoint_modalities, modality_gate
from mediscan.core.preprocessing import PreprocessConfig
from mediscan.devtools.synthetic import CLASSES, dicom_bytes, pattern_image, tiny_model
from mediscan.inference.predictor import Predictor

#: The documented default, written out (COMMON.md / issue 18).
DEFAULT = ("CR", "DX", "CT", "MR", "XA", "RF")


def dicom(modality: str = "CR", sop_class: str = dicom_uid.ComputedRadiographyImageStorage, label: int = 0) -> bytes:
    """A 64 x 64 DICOM of one pattern class with this Modality and SOP class."""
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(pattern_image(label, 64).astype(np.uint16) * 256)))
    ds.Modality = modality
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def checkpoint(path, **meta_extra):
    """A tiny checkpoint whose metadata has exactly the given extra keys (no ``modalities`` unless given)."""
    meta = new_metadata(list(CLASSES), PreprocessConfig(64), "random", **meta_extra)
    if "modalities" not in meta_extra:
        meta.pop("modalities", None)        # an old checkpoint: written before the key existed
    return save_checkpoint(path, tiny_model(CLASSES, 0), meta)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return Predictor(checkpoint(tmp_path_factory.mktemp("gate") / "old.safetensors"), "cpu", backend="torch")


# ------------------------------------------------------------------------------------------ the rule

@pytest.mark.parametrize("modality, sop_class, stopped", [
    ("CR", dicom_uid.ComputedRadiographyImageStorage, False),
    ("DX", dicom_uid.DigitalXRayImageStorageForPresentation, False),
    ("CT", dicom_uid.EnhancedCTImageStorage, False),
    ("MR", dicom_uid.MRImageStorage, False),
    ("", dicom_uid.SecondaryCaptureImageStorage, False),          # nothing says what it is: not stopped
    ("MR", "1.2.3.4.5", False),                                    # a private SOP class says nothing either
    ("US", dicom_uid.UltrasoundImageStorage, True),
    ("CR", dicom_uid.UltrasoundImageStorage, True),                # the SOP class tells, whatever Modality says
    ("NM", dicom_uid.NuclearMedicineImageStorage, True),
    ("PT", dicom_uid.PositronEmissionTomographyImageStorage, True),
    ("MG", dicom_uid.DigitalMammographyXRayImageStorageForPresentation, True),
    ("OT", dicom_uid.SecondaryCaptureImageStorage, True),
    ("SEG", dicom_uid.SegmentationStorage, True),
    ("SR", dicom_uid.BasicTextSRStorage, True),
    ("KO", dicom_uid.KeyObjectSelectionDocumentStorage, True),
    ("PR", dicom_uid.GrayscaleSoftcopyPresentationStateStorage, True),
    ("RTDOSE", dicom_uid.RTDoseStorage, True),
    ("CR", dicom_uid.RTStructureSetStorage, True),                 # non-image SOP class, whatever Modality says
])
def test_gate_stops_what_the_default_set_does_not_hold(modality, sop_class, stopped):
    reason = modality_gate(DicomHeader(modality=modality, sop_class_uid=sop_class), DEFAULT)
    assert (reason is not None) == stopped, reason
    if stopped:
        assert reason.endswith("not analysed.") and ("Modality" in reason or "SOP class" in reason)


def test_gate_sentence_names_the_modality_and_the_trained_set():
    reason = modality_gate(DicomHeader(modality="US", sop_class_uid=dicom_uid.UltrasoundImageStorage), DEFAULT)
    assert reason == ("Modality US (ultrasound) is not one this model was trained on (CR, DX, CT, MR, XA, RF); "
                      "it was not analysed.")


def test_gate_follows_the_checkpoint_set_and_ignores_non_dicom():
    us = DicomHeader(modality="US", sop_class_uid=dicom_uid.UltrasoundImageStorage)
    assert modality_gate(us, ["us", "CR"]) is None                      # trained on ultrasound: analysed
    assert modality_gate(DicomHeader(modality="CR"), ["US"]) is not None
    assert modality_gate(None, ["US"]) is None                           # PNG/JPEG: no header, no gate
    sr = DicomHeader(modality="SR", sop_class_uid=dicom_uid.BasicTextSRStorage)
    assert "not an image" in modality_gate(sr, ["SR", "CR"])              # non-image objects: never


def test_checkpoint_modalities_default_and_bad_values():
    assert checkpoint_modalities({}) == DEFAULT
    assert checkpoint_modalities({"modalities": None}) == DEFAULT
    assert checkpoint_modalities({"modalities": ["dx", " CR ", "DX"]}) == ("DX", "CR")
    for bad in ([], "CR", [1], [""], ["X" * 17]):
        with pytest.raises(ValueError, match="modalities"):
            checkpoint_modalities({"modalities": bad})


# ------------------------------------------------------------------------------------------ the Predictor

def test_old_checkpoint_uses_the_default(predictor):
    assert "modalities" not in predictor.meta
    assert predictor.modalities == DEFAULT
    assert predictor.model_card()["modalities"] == list(DEFAULT)


def test_us_dicom_is_out_of_scope_and_never_reaches_the_network(predictor, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the network ran for an input the modality gate stops")
    monkeypatch.setattr(predictor.net, "tapped_features", no_network)
    for p in (predictor.predict(dicom("US", dicom_uid.UltrasoundImageStorage), name="us.dcm"),
              predictor.explain(dicom("US", dicom_uid.UltrasoundImageStorage), name="us.dcm").prediction):
        assert p.verdict == "out_of_scope" and p.top_class is None and p.confidence is None
        assert p.probabilities == {} and p.ood_score is None and p.header_check is None
        assert p.verdict_reason.startswith("Modality US (ultrasound) is not one this model was trained on")
        assert p.dicom["modality"] == "US"
        assert p.to_dict()["top_class"] is None and p.to_dict()["confidence"] is None
    explanation = predictor.explain(dicom("NM", dicom_uid.NuclearMedicineImageStorage))
    assert explanation.explained_class is None and not np.any(explanation.heatmap)
    gray = np.round(explanation.image * 255)
    assert np.abs(explanation.overlay(0.6).astype(float) - gray[:, :, None]).max() <= 1   # the image, no colour wash


def test_a_batch_runs_its_other_rows_without_the_gated_one(predictor, monkeypatch):
    inputs = [dicom("CR", label=1), dicom("US", dicom_uid.UltrasoundImageStorage), png_bytes(pattern_image(2, 64)),
              dicom("MG", dicom_uid.DigitalMammographyXRayImageStorageForPresentation)]
    alone = [predictor.predict(inputs[0]), predictor.predict(inputs[2])]
    rows_seen = []
    real = predictor.net.tapped_features

    def counting(batch, *args, **kwargs):
        rows_seen.append(batch.shape[0])
        return real(batch, *args, **kwargs)
    monkeypatch.setattr(predictor.net, "tapped_features", counting)
    together = predictor.predict_many(inputs, batch_size=4)
    assert rows_seen == [2]                                   # one forward pass, of the two analysable rows
    assert [p.top_class is None for p in together] == [False, True, False, True]
    for mine, single in zip((together[0], together[2]), alone):
        assert mine.top_class == single.top_class
        for name in CLASSES:
            assert mine.probabilities[name] == pytest.approx(single.probabilities[name], abs=1e-5)
    assert together[3].verdict_reason.startswith("Modality MG (mammography)")
    maps = predictor.explain_many(inputs, batch_size=4)
    assert [m.explained_class is None for m in maps] == [False, True, False, True]


def test_cr_passes_and_a_checkpoint_trained_on_us_reads_us(predictor, tmp_path):
    p = predictor.predict(dicom("CR"))
    assert p.top_class in CLASSES and p.verdict != "out_of_scope" and set(p.probabilities) == set(CLASSES)
    us_model = Predictor(checkpoint(tmp_path / "us.safetensors", modalities=["US"]), "cpu", backend="torch")
    assert us_model.predict(dicom("US", dicom_uid.UltrasoundImageStorage)).top_class in CLASSES
    assert us_model.predict(dicom("CR")).top_class is None          # CR is now outside the set
    assert us_model.predict(png_bytes(pattern_image(0, 64))).top_class in CLASSES   # no header: not gated


def test_damaged_modalities_key_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="modalities"):
        Predictor(checkpoint(tmp_path / "bad.safetensors", modalities="CR"), "cpu", backend="torch")
