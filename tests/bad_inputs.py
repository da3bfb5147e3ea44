"""A corpus of bad and odd uploads, written at test time (no binary files in the repository).

Each `Case` makes one kind of file in a folder and states the outcome the app must give:

- ``RESULT``: a classification (optionally with the size of the image after loading,
  e.g. an EXIF-rotated JPEG comes out upright);
- ``REFUSED``: a message matching `words`, which name what is wrong and what is accepted.

The oversized cases are cheap to make: the decompression bombs are a few hundred bytes
whose headers claim 30,000 x 30,000 pixels or more, and the file over the upload limit is
a sparse file (holes on disk). `write_corpus(folder)` writes every case and returns name -> path.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLosslessSV1
from synthetic_inputs import make_dicom, xray_like

from covidtl.inference import MAX_UPLOAD_BYTES

RESULT = "result"
REFUSED = "refused"

# Recurring parts of the refusal messages: what is accepted, and the limits.
FORMATS = r"PNG, JPEG, BMP or TIFF \(8- or 16-bit\), or a DICOM file"
PIXEL_LIMIT = r"the limit is 50(\.0)? megapixels"
DICOM_CORRUPT = r"the file may be truncated or corrupt: upload the complete DICOM image, or export it as a PNG"
SIZE_RULE = r"a chest X-ray needs at least 32 pixels on each side and an aspect ratio of at most 4:1"


def _bomb(megapixels: str) -> str:
    return rf"declares {megapixels} megapixels \(a decompression bomb\?\); {PIXEL_LIMIT}\. Downscale it"


@dataclass(frozen=True)
class Case:
    """One kind of upload and the outcome the app must give for it."""

    name: str
    make: Callable[[Path], Path]  # writes the file into a folder, returns its path
    outcome: str  # RESULT or REFUSED
    words: str = ""  # regex the refusal message must match (what is wrong, what is accepted)
    size: tuple[int, int] | None = None  # (width, height) after loading, for RESULT cases
    oversized: bool = False  # claims far more pixels or bytes than allowed: must be refused cheaply


# --------------------------------------------------------------------------- byte-level builders


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, idat: bytes, extra: bytes = b"", color_type: int = 0) -> bytes:
    """A PNG (8-bit, given colour type) with this IHDR and IDAT payload, chunk CRCs correct."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def tiff_header_only(width: int, height: int) -> bytes:
    """An uncompressed 8-bit grayscale TIFF whose IFD claims `width` x `height` and whose
    one strip holds 16 bytes."""
    entries = [  # tag, type (3 SHORT, 4 LONG), count, value
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, 1, 0),  # strip offset, patched below
        (277, 3, 1, 1),
        (278, 4, 1, height),
        (279, 4, 1, 16),
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    data_offset = 8 + ifd_size
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + bytes(16)


def _encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _xray(size: int = 96, seed: int = 0) -> np.ndarray:
    return xray_like(size, seed=seed, bright_disk=True)


# --------------------------------------------------------------------------- makers


def _writer(filename: str, data: Callable[[], bytes]) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / filename
        path.write_bytes(data())
        return path

    return make


def _saver(filename: str, image: Callable[[], Image.Image | list[Image.Image]], **params) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / filename
        made = image()
        if isinstance(made, list):
            made[0].save(path, save_all=True, append_images=made[1:], **params)
        else:
            made.save(path, **params)
        return path

    return make


def _good_png() -> bytes:
    return _encoded(Image.fromarray(_xray(128, seed=1)), "PNG")


