"""DICOM reading: modality LUT, VOI window, MONOCHROME1, multi-frame, clear errors."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLosslessSV1
from synthetic_inputs import make_dicom, xray_like

from covidtl.dicom import DicomError, is_dicom, read_dicom

RAMP = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096  # 12-bit values in 16 bits


def gray(image) -> np.ndarray:
    array = np.asarray(image)
    assert image.mode == "RGB" and array.dtype == np.uint8
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    return array[..., 0].astype(int)


def test_is_dicom_reads_the_preamble_signature():
    data = make_dicom(RAMP, bits_stored=12)
    assert is_dicom(data[:132])
    assert is_dicom(data)
    assert not is_dicom(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    assert not is_dicom(b"short")
    assert not is_dicom(make_dicom(RAMP, bits_stored=12, preamble=False))


def test_16_bit_monochrome2_is_scaled_to_8_bit():
    image = read_dicom(make_dicom(RAMP, bits_stored=12))
    values = gray(image)
    assert image.size == (64, 64)
    assert values.min() == 0 and values.max() == 255
    assert values[0, 0] == 0 and values[-1, -1] == 255  # the ramp keeps its direction


def test_monochrome1_is_inverted():
    normal = gray(read_dicom(make_dicom(RAMP, "MONOCHROME2", 12)))
    inverted = gray(read_dicom(make_dicom(RAMP, "MONOCHROME1", 12)))
    np.testing.assert_array_equal(normal + inverted, 255)


def test_modality_rescale_is_applied():
    # A negative slope flips the stored values; without the modality LUT nothing would change.
    plain = gray(read_dicom(make_dicom(RAMP, bits_stored=12)))
    flipped = gray(read_dicom(make_dicom(RAMP, bits_stored=12, RescaleSlope=-1, RescaleIntercept=0)))
    np.testing.assert_array_equal(plain + flipped, 255)


def test_voi_window_is_applied():
    # Values 0..4095 through a narrow window at 1000: most pixels saturate. Min-max scaling
    # alone would give a linear ramp with only a few pixels at 255.
    windowed = gray(read_dicom(make_dicom(RAMP, bits_stored=12, WindowCenter=1000, WindowWidth=200)))
    plain = gray(read_dicom(make_dicom(RAMP, bits_stored=12)))
    assert (windowed == 255).mean() > 0.7
    assert (plain == 255).mean() < 0.01


def test_multi_frame_gives_the_first_frame():
    first = xray_like(48, seed=1).astype(np.uint16) * 16
    frames = np.stack([first, 4095 - first, np.zeros_like(first)])
    image = read_dicom(make_dicom(frames, bits_stored=12))
    expected = gray(read_dicom(make_dicom(first, bits_stored=12)))
    np.testing.assert_array_equal(gray(image), expected)


def test_rgb_dicom():
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[..., 0] = 200
    array = np.asarray(read_dicom(make_dicom(pixels, "RGB", 8)))
    assert array.shape == (16, 16, 3)
    assert (array[..., 0] == 200).all() and (array[..., 1:] == 0).all()


def test_accepts_path_bytes_and_file_object(tmp_path):
    data = make_dicom(RAMP, bits_stored=12)
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    expected = gray(read_dicom(data))
    for source in (path, str(path), io.BytesIO(data)):
        np.testing.assert_array_equal(gray(read_dicom(source)), expected)


def test_raw_dataset_without_preamble_is_read():
    image = read_dicom(make_dicom(RAMP, bits_stored=12, preamble=False))
    assert image.size == (64, 64)


def test_no_pixel_data_says_so():
    ds = pydicom.dcmread(io.BytesIO(make_dicom(RAMP, bits_stored=12)))
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(DicomError, match="no pixel data"):
        read_dicom(buffer.getvalue())


def test_compressed_without_decoder_names_the_syntax_and_what_is_accepted():
    ds = pydicom.dcmread(io.BytesIO(make_dicom(RAMP, bits_stored=12)))
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1  # decodable only with gdcm or pylibjpeg
    ds.PixelData = encapsulate([b"\xff\xd8 not really jpeg \xff\xd9"])
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(DicomError) as info:
        read_dicom(buffer.getvalue())
    message = str(info.value)
    assert "JPEG Lossless" in message and JPEGLosslessSV1 in message
    assert "pylibjpeg" in message and "Explicit VR Little Endian" in message


def test_not_dicom_and_truncated_files_raise_dicom_error():
    with pytest.raises(DicomError, match="not a DICOM file"):
        read_dicom(b"this is a text file, not an image " * 10)
    with pytest.raises(DicomError):
        read_dicom(make_dicom(RAMP, bits_stored=12)[:1000])


def test_pixel_limit_is_checked_before_decoding():
    with pytest.raises(DicomError, match="megapixels"):
        read_dicom(make_dicom(RAMP, bits_stored=12), max_pixels=1000)


def test_dicom_error_is_a_value_error():
    assert issubclass(DicomError, ValueError)
