"""DICOM grayscale pipeline, pixel by pixel: Modality LUT (rescale), VOI LUT Sequence, windowing with each
VOILUTFunction, MONOCHROME1, multi-frame functional groups -- through the public ``read_image``.

What the decoder promises (mediscan.core.imaging): stored values -> Modality LUT / rescale -> VOI LUT (a VOI
LUT Sequence when there is one, else the first window) -> MONOCHROME1 inverted -> min-max stretched to float32
[0, 1]. Every expected value below is computed by hand from the DICOM standard's formulas (PS3.3 C.11.1,
C.11.2), never by the decoder or by pydicom. The images hold pixels on both sides of each window, so the final
stretch cannot cancel a wrong slope, intercept or window: a decoder that ignored any of them gives other pixels.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mediscan.core.imaging import read_image

H, W = 32, 40
#: Stored values (12 bits) tiled over the image, with the same value in each row of 8 columns.
STORED = np.array([0, 300, 380, 400, 450, 500, 550, 620, 700, 4095], np.uint16)


def tiled(values: np.ndarray, dtype=np.uint16) -> np.ndarray:
    return np.resize(np.asarray(values, dtype), H * W).reshape(H, W)


def dicom(stored: np.ndarray, *, photometric: str = "MONOCHROME2", frames: int = 1, **elements) -> bytes:
    """An uncompressed 12-bit CR in memory with the given extra elements."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "CR"
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(stored, np.uint16).tobytes()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def item(**elements) -> Dataset:
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def decoded(data: bytes) -> np.ndarray:
    image = read_image(data, name="test.dcm")
    assert image.format == "DICOM" and image.pixels.dtype == np.float32 and image.pixels.shape == (H, W)
    assert image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0
    return image.pixels


