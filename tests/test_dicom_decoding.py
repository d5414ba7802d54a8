"""DICOM the way archives hold it: every compressed transfer syntax of the issue, each on a file made here
(pydicom encodes RLE, JPEG-LS and JPEG 2000 with the installed plugins; dcmtk's dcmcjpeg makes JPEG
Lossless process 14, baseline and extended), decoded through the public ``read_image`` and compared with
the uncompressed original; and legacy files without preamble / file meta."""
from __future__ import annotations

import io
import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from mediscan.core.imaging import ImageReadError, read_image
from mediscan.devtools.orthanc import dcmtk, skip_unless_installed, tools_missing
from mediscan.devtools.synthetic import FAKE_PATIENT, dicom_study


def part10(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def instance(bits: int = 12, size: int = 48):
    """A CR whose pixels use the full ``bits`` range (so that scaling differences would show)."""
    ds = dicom_study(1, 1, size=size)[0]
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 2**bits, (size, size)).astype(np.uint8 if bits == 8 else np.uint16)
    pixels[:8] = 0                                               # some structure for the lossy codecs
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = (8 if bits == 8 else 16), bits, bits - 1
    ds.PixelData = pixels.tobytes()
    return ds, pixels


def reference(ds) -> np.ndarray:
    """The uncompressed file's decoding, min-max stretched by hand (the decoder's promise)."""
    raw = np.frombuffer(ds.PixelData, np.uint8 if ds.BitsAllocated == 8 else np.uint16).reshape(ds.Rows, ds.Columns)
    raw = raw.astype(np.float64)
    return ((raw - raw.min()) / (raw.max() - raw.min())).astype(np.float32)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=["rle", "jpeg-ls", "j2k"])
def test_pydicom_encoded_syntaxes_decode_losslessly(syntax):
    ds, _ = instance()
    expected = reference(ds)
    ds.compress(syntax)
    data = part10(ds)
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == syntax
    img = read_image(data, name="c.dcm")
    np.testing.assert_allclose(img.pixels, expected, atol=1e-6)


@pytest.mark.parametrize("flag, syntax, bits, tolerance", [
    ("+e1", JPEGLosslessSV1, 12, 1e-6),     # JPEG Lossless process 14 SV1: the archives' favourite
    ("+ee", JPEGExtended12Bit, 12, 0.03),
    ("+eb", JPEGBaseline8Bit, 8, 0.05),
], ids=["lossless-sv1", "extended-12bit", "baseline-8bit"])
def test_dcmcjpeg_encoded_syntaxes_decode(tmp_path, flag, syntax, bits, tolerance):
    skip_unless_installed(tools_missing("dcmcjpeg"))
    ds, _ = instance(bits)
    expected = reference(ds)
    src, out = tmp_path / "in.dcm", tmp_path / "out.dcm"
    src.write_bytes(part10(ds))
    run = subprocess.run([dcmtk("dcmcjpeg"), flag, str(src), str(out)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == syntax
    img = read_image(out)
    assert np.abs(img.pixels - expected).mean() <= tolerance
    if tolerance < 1e-3:
        np.testing.assert_allclose(img.pixels, expected, atol=1e-6)


def bare(ds, *, implicit: bool) -> bytes:
    """``ds`` written as a legacy bare dataset: no preamble, no "DICM", no file meta."""
    buf = io.BytesIO()
    ds = pydicom.dcmread(io.BytesIO(part10(ds)))
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.preamble = None
    pydicom.dcmwrite(buf, ds, implicit_vr=implicit, little_endian=True)
    data = buf.getvalue()
    assert data[128:132] != b"DICM" and data[:2] == b"\x08\x00"          # starts with group 0008
    return data


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit-vr", "explicit-vr"])
def test_file_without_preamble_is_read_with_a_warning(implicit):
    ds, _ = instance()
    data = bare(ds, implicit=implicit)
    img = read_image(data, name="old.dcm")
    np.testing.assert_allclose(img.pixels, reference(ds), atol=1e-6)
    assert img.format == "DICOM"
    assert any("no DICOM preamble" in w for w in img.warnings)
    assert ("Implicit" in " ".join(img.warnings)) is implicit


def test_header_summary_rides_along_and_holds_no_patient_field():
    ds, _ = instance()
    ds.BodyPartExamined, ds.SeriesDescription = "KNEE", "KNEE AP"
    img = read_image(part10(ds))
    assert img.dicom.body_part == "KNEE" and img.dicom.series_description == "KNEE AP"
    assert img.dicom.series_uid == ds.SeriesInstanceUID and img.dicom.study_uid == ds.StudyInstanceUID
    summary = repr(img.dicom) + repr(img.dicom.to_dict())
    assert not any(value in summary for value in FAKE_PATIENT.values())


def test_damaged_codestream_is_a_clear_error():
    ds, _ = instance()
    ds.compress(JPEGLSLossless)
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\xff\xf7" + b"\x13" * 64 + b"\xff\xd9"])
    with pytest.raises(ImageReadError) as err:
        read_image(part10(ds), name="bad-ls.dcm")
    assert err.value.reason in ("corrupt", "truncated") and "bad-ls.dcm" in str(err.value)


def test_bare_dataset_check_does_not_swallow_other_formats():
    with pytest.raises(ImageReadError) as err:
        read_image(b"\x08\x00" + b"garbage" * 10, name="x.bin")
    assert err.value.reason in ("not_image", "corrupt")
