"""The DICOM node without an archive: a real Storage SCP (pynetdicom) on a free port, real senders (dcmtk's
storescu and echoscu, pynetdicom as an SCU, over TLS too), a tiny random-initialised checkpoint (one per
session: the ``dicom_predictor`` fixture), results written to a folder and checked with dicom3tools'
dciodvfy, a real storage SCP standing in for a destination that comes back."""
from __future__ import annotations

import contextlib
import io
import os
import socket
import ssl
import subprocess
import time

import numpy as np
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import ComprehensiveSRStorage, ComputedRadiographyImageStorage, Verification

from mediscan.devtools.browser import free_port
from mediscan.devtools.orthanc import (
    dciodvfy_errors,
    dcmtk,
    make_tls_certificates,
    skip_unless_installed,
    tools_missing,
)
from mediscan.devtools.synthetic import FAKE_PATIENT, dicom_study
from mediscan.dicom.node import DicomNode, NodeConfig
from mediscan.dicom.sender import CStoreDestination
from mediscan.dicom.status import read_status
from mediscan.dicom.tls_server import HandshakeInThreadServer

#: SNOMED CT codes of the classes, written out here (not read from the code under test).
SNOMED = {"lungs": "39607008", "heart": "80891009", "brain": "12738006", "bone": "272673000"}


@pytest.fixture
def predictor(dicom_predictor):
    return dicom_predictor


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
    echo = subprocess.run([dcmtk("echoscu"), "-aec", "MEDISCAN", "127.0.0.1", str(n.port)],
                          capture_output=True, text=True)
    assert echo.returncode == 0, echo.stderr
    run = subprocess.run([dcmtk("storescu"), "-aec", "MEDISCAN", "127.0.0.1", str(n.port), *map(str, files)],
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


def test_dcmtk_tools_are_dcmtks_even_when_a_same_named_program_comes_first_on_path(tmp_path, monkeypatch):
    """pynetdicom installs its own ``storescu`` and ``echoscu``, and they can come first on PATH: the tests
    that use dcmtk as a second, independent DICOM client would then run the node's own library against it."""
    from mediscan.devtools import orthanc
    skip_unless_installed(tools_missing("storescu"))
    impostor = tmp_path / "storescu"
    impostor.write_text("#!/bin/sh\necho 'storescu: DICOM storage (C-STORE) SCU (pynetdicom)'\n")
    impostor.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    orthanc.dcmtk.cache_clear()
    try:
        found = orthanc.dcmtk("storescu")
        assert found is not None and found != str(impostor)
        version = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=60)
        assert version.stdout.startswith("$dcmtk: storescu")
        monkeypatch.setenv("PATH", str(tmp_path))                 # only the impostor
        orthanc.dcmtk.cache_clear()
        assert orthanc.dcmtk("storescu") is None
        assert "another program" in orthanc.tools_missing("storescu")
    finally:
        orthanc.dcmtk.cache_clear()


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
    # What is held is the decoded image: 128 x 128 float32 = 64 kB, plus 16 kB counted for its header.
    full = node(max_held_mb=0.1)                                  # room for one instance, not two
    answers = send(full.port, study)
    assert answers[0][0] == 0x0000
    assert answers[1][0] == 0xA700 and "queue is full" in answers[1][1]
    # One that could never fit is a failure, not "out of resources": a sender retries those for ever.
    tiny = node(max_held_mb=0.05)
    status, comment = send(tiny.port, study[:1])[0]
    assert status == 0xC000 and "--max-held-mb" in comment and len(comment) <= 64


def test_each_instance_is_decoded_once_between_its_arrival_and_its_result(node, tmp_path, monkeypatch):
    """The C-STORE handler decodes every instance to answer truthfully; the analysis must use that decoded
    image, not decode the received bytes again (a compressed radiograph costs ~15 times the forward pass to
    decode). Counted at the DICOM decoder itself."""
    from mediscan.core import imaging
    calls = []
    real = imaging.decode_dicom
    monkeypatch.setattr(imaging, "decode_dicom", lambda *a, **k: calls.append(1) or real(*a, **k))
    n = node()
    study = dicom_study(1, 3)
    assert [status for status, _ in send(n.port, study)] == [0, 0, 0]
    wait_until(lambda: n.status()["results_delivered"] == 1)
    sr = results(tmp_path / "out")["sr"][0][1]
    assert float(sr_items(sr)["MS-ANALYSED"].MeasuredValueSequence[0].NumericValue) == 3
    assert len(calls) == 3


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