def _good_jpeg() -> bytes:
    return _encoded(Image.fromarray(_xray(128, seed=2)), "JPEG", quality=90)


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(_good_jpeg())
    sof = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(_encoded(Image.fromarray(_xray(64)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # logical screen size
    return bytes(data)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return _encoded(Image.fromarray(_xray(128)[:, 32:96]), "JPEG", quality=90, exif=exif.tobytes())


def _corrupt_exif() -> bytes:
    data = _good_jpeg()
    payload = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x09"  # cut short
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def _cmyk() -> Image.Image:
    gray = _xray(96)
    return Image.fromarray(np.dstack([255 - gray] * 3 + [np.zeros_like(gray)]), mode="CMYK")


def _palette_with_transparency() -> Image.Image:
    image = Image.fromarray(_xray(96)).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    image.info["transparency"] = 0
    return image


def _frames() -> list[Image.Image]:
    return [Image.fromarray(_xray(96, seed=seed)) for seed in range(3)]


def _float_with_nan(all_nan: bool = False) -> Image.Image:
    values = _xray(96).astype(np.float32) / 255.0
    if all_nan:
        values[:] = np.nan
    else:
        values[:10, :] = np.nan
        values[-5:, -5:] = np.inf
    return Image.fromarray(values, mode="F")


def _png_bomb() -> bytes:
    # One compressed row (30,001 zero bytes) of a claimed 30,000 x 30,000 image: ~100 bytes.
    return png_bytes(30_000, 30_000, zlib.compress(bytes(30_001), 9))


def _png_bad_zlib() -> bytes:
    rng = np.random.default_rng(0)
    return png_bytes(64, 64, rng.integers(0, 256, 500, dtype=np.uint8).tobytes())


def _png_text_bomb() -> bytes:
    # A zTXt chunk inflating to 64 MiB in front of a valid image.
    text = png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(bytes(64 * 2**20), 9))
    image = _xray(64)
    rows = b"".join(b"\x00" + row.tobytes() for row in image)
    return png_bytes(64, 64, zlib.compress(rows), extra=text)


def _png_bad_crc() -> bytes:
    data = bytearray(_good_png())
    data[29] ^= 0xFF  # the last byte of IHDR's CRC
    return bytes(data)


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("xray.png", _good_png())
    return buffer.getvalue()


def _dicom(pixels: np.ndarray | None = None, **elements) -> bytes:
    pixels = (_xray(96).astype(np.uint16) * 16) if pixels is None else pixels
    return make_dicom(pixels, "MONOCHROME2", 12, **elements)


def _dicom_edit(edit: Callable[[pydicom.Dataset], None]) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(_dicom()))
    edit(ds)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def _no_pixels(ds: pydicom.Dataset) -> None:
    del ds.PixelData


def _jpeg_lossless_without_decoder(ds: pydicom.Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1  # needs pylibjpeg or gdcm, not installed
    ds.PixelData = encapsulate([b"\xff\xd8 compressed frame \xff\xd9"])


def _huge_rows(ds: pydicom.Dataset) -> None:
    ds.Rows, ds.Columns = 60_000, 60_000


def _zero_rows(ds: pydicom.Dataset) -> None:
    ds.Rows = 0


def _over_upload_limit(folder: Path) -> Path:
    path = folder / "huge.png"
    with open(path, "wb") as f:
        f.write(_good_png())
        f.truncate(MAX_UPLOAD_BYTES + 1)  # the rest is a hole: nothing written to disk
    return path


def _random_bytes() -> bytes:
    return np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()


def _dicom_frames() -> bytes:
    return _dicom(np.stack([_xray(96, seed=seed).astype(np.uint16) * 16 for seed in range(3)]))


def _missing(folder: Path) -> Path:
    return folder / "deleted-before-reading.png"


_HTML = b"<!DOCTYPE html><html><body><script>alert(1)</script><img src=x></body></html>\n"
_SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"><circle r="40"/></svg>\n'
_PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
_XSS_NAME = "<img src=x onerror=alert(1)>.png"

CASES: list[Case] = [
    # ---- not images at all
    Case("zero_bytes", _writer("empty.png", lambda: b""), REFUSED, rf"empty \(0 bytes\); upload {FORMATS}"),
    Case("text_as_png", _writer("notes.png", lambda: b"notes\n" * 40), REFUSED, rf"not an image .*; upload {FORMATS}"),
    Case("html_as_png", _writer("page.png", lambda: _HTML * 4), REFUSED, rf"not an image .*; upload {FORMATS}"),
    Case("svg_as_png", _writer("drawing.png", lambda: _SVG), REFUSED, rf"not an image .*; upload {FORMATS}"),
    Case("pdf_as_jpg", _writer("report.jpg", lambda: _PDF), REFUSED, rf"not an image .*; upload {FORMATS}"),
    Case("zip_as_png", _writer("archive.png", _zip), REFUSED, rf"not an image .*; upload {FORMATS}"),
    Case("random_bytes", _writer("noise.jpg", _random_bytes), REFUSED, rf"not an image .*; upload {FORMATS}"),
    # The name is shown escaped: the page renders messages as HTML.
    Case(
        "html_file_name",
        _writer(_XSS_NAME, lambda: _HTML),
        REFUSED,
        r"^&lt;img src=x onerror=alert\(1\)&gt;\.png is not an image",
    ),
    Case("missing_file", _missing, REFUSED, r"no longer there; upload it again"),
    # ---- broken images
    Case(
        "truncated_png",
        _writer("cut.png", lambda: _good_png()[:400]),
        REFUSED,
        rf"truncated or corrupt\. Upload {FORMATS}",
    ),
    Case(
        "truncated_jpeg",
        _writer("cut.jpg", lambda: _good_jpeg()[:600]),
        REFUSED,
        rf"truncated or corrupt\. Upload {FORMATS}",
    ),
    Case("png_bad_header_crc", _writer("crc.png", _png_bad_crc), REFUSED, rf"not an image .*; upload {FORMATS}"),
    Case("png_bad_zlib_data", _writer("zlib.png", _png_bad_zlib), REFUSED, rf"truncated or corrupt\. Upload {FORMATS}"),
    Case(
        "png_text_chunk_bomb",
        _writer("textbomb.png", _png_text_bomb),
        REFUSED,
        rf"cannot be read safely \(Decompressed data too large.*\); upload {FORMATS}",
        oversized=True,
    ),
    # ---- too big, too small, the wrong shape
    Case("png_bomb_30000", _writer("bomb.png", _png_bomb), REFUSED, _bomb(r"900\.0"), oversized=True),
    Case(
        "jpeg_bomb",
        _writer("bomb.jpg", lambda: _jpeg_claiming(65_000, 65_000)),
        REFUSED,
        _bomb(r"4225\.0"),
        oversized=True,
    ),
    Case(
        "tiff_bomb",
        _writer("bomb.tif", lambda: tiff_header_only(30_000, 30_000)),
        REFUSED,
        _bomb(r"900\.0"),
        oversized=True,
    ),
    Case(
        "gif_bomb",
        _writer("bomb.gif", lambda: _gif_claiming(65_535, 65_535)),
        REFUSED,
        _bomb(r"4294\.8"),
        oversized=True,
    ),
    Case(
        "png_header_60_megapixels",
        _writer("big.png", lambda: png_bytes(8000, 7500, zlib.compress(bytes(8001)))),
        REFUSED,
        rf"8000 x 7500 = 60\.0 megapixels; {PIXEL_LIMIT}\. Downscale it",
        oversized=True,
    ),
    Case(
        "dicom_60000_rows",
        _writer("huge.dcm", lambda: _dicom_edit(_huge_rows)),
        REFUSED,
        rf"60000 x 60000 = 3600\.0 megapixels; {PIXEL_LIMIT}",
        oversized=True,
    ),
    Case(
        "over_upload_limit",
        _over_upload_limit,
        REFUSED,
        r"is 52,428,801 bytes, over the upload limit of 50 MiB; export it smaller",
        oversized=True,
    ),
    Case(
        "strip_5x100000",
        _saver("strip.png", lambda: Image.new("L", (5, 100_000), 128)),
        REFUSED,
        rf"5 x 100000 pixels; {SIZE_RULE} \(this one is 20000\.0:1\)",
        oversized=True,
    ),
    Case(
        "strip_2000x100",
        _saver("wide.png", lambda: Image.fromarray(np.tile(_xray(100), (1, 20)))),
        REFUSED,
        rf"2000 x 100 pixels; {SIZE_RULE} \(this one is 20\.0:1\)",
    ),
    Case("one_pixel", _saver("dot.png", lambda: Image.new("L", (1, 1), 128)), REFUSED, rf"1 x 1 pixels; {SIZE_RULE}"),
    # ---- nothing in the picture
    Case(
        "all_black",
        _saver("black.png", lambda: Image.new("L", (128, 128), 0)),
        REFUSED,
        rf"blank: every pixel is \(0, 0, 0\) .*nothing to classify; upload the X-ray itself \({FORMATS}\)",
    ),
    Case(
        "all_white",
        _saver("white.jpg", lambda: Image.new("RGB", (128, 128), "white")),
        REFUSED,
        r"blank: every pixel is \(255, 255, 255\)",
    ),
    Case(
        "png16_constant",
        _saver("flat16.png", lambda: Image.fromarray(np.full((64, 64), 4000, np.uint16))),
        REFUSED,
        r"blank: every pixel is \(0, 0, 0\)",
    ),
    Case(
        "rgba_fully_transparent",
        _saver("clear.png", lambda: Image.new("RGBA", (96, 96), (200, 200, 200, 0))),
        REFUSED,
        r"blank: every pixel is \(0, 0, 0\)",  # transparent is composited on black
    ),
    Case(
        "float_tiff_all_nan", _saver("nan.tif", lambda: _float_with_nan(all_nan=True)), REFUSED, r"blank: every pixel"
    ),
    # ---- unusual but valid images: a result
    Case(
        "png_16_bit",
        _saver("x16.png", lambda: Image.fromarray(_xray(96).astype(np.uint16) * 250)),
        RESULT,
        size=(96, 96),
    ),
    Case(
        "tiff_16_bit",
        _saver("x16.tif", lambda: Image.fromarray(_xray(96).astype(np.uint16) * 250)),
        RESULT,
        size=(96, 96),
    ),
    Case("tiff_float_with_nan", _saver("float.tif", _float_with_nan), RESULT, size=(96, 96)),
    Case(
        "tiff_int32",
        _saver("x32.tif", lambda: Image.fromarray(_xray(96).astype(np.int32) * 1000)),
        RESULT,
        size=(96, 96),
    ),
    Case("cmyk_jpeg", _saver("cmyk.jpg", _cmyk, quality=90), RESULT, size=(96, 96)),
    Case("palette_png_transparency", _saver("palette.png", _palette_with_transparency), RESULT, size=(96, 96)),
    Case("gray_alpha_png", _saver("la.png", lambda: Image.fromarray(_xray(96)).convert("LA")), RESULT, size=(96, 96)),
    Case("one_bit_png", _saver("bw.png", lambda: Image.fromarray(_xray(96)).convert("1")), RESULT, size=(96, 96)),
    Case("animated_gif", _saver("anim.gif", _frames, duration=100, loop=0), RESULT, size=(96, 96)),
    Case("multipage_tiff", _saver("pages.tif", _frames), RESULT, size=(96, 96)),
    Case("exif_rotated_jpeg", _writer("rotated.jpg", _exif_rotated), RESULT, size=(128, 64)),  # stored 64 x 128
    Case("jpeg_corrupt_exif", _writer("badexif.jpg", _corrupt_exif), RESULT, size=(128, 128)),
    Case("jpeg_named_png", _writer("actually-jpeg.png", _good_jpeg), RESULT, size=(128, 128)),
    Case("webp", _saver("x.webp", lambda: Image.fromarray(_xray(96)), lossless=True), RESULT, size=(96, 96)),
    Case("bmp", _saver("x.bmp", lambda: Image.fromarray(_xray(96))), RESULT, size=(96, 96)),
    # ---- DICOM
    Case("dicom_renamed_png", _writer("scan.png", _dicom), RESULT, size=(96, 96)),
    Case(
        "dicom_monochrome1",
        _writer("mono1.dcm", lambda: make_dicom(_xray(96), "MONOCHROME1", 8)),
        RESULT,
        size=(96, 96),
    ),
    Case("dicom_multiframe", _writer("frames.dcm", _dicom_frames), RESULT, size=(96, 96)),
    Case(
        "dicom_no_pixel_data",
        _writer("report.dcm", lambda: _dicom_edit(_no_pixels)),
        REFUSED,
        r"has no pixel data .*; upload the image object itself",
    ),
    Case(
        "dicom_compressed_no_decoder",
        _writer("lossless.dcm", lambda: _dicom_edit(_jpeg_lossless_without_decoder)),
        REFUSED,
        r"compressed as JPEG Lossless.* no decoder for it is installed .*convert the file to an uncompressed DICOM "
        r"or a PNG\. Readable here: .*Explicit VR Little Endian",
    ),
    Case(
        "dicom_zero_rows",
        _writer("zero.dcm", lambda: _dicom_edit(_zero_rows)),
        REFUSED,
        rf"0 x 96 pixels; {DICOM_CORRUPT}",
    ),
    Case(
        "dicom_truncated",
        _writer("cut.dcm", lambda: _dicom()[:2000]),
        REFUSED,
        rf"does not decode \(.*\); {DICOM_CORRUPT}",
    ),
    Case(
        "text_named_dcm",
        _writer("notes.dcm", lambda: b"not a dicom file\n" * 30),
        REFUSED,
        r"not a DICOM file: .*; upload a DICOM image, or the X-ray as PNG, JPEG, BMP or TIFF",
    ),
]

NAMES = [case.name for case in CASES]
BY_NAME = {case.name: case for case in CASES}


def write_corpus(folder: Path) -> dict[str, Path]:
    """Write every case into its own subfolder of `folder`; returns case name -> path."""
    paths = {}
    for case in CASES:
        sub = folder / case.name
        sub.mkdir(parents=True, exist_ok=True)
        paths[case.name] = case.make(sub)
    return paths


def good_xray(folder: Path) -> Path:
    """A plain 8-bit PNG that every model must classify."""
    path = folder / "good.png"
    path.write_bytes(_good_png())
    return path
