"""Tests for mediscan.imaging: every format, the scaling rule, and every user-facing error.

All images are made here (tiny, e.g. 40x48); nothing reads dataset/ or the network.
"""
from __future__ import annotations

import io
import pickle
import struct
import warnings
import zlib

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

from mediscan.core.imaging import (
    DEFAULT_MAX_PIXELS,
    MIN_SIDE,
    SUPPORTED_SUFFIXES,
    DecodedImage,
    ImageReadError,
    colourfulness,
    looks_like_image_file,
    read_image,
)

REASONS = {
    "missing", "empty", "not_image", "truncated", "too_large", "too_small", "no_pixel_data", "unsupported", "corrupt",
}
H, W = 40, 48
RNG = np.random.default_rng(0)
GRAY8 = RNG.integers(0, 256, (H, W), dtype=np.uint8)


# ----------------------------------------------------------------------------- helpers


def pil_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def make_dicom(
    arr: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    pixel_data: bool = True,
    transfer_syntax=ExplicitVRLittleEndian,
    **elements,
) -> bytes:
    """A Part-10 DICOM (CR) in memory, with fake patient fields that must never leak."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET123"
    ds.PatientBirthDate = "19700101"
    samples = 3 if arr.ndim == 3 + ("NumberOfFrames" in elements) else 1
    ds.Rows, ds.Columns = arr.shape[-3:-1] if samples == 3 else arr.shape[-2:]
    ds.SamplesPerPixel = samples
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    bits = arr.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    for key, value in elements.items():
        setattr(ds, key, value)
    if pixel_data:
        ds.PixelData = arr.tobytes()
    buf = io.BytesIO()
    try:
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)  # pydicom >= 3
    except TypeError:  # pragma: no cover - pydicom 2.x
        pydicom.dcmwrite(buf, ds, write_like_original=False)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but holds no pixel data (a bomb header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def stretched(arr) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float64)
    return ((arr - arr.min()) / (arr.max() - arr.min())).astype(np.float32)


def check_output(img: DecodedImage, shape=(H, W)) -> None:
    px = img.pixels
    assert isinstance(img, DecodedImage)
    assert px.dtype == np.float32 and px.shape == shape and px.flags.c_contiguous
    assert np.isfinite(px).all() and px.min() >= 0.0 and px.max() <= 1.0


def expect_error(reason: str, source, **kw) -> ImageReadError:
    with pytest.raises(ImageReadError) as info:
        read_image(source, **kw)
    err = info.value
    assert err.reason == reason, str(err)
    assert err.reason in REASONS
    assert err.source and err.source in str(err)
    assert err.hint and err.hint in str(err)
    assert "Traceback" not in str(err)
    return err


# ----------------------------------------------------------------------------- raster formats


def test_png_8bit_is_divided_by_255(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(GRAY8).save(path)
    img = read_image(path)
    check_output(img)
    assert img.format == "PNG" and img.bit_depth == 8 and img.modality is None and img.warnings == ()
    np.testing.assert_array_equal(img.pixels, GRAY8.astype(np.float32) / 255)
    assert img.source == str(path)


def test_png_16bit_12bit_range_is_stretched(tmp_path):
    arr = np.linspace(0, 4095, H * W).round().reshape(H, W).astype(np.uint16)  # 12-bit data in 16 bits
    im = Image.fromarray(arr)
    assert im.mode == "I;16"
    path = tmp_path / "twelve.png"
    im.save(path)
    img = read_image(path)
    check_output(img)
    assert img.bit_depth == 16
    np.testing.assert_allclose(img.pixels, arr / 4095, atol=1e-6)
    assert img.pixels.max() == 1.0  # not "almost black"


def test_constant_16bit_image_gives_zeros_not_nan():
    img = read_image(pil_bytes(Image.fromarray(np.full((H, W), 1234, np.uint16)), "PNG"))
    check_output(img)
    assert not img.pixels.any()


def test_jpeg_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((H, 64), np.uint8)
    arr[:16, :16] = 255  # bright block top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "phone.jpg"
    Image.fromarray(arr).save(path, "JPEG", exif=exif, quality=95)
    img = read_image(path)
    check_output(img, shape=(64, H))  # transposed
    assert img.format == "JPEG" and img.bit_depth == 8
    assert img.pixels[:16, -16:].mean() > 0.9  # the block moved to the top-right
    assert img.pixels[:16, :16].mean() < 0.1


def test_bmp(tmp_path):
    path = tmp_path / "gray.bmp"
    Image.fromarray(GRAY8).save(path)
    img = read_image(path)
    assert img.format == "BMP"
    np.testing.assert_array_equal(img.pixels, GRAY8 / np.float32(255))


def test_tiff_16bit(tmp_path):
    arr = RNG.integers(1000, 3001, (H, W)).astype(np.uint16)
    path = tmp_path / "scan.tif"
    Image.fromarray(arr).save(path)
    img = read_image(path)
    check_output(img)
    assert img.format == "TIFF" and img.bit_depth == 16
    np.testing.assert_allclose(img.pixels, stretched(arr), atol=1e-6)


def test_float_tiff_is_stretched_and_nan_rejected(tmp_path):
    arr = RNG.normal(size=(H, W)).astype(np.float32)
    img = read_image(pil_bytes(Image.fromarray(arr), "TIFF"))
    assert img.bit_depth == 32
    np.testing.assert_allclose(img.pixels, stretched(arr), atol=1e-6)
    arr[3, 4] = np.nan
    expect_error("corrupt", pil_bytes(Image.fromarray(arr), "TIFF"), name="nan.tif")


def test_rgb_becomes_luminance():
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    rgb[:, : W // 2, 1] = 255  # left half yellow
    im = Image.fromarray(rgb)
    img = read_image(pil_bytes(im, "PNG"))
    check_output(img)
    np.testing.assert_array_equal(img.pixels, np.asarray(im.convert("L")) / np.float32(255))
    assert img.pixels[0, -1] == pytest.approx(76 / 255)


def test_colourfulness_is_measured_before_the_grayscale_conversion():
    gray = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    assert read_image(pil_bytes(Image.fromarray(gray), "PNG")).colourfulness == 0.0
    assert read_image(pil_bytes(Image.fromarray(np.stack([gray] * 3, -1)), "PNG")).colourfulness == 0.0
    # JPEG chroma noise on gray content stays near zero ...
    jpeg_gray = read_image(pil_bytes(Image.fromarray(np.stack([gray] * 3, -1)), "JPEG")).colourfulness
    assert jpeg_gray < 0.03
    # ... while colour content scores what the metric says, also through a palette PNG.
    colour = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
    expected = colourfulness(colour / 255.0)
    assert expected > 0.3
    assert read_image(pil_bytes(Image.fromarray(colour), "PNG")).colourfulness == pytest.approx(expected, rel=1e-5)
    palette = Image.fromarray(colour).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    assert read_image(pil_bytes(palette, "PNG")).colourfulness > 0.2
    # A uniform tint counts through the mean term: pure red is colourful, mid gray is not.
    assert colourfulness(np.tile([1.0, 0.0, 0.0], (4, 4, 1))) == pytest.approx(0.3 * np.hypot(1.0, 0.5))
    assert colourfulness(np.full((4, 4, 3), 0.5)) == 0.0


def test_rgba_is_composited_onto_black():
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 255
    rgba[:10, :, 3] = 0  # fully transparent rows
    rgba[10:20, :, 3] = 51  # 20 % opaque
    img = read_image(pil_bytes(Image.fromarray(rgba), "PNG"))
    check_output(img)
    assert not img.pixels[:10].any()
    assert img.pixels[15, 0] == pytest.approx(200 / 255 * 51 / 255)
    assert img.pixels[30, 0] == pytest.approx(200 / 255)


def test_la_and_palette_images():
    la = Image.merge("LA", [Image.fromarray(GRAY8), Image.new("L", (W, H), 255)])
    np.testing.assert_allclose(read_image(pil_bytes(la, "PNG")).pixels, GRAY8 / 255, atol=1e-6)
    rgb = Image.fromarray(RNG.integers(0, 256, (H, W, 3), dtype=np.uint8))
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    assert pal.mode == "P"
    img = read_image(pil_bytes(pal, "PNG"))
    check_output(img)
    np.testing.assert_array_equal(img.pixels, np.asarray(pal.convert("L")) / np.float32(255))


def test_cmyk_jpeg():
    im = Image.fromarray(GRAY8).convert("CMYK")
    img = read_image(pil_bytes(im, "JPEG"))
    check_output(img)
    assert img.format == "JPEG"


def test_format_is_detected_by_content_not_suffix(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    Image.fromarray(GRAY8).save(path, "PNG")
    assert read_image(path).format == "PNG"
    dcm = tmp_path / "scan.png"
    dcm.write_bytes(make_dicom(np.zeros((H, W), np.uint16)))
    assert read_image(dcm).format == "DICOM"


def test_multipage_tiff_uses_first_page_with_warning():
    pages = [Image.fromarray(GRAY8), Image.fromarray(255 - GRAY8)]
    data = pil_bytes(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    img = read_image(data)
    np.testing.assert_array_equal(img.pixels, GRAY8 / np.float32(255))
    assert any("page 1 of 2" in w for w in img.warnings)


# ----------------------------------------------------------------------------- input kinds


@pytest.mark.parametrize("kind", ["png", "dicom"])
def test_path_bytes_and_stream_give_identical_pixels(tmp_path, kind):
    if kind == "png":
        data = pil_bytes(Image.fromarray(GRAY8), "PNG")
    else:
        data = make_dicom(RNG.integers(0, 4096, (H, W)).astype(np.uint16), bits_stored=12)
    path = tmp_path / f"x.{kind}"
    path.write_bytes(data)
    from_path = read_image(path)
    from_bytes = read_image(data, name="upload")
    from_bytearray = read_image(memoryview(bytearray(data)))
    with open(path, "rb") as fh:
        from_file = read_image(fh)
    from_stream = read_image(io.BytesIO(data), name="upload")
    for other in (from_bytes, from_bytearray, from_file, from_stream):
        np.testing.assert_array_equal(from_path.pixels, other.pixels)
    assert from_bytes.source == "upload" and from_bytearray.source == "<bytes>"
    assert from_file.source == str(path)


def test_upload_objects_are_labelled_by_file_name():
    class FlaskLikeUpload(io.BytesIO):  # werkzeug FileStorage: .name is the form field
        name = "file"
        filename = "chest.png"

    err = expect_error("empty", FlaskLikeUpload(b""))
    assert err.source == "chest.png"
    err = expect_error("empty", b"", name="bad\nname.png")
    assert "\n" not in str(err)


def test_wrong_argument_type_is_a_type_error():
    with pytest.raises(TypeError):
        read_image(12345)
    with pytest.raises(TypeError):
        read_image(io.StringIO("text"))


# ----------------------------------------------------------------------------- DICOM


def test_dicom_monochrome2_16bit_with_rescale():
    """Slope 2, intercept -1024, window 0 / 1001: a window fixed in rescaled units, so the final min-max
    stretch cannot cancel a wrong slope or intercept (without a window it would: see test_dicom_pixels)."""
    arr = RNG.integers(0, 4096, (H, W)).astype(np.uint16)
    arr[0, :5] = [0, 400, 512, 600, 4095]
    img = read_image(make_dicom(arr, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024,
                                WindowCenter=0, WindowWidth=1001), name="cr.dcm")
    check_output(img)
    assert (img.format, img.bit_depth, img.modality, img.source) == ("DICOM", 16, "CR", "cr.dcm")
    # By hand (PS3.3 C.11.2.1.2.1, LINEAR): units u = 2 s - 1024; u <= -500.5 -> 0, u > 499.5 -> 1,
    # else (u + 0.5) / 1000 + 0.5. Stored 400, 512, 600 -> u = -224, 0, 176.
    assert img.pixels[0, :5].tolist() == pytest.approx([0.0, 0.2765, 0.5005, 0.6765, 1.0], abs=1e-6)
    units = 2.0 * arr - 1024.0
    expected = np.clip((units + 0.5) / 1000 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(img.pixels, expected, atol=1e-6)


def test_dicom_window_is_applied_after_rescale():
    arr = np.full((H, W), 1024, np.uint16)  # stored 1024 -> 0 HU, the window centre
    arr[0, 0], arr[0, 1], arr[0, 2] = 500, 4000, 824  # below / above / bottom edge of the window
    data = make_dicom(arr, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=0, WindowWidth=400)
    px = read_image(data).pixels
    assert px[0, 0] == 0.0 and px[0, 1] == 1.0
    assert px[0, 2] == pytest.approx(0.0, abs=0.01)
    assert px[5, 5] == pytest.approx(0.5, abs=0.01)


def test_dicom_monochrome1_is_inverted():
    arr = RNG.integers(100, 4000, (H, W)).astype(np.uint16)
    arr[1, 2], arr[3, 4] = 0, 4095
    img = read_image(make_dicom(arr, photometric="MONOCHROME1", bits_stored=12))
    assert img.pixels[1, 2] == 1.0  # smallest stored value is brightest
    assert img.pixels[3, 4] == 0.0
    np.testing.assert_allclose(img.pixels, 1 - stretched(arr), atol=1e-6)


def test_dicom_signed_and_constant():
    arr = RNG.integers(-2000, 2000, (H, W)).astype(np.int16)
    np.testing.assert_allclose(read_image(make_dicom(arr)).pixels, stretched(arr), atol=1e-6)
    img = read_image(make_dicom(np.full((H, W), 7, np.uint16), photometric="MONOCHROME1"))
    check_output(img)
    assert not img.pixels.any()


def test_dicom_multiframe_uses_first_frame_with_warning():
    frames = RNG.integers(0, 4096, (3, H, W)).astype(np.uint16)
    img = read_image(make_dicom(frames, NumberOfFrames=3))
    check_output(img)
    np.testing.assert_allclose(img.pixels, stretched(frames[0]), atol=1e-6)
    assert img.warnings == ("multi-frame DICOM: using frame 1 of 3",)


def _item(**elements) -> Dataset:
    item = Dataset()
    for key, value in elements.items():
        setattr(item, key, value)
    return item


def test_dicom_enhanced_multiframe_uses_frame_one_functional_groups():
    """Enhanced CT/MR keep rescale and window per frame in functional groups: frame 1's are applied
    (per-frame over shared), as the top-level ones of a classic file are."""
    frames = np.full((2, H, W), 1024, np.uint16)          # stored 1024 -> 0 HU with the shared rescale
    frames[0, 0, 0], frames[0, 0, 1], frames[0, 0, 2] = 500, 4000, 824
    rescale = _item(PixelValueTransformationSequence=[_item(RescaleSlope=1, RescaleIntercept=-1024,
                                                             RescaleType="HU")])
    per_frame = [_item(FrameVOILUTSequence=[_item(WindowCenter=0, WindowWidth=400)]),
                 _item(FrameVOILUTSequence=[_item(WindowCenter=3000, WindowWidth=10)])]
    shared = _item(PixelValueTransformationSequence=rescale.PixelValueTransformationSequence,
                   FrameVOILUTSequence=[_item(WindowCenter=2000, WindowWidth=10)])   # overridden per frame
    data = make_dicom(frames, bits_stored=12, NumberOfFrames=2, SharedFunctionalGroupsSequence=[shared],
                      PerFrameFunctionalGroupsSequence=per_frame)
    img = read_image(data)
    px = img.pixels
    # The same as test_dicom_window_is_applied_after_rescale: the soft-tissue window of frame 1.
    assert px[0, 0] == 0.0 and px[0, 1] == 1.0
    assert px[0, 2] == pytest.approx(0.0, abs=0.01)
    assert px[5, 5] == pytest.approx(0.5, abs=0.01)
    assert img.warnings == ("multi-frame DICOM: using frame 1 of 2",)
    # Without the functional groups the full range is stretched instead: the window did something.
    plain = read_image(make_dicom(frames, bits_stored=12, NumberOfFrames=2)).pixels
    assert plain[5, 5] == pytest.approx((1024 - 500) / (4000 - 500), abs=0.01)


def test_dicom_rgb_becomes_grayscale():
    rgb = RNG.integers(0, 256, (H, W, 3)).astype(np.uint8)
    img = read_image(make_dicom(rgb, photometric="RGB"))
    check_output(img)
    np.testing.assert_allclose(img.pixels, stretched(rgb @ np.array([0.299, 0.587, 0.114])), atol=1e-5)
    assert img.colourfulness > 0.3
    gray = np.repeat(rgb[..., :1], 3, axis=-1)
    assert read_image(make_dicom(gray, photometric="RGB")).colourfulness == 0.0


def test_dicom_grayscale_has_no_colour_and_large_or_ybr_colour_decodes():
    """Monochrome DICOM has colourfulness 0; an RGB image wider than the colour sample (every k-th pixel
    measured) still decodes; YBR_FULL gives the luminance of the RGB it encodes (pydicom's conversion)."""
    from pydicom.pixels import convert_color_space
    assert read_image(make_dicom(RNG.integers(0, 4096, (H, W)).astype(np.uint16), bits_stored=12)).colourfulness == 0.0
    big = np.zeros((60, 600, 3), np.uint8)
    big[..., 0] = 255                                                  # pure red, 600 px wide
    img = read_image(make_dicom(big, photometric="RGB"))
    assert img.pixels.shape == (60, 600) and img.colourfulness == pytest.approx(colourfulness(big / 255.0), rel=1e-6)
    rgb = RNG.integers(0, 256, (H, W, 3)).astype(np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    px = read_image(make_dicom(ybr, photometric="YBR_FULL")).pixels
    np.testing.assert_allclose(px, read_image(make_dicom(rgb, photometric="RGB")).pixels, atol=0.02)


def test_dicom_16bit_rgb_colourfulness_is_measured_on_its_bits_stored_scale():
    """RGB stored in 16 bits is the same picture as its 8-bit version: the same colourfulness, not 257x."""
    rgb = RNG.integers(0, 256, (H, W, 3)).astype(np.uint8)
    img = read_image(make_dicom(rgb.astype(np.uint16) * 257, photometric="RGB"))
    check_output(img)
    assert img.colourfulness == pytest.approx(colourfulness(rgb / 255.0), rel=1e-4)
    assert img.colourfulness == pytest.approx(read_image(make_dicom(rgb, photometric="RGB")).colourfulness, rel=1e-4)


@pytest.mark.parametrize("lut_bits", [8, 16])
def test_dicom_palette_colour_is_measured_on_the_lookup_table_scale(lut_bits):
    indices = (np.arange(H * W) % 4).reshape(H, W).astype(np.uint8)
    top = 2 ** lut_bits - 1
    red, green, blue = ([top, 0, 0, top], [0, top, 0, top], [0, 0, top, top])   # red, green, blue, white
    dtype = np.uint8 if lut_bits == 8 else np.uint16
    lut = {f"{name}PaletteColorLookupTableDescriptor": [4, 0, lut_bits] for name in ("Red", "Green", "Blue")}
    lut.update({f"{name}PaletteColorLookupTableData": np.array(values, dtype).tobytes()
                for name, values in (("Red", red), ("Green", green), ("Blue", blue))})
    img = read_image(make_dicom(indices, photometric="PALETTE COLOR", bits_stored=8, **lut))
    check_output(img)
    rgb = np.stack([np.array(c)[indices] for c in (red, green, blue)], -1) / top
    assert img.colourfulness == pytest.approx(colourfulness(rgb), rel=1e-4)    # same value at 8 and 16 bits


def test_dicom_without_pixel_data():
    expect_error("no_pixel_data", make_dicom(np.zeros((H, W), np.uint16), pixel_data=False), name="sr.dcm")


def test_dicom_missing_decoder_is_unsupported():
    """A transfer syntax no installed plugin decodes (here DICOM video: none exists for Python) is refused
    with the syntax's name and what to do -- never a stack trace. (JPEG-LS, the old example, now decodes.)"""
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG4HP41

    data = make_dicom(np.zeros((H, W), np.uint16), pixel_data=False, transfer_syntax=MPEG4HP41)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.add_new(0x7FE00010, "OB", encapsulate([b"\0\0\0\x01" + b"\0" * 64]))
    buf = io.BytesIO()
    ds.save_as(buf)
    err = expect_error("unsupported", buf.getvalue(), name="video.dcm")
    assert "MPEG-4" in str(err) and "still image" in err.hint


def test_dicom_truncated_pixel_data():
    data = make_dicom(np.zeros((H, W), np.uint16))
    expect_error("truncated", data[:-500], name="cut.dcm")


def test_dicom_results_carry_no_patient_fields(capsys):
    data = make_dicom(np.zeros((H, W), np.uint16))
    img = read_image(data)
    err = expect_error("too_small", data, min_side=H + 1)
    blob = repr(img) + str(err) + repr(vars(err)) + "".join(capsys.readouterr())
    for secret in ("SECRET123", "Doe", "19700101"):
        assert secret not in blob


# ----------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    err = expect_error("missing", tmp_path / "nope.png")
    assert "nope.png" in str(err)


def test_directory_path(tmp_path):
    expect_error("unsupported", tmp_path)


def test_empty_file_and_bytes(tmp_path):
    path = tmp_path / "zero.png"
    path.write_bytes(b"")
    expect_error("empty", path)
    expect_error("empty", b"", name="upload.png")
    expect_error("empty", io.BytesIO(b""))


@pytest.mark.parametrize(
    "data",
    [
        b"hello, this is a text file\n",
        b"BM is also how a BMP starts, but this is text",
        b"<html><body>404</body></html>",
        RNG.bytes(500),
        b"version https://git-lfs.github.com/spec/v1\n",
    ],
)
def test_not_an_image(data):
    err = expect_error("not_image", data, name="upload.png")
    assert "upload.png" in str(err)


def test_text_error_names_supported_formats():
    err = expect_error("not_image", b"just some text", name="notes.png")
    assert "PNG" in err.hint and "DICOM" in err.hint


def test_damaged_header_of_a_supported_format_is_corrupt():
    data = bytearray(pil_bytes(Image.fromarray(GRAY8), "PNG"))
    data[12:16] = b"XXXX"  # IHDR chunk type destroyed
    err = expect_error("corrupt", bytes(data), name="x.png")
    assert "PNG" in str(err)


def test_other_image_formats_are_named():
    err = expect_error("unsupported", pil_bytes(Image.fromarray(GRAY8), "GIF"), name="anim.gif")
    assert "GIF" in str(err)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(tmp_path, fmt):
    data = pil_bytes(Image.fromarray(RNG.integers(0, 256, (200, 300), dtype=np.uint8)), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    expect_error("truncated", path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_png_data():
    raw = zlib.compress(b"\0" + b"\x80" * W)  # not the full image, and then garbage
    bad = png_header_only(W, H)[:-12] + png_chunk(b"IDAT", b"\x78\x9c" + b"\xff" * 40 + raw) + png_chunk(b"IEND", b"")
    expect_error("corrupt", bad, name="bad.png")


def test_too_large_is_checked_before_decoding():
    before = Image.MAX_IMAGE_PIXELS
    data = pil_bytes(Image.fromarray(GRAY8), "PNG")
    err = expect_error("too_large", data, max_pixels=H * W - 1)
    assert f"{H * W:,}" in str(err)
    assert read_image(data, max_pixels=H * W).pixels.shape == (H, W)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not escape either
        expect_error("too_large", png_header_only(10_000, 10_000))  # PIL warns; our limit rejects
        expect_error("too_large", png_header_only(100_000, 100_000))  # PIL's own bomb error
        expect_error("too_large", make_dicom(np.zeros((H, W), np.uint16)), max_pixels=100)
    assert Image.MAX_IMAGE_PIXELS == before and DEFAULT_MAX_PIXELS == 64_000_000


def test_concurrent_reads_leave_warning_filters_alone():
    from concurrent.futures import ThreadPoolExecutor

    before = list(warnings.filters)
    good, bomb = pil_bytes(Image.fromarray(GRAY8), "PNG"), png_header_only(10_000, 10_000)

    def work(i):
        try:
            return read_image(bomb if i % 2 else good).format
        except ImageReadError as err:
            return err.reason

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(40)))
    assert results == ["PNG", "too_large"] * 20
    assert warnings.filters == before


def test_32bit_integer_tiff_is_stretched():
    arr = RNG.integers(-5, 70_000, (H, W)).astype(np.int32)
    img = read_image(pil_bytes(Image.fromarray(arr), "TIFF"))
    assert img.bit_depth == 32
    np.testing.assert_allclose(img.pixels, stretched(arr), atol=1e-6)


def test_dicom_without_image_size():
    data = make_dicom(np.zeros((H, W), np.uint16))
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.Rows
    buf = io.BytesIO()
    ds.save_as(buf)
    expect_error("corrupt", buf.getvalue())


def test_too_small():
    expect_error("too_small", pil_bytes(Image.new("L", (10, 10)), "PNG"), name="icon.png")
    expect_error("too_small", pil_bytes(Image.new("L", (W, MIN_SIDE - 1)), "PNG"))
    assert read_image(pil_bytes(Image.new("L", (8, 8)), "PNG"), min_side=8).pixels.shape == (8, 8)


def test_error_survives_pickling_and_dataloader_reraise():
    err = expect_error("empty", b"", name="a.png")
    clone = pickle.loads(pickle.dumps(err))
    assert (str(clone), clone.reason, clone.source, clone.hint) == (str(err), "empty", "a.png", err.hint)
    assert isinstance(type(err)("Caught ImageReadError in worker"), ValueError)  # torch's re-raise


PREFIXES = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*", b"\0" * 128 + b"DICM"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from(PREFIXES), body=st.binary(max_size=600))
def test_random_bytes_only_raise_image_read_error(prefix, body):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom may warn about nonsense headers
        try:
            img = read_image(prefix + body, min_side=1)
        except ImageReadError as err:
            assert err.reason in REASONS
        else:
            assert img.pixels.ndim == 2 and np.isfinite(img.pixels).all()


# ----------------------------------------------------------------------------- folder scanning


def test_looks_like_image_file(tmp_path):
    assert SUPPORTED_SUFFIXES == {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
    for name in ("a.png", "b.JPG", "c.Jpeg", "d.bmp", "e.TIF", "f.tiff", "g.DCM", "h.dicom"):
        assert looks_like_image_file(tmp_path / name)  # suffix alone decides
    assert not looks_like_image_file(tmp_path / "notes.txt")
    assert not looks_like_image_file(tmp_path / "._a.png")  # macOS resource fork
    bare = tmp_path / "IM000001"
    bare.write_bytes(make_dicom(np.zeros((H, W), np.uint16)))
    assert looks_like_image_file(bare)
    text = tmp_path / "README"
    text.write_text("x" * 200)
    assert not looks_like_image_file(text)
    assert not looks_like_image_file(tmp_path / "does_not_exist")
