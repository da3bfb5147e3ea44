"""COVIDx label files, image loading, patient-level splits, transforms and datasets.

A COVIDx folder (the Kaggle ``andyczhao/covidx-cxr2`` release and ``covidx-mini``) holds
one label file and one image folder per split::

    ROOT/
      train.txt  val.txt  test.txt    lines "patient_id filename label source"
      train/  val/  test/             the image files named in those lines

Labels are indices into :data:`covidtl.classes.CLASSES` (0 = negative, 1 = positive).
Nothing here prints or seeds: library code logs, the entry point seeds.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

from covidtl.classes import CLASSES

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "KAGGLE_HANDLE",
    "LABEL_MAP",
    "LAYOUT_HELP",
    "SPLITS",
    "CorruptImagesError",
    "CovidxDataset",
    "DatasetUnavailableError",
    "LabelFileError",
    "MissingImagesError",
    "Record",
    "UnreadableImageError",
    "balanced_sampler_weights",
    "build_transform",
    "check_images",
    "class_weights",
    "corrupt_images_error",
    "eval_geometry",
    "find_missing",
    "input_steps",
    "load_image",
    "parse_label_file",
    "patient_split",
    "resolve_dataset_root",
    "scan_images",
    "skip_corrupt",
    "split_paths",
    "write_label_file",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")

KAGGLE_HANDLE = "andyczhao/covidx-cxr2"

LAYOUT_HELP = (
    "a COVIDx folder holds one label file and one image folder per split: "
    "ROOT/train.txt ROOT/val.txt ROOT/test.txt with lines 'patient_id filename label source' "
    "(label positive|negative) and the images in ROOT/train/ ROOT/val/ ROOT/test/"
)

# Case-sensitive, exactly as written in the COVIDx releases. The 3-class releases
# (COVIDx <= 8A/9A) label COVID-19 / normal / pneumonia; for the binary COVID-19 task
# both normal and (non-COVID) pneumonia are negatives, as in COVIDx 8B/9B.
LABEL_MAP: dict[str, int] = {
    "negative": CLASSES.index("negative"),
    "positive": CLASSES.index("positive"),
    "COVID-19": CLASSES.index("positive"),
    "normal": CLASSES.index("negative"),
    "pneumonia": CLASSES.index("negative"),
}

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".dcm"}
)

_EXPECTED_LINE = "expected 'patient_id filename label source'"

# What PIL raises for files it cannot identify or decode: truncated data comes as OSError,
# broken chunk structure as SyntaxError, huge images as DecompressionBombError.
_PIL_ERRORS: tuple[type[BaseException], ...] = (
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,
    SyntaxError,
)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Record:
    """One labelled image: ``label`` is an index into ``CLASSES`` (1 = COVID-19 positive)."""

    patient_id: str
    filename: str
    label: int
    source: str


class LabelFileError(ValueError):
    """A label file line that does not read as ``patient_id filename label source``."""


def _line_error(path: Path, lineno: int, what: str) -> LabelFileError:
    return LabelFileError(f"{path}:{lineno}: {what}; {_EXPECTED_LINE}")


def _parse_line(path: Path, lineno: int, line: str) -> Record:
    # Split from the right: patient ids may contain spaces ("COVID 1 COVID(1).png positive sirm"
    # in COVIDx 8B), filename, label and source never do.
    parts = line.rsplit(None, 3)
    if len(parts) < 4:
        hint = " (the source field seems missing)" if parts[-1] in LABEL_MAP else ""
        raise _line_error(path, lineno, f"found {len(parts)} fields in {line!r}, need at least 4{hint}")
    patient_id, filename, label_name, source = parts
    label = LABEL_MAP.get(label_name)
    if label is None:
        if source in LABEL_MAP:
            what = f"the source field is missing in {line!r} (last field {source!r} is a label)"
        else:
            accepted = ", ".join(sorted(LABEL_MAP))
            what = f"unknown label {label_name!r} in {line!r}; accepted labels: {accepted}"
        raise _line_error(path, lineno, what)
    if os.path.splitext(filename)[1].lower() not in IMAGE_EXTENSIONS:
        accepted = " ".join(sorted(IMAGE_EXTENSIONS))
        raise _line_error(path, lineno, f"filename {filename!r} has no image extension ({accepted}) in {line!r}")
    return Record(patient_id=patient_id, filename=filename, label=label, source=source)


def parse_label_file(path: str | Path) -> list[Record]:
    """Read a COVIDx label file: one ``patient_id filename label source`` line per image.

    The last three space-separated fields are filename, label and source; everything before
    them is the patient id, which may contain spaces. Blank lines are skipped. Labels map
    through :data:`LABEL_MAP`, so 3-class files (COVID-19/normal/pneumonia) read as binary.

    Raises:
        LabelFileError: a malformed line, naming ``file:line``.
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    records: list[Record] = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _line_error(path, lineno, f"not UTF-8 text ({error.reason} at byte {error.start})") from error
        if lineno == 1:
            line = line.removeprefix("\ufeff")
        if line.strip():
            records.append(_parse_line(path, lineno, line))
    return records


