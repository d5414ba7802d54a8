"""The DICOM node without an archive: a real Storage SCP (pynetdicom) on a free port, real senders (dcmtk's
storescu and echoscu, pynetdicom as an SCU), a tiny random-initialised checkpoint, results written to a
folder and checked with dicom3tools' dciodvfy."""
from __future__ import annotations

import io
import subprocess
import time

import numpy as np
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, ComprehensiveSRStorage, Verification

from mediscan.devtools.orthanc import dciodvfy_errors, skip_unless_installed, tools_missing
from mediscan.devtools.synthetic import FAKE_PATIENT, dicom_study, write_tiny_checkpoint
from mediscan.dicom.node import DicomNode, NodeConfig
from mediscan.dicom.sender import CStoreDestination
from mediscan.inference.predictor import Predictor

#: SNOMED CT codes of the classes, written out here (not read from the code under test).
SNOMED = {"lungs": "39607008", "heart": "80891009", "brain": "12738006", "bone": "272673000"}


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "m.safetensors", with_ood=True)
    return Predictor(path, device="cpu", backend="torch")


@pytest.fixture
def node(predictor, tmp_path):
    started = []

    def start(**overrides):
        config = NodeConfig(**{"port": 0, "series_timeout": 30.0, "out_dir": tmp_path / "out", **overrides})
        started.append(DicomNode(predictor, config, version="test").start())
        return started[-1]
    yield start
    for n in started:
        n.stop()


