"""DICOM facts in every answer (issue 14, inference/app side): the header summary and the header check in the
CLI's JSON and folder CSV, the API answer and the dashboard; ``--dicom-out`` (the node's SC + SR for one file)
and ``--per-series``; and how each of them answers an input the modality gate stopped.

Expected values come from the files the tests write (pydicom reads them back), from the Predictor's own
single-image answers averaged here with numpy, and from the written-out SNOMED codes and mapping rules.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid as dicom_uid

from mediscan.apps import dashboard, predict_cli
from mediscan.apps.api import create_app
from mediscan.apps.dashboard_content import ImageResult
from mediscan.apps.dashboard_state import CachedExplanation, preview_of
from mediscan.apps.exit_codes import EXIT_BAD_INPUT, EXIT_OK
from mediscan.devtools.orthanc import (
    dciodvfy_errors,
    skip_unless_installed,
    tools_missing,
)
from mediscan.devtools.synthetic import (
    CLASSES,
    FAKE_PATIENT,
    dicom_study,
    pattern_image,
    write_tiny_checkpoint,
)
from mediscan.inference.predictor import Predictor

#: SNOMED CT codes of the classes, written out here (not read from the code under test).
SNOMED = {"lungs": "39607008", "heart": "80891009", "brain": "12738006", "bone": "272673000"}
CHEST = ("lungs", "heart")          # what BodyPartExamined CHEST allows in the documented default table
UNCERTAIN_BELOW = 0.6               # the CLI's default --uncertain-below


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """No out-of-scope detector, and a high temperature: the verdict then follows the confidence alone."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("answers") / "m.safetensors", temperature=20.0)


@pytest.fixture(scope="module")
def predictor(checkpoint) -> Predictor:
    return Predictor(checkpoint, "cpu", backend="torch")


@pytest.fixture(autouse=True)
def fast_load(monkeypatch, checkpoint, predictor):
    """The CLI runs in-process with the module's loaded model instead of loading the checkpoint for every call;
    runs with other options (--header-map included) load their own, through the real path."""
    real = predict_cli.load_predictor

    def load(args):
        defaults = not (args.device or args.max_pixels or args.header_map) and args.uncertain_below == 0.6
        return predictor if Path(args.checkpoint) == checkpoint and defaults else real(args)
    monkeypatch.setattr(predict_cli, "load_predictor", load)