def write_label_file(records: Iterable[Record], path: str | Path) -> None:
    """Write records as a COVIDx label file that :func:`parse_label_file` reads back.

    Labels are written as their ``CLASSES`` name (``negative`` / ``positive``).

    Raises:
        ValueError: a filename or source containing whitespace, an empty field, or a label
            outside ``CLASSES``; nothing is written then.
    """
    lines = []
    for record in records:
        for field in ("filename", "source"):
            value = getattr(record, field)
            if not value or len(value.split()) != 1 or value != value.strip():
                raise ValueError(f"{field} {value!r} of {record} must be one non-empty word")
        if not record.patient_id.strip():
            raise ValueError(f"empty patient_id in {record}")
        if not 0 <= record.label < len(CLASSES):
            raise ValueError(f"label {record.label} of {record} is not an index into {CLASSES}")
        lines.append(f"{record.patient_id} {record.filename} {CLASSES[record.label]} {record.source}\n")
    Path(path).write_text("".join(lines), encoding="utf-8")


# --------------------------------------------------------------------------- folders


def split_paths(root: Path, split: str) -> tuple[Path, Path]:
    """Return ``(root / f"{split}.txt", root / split)``: a split's label file and image folder.

    ``split`` is usually one of :data:`SPLITS`; any other plain name (``test_sirm``) works
    for folders that carry extra label files in the same layout. Both paths must exist.

    Raises:
        ValueError: ``split`` is empty or contains a path separator.
        FileNotFoundError: what is missing, and the expected layout.
    """
    if not split or split != Path(split).name or split in (".", ".."):
        raise ValueError(f"split must be a plain name such as {SPLITS}, got {split!r}")
    root = Path(root)
    label_file, image_dir = root / f"{split}.txt", root / split
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist; {LAYOUT_HELP}")
    if not label_file.is_file():
        present = sorted(path.name for path in root.glob("*.txt"))
        raise FileNotFoundError(
            f"no label file {label_file} for split {split!r} (label files present: "
            f"{', '.join(present) or 'none'}); {LAYOUT_HELP}"
        )
    if not image_dir.is_dir():
        raise FileNotFoundError(
            f"no image folder {image_dir} for split {split!r} next to {label_file.name}; {LAYOUT_HELP}"
        )
    return label_file, image_dir


class DatasetUnavailableError(RuntimeError):
    """The COVIDx data cannot be obtained (offline, no Kaggle credentials, not found)."""


def _has_label_file(folder: Path) -> bool:
    return any((folder / f"{split}.txt").is_file() for split in SPLITS)