@contextlib.contextmanager
def storage_scp(port: int, ae_title: str = "ARCHIVE"):
    """A real pynetdicom Storage SCP on ``port`` (a destination that is up); yields the datasets it received."""
    from pynetdicom import AllStoragePresentationContexts, evt

    received = []

    def on_store(event):
        received.append(event.dataset)
        return 0x0000
    ae = AE(ae_title=ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield received
    finally:
        server.shutdown()


def test_unreachable_destination_is_kept_in_the_status_file_and_delivered_when_it_returns(node, tmp_path):
    port, status_file = free_port(), tmp_path / "status.json"
    n = node(destination=CStoreDestination("ARCHIVE", "127.0.0.1", port), attempts=2, backoff=0.01,
             redeliver_every=0.3, status_file=status_file)
    study = dicom_study(1, 2)
    send(n.port, study)
    wait_until(lambda: len(read_status(status_file)["undelivered"]) == 1)     # down: kept, and said so
    status = read_status(status_file)
    assert status["running"] is True and status["results_delivered"] == 0 and status["series_analysed"] == 1
    waiting = status["undelivered"][0]
    assert "association not established" in waiting["last_error"] and waiting["attempts"] >= 2
    assert study[0].SeriesInstanceUID not in status_file.read_text()            # no UID in clear
    assert len(list((tmp_path / "out").glob("*.dcm"))) == 2                     # and the folder has them
    with storage_scp(port) as received:                                         # the destination comes back
        wait_until(lambda: read_status(status_file)["undelivered"] == [], timeout=30)
        assert sorted(str(ds.SOPClassUID) for ds in received) == ["1.2.840.10008.5.1.4.1.1.7",
                                                                   "1.2.840.10008.5.1.4.1.1.88.33"]
    summary = n.stop()
    assert summary["results_delivered"] == 1 and summary["undelivered"] == []
    assert read_status(status_file)["running"] is False


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


def test_command_line_node_reports_undelivered_in_status_and_drains_on_sigterm(tmp_path, predictor, capsys):
    """``python app.py dicom`` as users start it, sending to an archive that is down: the status file and
    ``--status`` show the undelivered result while it runs; SIGTERM drains the series of an open association;
    the exit status and summary say what was not delivered, and the --out folder holds every result."""
    import os
    import signal
    import sys

    from mediscan.apps.dicom_node import main as dicom_main
    from tests.conftest import ROOT

    skip_unless_installed(tools_missing("storescu", "echoscu"))
    port, out, status_file = free_port(), tmp_path / "cli-out", tmp_path / "node-status.json"
    files = []
    for k, ds in enumerate(dicom_study(2, 2)):
        files.append(str(tmp_path / f"c{k}.dcm"))
        ds.save_as(files[-1], enforce_file_format=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "dicom", "--port", str(port), "--out", str(out),
                             "--checkpoint", str(predictor.checkpoint_path), "--device", "cpu",
                             "--send-to", f"DOWN@127.0.0.1:{free_port()}", "--retries", "0",
                             "--series-timeout", "60", "--status-file", str(status_file)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while subprocess.run([dcmtk("echoscu"), "-aec", "MEDISCAN", "127.0.0.1", str(port)],
                             capture_output=True).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, "the node did not come up"
            time.sleep(0.3)
        run = subprocess.run([dcmtk("storescu"), "-aec", "MEDISCAN", "127.0.0.1", str(port), *files[:2]],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        wait_until(lambda: status_file.exists() and len(read_status(status_file)["undelivered"]) == 1, timeout=90)
        assert dicom_main(["--status", "--status-file", str(status_file)]) == 1   # something needs attention
        shown = capsys.readouterr().out
        assert "running since" in shown and "undelivered: 1 result(s)" in shown and "association not" in shown
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(ComputedRadiographyImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDISCAN")
        assert all(assoc.send_c_store(f).Status == 0 for f in files[2:])   # the association stays open:
        proc.send_signal(signal.SIGTERM)                                     # SIGTERM must drain the series
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, output                                   # results remain undelivered
    assert "'series_analysed': 2" in output and "2 undelivered result(s)" in output
    assert len(list(out.glob("*.dcm"))) == 4                             # ... but none is lost
    final = read_status(status_file)
    assert final["running"] is False and len(final["undelivered"]) == 2 and final["pending_series"] == 0
    assert dicom_main(["--status", "--status-file", str(status_file)]) == 1
    assert "stopped at" in capsys.readouterr().out
    assert not any(v in output + status_file.read_text() for v in FAKE_PATIENT.values())
    assert "1.2.826.0.1.3680043" not in output + status_file.read_text()  # pydicom's UID root: no UID in clear


def test_bad_node_options_are_clear_errors(tmp_path, capsys):
    from mediscan.apps.dicom_node import main as dicom_main

    assert dicom_main(["--out", str(tmp_path), "--tls-cert", str(tmp_path / "no.pem"),
                       "--tls-key", str(tmp_path / "no.key")]) == 2
    assert "--tls-cert" in capsys.readouterr().err
    assert dicom_main(["--out", str(tmp_path), "--tls-key", "k.pem"]) == 2
    assert "go together" in capsys.readouterr().err
    assert dicom_main(["--status", "--status-file", str(tmp_path / "none.json")]) == 2
    assert "No DICOM node status" in capsys.readouterr().err


def _tls_client(certs, *, with_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=certs["ca"])
    if with_certificate:
        context.load_cert_chain(certs["client"], certs["client_key"])
    return context


def _echo_scu() -> AE:
    """A Verification SCU that gives up after 5 s (a node that never answers fails the test, not hangs it)."""
    ae = AE(ae_title="TLSSCU")
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 5
    ae.add_requested_context(Verification)
    return ae


def _tls_associate(ae: AE, port: int, certs, **kwargs):
    """``ae`` associated over TLS with the node on ``port``, presenting the client certificate."""
    return ae.associate("127.0.0.1", port, ae_title="MEDISCAN",
                        tls_args=(_tls_client(certs, with_certificate=True), "127.0.0.1"), **kwargs)


def test_a_silent_connection_holds_neither_the_tls_node_nor_its_own_thread(node, tmp_path, monkeypatch):
    """pynetdicom handshakes in its accept loop, without a time limit: one TCP connection that never sends a
    ClientHello stopped the node from accepting anyone (mediscan/dicom/tls_server.py)."""
    monkeypatch.setattr(HandshakeInThreadServer, "handshake_timeout", 1.0)
    certs = make_tls_certificates(tmp_path)
    n = node(tls_cert=certs["server"], tls_key=certs["server_key"], tls_ca=certs["ca"])
    silent = socket.create_connection(("127.0.0.1", n.port))
    try:
        time.sleep(0.3)                                  # accepted, and waiting for a handshake
        assoc = _tls_associate(_echo_scu(), n.port, certs)
        assert assoc.is_established, "a silent connection kept the TLS node from accepting a client"
        try:
            assert assoc.send_c_echo().Status == 0
        finally:
            assoc.release()
        silent.settimeout(5)
        assert silent.recv(1) == b"", "the silent connection was not closed after the handshake timeout"
    finally:
        silent.close()


def test_silent_connections_beyond_max_associations_from_one_address_are_closed_and_others_still_get_in(
        node, tmp_path, monkeypatch):
    """TLS handshakes in progress count toward --max-associations per address: a flood of connections that
    never speak cannot each hold a thread for the handshake timeout, and does not shut out another host."""
    monkeypatch.setattr(HandshakeInThreadServer, "handshake_timeout", 4.0)
    certs = make_tls_certificates(tmp_path)
    n = node(tls_cert=certs["server"], tls_key=certs["server_key"], tls_ca=certs["ca"], max_associations=2)
    silent = []
    try:
        for _ in range(3):
            silent.append(socket.create_connection(("127.0.0.1", n.port)))
            time.sleep(0.3)                                  # accepted and counted, in this order
        for connection in silent:
            connection.settimeout(0.5)
        assert silent[2].recv(1) == b"", "the third silent connection from one address was not closed"
        for connection in silent[:2]:                         # the first two wait for their handshake
            with pytest.raises(socket.timeout):
                connection.recv(1)
        ae = _echo_scu()                                      # another address, while the two are held
        assoc = _tls_associate(ae, n.port, certs, bind_address=("127.0.0.2", 0))
        assert assoc.is_established, "silent connections from one address shut out another"
        try:
            assert assoc.send_c_echo().Status == 0
        finally:
            assoc.release()
    finally:
        for connection in silent:
            connection.close()
    time.sleep(0.5)                          # closed by the client: their handshakes fail, the slots free
    assoc = _tls_associate(ae, n.port, certs)
    assert assoc.is_established, "slots of failed handshakes were not given back"
    assoc.release()


def test_tls_node_serves_tls_clients_with_a_certificate_and_refuses_the_others(node, tmp_path):
    certs = make_tls_certificates(tmp_path)
    n = node(tls_cert=certs["server"], tls_key=certs["server_key"], tls_ca=certs["ca"])
    study = dicom_study(1, 2)

    def associate(tls):
        ae = AE(ae_title="TLSSCU")
        ae.acse_timeout = ae.network_timeout = 5
        ae.add_requested_context(Verification)
        ae.add_requested_context(ComputedRadiographyImageStorage)
        return ae.associate("127.0.0.1", n.port, ae_title="MEDISCAN", tls_args=tls)
    assert not associate(None).is_established                                    # plain DICOM: refused
    assert not associate((_tls_client(certs, with_certificate=False), "127.0.0.1")).is_established  # no cert
    assoc = associate((_tls_client(certs, with_certificate=True), "127.0.0.1"))
    assert assoc.is_established, "a TLS client with a certificate from --tls-ca was refused"
    try:
        assert assoc.send_c_echo().Status == 0
        assert [int(assoc.send_c_store(ds).Status) for ds in study] == [0, 0]
    finally:
        assoc.release()
    wait_until(lambda: n.status()["results_delivered"] == 1)
    assert len(results(tmp_path / "out")["sr"]) == 1


def test_one_association_over_the_limit_is_rejected_and_the_others_are_served(node):
    n = node(max_associations=2)

    def associate():
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        ae.add_requested_context(ComputedRadiographyImageStorage)
        return ae.associate("127.0.0.1", n.port, ae_title="MEDISCAN")
    first, second = associate(), associate()
    assert first.is_established and second.is_established
    try:
        third = associate()
        assert third.is_rejected and not third.is_established                  # over the limit
        study = dicom_study(2, 1)
        assert first.send_c_store(study[0]).Status == 0 and second.send_c_store(study[1]).Status == 0
    finally:
        first.release()
    wait_until(lambda: len(n.ae.active_associations) < 2, timeout=10)
    fourth = associate()                                                        # room again once one ended
    assert fourth.is_established and fourth.send_c_echo().Status == 0
    fourth.release()
    second.release()


def test_series_stopped_by_the_modality_gate_is_out_of_scope_and_mixed_ones_average_the_rest(node, predictor,
                                                                                           tmp_path):
    skip_unless_installed(tools_missing("dciodvfy"))
    n = node()
    study = dicom_study(2, 3)
    for ds in study[:3]:
        ds.Modality = "MG"                   # mammography: not among the checkpoint's default modalities
    del study[1].PixelData                   # no pixels, but the header says MG: stopped, not refused
    study[5].Modality = "MG"                 # the second series: one stopped, two analysed
    assert all(status == 0 for status, _ in send(n.port, study))
    wait_until(lambda: n.status()["results_delivered"] == 2)
    found = results(tmp_path / "out")
    srs = {str(sr_items(ds)["112002"].UID): (path, ds) for path, ds in found["sr"]}   # by source series UID
    gated_path, gated = srs[study[0].SeriesInstanceUID]
    items = sr_items(gated)
    assert items["MS-VERDICT"].ConceptCodeSequence[0].CodeValue == "OUT_OF_SCOPE"
    assert "MG" in items["MS-REASON"].TextValue and "363698007" not in items
    assert not any(code.startswith("MS-P-") for code in items) and "MS-HEADER" not in items
    assert float(items["MS-GATED"].MeasuredValueSequence[0].NumericValue) == 3
    assert float(items["MS-ANALYSED"].MeasuredValueSequence[0].NumericValue) == 0
    _, mixed = srs[study[3].SeriesInstanceUID]
    items = sr_items(mixed)
    assert float(items["MS-ANALYSED"].MeasuredValueSequence[0].NumericValue) == 2
    assert float(items["MS-GATED"].MeasuredValueSequence[0].NumericValue) == 1
    reference = [predictor.predict(part10(ds)).probabilities for ds in study[3:5]]   # the two analysed ones
    for c in predictor.classes:
        assert float(items[f"MS-P-{c.upper()}"].MeasuredValueSequence[0].NumericValue) == pytest.approx(
            np.mean([r[c] for r in reference]), abs=1e-5)
    for path, ds in found["sc"] + [(gated_path, gated)]:
        assert dciodvfy_errors(path) == [], path
    assert any("not analysed" in ds.SeriesDescription for _, ds in found["sc"])
