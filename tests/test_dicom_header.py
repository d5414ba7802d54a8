"""The header cross-check (documented table, user override file) and the deterministic result UIDs."""
from __future__ import annotations

import json
import re

import pytest

from mediscan.core.dicom_header import DicomHeader, HeaderMapError, HeaderMapping, header_check
from mediscan.dicom.uids import derived_uid, is_own_instance, log_id, result_uids

CLASSES = ("bone", "brain", "heart", "lungs")


def check(predicted, mapping=None, **fields):
    return header_check(DicomHeader(**fields), predicted, CLASSES, mapping)


@pytest.mark.parametrize("body_part, predicted, status", [
    ("CHEST", "lungs", "agrees"), ("CHEST", "heart", "agrees"), ("CHEST", "bone", "disagrees"),
    ("HEAD", "brain", "agrees"), ("KNEE", "bone", "agrees"), ("EXTREMITY", "lungs", "disagrees"),
    ("hand ", "bone", "agrees"),                                  # case and padding as some modalities send
    ("ABDOMEN", "bone", "not_mapped"),
])
def test_body_part_examined(body_part, predicted, status):
    result = check(predicted, body_part=body_part)
    assert result.status == status
    if status != "not_mapped":
        assert result.field == "BodyPartExamined" and result.value == body_part.strip()


def test_descriptions_and_modality_when_body_part_is_empty():
    assert check("lungs", series_description="PA CHEST 2 VIEWS").status == "agrees"
    assert check("bone", study_description="XR LUNGS").status == "disagrees"     # LUNG matches LUNGS
    assert check("bone", series_description="Series 1", modality="BMD").status == "agrees"
    unmapped = check("bone", body_part="ABDOMEN", series_description="KNEE LAT")
    assert (unmapped.status, unmapped.field) == ("agrees", "SeriesDescription")   # description maps
    assert check("bone", series_description="HEADER", modality="CR").status == "no_header"   # HEAD != HEADER
    assert check("bone").status == "no_header"
    assert header_check(None, "bone", CLASSES).status == "no_header"


def test_classes_the_model_lacks_are_not_a_mapping():
    result = header_check(DicomHeader(body_part="KNEE"), "lungs", ("lungs", "heart"))
    assert result.status == "not_mapped" and result.value == "KNEE"


def test_override_file_replaces_and_removes_entries(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"BodyPartExamined": {"abdomen": ["bone"], "CHEST": []}}))
    mapping = HeaderMapping.from_file(path)
    assert check("bone", mapping, body_part="ABDOMEN").status == "agrees"
    assert check("lungs", mapping, body_part="CHEST").status == "not_mapped"
    assert check("bone", mapping, body_part="KNEE").status == "agrees"            # defaults stay
    for bad in ("{not json", json.dumps({"BodyPart": {}}), json.dumps({"Modality": {"CR": "bone"}})):
        path.write_text(bad)
        with pytest.raises(HeaderMapError, match="map.json"):
            HeaderMapping.from_file(path)


def test_env_variable_names_the_override_file(tmp_path, monkeypatch):
    path = tmp_path / "env-map.json"
    path.write_text(json.dumps({"Modality": {"CR": ["lungs"]}}))
    monkeypatch.setenv("MEDISCAN_HEADER_MAP", str(path))
    assert check("lungs", modality="CR").status == "agrees"
    monkeypatch.delenv("MEDISCAN_HEADER_MAP")
    assert check("lungs", modality="CR").status == "no_header"


def test_result_uids_are_deterministic_valid_and_model_specific():
    a, again, other_model = (result_uids("1.2.3.4", "aa" * 32), result_uids("1.2.3.4", "aa" * 32),
                             result_uids("1.2.3.4", "bb" * 32))
    assert a == again and a != other_model
    uids = [a.sc_series, a.sc_instance, a.sr_series, a.sr_instance]
    assert len(set(uids)) == 4 and result_uids("1.2.3.5", "aa" * 32).sc_series not in uids
    for uid in uids:                                              # PS3.5 9.1: digits and dots, <= 64 chars
        assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", uid) and len(uid) <= 64
        assert int(uid[5:]) < 2**128
    assert derived_uid("x") != derived_uid("y")
    assert len(log_id("1.2.3")) == 8 and "1.2.3" not in log_id("1.2.3")


def test_own_instances_are_recognised():
    import pydicom
    ds = pydicom.Dataset()
    assert not is_own_instance(ds)
    ds.Manufacturer = "MediScan"
    assert is_own_instance(ds)
