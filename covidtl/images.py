"""Image decoding: any file PIL (or OpenCV, for 16-bit PNGs) reads, as 8-bit "L" or RGB.

16-bit, 32-bit and float images are rescaled min-max to 0..255; big images may be decoded
reduced when the caller says which side it will resize to (see `load_image`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "REDUCING_GAP",
    "UnreadableImageError",
    "load_image",
    "rescale_to_uint8",
]


IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".dcm"}
)


# What PIL raises for files it cannot identify or decode: truncated data comes as OSError,
# broken chunk structure as SyntaxError, huge images as DecompressionBombError.
_PIL_ERRORS: tuple[type[BaseException], ...] = (
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,
    SyntaxError,
)


class UnreadableImageError(ValueError):
    """PIL cannot open or decode an image file; the message names the file and the reason."""


def _rescale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``round((values - low) * 255 / (high - low))`` as uint8, clipped to [0, 255]."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scale = 255.0 / (high - low)
    if values.dtype.kind in "ui" and values.dtype.itemsize <= 2:
        # One table entry per possible value: the same float64 arithmetic as below, done
        # 2**16 times instead of once per pixel (a 2500 x 3000 film has 7.5 million).
        info = np.iinfo(values.dtype)
        table = np.arange(info.min, info.max + 1, dtype=np.float64)
        table = np.clip(np.round((table - low) * scale), 0, 255).astype(np.uint8)
        return table[values.astype(np.int32) - info.min] if info.min else table[values]
    scaled = np.round((values.astype(np.float64) - low) * scale)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _finite_range(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(values with non-finite entries set to 0, min, max)."""
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    return values, float(values.min()), float(values.max())


