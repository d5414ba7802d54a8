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


# --------------------------------------------------------------------- objects without usable pixels

def pixel_less(modality: str, sop_class: str) -> bytes:
    """A DICOM object with this Modality and SOP class and no pixel data (what a PACS routes beside images)."""
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(None)))
    ds.Modality = modality
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def ultrasound_video() -> bytes:
    """An ultrasound cine in MPEG-4 (no Python decoder exists for DICOM video): its pixels are unusable."""
    from pydicom.encaps import encapsulate
    ds = pydicom.dcmread(io.BytesIO(dicom("US", dicom_uid.UltrasoundMultiFrameImageStorage)))
    ds.file_meta.TransferSyntaxUID = dicom_uid.MPEG4HP41
    ds.NumberOfFrames = 2
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_a_report_or_a_video_is_out_of_scope_by_its_header_not_unreadable(predictor):
    """A Structured Report has no pixels and an ultrasound cine none that can be decoded, but their headers say
    what they are: the answer is out_of_scope with the gate's sentence (in a batch too), not "cannot read". A CR
    without pixels has nothing the gate can stop: it stays a clear read error."""
    from mediscan.core.imaging import ImageReadError
    report = pixel_less("SR", dicom_uid.BasicTextSRStorage)
    with pytest.raises(ImageReadError) as err:                 # what the decoder alone says about it
        from mediscan.core.imaging import read_image
        read_image(report, name="report.dcm")
    assert err.value.reason == "no_pixel_data" and err.value.dicom.modality == "SR"

    p = predictor.predict(report, name="report.dcm")
    assert p.verdict == "out_of_scope" and p.top_class is None and p.probabilities == {}
    assert p.verdict_reason == ("This DICOM object (Basic Text SR Storage, SOP class 1.2.840.10008.5.1.4.1.1.88.11) "
                                "is not an image, so it was not analysed.")
    assert p.source == "report.dcm" and p.dicom["modality"] == "SR"
    assert p.warnings == ("no usable pixels: the DICOM file has no pixel data (it is a report or other non-image "
                          "object, or it is cut off).",)
    video = predictor.predict(ultrasound_video(), name="cine.dcm")
    assert video.verdict == "out_of_scope"
    assert video.verdict_reason.startswith("Modality US (ultrasound) is not one this model was trained on")

    explanation = predictor.explain(report, name="report.dcm")
    assert explanation.explained_class is None and explanation.image.shape == (0, 0)
    record = explanation.to_dict(include_overlay=True, grid=3)
    assert record["heatmap_grid"] == [[0.0] * 3] * 3 and record["image_size"] == {"height": 0, "width": 0}
    assert "overlay_png_base64" not in record                  # nothing to draw on

    rows = predictor.predict_many([dicom("CR", label=1), report, dicom_bytes(None)], batch_size=3)
    assert rows[0].top_class in CLASSES and rows[1].verdict == "out_of_scope"
    assert isinstance(rows[2], ImageReadError) and rows[2].reason == "no_pixel_data"   # a CR: not the gate's


def test_the_cli_and_the_api_answer_a_report_out_of_scope(predictor, tmp_path, capsys):
    import csv
    import json

    import test_single_image as cli
    from mediscan.apps.api import create_app
    report = tmp_path / "folder" / "report.dcm"
    report.parent.mkdir()
    report.write_bytes(pixel_less("KO", dicom_uid.KeyObjectSelectionDocumentStorage))
    (tmp_path / "folder" / "empty_cr.dcm").write_bytes(dicom_bytes(None))

    assert cli.main([str(report), "--checkpoint", str(predictor.checkpoint_path), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["prediction"]["verdict"] == "out_of_scope" and answer["figure"] is None
    assert "Key Object Selection Document Storage" in answer["prediction"]["verdict_reason"]
    assert cli.main([str(tmp_path / "folder" / "empty_cr.dcm"), "--checkpoint", str(predictor.checkpoint_path)]) == 2
    assert "has no pixel data" in capsys.readouterr().err

    results, overlays = tmp_path / "results.csv", tmp_path / "overlays"
    assert cli.main([str(report.parent), "--checkpoint", str(predictor.checkpoint_path), "--csv", str(results),
                     "--overlays", str(overlays), "--no-progress"]) == 0
    rows = {row["path"]: row for row in csv.DictReader(results.open(newline=""))}
    assert rows["report.dcm"]["verdict"] == "out_of_scope" and rows["report.dcm"]["error"] == ""
    assert rows["report.dcm"]["modality"] == "KO" and rows["report.dcm"]["class"] == ""
    assert rows["empty_cr.dcm"]["verdict"] == "error" and "no pixel data" in rows["empty_cr.dcm"]["error"]
    assert not list(overlays.rglob("*.png"))                    # neither has pixels to draw a map on
    capsys.readouterr()

    client = create_app({"PREDICTOR": predictor, "API_KEY": None}).test_client()
    for path in ("/v1/predict", "/v1/predict?explain=true"):
        body = client.post(path, data={"file": (io.BytesIO(report.read_bytes()), "report.dcm")}).get_json()
        assert body["verdict"] == "out_of_scope" and body["top_class"] is None, body
    assert "overlay_png_base64" not in body["explanation"] and body["explanation"]["explained_class"] is None