def linear(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (VOILUTFunction LINEAR, the default), output range scaled to [0, 1]."""
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    inside = (x - (center - 0.5)) / (width - 1) + 0.5
    return np.where(x <= low, 0.0, np.where(x > high, 1.0, inside))


def linear_exact(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.2 (LINEAR_EXACT), output range scaled to [0, 1]."""
    inside = (x - center) / width + 0.5
    return np.where(x <= center - width / 2, 0.0, np.where(x > center + width / 2, 1.0, inside))


def stretch(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, np.float64)
    return (values - values.min()) / (values.max() - values.min())


# -------------------------------------------------------------------------------------------- window + rescale

def test_linear_window_on_rescaled_values_with_slope_2():
    """Hounsfield-like units = 2 * stored - 1000; the soft-tissue window 0 / 401 spans stored 400 ... 600."""
    stored = tiled(STORED)
    px = decoded(dicom(stored, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=401))
    units = 2.0 * stored - 1000.0
    np.testing.assert_allclose(px, linear(units, 0, 401), atol=1e-6)
    # By hand for stored 450, 500, 550: units -100, 0, 100 -> (u + 0.5) / 400 + 0.5.
    by_stored = dict(zip(stored.ravel().tolist(), px.ravel().tolist()))
    assert by_stored[450] == pytest.approx(0.25125, abs=1e-6)
    assert by_stored[500] == pytest.approx(0.50125, abs=1e-6)
    assert by_stored[550] == pytest.approx(0.75125, abs=1e-6)
    assert by_stored[380] == 0.0 and by_stored[620] == 1.0     # units -240 and 240: outside the window
    assert by_stored[0] == 0.0 and by_stored[4095] == 1.0


def test_intercept_alone_moves_the_window():
    stored = tiled(STORED)
    px = decoded(dicom(stored, RescaleSlope=1, RescaleIntercept=-200, WindowCenter=300, WindowWidth=201))
    np.testing.assert_allclose(px, linear(stored - 200.0, 300, 201), atol=1e-6)
    by_stored = dict(zip(stored.ravel().tolist(), px.ravel().tolist()))
    # By hand: units 250, 300, 350 -> (u - 299.5) / 200 + 0.5; units 180 and 420 lie outside the window.
    assert by_stored[450] == pytest.approx(0.2525, abs=1e-6) and by_stored[500] == pytest.approx(0.5025, abs=1e-6)
    assert by_stored[550] == pytest.approx(0.7525, abs=1e-6)
    assert by_stored[380] == 0.0 and by_stored[620] == 1.0


def test_linear_exact_window():
    stored = tiled(STORED)
    px = decoded(dicom(stored, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=400,
                       VOILUTFunction="LINEAR_EXACT"))
    np.testing.assert_allclose(px, linear_exact(2.0 * stored - 1000.0, 0, 400), atol=1e-6)
    by_stored = dict(zip(stored.ravel().tolist(), px.ravel().tolist()))
    assert (by_stored[450], by_stored[500], by_stored[550]) == pytest.approx((0.25, 0.5, 0.75), abs=1e-6)


def test_sigmoid_window():
    """PS3.3 C.11.2.1.3.1: y = 1 / (1 + exp(-4 (x - c) / w)), then the image's min-max stretch."""
    stored = tiled(STORED)
    px = decoded(dicom(stored, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=400,
                       VOILUTFunction="SIGMOID"))
    units = 2.0 * stored - 1000.0
    np.testing.assert_allclose(px, stretch(1.0 / (1.0 + np.exp(-4.0 * units / 400.0))), atol=1e-6)
    by_stored = dict(zip(stored.ravel().tolist(), px.ravel().tolist()))
    assert 0.45 < by_stored[500] < 0.55 and by_stored[450] < 0.3 and by_stored[550] > 0.7


def test_the_first_of_several_windows_is_used():
    stored = tiled(STORED)
    px = decoded(dicom(stored, WindowCenter=[500, 2000], WindowWidth=[201, 4000]))
    np.testing.assert_allclose(px, linear(stored.astype(np.float64), 500, 201), atol=1e-6)


def test_monochrome1_with_a_window_is_inverted_after_windowing():
    stored = tiled(STORED)
    px = decoded(dicom(stored, photometric="MONOCHROME1", RescaleSlope=2, RescaleIntercept=-1000,
                       WindowCenter=0, WindowWidth=400, VOILUTFunction="LINEAR_EXACT"))
    np.testing.assert_allclose(px, 1.0 - linear_exact(2.0 * stored - 1000.0, 0, 400), atol=1e-6)
    by_stored = dict(zip(stored.ravel().tolist(), px.ravel().tolist()))
    assert (by_stored[0], by_stored[450], by_stored[550], by_stored[4095]) == pytest.approx((1, 0.75, 0.25, 0))


# -------------------------------------------------------------------------------------------- VOI LUT Sequence

def voi_lut(first: int, data: list[int], bits: int = 16) -> list[Dataset]:
    lut = item(LUTDescriptor=[len(data), first, bits])
    lut.add_new("LUTData", "US", data)            # the VR is ambiguous (US or OW): say which
    return [lut]


def test_voi_lut_sequence_maps_each_value_and_wins_over_a_window():
    """A VOI LUT of 5 entries from stored value 400: below 400 -> entry 0, above 404 -> the last entry."""
    table = [100, 400, 1600, 3600, 6400]              # a square law: not something a window could do
    stored = tiled([0, 399, 400, 401, 402, 403, 404, 405, 4095])
    px = decoded(dicom(stored, VOILUTSequence=voi_lut(400, table), WindowCenter=2000, WindowWidth=10))
    lut_out = np.array(table)[np.clip(stored.astype(int) - 400, 0, 4)]
    np.testing.assert_allclose(px, stretch(lut_out), atol=1e-6)
    by_stored = dict(zip(stored.ravel().tolist(), px.ravel().tolist()))
    assert by_stored[0] == 0.0 and by_stored[399] == 0.0 and by_stored[400] == 0.0
    assert by_stored[401] == pytest.approx(300 / 6300, abs=1e-6)
    assert by_stored[402] == pytest.approx(1500 / 6300, abs=1e-6)
    assert by_stored[403] == pytest.approx(3500 / 6300, abs=1e-6)
    assert by_stored[404] == 1.0 and by_stored[4095] == 1.0


@pytest.mark.filterwarnings("ignore:Applying a VOI LUT on a float input")
def test_voi_lut_indexes_the_rescaled_values():
    """The VOI LUT applies to the Modality LUT's output: units = 2 * stored + 10, table from unit 20."""
    table = [0, 10, 20, 30, 40, 50, 60, 70, 1000, 2000, 4000]
    stored = tiled([0, 4, 5, 6, 7, 8, 9, 100])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        px = decoded(dicom(stored, RescaleSlope=2, RescaleIntercept=10, VOILUTSequence=voi_lut(20, table)))
    units = 2 * stored.astype(int) + 10
    np.testing.assert_allclose(px, stretch(np.array(table)[np.clip(units - 20, 0, len(table) - 1)]), atol=1e-6)
    by_stored = dict(zip(stored.ravel().tolist(), px.ravel().tolist()))
    assert by_stored[5] == 0.0 and by_stored[6] == pytest.approx(20 / 4000)         # units 20 and 22
    assert by_stored[9] == pytest.approx(1000 / 4000) and by_stored[100] == 1.0     # units 28 and 210


# -------------------------------------------------------------------------------------------- multi-frame

def test_enhanced_multiframe_uses_frame_one_rescale_and_window_with_slope_2():
    stored = np.stack([tiled(STORED), tiled(STORED[::-1])])
    per_frame = [
        item(PixelValueTransformationSequence=[item(RescaleSlope=2, RescaleIntercept=-1000, RescaleType="HU")],
             FrameVOILUTSequence=[item(WindowCenter=0, WindowWidth=400, VOILUTFunction="LINEAR_EXACT")]),
        item(PixelValueTransformationSequence=[item(RescaleSlope=1, RescaleIntercept=0, RescaleType="US")],
             FrameVOILUTSequence=[item(WindowCenter=3000, WindowWidth=10)]),
    ]
    shared = item(PixelValueTransformationSequence=[item(RescaleSlope=5, RescaleIntercept=7, RescaleType="US")],
                  FrameVOILUTSequence=[item(WindowCenter=9, WindowWidth=9)])
    image = read_image(dicom(stored, frames=2, PerFrameFunctionalGroupsSequence=per_frame,
                             SharedFunctionalGroupsSequence=[shared]))
    np.testing.assert_allclose(image.pixels, linear_exact(2.0 * stored[0] - 1000.0, 0, 400), atol=1e-6)
    assert image.warnings == ("multi-frame DICOM: using frame 1 of 2",)


def test_shared_functional_group_applies_when_a_frame_has_none():
    stored = np.stack([tiled(STORED), tiled(STORED)])
    shared = item(PixelValueTransformationSequence=[item(RescaleSlope=2, RescaleIntercept=-1000)],
                  FrameVOILUTSequence=[item(WindowCenter=0, WindowWidth=400, VOILUTFunction="SIGMOID")])
    px = read_image(dicom(stored, frames=2, SharedFunctionalGroupsSequence=[shared],
                          PerFrameFunctionalGroupsSequence=[item(), item()])).pixels
    units = 2.0 * stored[0] - 1000.0
    np.testing.assert_allclose(px, stretch(1.0 / (1.0 + np.exp(-4.0 * units / 400.0))), atol=1e-6)


def test_a_window_in_the_functional_groups_applies_without_a_rescale_macro():
    """Enhanced files may carry a FrameVOILUTSequence and no PixelValueTransformationSequence (no rescale)."""
    stored = np.stack([tiled(STORED), tiled(STORED)])
    per_frame = [item(FrameVOILUTSequence=[item(WindowCenter=500, WindowWidth=201)]), item()]
    px = read_image(dicom(stored, frames=2, PerFrameFunctionalGroupsSequence=per_frame)).pixels
    np.testing.assert_allclose(px, linear(stored[0].astype(np.float64), 500, 201), atol=1e-6)
    by_stored = dict(zip(stored[0].ravel().tolist(), px.ravel().tolist()))
    assert by_stored[450] == pytest.approx(0.2525, abs=1e-6) and by_stored[380] == 0.0 and by_stored[620] == 1.0