def _find_layout_root(folder: Path) -> Path | None:
    # Kaggle archives sometimes wrap the files in one extra folder.
    if _has_label_file(folder):
        return folder
    nested = [child for child in sorted(folder.iterdir()) if child.is_dir() and _has_label_file(child)]
    return nested[0] if len(nested) == 1 else None


def _kaggle_errors() -> tuple[type[BaseException], ...]:
    from kagglehub import exceptions

    # requests' errors are OSErrors; the rest are kagglehub's auth/backend/environment errors.
    return (
        OSError,
        exceptions.CredentialError,
        exceptions.UnauthenticatedError,
        exceptions.BackendError,
        exceptions.NotFoundError,
        exceptions.DataCorruptionError,
        exceptions.KaggleEnvironmentError,
        exceptions.ColabEnvironmentError,
    )


def _kaggle_probe_needed(handle: str) -> bool:
    # In Kaggle and Colab notebooks kagglehub reads attached data through a local service,
    # and a versioned dataset already in kagglehub's cache needs no network at all.
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") or os.environ.get("TBE_RUNTIME_ADDR"):
        return False
    from kagglehub.cache import Cache
    from kagglehub.handle import parse_dataset_handle

    dataset = parse_dataset_handle(handle)
    return not (dataset.is_versioned() and Cache().load_from_cache(dataset))


def _probe_kaggle(timeout: float) -> None:
    """Open (and close) a TCP connection to the Kaggle API host within ``timeout`` seconds.

    kagglehub's API calls carry no timeout, so where packets are dropped rather than refused
    they hang for the OS connect timeout (minutes); this probe turns that into a quick error.
    """
    from kagglesdk.kaggle_env import get_endpoint, get_env

    url = urlparse(get_endpoint(get_env()))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            pass
    except OSError as error:
        raise ConnectionError(f"cannot reach {url.hostname}:{port} within {timeout:g} s: {error}") from error


def resolve_dataset_root(
    root: str | Path | None,
    handle: str = KAGGLE_HANDLE,
    version: int | None = None,
    *,
    connect_timeout: float | None = 5.0,
) -> Path:
    """Return a COVIDx folder: ``root`` if given (checked), else a kagglehub download.

    Args:
        root: a local folder in the COVIDx layout (see :data:`LAYOUT_HELP`), or None to
            download ``handle`` with kagglehub (cached under ``~/.cache/kagglehub``).
        handle: Kaggle dataset handle ``owner/dataset``.
        version: a dataset version number; None means the latest.
        connect_timeout: seconds to wait for the Kaggle API host before giving up; None skips
            this check and leaves failure detection to kagglehub.

    Raises:
        FileNotFoundError: ``root`` does not exist or holds no split label file.
        DatasetUnavailableError: the download failed (offline, no credentials, not found).
    """
    if root is not None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder {root} does not exist; {LAYOUT_HELP}")
        if not _has_label_file(root):
            raise FileNotFoundError(
                f"dataset folder {root} has none of the label files "
                f"{', '.join(f'{s}.txt' for s in SPLITS)}; {LAYOUT_HELP}"
            )
        return root

    import kagglehub

    full_handle = f"{handle}/versions/{version}" if version else handle
    try:
        if connect_timeout is not None and _kaggle_probe_needed(full_handle):
            _probe_kaggle(connect_timeout)
        downloaded = Path(kagglehub.dataset_download(full_handle))
    except _kaggle_errors() as error:
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise DatasetUnavailableError(
            f"cannot download Kaggle dataset {full_handle!r} ({reason[:300]}). "
            f"Pass a local folder in the COVIDx layout with --data DIR instead ({LAYOUT_HELP}), "
            "or, when online, set up Kaggle credentials (KAGGLE_USERNAME and KAGGLE_KEY, or "
            "~/.kaggle/kaggle.json) and accept the dataset's terms on kaggle.com."
        ) from error
    found = _find_layout_root(downloaded)
    if found is None:
        raise DatasetUnavailableError(
            f"kagglehub downloaded {full_handle!r} to {downloaded}, but no folder there is in the "
            f"COVIDx layout; {LAYOUT_HELP}. Pass the right folder with --data DIR."
        )
    logger.info("COVIDx data from %s at %s", full_handle, found)
    return found