def part10(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def send(port: int, datasets, *, calling="TESTSCU", called="MEDISCAN"):
    """C-STORE with pynetdicom; returns each answer's (Status, ErrorComment)."""
    ae = AE(ae_title=calling)
    for uid in {str(ds.SOPClassUID) for ds in datasets} | {ComputedRadiographyImageStorage}:
        ae.add_requested_context(uid)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "the node refused the association"
    try:
        out = []
        for ds in datasets:
            status = assoc.send_c_store(ds)
            out.append((int(status.Status), str(status.get("ErrorComment", ""))))
        return out
    finally:
        assoc.release()


def results(folder):
    """{"sc": [...], "sr": [...]} of the result files in ``folder``."""
    files = sorted(folder.glob("*.dcm"))
    found = {"sc": [], "sr": []}
    for f in files:
        ds = pydicom.dcmread(f)
        found["sr" if ds.Modality == "SR" else "sc"].append((f, ds))
    return found


def wait_until(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def sr_items(sr) -> dict:
    """Concept code value -> the content item, over the SR's (flat) content tree."""
    return {item.ConceptNameCodeSequence[0].CodeValue: item for item in sr.ContentSequence}


def expected_series_class(predictor, datasets) -> str:
    """Independent of the node: the class with the highest mean probability over the series' images."""
    preds = predictor.predict_many([part10(ds) for ds in datasets])
    probs = np.mean([[p.probabilities[c] for c in predictor.classes] for p in preds], axis=0)
    return predictor.classes[int(np.argmax(probs))]


def test_storescu_series_gives_valid_sc_and_sr_with_region_and_header_check(node, predictor, tmp_path):
    skip_unless_installed(tools_missing("storescu", "echoscu", "dciodvfy"))
    n = node()
    study = dicom_study(1, 3, body_part="KNEE")
    files = []
    for k, ds in enumerate(study):
        files.append(tmp_path / f"in{k}.dcm")
        files[-1].write_bytes(part10(ds))
    echo = subprocess.run(["echoscu", "-aec", "MEDISCAN", "127.0.0.1", str(n.port)], capture_output=True, text=True)
    assert echo.returncode == 0, echo.stderr
    run = subprocess.run(["storescu", "-aec", "MEDISCAN", "127.0.0.1", str(n.port), *map(str, files)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    wait_until(lambda: n.status()["results_delivered"] == 1)     # the association's end completes the series
    found = results(tmp_path / "out")
    assert len(found["sc"]) == len(found["sr"]) == 1
    (sc_path, sc), (sr_path, sr) = found["sc"][0], found["sr"][0]
    for path in (sc_path, sr_path):
        assert dciodvfy_errors(path) == []
    expected = expected_series_class(predictor, study)
    items = sr_items(sr)
    assert items["363698007"].ConceptCodeSequence[0].CodeValue == SNOMED[expected]
    assert items["MS-HEADER"].ConceptCodeSequence[0].CodeValue == ("AGREES" if expected == "bone" else "DISAGREES")
    assert items["MS-HEADER-VALUE"].TextValue == "BodyPartExamined=KNEE"
    assert float(items["MS-ANALYSED"].MeasuredValueSequence[0].NumericValue) == 3
    assert sum(float(items[f"MS-P-{c.upper()}"].MeasuredValueSequence[0].NumericValue)
               for c in predictor.classes) == pytest.approx(1.0, abs=1e-5)
    for ds in (sc, sr):                                           # same study and patient, new series
        assert ds.StudyInstanceUID == study[0].StudyInstanceUID
        assert ds.PatientID == FAKE_PATIENT["patient_id"]
        assert ds.SeriesInstanceUID != study[0].SeriesInstanceUID and ds.SeriesInstanceUID.startswith("2.25.")
    assert sc.PhotometricInterpretation == "RGB" and sc.BurnedInAnnotation == "YES"
    assert "NOT FOR DIAGNOSTIC USE" in sc.SeriesDescription


def test_malformed_instance_fails_with_comment_and_series_still_answers(node, tmp_path):
    n = node()
    study = dicom_study(1, 3)
    broken = pydicom.dcmread(io.BytesIO(part10(study[1])))
    broken.PixelData = broken.PixelData[:100]                     # truncated pixel data
    no_pixels = pydicom.dcmread(io.BytesIO(part10(study[2])))
    del no_pixels.PixelData
    answers = send(n.port, [study[0], broken, no_pixels])
    assert answers[0] == (0x0000, "")
    assert answers[1][0] == 0xC000 and "truncated" in answers[1][1]
    assert answers[2][0] == 0xC000 and "no pixel data" in answers[2][1]
    assert all(len(comment) <= 64 for _, comment in answers)
    wait_until(lambda: n.status()["results_delivered"] == 1)
    sr = results(tmp_path / "out")["sr"][0][1]
    assert float(sr_items(sr)["MS-ANALYSED"].MeasuredValueSequence[0].NumericValue) == 1
    assert n.status()["refused"] == 2


def test_over_size_and_full_queue_answer_out_of_resources(node):
    study = dicom_study(1, 2, size=128)
    small = node(max_instance_mb=0.01)                            # 10 kB: a 128 x 128 x 16-bit image is 32 kB
    status, comment = send(small.port, study[:1])[0]
    assert status == 0xA700 and "limit" in comment
    full = node(max_held_mb=0.05)                                 # room for one instance, not two
    answers = send(full.port, study)
    assert answers[0][0] == 0x0000
    assert answers[1][0] == 0xA700 and "queue is full" in answers[1][1]


def test_non_image_objects_and_own_results_are_accepted_not_analysed(node, tmp_path):
    n = node()
    sr = dicom_study(1, 1)[0]
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
    del sr.PixelData
    own = dicom_study(1, 1)[0]
    own.Manufacturer = "MediScan"                                 # one of our own Secondary Captures
    assert send(n.port, [sr, own]) == [(0, ""), (0, "")]
    time.sleep(0.3)
    status = n.status()
    assert status["not_analysed"] == 2 and status["received"] == 0 and status["pending_series"] == 0


def test_only_allowed_calling_aes_may_associate(node):
    n = node(allow=[("PACS", "127.0.0.1")])
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", n.port, ae_title="MEDISCAN")
    assert not assoc.is_established
    other_host = node(allow=[("PACS", "10.9.9.9")])
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", other_host.port, ae_title="MEDISCAN")
    assert not assoc.is_established
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", n.port, ae_title="MEDISCAN")
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()


def test_unreachable_destination_is_reported_not_dropped(node, tmp_path):
    from mediscan.devtools.browser import free_port

    n = node(destination=CStoreDestination("NOBODY", "127.0.0.1", free_port()), attempts=2, backoff=0.01)
    study = dicom_study(1, 2)
    send(n.port, study)
    wait_until(lambda: n.status()["series_analysed"] == 1)
    wait_until(lambda: len(n.status()["undelivered"]) == 1)
    summary = n.stop()
    assert summary["results_delivered"] == 0 and len(summary["undelivered"]) == 1
    assert len(list((tmp_path / "out").glob("*.dcm"))) == 2      # and the folder still has them


def test_series_timeout_completes_a_series_and_large_series_are_sampled(node, tmp_path):
    n = node(series_timeout=0.5, max_slices=3)
    study = dicom_study(1, 9)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage)
    assoc = ae.associate("127.0.0.1", n.port, ae_title="MEDISCAN")
    for ds in study:                                              # the association stays open
        assert assoc.send_c_store(ds).Status == 0
    wait_until(lambda: n.status()["results_delivered"] == 1, timeout=30)
    assoc.release()
    sr = results(tmp_path / "out")["sr"][0][1]
    assert float(sr_items(sr)["MS-ANALYSED"].MeasuredValueSequence[0].NumericValue) == 3


def test_command_line_node_serves_and_drains_on_sigterm(tmp_path, predictor):
    """``python app.py dicom`` as users start it: echo, a series with storescu, SIGTERM -> its results are
    written and the summary says nothing was lost."""
    import os
    import signal
    import sys

    from mediscan.devtools.browser import free_port
    from tests.conftest import ROOT

    skip_unless_installed(tools_missing("storescu", "echoscu"))
    port, out = free_port(), tmp_path / "cli-out"
    files = []
    for k, ds in enumerate(dicom_study(1, 2)):
        files.append(str(tmp_path / f"c{k}.dcm"))
        ds.save_as(files[-1], enforce_file_format=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "dicom", "--port", str(port), "--out", str(out),
                             "--checkpoint", str(predictor.checkpoint_path), "--device", "cpu",
                             "--series-timeout", "60"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while subprocess.run(["echoscu", "-aec", "MEDISCAN", "127.0.0.1", str(port)],
                             capture_output=True).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, "the node did not come up"
            time.sleep(0.3)
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(ComputedRadiographyImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDISCAN")
        assert all(assoc.send_c_store(f).Status == 0 for f in files)   # the association stays open:
        proc.send_signal(signal.SIGTERM)                                 # SIGTERM must drain the series
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "'series_analysed': 1" in output and "'undelivered': []" in output
    assert len(list(out.glob("*.dcm"))) == 2
    assert not any(v in output for v in FAKE_PATIENT.values())
    assert "1.2.826.0.1.3680043" not in output                   # pydicom's UID root: no UID in clear
