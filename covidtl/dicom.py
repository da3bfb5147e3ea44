"""Read a DICOM chest X-ray as an 8-bit RGB image, the way a viewer would display it.

Stored pixel values go through the modality LUT (Rescale Slope/Intercept), then the
first VOI LUT or window the file carries, are scaled min-max to 0..255, and are
inverted for MONOCHROME1 (where the stored value 0 is white). A multi-frame file gives
its first frame. Compressed transfer syntaxes need a decoder plugin for pydicom; when
one is missing the error names the syntax, the packages that would decode it, and the
syntaxes this installation does read.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import IO

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array
from pydicom.uid import UID, AllTransferSyntaxes

from covidtl.images import rescale_to_uint8

PREAMBLE_LENGTH = 128
MAGIC = b"DICM"
HEAD_LENGTH = PREAMBLE_LENGTH + len(MAGIC)  # bytes `is_dicom` needs to see
WHAT_TO_DO = "the file may be truncated or corrupt: upload the complete DICOM image, or export it as a PNG"


class DicomError(ValueError):
    """A DICOM file that cannot be shown as an image; the message says why and what to do."""


def is_dicom(head: bytes) -> bool:
    """True when `head` (the first 132 bytes of a file, or more) carries the DICOM
    Part 10 signature: a 128-byte preamble followed by ``DICM``."""
    return head[PREAMBLE_LENGTH:HEAD_LENGTH] == MAGIC


def readable_transfer_syntaxes() -> list[str]:
    """Names of the transfer syntaxes whose pixel data this installation can decode."""
    return [UID(uid).name for uid in AllTransferSyntaxes if _decoder_available(uid)]


def _decoder_available(uid: str) -> bool:
    try:
        return get_decoder(uid).is_available
    except NotImplementedError:  # a syntax pydicom knows but has no decoder for (e.g. MPEG)
        return False


def _check_decodable(ds: pydicom.Dataset) -> None:
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None:
        return  # no file meta: pydicom assumes an uncompressed syntax
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DicomError(
            f"transfer syntax {syntax} ({syntax.name}) is not supported; "
            f"this app reads: {', '.join(readable_transfer_syntaxes())}"
        ) from None
    if not decoder.is_available:
        raise DicomError(
            f"the pixel data is compressed as {syntax.name} ({syntax}) and no decoder for it is "
            f"installed (needs one of: {'; '.join(decoder.missing_dependencies)}). Install one, or "
            f"convert the file to an uncompressed DICOM or a PNG. Readable here: "
            f"{', '.join(readable_transfer_syntaxes())}"
        )


def read_dicom(source: str | Path | bytes | IO[bytes], max_pixels: int | None = None) -> Image.Image:
    """Decode a DICOM file (path, bytes or binary file object) to an RGB ``PIL.Image``.

    Grayscale images go through modality LUT -> VOI LUT/window -> 0..255 -> MONOCHROME1
    inversion; colour images (RGB, YBR converted to RGB) are only scaled to 0..255.
    `max_pixels` caps Rows x Columns, checked before any pixel data is decoded.

    Raises:
        DicomError: not a DICOM file, no pixel data, an unreadable transfer syntax,
            too many pixels, or pixel data that does not decode.
    """
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        ds = pydicom.dcmread(source, force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as err:
        raise DicomError(f"not a readable DICOM file ({type(err).__name__}: {err}); {WHAT_TO_DO}") from err
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if "SOPClassUID" not in ds and "Rows" not in ds:
            # force=True reads any bytes as "a dataset"; without these it is not DICOM.
            raise DicomError(
                "not a DICOM file: it has neither the DICM signature nor DICOM image elements; "
                "upload a DICOM image, or the X-ray as PNG, JPEG, BMP or TIFF"
            )
        raise DicomError(
            "the DICOM file has no pixel data (it may be a report, a structured document or a "
            "DICOMDIR); upload the image object itself"
        )
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or columns <= 0:
        raise DicomError(f"the DICOM file declares an image of {rows} x {columns} pixels; {WHAT_TO_DO}")
    if max_pixels is not None and rows * columns > max_pixels:
        raise DicomError(
            f"the DICOM image is {columns} x {rows} = {rows * columns / 1e6:.1f} megapixels; "
            f"the limit is {max_pixels / 1e6:.1f} megapixels"
        )
    _check_decodable(ds)

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        # index=0 decodes only the first frame of a multi-frame file.
        pixels = pixel_array(ds, index=0) if frames > 1 else ds.pixel_array
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError, TypeError) as err:
        raise DicomError(f"the DICOM pixel data does not decode ({type(err).__name__}: {err}); {WHAT_TO_DO}") from err

    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        return Image.fromarray(rescale_to_uint8(apply_color_lut(pixels, ds)))
    if samples == 1:
        values = apply_voi_lut(apply_modality_lut(pixels, ds), ds)
        gray = rescale_to_uint8(values)
        if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
            gray = 255 - gray
        return Image.fromarray(gray).convert("RGB")
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise DicomError(
            f"unsupported DICOM pixel layout: {samples} samples per pixel, array shape {pixels.shape}; "
            "export the image as a PNG and upload that"
        )
    if pixels.dtype == np.uint8:
        return Image.fromarray(pixels)
    return Image.fromarray(rescale_to_uint8(pixels))