# --------------------------------------------------------------------------- images


class UnreadableImageError(ValueError):
    """PIL cannot open or decode an image file; the message names the file and the reason."""


class MissingImagesError(FileNotFoundError):
    """Images named in a label file are not in the image folder."""


class CorruptImagesError(ValueError):
    """Images that exist but cannot be decoded; `reasons` maps each file name to why."""

    def __init__(self, message: str, reasons: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.reasons = dict(reasons or {})


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


def _probe_image(path: Path) -> str | None:
    """Return why ``path`` cannot be decoded, or None when it can (cheaply checked)."""
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                # A 1/8-scale draft decode still reads every byte of the entropy-coded data.
                image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
            elif image.format == "PNG":
                image.verify()  # walks all chunks and checks their CRCs, no pixel decoding
            else:
                image.load()
    except FileNotFoundError:
        return "file not found"
    except _PIL_ERRORS as error:
        return f"{type(error).__name__}: {error}"
    return None


def find_missing(records: Iterable[Record], image_dir: Path) -> list[str]:
    """Filenames of ``records`` that are not files in ``image_dir``, in record order."""
    image_dir = Path(image_dir)
    try:
        present = {entry.name for entry in os.scandir(image_dir) if entry.is_file()}
    except FileNotFoundError:
        present = set()
    # One directory listing instead of one stat per image; names not listed (subfolders,
    # case-insensitive file systems) get a direct check.
    return [r.filename for r in records if r.filename not in present and not (image_dir / r.filename).is_file()]


def _check_on(value: str, argument: str) -> None:
    if value not in ("error", "skip"):
        raise ValueError(f"{argument} must be 'error' or 'skip', got {value!r}")


def check_images(records: Sequence[Record], image_dir: Path, on_missing: str = "error") -> list[Record]:
    """Check every record's image exists in ``image_dir``.

    Args:
        on_missing: ``"error"`` raises :class:`MissingImagesError`; ``"skip"`` logs a warning
            and drops those records.

    Returns:
        The records whose image exists (all of them with ``"error"``).
    """
    _check_on(on_missing, "on_missing")
    missing = find_missing(records, image_dir)
    if not missing:
        return list(records)
    first = ", ".join(missing[:5])
    if on_missing == "error":
        raise MissingImagesError(
            f"{len(missing)} of {len(records)} images listed are not in {image_dir} "
            f"(first: {first}); fix the folder, or drop them with --on-missing skip"
        )
    logger.warning("skipping %d of %d images missing from %s (first: %s)", len(missing), len(records), image_dir, first)
    lost = set(missing)
    return [r for r in records if r.filename not in lost]


def scan_images(
    records: Sequence[Record],
    image_dir: Path,
    on_corrupt: str = "error",
    progress: Callable[[Iterable], Iterable] | None = None,
) -> list[Record]:
    """Check every record's image decodes (JPEG: draft decode; PNG: chunk CRCs; else full).

    Args:
        on_corrupt: ``"error"`` raises :class:`CorruptImagesError`; ``"skip"`` logs a warning
            and drops those records. A missing file counts as corrupt here.
        progress: optional wrapper of an iterable, e.g. ``tqdm``.

    Returns:
        The records whose image decodes (all of them with ``"error"``).
    """
    _check_on(on_corrupt, "on_corrupt")
    image_dir = Path(image_dir)
    iterable: Iterable[Record] = progress(records) if progress is not None else records
    bad: dict[str, str] = {}
    for record in iterable:
        reason = _probe_image(image_dir / record.filename)
        if reason is not None:
            bad[record.filename] = reason
    if not bad:
        return list(records)
    if on_corrupt == "error":
        raise corrupt_images_error(bad, len(records), image_dir)
    return skip_corrupt(records, bad, image_dir)


def _first_reasons(bad: dict[str, str]) -> str:
    return "; ".join(f"{name} ({reason})" for name, reason in list(bad.items())[:5])


def corrupt_images_error(bad: dict[str, str], total: int, image_dir: Path) -> CorruptImagesError:
    """The error for `bad` (file name -> reason) among `total` images in `image_dir`."""
    return CorruptImagesError(
        f"{len(bad)} of {total} images in {image_dir} cannot be decoded "
        f"(first: {_first_reasons(bad)}); replace them, or drop them with --on-corrupt skip",
        bad,
    )


def skip_corrupt(records: Sequence[Record], bad: dict[str, str], image_dir: Path) -> list[Record]:
    """`records` without those whose file is in `bad` (file name -> reason), with a warning."""
    logger.warning(
        "skipping %d of %d undecodable images in %s (first: %s)", len(bad), len(records), image_dir, _first_reasons(bad)
    )
    return [r for r in records if r.filename not in bad]


# --------------------------------------------------------------------------- splits


def patient_split(
    records: Sequence[Record],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> dict[str, list[Record]]:
    """Split records into train/val/test with every patient's images in one split.

    Patients are stratified by their most frequent ``(label, source)``; within each stratum
    they are shuffled with ``seed`` and each goes to the split furthest below its target
    share of that stratum's images. The result does not depend on the input order.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, records in input order.
    """
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be {len(SPLITS)} non-negative numbers summing to 1, got {fractions}")
    by_patient: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_patient[record.patient_id].append(record)

    strata: dict[tuple[int, str], list[str]] = defaultdict(list)
    for patient, images in by_patient.items():
        counts = Counter((r.label, r.source) for r in images)
        key = min(counts, key=lambda k: (-counts[k], k))
        strata[key].append(patient)

    rng = random.Random(seed)
    split_of: dict[str, str] = {}
    for key in sorted(strata):
        patients = sorted(strata[key])
        rng.shuffle(patients)
        total = sum(len(by_patient[p]) for p in patients)
        filled = [0] * len(SPLITS)
        for patient in patients:
            deficits = [f * total - n for f, n in zip(fractions, filled)]
            best = max(range(len(SPLITS)), key=lambda i: (fractions[i] > 0, deficits[i], -i))
            filled[best] += len(by_patient[patient])
            split_of[patient] = SPLITS[best]

    splits: dict[str, list[Record]] = {split: [] for split in SPLITS}
    for record in records:
        splits[split_of[record.patient_id]].append(record)
    return splits


# --------------------------------------------------------------------------- tensors


def eval_geometry(input_size: int, crop_fraction: float = 0.9) -> list[v2.Transform]:
    """``[Resize(round(input_size / crop_fraction)), CenterCrop(input_size)]``: the eval framing."""
    if input_size <= 0:
        raise ValueError(f"input_size must be positive, got {input_size}")
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    return [v2.Resize(round(input_size / crop_fraction)), v2.CenterCrop(input_size)]


def build_transform(
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    crop_fraction: float = 0.9,
    hflip: bool = True,
    rotation: float = 10.0,
    color_jitter: float = 0.1,
    crop_scale: float = 1.0,
    intensity: Sequence[Callable] = (),
) -> v2.Compose:
    """RGB ``PIL.Image`` -> normalized float32 tensor ``[3, input_size, input_size]``.

    Eval: resize the shorter side to ``input_size / crop_fraction``, center crop, normalize.
    Train adds, after the crop: horizontal flip, rotation by up to ``rotation`` degrees and
    brightness/contrast jitter of ``color_jitter`` (each left out when off or zero). With
    ``crop_scale < 1`` the training crop is random instead of central: a square-ish crop of
    ``crop_scale`` to all of the resized image's area, resized to ``input_size``; it moves
    the film's edges, markers and body outline around so they are less useful as cues.
    `intensity` (training only): steps on the [0, 1] float image before normalizing,
    e.g. ``covidtl.augment.intensity_steps(...)``.
    """
    if not 0 < crop_scale <= 1:
        raise ValueError(f"crop_scale must be in (0, 1], got {crop_scale}")
    steps: list[v2.Transform] = eval_geometry(input_size, crop_fraction)
    if train and crop_scale < 1:
        steps[-1] = v2.RandomResizedCrop(input_size, scale=(crop_scale, 1.0), ratio=(0.8, 1.25))
    if train:
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        if rotation:
            steps.append(v2.RandomRotation(rotation))
        if color_jitter:
            steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter))
    to_image, to_float, normalize = input_steps(mean, std)
    # `intensity` (training only; covidtl.augment) acts on the [0, 1] float image
    return v2.Compose([*steps, to_image, to_float, *(intensity if train else ()), normalize])