def study_files(folder: Path, n_series: int, per_series: int, *, body_part="CHEST", seed=0) -> list[Path]:
    """Part-10 files of a synthetic study (fake patient fields included, so leaks would show)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(dicom_study(n_series, per_series, body_part=body_part, seed=seed)):
        paths.append(folder / f"s{seed}_{k}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def as_ultrasound(source: Path, target: Path) -> Path:
    """A copy of ``source`` (same series) that says it is an ultrasound image."""
    ds = pydicom.dcmread(source)
    ds.Modality = "US"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = dicom_uid.UltrasoundImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = dicom_uid.generate_uid()
    ds.save_as(target, enforce_file_format=True)
    return target


def png(path: Path) -> Path:
    Image.fromarray(pattern_image(1, 64)).save(path)
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = predict_cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def no_patient_field(text: str) -> None:
    for value in FAKE_PATIENT.values():
        assert value.split("^")[0] not in text


# ------------------------------------------------------------------------------------------ CLI JSON

def test_cli_json_carries_the_header_summary_and_the_check(capsys, tmp_path, checkpoint):
    source = study_files(tmp_path, 1, 1)[0]
    ds = pydicom.dcmread(source)
    code, out, _ = run_cli(capsys, source, "--checkpoint", checkpoint, "--json", "--no-figure")
    assert code == EXIT_OK
    record = json.loads(out)["prediction"]
    assert record["dicom"] == {"study_instance_uid": ds.StudyInstanceUID, "series_instance_uid": ds.SeriesInstanceUID,
                               "sop_instance_uid": ds.SOPInstanceUID, "modality": "CR", "body_part_examined": "CHEST"}
    check = record["header_check"]
    assert check["status"] == ("agrees" if record["top_class"] in CHEST else "disagrees")
    assert (check["field"], check["value"], sorted(check["expected"])) == ("BodyPartExamined", "CHEST", sorted(CHEST))
    no_patient_field(out)
    code, out, _ = run_cli(capsys, png(tmp_path / "p.png"), "--checkpoint", checkpoint, "--json", "--no-figure")
    record = json.loads(out)["prediction"]
    assert code == EXIT_OK and record["dicom"] is None and record["header_check"] is None


def test_cli_header_map_overrides_the_table_and_a_bad_one_is_exit_2(capsys, tmp_path, checkpoint):
    source = study_files(tmp_path, 1, 1)[0]
    table = tmp_path / "map.json"
    table.write_text(json.dumps({"BodyPartExamined": {"CHEST": ["bone"]}}))
    code, out, _ = run_cli(capsys, source, "--checkpoint", checkpoint, "--json", "--no-figure", "--header-map", table)
    record = json.loads(out)["prediction"]
    assert code == EXIT_OK and record["header_check"]["expected"] == ["bone"]
    assert record["header_check"]["status"] == ("agrees" if record["top_class"] == "bone" else "disagrees")
    table.write_text("{not json")
    code, _, err = run_cli(capsys, source, "--checkpoint", checkpoint, "--header-map", table)
    assert code == EXIT_BAD_INPUT and "map.json" in err and "Traceback" not in err


def test_cli_report_of_a_gated_dicom(capsys, tmp_path, checkpoint):
    us = as_ultrasound(study_files(tmp_path, 1, 1)[0], tmp_path / "us.dcm")
    code, out, _ = run_cli(capsys, us, "--checkpoint", checkpoint, "--output", tmp_path / "fig.png")
    assert code == EXIT_OK and "not analysed" in out and "Modality US (ultrasound)" in out
    assert not (tmp_path / "fig.png").exists()                     # no heatmap to draw
    code, out, _ = run_cli(capsys, us, "--checkpoint", checkpoint, "--json", "--no-figure")
    record = json.loads(out)
    assert record["prediction"]["top_class"] is None and record["explained_class"] is None


# ------------------------------------------------------------------------------------------ folder CSV

def test_folder_csv_fills_the_dicom_columns(capsys, tmp_path, checkpoint):
    folder = tmp_path / "archive"
    files = study_files(folder, 1, 2, body_part="KNEE")
    as_ultrasound(files[0], folder / "us.dcm")
    png(folder / "p.png")
    code, _, _ = run_cli(capsys, folder, "--checkpoint", checkpoint, "--csv", tmp_path / "r.csv", "--no-progress")
    assert code == EXIT_OK
    with open(tmp_path / "r.csv", newline="") as handle:
        rows = {row["path"]: row for row in csv.DictReader(handle)}
    for path in files:
        ds, row = pydicom.dcmread(path), rows[path.name]
        assert (row["study_instance_uid"], row["series_instance_uid"], row["sop_instance_uid"]) == (
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert (row["modality"], row["body_part_examined"]) == ("CR", "KNEE")
        assert row["header_check"] == ("agrees" if row["class"] == "bone" else "disagrees")
    gated = rows["us.dcm"]
    assert (gated["class"], gated["confidence"], gated["verdict"], gated["modality"]) == ("", "", "out_of_scope", "US")
    assert all(gated[f"p_{name}"] == "" for name in CLASSES) and gated["error"] == ""
    assert all(rows["p.png"][column] == "" for column in ("modality", "sop_instance_uid", "header_check"))
    no_patient_field((tmp_path / "r.csv").read_text())


# ------------------------------------------------------------------------------------------ --per-series

def test_per_series_summary_from_the_csv(capsys, tmp_path, checkpoint, predictor):
    folder = tmp_path / "archive"
    first = study_files(folder / "a", 1, 3, seed=1)
    second = study_files(folder / "b", 1, 2, body_part="HEAD", seed=2)
    as_ultrasound(first[0], folder / "a" / "us.dcm")              # a gated instance inside the first series
    only_us = study_files(folder / "c", 1, 1, seed=3)[0]
    as_ultrasound(only_us, folder / "c" / "us_only.dcm")
    only_us.unlink()                                                # a series stopped entirely by the gate
    png(folder / "p.png")
    code, out, _ = run_cli(capsys, folder, "--checkpoint", checkpoint, "--csv", tmp_path / "r.csv", "--no-progress",
                           "--per-series")
    assert code == EXIT_OK and "3 DICOM series summarised in" in out
    with open(tmp_path / "r.series.csv", newline="") as handle:
        rows = {row["series_instance_uid"]: row for row in csv.DictReader(handle)}
    assert len(rows) == 3
    for files, instances, body_part in ((first, 4, "CHEST"), (second, 2, "HEAD")):
        row = rows[pydicom.dcmread(files[0]).SeriesInstanceUID]
        means = np.mean([[predictor.predict(f).probabilities[c] for c in CLASSES] for f in files], axis=0)
        top = CLASSES[int(np.argmax(means))]
        assert (int(row["instances"]), int(row["analysed"]), row["body_part_examined"]) == (
            instances, len(files), body_part)
        assert [float(row[f"p_{c}"]) for c in CLASSES] == pytest.approx(means.tolist(), abs=2e-4)
        assert row["class"] == top and float(row["confidence"]) == pytest.approx(means.max(), abs=2e-4)
        assert row["verdict"] == ("uncertain" if means.max() < UNCERTAIN_BELOW else "confident")
        allowed = CHEST if body_part == "CHEST" else ("brain",)
        statuses = [("agrees" if predictor.predict(f).top_class in allowed else "disagrees") for f in files]
        assert row["header_check"] == ", ".join(f"{s} {statuses.count(s)}" for s in sorted(set(statuses)))
    gated = rows[pydicom.dcmread(folder / "c" / "us_only.dcm").SeriesInstanceUID]
    assert (gated["instances"], gated["analysed"], gated["class"], gated["verdict"]) == ("1", "0", "", "out_of_scope")


# ------------------------------------------------------------------------------------------ --dicom-out

def _sr_region(sr) -> str:
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == "363698007":         # Finding site
            return item.ConceptCodeSequence[0].CodeValue
    raise AssertionError("no Finding site in the SR")


def test_dicom_out_writes_the_nodes_sc_and_sr(capsys, tmp_path, checkpoint):
    skip_unless_installed(tools_missing("dciodvfy"))
    source = study_files(tmp_path, 1, 1)[0]
    src = pydicom.dcmread(source)
    out_dir = tmp_path / "results"
    code, out, _ = run_cli(capsys, source, "--checkpoint", checkpoint, "--json", "--no-figure", "--dicom-out", out_dir)
    assert code == EXIT_OK
    record = json.loads(out)
    written = sorted(out_dir.glob("*.dcm"))
    assert sorted(map(Path, record["dicom_out"])) == written and len(written) == 2
    found = {pydicom.dcmread(path).Modality: pydicom.dcmread(path) for path in written}
    sc, sr = found["OT"], found["SR"]
    for ds, path in ((sc, out_dir / f"{sc.SOPInstanceUID}.dcm"), (sr, out_dir / f"{sr.SOPInstanceUID}.dcm")):
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.SeriesInstanceUID != src.SeriesInstanceUID
        assert dciodvfy_errors(path) == []
    assert sc.SOPClassUID == dicom_uid.SecondaryCaptureImageStorage and sc.PhotometricInterpretation == "RGB"
    assert _sr_region(sr) == SNOMED[record["prediction"]["top_class"]]
    first_uids = {p.name for p in written}
    code, _, _ = run_cli(capsys, source, "--checkpoint", checkpoint, "--no-figure", "--dicom-out", out_dir)
    assert code == EXIT_OK and {p.name for p in out_dir.glob("*.dcm")} == first_uids   # replaced, not added
    gated_dir = tmp_path / "gated"                  # a gated file still gets its (out-of-scope) SC and SR
    us = as_ultrasound(source, tmp_path / "us.dcm")
    code, _, _ = run_cli(capsys, us, "--checkpoint", checkpoint, "--no-figure", "--dicom-out", gated_dir)
    assert code == EXIT_OK and len(list(gated_dir.glob("*.dcm"))) == 2
    assert all(dciodvfy_errors(path) == [] for path in gated_dir.glob("*.dcm"))


def test_dicom_out_refuses_what_it_cannot_do(capsys, tmp_path, checkpoint):
    code, _, err = run_cli(capsys, png(tmp_path / "p.png"), "--checkpoint", checkpoint, "--dicom-out", tmp_path / "o")
    assert code == EXIT_BAD_INPUT and "--dicom-out needs a DICOM input" in err and "p.png" in err
    code, _, err = run_cli(capsys, tmp_path, "--checkpoint", checkpoint, "--dicom-out", tmp_path / "o")
    assert code == EXIT_BAD_INPUT and "folder" in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ API

def _json_schema(node, components: dict):
    """An OpenAPI 3.0 schema as JSON Schema: ``$ref`` inlined, ``nullable: true`` as a ``null`` type."""
    if isinstance(node, list):
        return [_json_schema(item, components) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return _json_schema(components[node["$ref"].rsplit("/", 1)[-1]], components)
    out = {key: _json_schema(value, components) for key, value in node.items() if key != "nullable"}
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def assert_documented(body: dict) -> None:
    """``body`` matches the PredictResponse schema of openapi.json (strict about types and required keys)."""
    import jsonschema

    spec = json.loads((Path(predict_cli.__file__).with_name("openapi.json")).read_text())
    components = spec["components"]["schemas"]
    jsonschema.validate(body, _json_schema(components["PredictResponse"], components))


def test_api_answer_carries_the_dicom_fields(tmp_path, predictor):
    client = create_app({"PREDICTOR": predictor, "API_KEY": None}).test_client()
    source = study_files(tmp_path, 1, 1, body_part="HAND")[0]
    ds = pydicom.dcmread(source)
    body = client.post("/v1/predict", data={"file": (io.BytesIO(source.read_bytes()), "scan.dcm")}).get_json()
    assert body["dicom"]["sop_instance_uid"] == ds.SOPInstanceUID and body["dicom"]["body_part_examined"] == "HAND"
    assert body["header_check"]["status"] == ("agrees" if body["top_class"] == "bone" else "disagrees")
    no_patient_field(json.dumps(body))
    assert_documented(body)
    us = as_ultrasound(source, tmp_path / "us.dcm")
    for query in ("", "?explain=true"):
        response = client.post(f"/v1/predict{query}", data={"file": (io.BytesIO(us.read_bytes()), "us.dcm")})
        body = response.get_json()
        assert response.status_code == 200 and body["top_class"] is None and body["confidence"] is None
        assert body["verdict"] == "out_of_scope" and body["probabilities"] == {} and body["dicom"]["modality"] == "US"
        assert_documented(body)
    batch = client.post("/v1/predict/batch", data={"files": [(io.BytesIO(us.read_bytes()), "us.dcm"),
                                                             (png(tmp_path / "p.png").open("rb"), "p.png")]})
    results = batch.get_json()["results"]
    assert results[0]["prediction"]["top_class"] is None and results[1]["prediction"]["dicom"] is None
    card = client.get("/v1/model").get_json()
    assert card["modalities"] == ["CR", "DX", "CT", "MR", "XA", "RF"]


# ------------------------------------------------------------------------------------------ dashboard

def _result(predictor, path: Path) -> ImageResult:
    data = path.read_bytes()
    explanation = predictor.explain(data, name=path.name, faithfulness=False)
    return ImageResult(path.name, path.name, "d", data, CachedExplanation(explanation, preview_of(explanation)))


def test_dashboard_shows_modality_body_part_and_check(tmp_path, predictor):
    source = study_files(tmp_path, 1, 1)[0]
    dicom_result, png_result = _result(predictor, source), _result(predictor, png(tmp_path / "p.png"))
    lines = dashboard.dicom_facts(dicom_result.prediction)
    status = "agrees" if dicom_result.prediction.top_class in CHEST else "disagrees"
    assert "Modality `CR`" in lines[0] and "BodyPartExamined `CHEST`" in lines[0]
    assert lines[1].startswith(f"**Header check:** {status}") and "BodyPartExamined `CHEST`" in lines[1]
    assert dashboard.dicom_facts(png_result.prediction) == []
    report = dashboard.analysis_report("scan.dcm", dicom_result.default.full, predictor.model_card(), opacity=0.4)
    assert report["prediction"]["dicom"] == {"modality": "CR", "body_part_examined": "CHEST"}   # no UID
    assert report["prediction"]["header_check"]["status"] == status
    gated = _result(predictor, as_ultrasound(source, tmp_path / "us.dcm"))
    table = dashboard.summary_table([dicom_result, gated])
    assert table["Class"].tolist()[1] == "not analysed" and np.isnan(table["Confidence"].tolist()[1])
    assert table["Verdict"].tolist()[1] == "Out of scope"


def test_dashboard_page_for_a_dicom_and_a_gated_upload(monkeypatch, tmp_path, checkpoint):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MEDISCAN_MODEL", str(checkpoint))
    source = study_files(tmp_path, 1, 1)[0]
    us = as_ultrasound(source, tmp_path / "us.dcm")
    app = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=60)
    app.run()
    app.file_uploader(key="uploads").set_value([("cr.dcm", source.read_bytes(), "application/dicom"),
                                                ("us.dcm", us.read_bytes(), "application/dicom")])
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    markdown = "\n".join(str(m.value) for m in app.markdown)
    assert "Modality `CR`, BodyPartExamined `CHEST`" in markdown and "**Header check:**" in markdown
    assert "Modality `US`, BodyPartExamined `CHEST`" in markdown
    no_patient_field(markdown)
    gated = [box.value for box in app.error if "not analysed" in box.value]
    assert len(gated) == 1 and "Modality US (ultrasound)" in gated[0]
    assert len(app.get("vega_lite_chart")) == 1 and len(app.image) == 3      # chart and images: the CR only