def rescale_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Min-max rescale any numeric array to uint8 [0, 255] (non-finite values count as 0)."""
    # Min-max over the finite values: 16-bit / 32-bit / float X-rays use their own range
    # (often 10-14 bits stored in 16), and clipping to 0..255 as PIL's convert("L") does
    # would turn them white. A constant image becomes black.
    values, low, high = _finite_range(np.asarray(pixels))
    return _rescale(values, low, high)


# Images are reduced (box filter, integer factor) only while their shorter side stays at
# least this many times the side the caller resizes to: the caller's antialiased resize
# then gives nearly the pixels of a resize from full size (Pillow's `reducing_gap`).
REDUCING_GAP = 2.0


_UINT16 = ("I;16", "I;16L", "I;16B", "I;16N")


_HIGH_DEPTH = ("I", "F", *_UINT16)


def _reduction(size: tuple[int, int], min_side: int | None) -> int:
    if not min_side:
        return 1
    return max(1, int(min(size) // (REDUCING_GAP * min_side)))


def _high_depth_to_l(image: Image.Image, factor: int) -> Image.Image:
    # The range comes from every pixel at full size, as without reduction; the reduction
    # runs before the values are rounded to 8 bits.
    if image.mode == "F":
        values, low, high = _finite_range(np.asarray(image))
        if factor > 1:
            values = np.asarray(Image.fromarray(values.astype(np.float32)).reduce(factor))
    elif image.mode in _UINT16:
        return _uint16_to_l(np.asarray(image), factor)
    else:  # 32-bit integers: Pillow's extrema are exact, and cheaper than numpy's on a copy
        low, high = image.getextrema()
        if factor > 1:
            image = (image if image.mode == "I" else image.convert("I")).reduce(factor)
        values = np.asarray(image)
    return Image.fromarray(_rescale(values, float(low), float(high)))


def _uint16_to_l(values: np.ndarray, factor: int) -> Image.Image:
    """8-bit "L" image of 16-bit `values`, min-max rescaled, box-reduced by `factor`."""
    import cv2  # OpenCV comes with grad-cam; imported here, on the first 16-bit image

    values = values.astype(np.uint16, copy=False)  # native byte order, for OpenCV
    low, high, _, _ = cv2.minMaxLoc(values)
    if factor > 1:
        # Means of factor x factor blocks, rounded; a last partial row or column of blocks
        # (under `factor` pixels of an image shrunk at least 2 * factor times) is dropped.
        # Pillow reduces only 8 and 32-bit images: converting a 2500 x 3000 film to 32 bits
        # and reducing it took 20 ms; OpenCV's area resize with an integer factor, 3 ms.
        height, width = (side // factor for side in values.shape)
        blocks = values[: height * factor, : width * factor]
        values = cv2.resize(blocks, (width, height), interpolation=cv2.INTER_AREA)
    return Image.fromarray(_rescale(values, low, high))


def _decode_uint16_png(opened: Image.Image, factor: int) -> Image.Image | None:
    """`opened`, a 16-bit grey PNG whose header PIL has read, decoded by OpenCV into 8-bit
    "L" (see `_uint16_to_l`); None when OpenCV does not decode it to the same array, for
    the caller to decode it with PIL.

    PIL's decode leaves the pixels where numpy can reach them only through a copy made
    line by line (16 ms for a 2500 x 3000 film, an eighth of the decode itself); OpenCV
    decodes into a numpy array at the same speed as PIL.
    """
    import cv2

    stream = opened.fp
    encoded = np.empty(stream.seek(0, os.SEEK_END), dtype=np.uint8)  # readinto: no bytes copy
    stream.seek(0)
    if stream.readinto(encoded) != encoded.size:
        return None
    values = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
    if values is None or values.dtype != np.uint16 or values.shape != (opened.height, opened.width):
        return None
    return _uint16_to_l(values, factor)


def _opencv_decodes_alike(opened: Image.Image) -> bool:
    """Whether OpenCV decodes `opened` (header read) to the pixels PIL would give: a single
    16-bit grey PNG frame, with no transparency and no EXIF (orientation) chunk before
    its pixels. An EXIF chunk after the pixels, which PNG allows and which is rare,
    would be missed; X-ray PNGs do not carry orientation."""
    return (
        opened.format == "PNG"
        and opened.mode in _UINT16
        and not getattr(opened, "is_animated", False)
        and "transparency" not in opened.info
        and "exif" not in opened.info
    )


def _is_grey(mode: str) -> bool:
    return mode in ("L", "1") or mode in _HIGH_DEPTH or mode.startswith("I;16")


def _to_8bit(image: Image.Image, factor: int = 1, grey: bool = False) -> Image.Image:
    """8-bit RGB of `image`, box-reduced by `factor`, or 8-bit "L" when `grey` and `image`
    has one band; may return `image` itself."""
    mode = image.mode
    target = "L" if grey and _is_grey(mode) else "RGB"
    if mode in _HIGH_DEPTH or mode.startswith("I;16"):
        grey_image = _high_depth_to_l(image, factor)
        return grey_image if target == "L" else grey_image.convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        # Transparent areas become black, the colour of air on a radiograph.
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba).convert("RGB")
    elif mode in ("L", "RGB"):
        if factor > 1:
            image, factor = image.reduce(factor), 1  # before converting: fewer pixels to convert
        if image.mode != target:
            image = image.convert(target)
    else:
        image = image.convert(target)
    return image.reduce(factor) if factor > 1 else image


def _source_name(source: str | Path | IO) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return str(getattr(source, "name", "<stream>"))


def load_image(path: str | Path | IO, min_side: int | None = None, grey: bool = False) -> Image.Image:
    """Open an image file (any PIL mode) as an 8-bit RGB ``PIL.Image``, upright.

    EXIF orientation is applied; 16-bit, 32-bit and float images are rescaled min-max to
    0..255; images with transparency are composited on black.

    Args:
        grey: return one-band images (8 to 32-bit and float grey, and 1-bit) as 8-bit "L"
            instead: the same values, a third of the pixels to resize. Colour and
            transparent images still come back RGB.
        min_side: the shorter side the caller resizes the image to, if it does. The image
            may then come back smaller than stored, never with a shorter side under
            ``REDUCING_GAP * min_side``: JPEGs decode at 1/2, 1/4 or 1/8 scale (PIL
            ``draft``) and other images are box-reduced by an integer factor before any
            mode conversion. A resize to ``min_side`` then costs a fraction of one from
            full size and gives nearly the same pixels (on average within a grey level).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnreadableImageError: PIL cannot identify or decode the file (name and reason).
    """
    try:
        with Image.open(path) as opened:
            scale = _reduction(opened.size, min_side)
            if _opencv_decodes_alike(opened):
                image = _decode_uint16_png(opened, scale)
                if image is not None:
                    return image if grey else image.convert("RGB")
            if opened.format == "JPEG" and scale > 1:  # decoded at 1/2, 1/4 or 1/8 of the size
                opened.draft(opened.mode, (-(-opened.width // scale), -(-opened.height // scale)))
            opened.load()
            ImageOps.exif_transpose(opened, in_place=True)
            image = _to_8bit(opened, _reduction(opened.size, min_side), grey)
            # Closing the file releases the pixels of `opened`: keep a copy if nothing
            # above made a new image.
            return image.copy() if image is opened else image
    except FileNotFoundError:
        raise
    except _PIL_ERRORS as error:
        raise UnreadableImageError(
            f"cannot read image {_source_name(path)}: {type(error).__name__}: {error}"
        ) from error
    except ValueError as error:
        # PIL raises ValueError for modes it cannot convert.
        raise UnreadableImageError(f"cannot convert image {_source_name(path)} to RGB: {error}") from error