def input_steps(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    """``[ToImage(), ToDtype(float32, scale=True), Normalize(mean, std)]``: the last steps of
    every transform, from a framed 8-bit ``PIL.Image`` to the model's input tensor."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


class CovidxDataset(torch.utils.data.Dataset):
    """Images of ``records`` from ``image_dir``, loaded as RGB and passed through ``transform``.

    Item ``i`` is ``(transform(image), label)``: with :func:`build_transform` a float32
    tensor ``[3, H, W]`` and an int index into ``CLASSES``.
    """

    def __init__(self, records: Sequence[Record], image_dir: Path, transform: Callable | None) -> None:
        self.records = list(records)
        self.image_dir = Path(image_dir)
        self.transform = transform
        self.labels = np.array([r.label for r in self.records], dtype=np.int64)
        self.sources = [r.source for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        record = self.records[index]
        image = load_image(self.image_dir / record.filename)
        if self.transform is not None:
            image = self.transform(image)
        return image, record.label


def _label_array(labels: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    array = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    array = array.astype(np.int64).reshape(-1)
    if array.size and (array.min() < 0 or array.max() >= len(CLASSES)):
        raise ValueError(f"labels must be indices into {CLASSES}, got values {sorted(set(array.tolist()))}")
    return array


def class_weights(labels: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Inverse-frequency class weights ``n / (n_classes * n_c)``, float32 ``[len(CLASSES)]``.

    For ``CrossEntropyLoss(weight=...)``; balanced classes give all ones.

    Raises:
        ValueError: a class has no examples (its weight would be infinite).
    """
    counts = np.bincount(_label_array(labels), minlength=len(CLASSES))
    empty = [CLASSES[c] for c in range(len(CLASSES)) if counts[c] == 0]
    if empty:
        raise ValueError(f"no examples of class {empty} among {counts.sum()} labels; cannot weight it")
    return torch.tensor(counts.sum() / (len(CLASSES) * counts), dtype=torch.float32)


def balanced_sampler_weights(records: Sequence[Record], by: str = "label") -> torch.Tensor:
    """Per-record weights for ``WeightedRandomSampler``, float64 ``[len(records)]``.

    ``by="label"``: every class present gets the same total weight. ``by="label_source"``:
    the same per class, shared equally among that class's sources, so a rare source is
    drawn as often as a common one of the same class.
    """
    if by not in ("label", "label_source"):
        raise ValueError(f"by must be 'label' or 'label_source', got {by!r}")
    label_counts = Counter(r.label for r in records)
    if by == "label":
        weights = [1.0 / (len(label_counts) * label_counts[r.label]) for r in records]
    else:
        group_counts = Counter((r.label, r.source) for r in records)
        sources_per_label = Counter(label for label, _ in group_counts)
        weights = [
            1.0 / (len(label_counts) * sources_per_label[r.label] * group_counts[(r.label, r.source)]) for r in records
        ]
    return torch.tensor(weights, dtype=torch.float64)
