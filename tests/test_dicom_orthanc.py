"""End to end with a real archive: Debian's Orthanc (temporary configuration, storage and ports; MediScan
registered as a modality) routes a study to the MediScan node, and the node's Secondary Captures and SRs
come back into the same study -- by C-STORE, and by STOW-RS into Orthanc's DICOMweb plugin.

Marked ``slow`` (about 10 s on the 2-core test machine). Skips, saying why, only where orthanc /
orthanc-dicomweb / dicom3tools are not installed; in CI (which installs them) that is a failure instead.
"""
from __future__ import annotations

import io
import time

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from mediscan.devtools.orthanc import (
    dciodvfy_errors,
    orthanc_missing,
    orthanc_server,
    skip_unless_installed,
    tools_missing,
)
from mediscan.devtools.synthetic import dicom_study
from mediscan.dicom.node import DicomNode, NodeConfig
from mediscan.dicom.sender import CStoreDestination, StowDestination

pytestmark = pytest.mark.slow
#: SNOMED CT codes of the classes, written out here (not read from the code under test).
SNOMED = {"lungs": "39607008", "heart": "80891009", "brain": "12738006", "bone": "272673000"}
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture
def predictor(dicom_predictor):
    return dicom_predictor


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """ONE real Orthanc for the module (each test works in its own study, so they do not meet)."""
    skip_unless_installed(orthanc_missing() or tools_missing("dciodvfy"))
    with orthanc_server(tmp_path_factory.mktemp("orthanc"), modalities={}) as server:
        yield server


def part10(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def jpeg2000(ds):
    """The same instance, JPEG 2000 lossless (Debian's Orthanc cannot transcode it: pitfall 15)."""
    ds = pydicom.dcmread(io.BytesIO(part10(ds)))
    ds.compress(JPEG2000Lossless)
    return ds


def wait_until(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def expected_class(predictor, datasets) -> str:
    """Independent of the node: the class with the highest mean probability over the series' images."""
    preds = predictor.predict_many([part10(ds) for ds in datasets])
    probs = np.mean([[p.probabilities[c] for c in predictor.classes] for p in preds], axis=0)
    return predictor.classes[int(np.argmax(probs))]


def fetch_results(orthanc, study_uid, tmp_path):
    """The study's MediScan SRs (by source series UID) and SCs, each saved and checked with dciodvfy."""
    srs, scs = {}, []
    for k, instance in enumerate(orthanc.study_instances(study_uid)):
        raw = orthanc.request("GET", f"/instances/{instance['ID']}/file")
        ds = pydicom.dcmread(io.BytesIO(raw))
        if ds.SOPClassUID not in (SR_CLASS, SC_CLASS):
            continue
        path = tmp_path / f"result{k}.dcm"
        path.write_bytes(raw)
        assert dciodvfy_errors(path) == [], path
        if ds.SOPClassUID == SR_CLASS:
            items = {i.ConceptNameCodeSequence[0].CodeValue: i for i in ds.ContentSequence}
            srs[items["112002"].UID] = (ds, items)
        else:
            scs.append(ds)
    return srs, scs


def test_orthanc_routes_a_study_and_gets_sc_and_sr_back_without_duplicates(predictor, orthanc, tmp_path):
    study = dicom_study(2, 2, body_part="CHEST")
    study[2], study[3] = jpeg2000(study[2]), jpeg2000(study[3])   # series 2 is JPEG 2000 in the archive
    config = NodeConfig(port=0, series_timeout=30.0, destination=CStoreDestination(
        orthanc.aet, "127.0.0.1", orthanc.port), attempts=2, backoff=0.2)
    node = DicomNode(predictor, config, version="test").start()
    try:
        orthanc.request("PUT", "/modalities/mediscan", {"AET": "MEDISCAN", "Host": "127.0.0.1", "Port": node.port})
        study_id = [orthanc.upload(part10(ds)) for ds in study][0]["ParentStudy"]
        orthanc.request("POST", "/modalities/mediscan/store", {"Resources": [study_id], "Synchronous": True})
        orthanc.wait_for(study[0].StudyInstanceUID, 4 + 4)
        srs, scs = fetch_results(orthanc, study[0].StudyInstanceUID, tmp_path)
        assert len(srs) == 2 and len(scs) == 2
        for series in (study[:2], study[2:]):
            sr, items = srs[series[0].SeriesInstanceUID]
            expected = expected_class(predictor, series)
            assert items["363698007"].ConceptCodeSequence[0].CodeValue == SNOMED[expected]
            header = "AGREES" if expected in ("lungs", "heart") else "DISAGREES"   # CHEST allows either
            assert items["MS-HEADER"].ConceptCodeSequence[0].CodeValue == header
            assert sr.StudyInstanceUID == study[0].StudyInstanceUID
        # The whole study again, now holding MediScan's own results: those are not analysed (no loop),
        # and the re-analysed series replace their results instead of adding copies.
        orthanc.request("POST", "/modalities/mediscan/store", {"Resources": [study_id], "Synchronous": True})
        wait_until(lambda: node.status()["results_delivered"] == 4)
        assert node.status()["not_analysed"] == 4
        assert len(orthanc.study_instances(study[0].StudyInstanceUID)) == 8
    finally:
        summary = node.stop()
    assert summary["undelivered"] == [] and summary["failed"] == []


def test_results_go_back_over_stow_rs_to_the_dicomweb_plugin(predictor, orthanc, tmp_path):
    study = dicom_study(1, 2, body_part="HEAD")
    config = NodeConfig(port=0, series_timeout=30.0, destination=StowDestination(orthanc.url + "/dicom-web"),
                        attempts=2, backoff=0.2)
    node = DicomNode(predictor, config, version="test").start()
    try:
        from pynetdicom import AE
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(study[0].SOPClassUID)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="MEDISCAN")
        assert all(assoc.send_c_store(ds).Status == 0 for ds in study)
        assoc.release()
        orthanc.wait_for(study[0].StudyInstanceUID, 2)
        srs, scs = fetch_results(orthanc, study[0].StudyInstanceUID, tmp_path)
        assert len(srs) == 1 and len(scs) == 1
        _, items = srs[study[0].SeriesInstanceUID]
        expected = expected_class(predictor, study)
        assert items["363698007"].ConceptCodeSequence[0].CodeValue == SNOMED[expected]
        assert items["MS-HEADER"].ConceptCodeSequence[0].CodeValue == (
            "AGREES" if expected == "brain" else "DISAGREES")
    finally:
        node.stop()
