"""Decode once: a memory-mapped cache of pre-resized images for training and evaluation.

Decoding a full-size X-ray (a 1024 px PNG, a 3000 px 16-bit film) takes longer than a
training step spends on it, and the uncached pipeline does it every epoch. The cache
decodes each image once, with exactly the loading and resizing of the uncached pipeline
(:func:`covidtl.images.load_image`, then ``Resize(side)`` with ``side = round(input_size /
crop_fraction)``), and keeps the ``side x side`` square around the centre. The square is
placed so that its own ``CenterCrop(input_size)`` is the very crop the uncached pipeline
takes, so :class:`CachedDataset` with the unchanged :func:`covidtl.transforms.build_transform`
gives the same tensors, augmentation included (``Resize`` is a no-op on the square). The
one difference: with ``crop_scale < 1`` random crops are drawn from the square instead of
the whole resized film.

On disk, one folder per (image folder, records, input size, crop fraction, colour) under the
cache folder (:func:`default_cache_dir`)::

    <name>-<side>px-<color>-<key>/
      pixels.npy    uint8 [N, side, side] ("gray") or [N, side, side, 3] ("rgb")
      index.json    label file sha256, sizes, filenames, labels, image file fingerprint

``"gray"`` stores luminance (PIL ``convert("L")``): exact for grey X-rays, which is what
COVIDx holds, and a third of the bytes; colour annotations on figures become grey.
``"rgb"`` stores what the uncached pipeline sees, for any image.

With a lung model (``lung_weights``, for recipes with ``crop = "lungs"``) each decoded
image is first cut to its lungs by :func:`covidtl.lungs.crop_to_lungs`, the function the
Predictor calls at inference, and then resized and framed as above. Images whose
predicted mask is implausible are kept whole; ``ImageCache.kept_whole`` names them with
the reason. The lung model's sha256 is part of the folder key, so another lung model
gets another cache.

A cache is rebuilt when its label file, an image file's size or mtime, or the geometry
differs from what is asked for; other records (a subset of a split, say), a different input
size or colour get their own folder, so caching a few films of a split never replaces the
cache that another job is reading. Builds run in worker processes and are published
atomically, under a file lock, so concurrent training processes (torchrun ranks) build it
once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from covidtl.export import sha256_file
from covidtl.harmonize import film_part
from covidtl.images import UnreadableImageError, load_image
from covidtl.labels import Record
from covidtl.scan import corrupt_images_error
from covidtl.transforms import eval_geometry

try:
    import fcntl
except ImportError:  # Windows: no lock; run one training process per cache there
    fcntl = None

logger = logging.getLogger(__name__)

__all__ = ["COLORS", "CachedDataset", "ImageCache", "crop_box", "default_cache_dir", "ensure_cache"]

COLORS: tuple[str, ...] = ("gray", "rgb")
FORMAT_VERSION = 1
_PIXELS, _INDEX = "pixels.npy", "index.json"

Progress = Callable[[Iterable], Iterable] | None


def default_cache_dir() -> Path:
    """``$COVIDTL_CACHE``, else ``$XDG_CACHE_HOME/covidtl``, else ``~/.cache/covidtl``."""
    if os.environ.get("COVIDTL_CACHE"):
        return Path(os.environ["COVIDTL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "covidtl"


def _center_anchor(length: int, crop: int) -> int:
    # torchvision's CenterCrop anchor (`_center_crop_compute_crop_anchor`).
    return round((length - crop) / 2.0)


def crop_box(width: int, height: int, side: int, input_size: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the ``side``-square kept from a resized image.

    The image is ``width x height`` after ``Resize(side)`` (shorter side ``side``). The
    square's own ``CenterCrop(input_size)`` lands exactly on ``CenterCrop(input_size)``
    of the whole image: its offset is the difference of the two crop anchors.
    """
    left = _center_anchor(width, input_size) - _center_anchor(side, input_size)
    top = _center_anchor(height, input_size) - _center_anchor(side, input_size)
    left, top = min(max(left, 0), width - side), min(max(top, 0), height - side)
    return left, top, left + side, top + side


# --------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class ImageCache:
    """A built cache: ``pixels()`` is a read-only memmap, row ``i`` holds ``filenames[i]``.

    Rows are uint8 ``[side, side]`` (``color="gray"``) or ``[side, side, 3]`` (``"rgb"``),
    as ``Resize(side)`` leaves the image, around the centre (see :func:`crop_box`).
    """

    path: Path
    input_size: int
    crop_fraction: float
    side: int
    color: str
    filenames: tuple[str, ...]
    labels: tuple[int, ...]
    # Lung-cropped caches only: the lung model's sha256, and file name -> why the image
    # was kept whole (its lung mask was implausible).
    lung_model_sha256: str | None = None
    kept_whole: dict[str, str] = field(default_factory=dict)
    # Caches of films at one resolution (covidtl.harmonize) only: that film size, and the JPEG
    # quality of the copy each film was made into (None: no copy).
    film_size: int | None = None
    film_jpeg: int | None = None

    def __len__(self) -> int:
        return len(self.filenames)

    def pixels(self) -> np.ndarray:
        """The rows, memory-mapped read-only (opened on each call: keep the result)."""
        return np.load(self.path / _PIXELS, mmap_mode="r")

    def rows(self, records: Sequence[Record]) -> np.ndarray:
        """Row index of each record's image, int64 [len(records)].

        Raises:
            ValueError: a record's image is not in the cache, or its label differs.
        """
        where = {name: i for i, name in enumerate(self.filenames)}
        rows = np.empty(len(records), dtype=np.int64)
        for n, record in enumerate(records):
            i = where.get(record.filename)
            if i is None:
                raise ValueError(f"{record.filename} is not in the cache {self.path}; rebuild it with ensure_cache")
            if self.labels[i] != record.label:
                raise ValueError(
                    f"{record.filename} is labelled {record.label} but cached as {self.labels[i]} in {self.path}; "
                    "rebuild it with ensure_cache"
                )
            rows[n] = i
        return rows

    def center(self) -> tuple[slice, slice]:
        """(rows, columns) of a cached square that ``CenterCrop(input_size)`` keeps: the
        eval framing's crop, the same pixels the uncached pipeline crops."""
        start = _center_anchor(self.side, self.input_size)
        return slice(start, start + self.input_size), slice(start, start + self.input_size)

    def check_geometry(self, input_size: int, crop_fraction: float) -> None:
        """Raise ValueError unless the cache was built for this input size and crop."""
        if (self.input_size, self.crop_fraction) != (input_size, crop_fraction):
            raise ValueError(
                f"the cache {self.path} holds {self.input_size} px crops at crop fraction {self.crop_fraction}, "
                f"not {input_size} px at {crop_fraction}; build one for this geometry with ensure_cache"
            )


def _files_fingerprint(records: Sequence[Record], image_dir: Path) -> str:
    """sha256 over every image's name, size and mtime: catches replaced files cheaply."""
    digest = hashlib.sha256()
    for record in records:
        stat = os.stat(image_dir / record.filename)
        digest.update(f"{record.filename}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _records_fingerprint(records: Sequence[Record]) -> str:
    """sha256 over the records' file names and labels, in order: the rows a cache holds."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(f"{record.filename}\0{record.label}\n".encode())
    return digest.hexdigest()


def _folder_name(image_dir: Path, records_sha: str, input_size: int, crop_fraction: float, color: str,
                 lung_sha: str | None = None, film_size: int | None = None, film_jpeg: int | None = None) -> str:
    side = round(input_size / crop_fraction)
    # The records are part of the key: a job caching other films of this folder (a subset of a
    # split) gets its own cache instead of replacing, under a running job, the one it reads.
    text = f"{image_dir.resolve()}\0{records_sha}\0{input_size}\0{crop_fraction!r}\0{color}"
    if lung_sha is not None:  # lung-cropped: another cache per lung model
        text += f"\0lungs\0{lung_sha}"
    if film_size is not None:  # films at one resolution: another cache per film size
        text += f"\0film\0{film_size}"
    if film_jpeg is not None:  # films made into JPEG copies: another cache per quality
        text += f"\0jpeg\0{film_jpeg}"
    key = hashlib.sha256(text.encode()).hexdigest()
    film = f"-film{film_size}" if film_size is not None else ""
    film += f"-jpeg{film_jpeg}" if film_jpeg is not None else ""
    return f"{image_dir.name}-{side}px-{color}{'-lungs' if lung_sha else ''}{film}-{key[:12]}"


def _stale_reason(index: dict[str, Any], expected: dict[str, Any]) -> str | None:
    for key, value in expected.items():
        if index.get(key) != value:
            return "the records differ" if key in ("filenames", "labels") else f"{key} changed"
    return None


# --------------------------------------------------------------------------- building

# Per worker process: where to write, and how (set once by `_init_worker`).
_job: dict[str, Any] = {}


def _available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _init_worker(
    pixels_path: str, image_dir: str, input_size: int, crop_fraction: float, color: str, lung_weights: str | None = None,
    film_size: int | None = None, film_jpeg: int | None = None, worker: bool = True,
) -> None:
    lungs = None
    if lung_weights is not None:
        from covidtl.lungs import load_lung_model

        if worker:  # one thread per worker process: the pool already uses every CPU
            torch.set_num_threads(1)
        lungs = load_lung_model(lung_weights)[0]
    _job.update(
        lungs=lungs,
        pixels=np.load(pixels_path, mmap_mode="r+"),
        image_dir=Path(image_dir),
        resize=eval_geometry(input_size, crop_fraction)[0],
        side=round(input_size / crop_fraction),
        input_size=input_size,
        color=color,
        film_size=film_size,
        film_jpeg=film_jpeg,
    )


def _cache_one(task: tuple[int, str]) -> tuple[int, str | None, str | None]:
    """Decode, (lung-crop,) resize and store one image (in a worker): (its row, why it does
    not decode or None, why it was kept whole instead of lung-cropped or None)."""
    row, filename = task
    gray = _job["color"] == "gray"
    try:
        # A grey film stays one band through the resize: the values of its RGB copy, a
        # third of the work; a colour image is resized in RGB, then made grey.
        image = load_image(_job["image_dir"] / filename, grey=gray)
    except UnreadableImageError as error:
        cause = error.__cause__ or error
        return row, f"{type(cause).__name__}: {cause}", None
    whole, box = None, None
    if _job["lungs"] is not None:
        from covidtl.lungs import crop_to_lungs

        lung_crop = crop_to_lungs(image, _job["lungs"])
        box, whole = lung_crop.box, lung_crop.check.reason
    image = film_part(image, box, _job["film_size"], _job["film_jpeg"])
    image = _job["resize"](image)
    image = image.crop(crop_box(image.width, image.height, _job["side"], _job["input_size"]))
    if gray:
        image = image.convert("L")
    _job["pixels"][row] = np.asarray(image)
    return row, None, whole


class _Counted:
    """An iterator with a length, so progress bars know the total."""

    def __init__(self, iterator: Iterator, length: int) -> None:
        self.iterator, self.length = iterator, length

    def __iter__(self) -> Iterator:
        return self.iterator

    def __len__(self) -> int:
        return self.length


def _failures(
    results: Iterator[tuple[int, str | None, str | None]], records: Sequence[Record], progress: Progress
) -> tuple[dict[str, str], dict[str, str]]:
    """Consume `_cache_one` results (through `progress`): (file name -> reason, for
    failures; file name -> reason, for images kept whole)."""
    counted = _Counted(results, len(records))
    bad, whole = {}, {}
    for row, reason, kept in progress(counted) if progress else counted:
        if reason:
            bad[records[row].filename] = reason
        if kept:
            whole[records[row].filename] = kept
    return bad, whole


def _build(
    folder: Path,
    records: Sequence[Record],
    image_dir: Path,
    input_size: int,
    crop_fraction: float,
    color: str,
    index: dict[str, Any],
    num_workers: int,
    progress: Progress,
    lung_weights: Path | None = None,
    film_size: int | None = None,
    film_jpeg: int | None = None,
) -> None:
    """Build the cache into `folder`; adds ``kept_whole`` to `index` for lung crops."""
    side = round(input_size / crop_fraction)
    shape = (len(records), side, side) + ((3,) if color == "rgb" else ())
    staging = folder.with_name(f"{folder.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        pixels_path = staging / _PIXELS
        np.lib.format.open_memmap(pixels_path, mode="w+", dtype=np.uint8, shape=shape).flush()
        setup = (str(pixels_path), str(image_dir), input_size, crop_fraction, color,
                 None if lung_weights is None else str(lung_weights), film_size, film_jpeg)
        tasks = [(i, record.filename) for i, record in enumerate(records)]
        if num_workers > 0:
            with ProcessPoolExecutor(num_workers, initializer=_init_worker, initargs=setup) as pool:
                done = pool.map(_cache_one, tasks, chunksize=max(1, min(64, len(tasks) // (8 * num_workers))))
                bad, whole = _failures(done, records, progress)
        else:
            _init_worker(*setup, worker=False)
            try:
                bad, whole = _failures(map(_cache_one, tasks), records, progress)
                _job["pixels"].flush()
            finally:
                _job.clear()
        if bad:  # every image was tried, so the error names all of them
            raise corrupt_images_error(bad, len(records), image_dir)
        if lung_weights is not None:
            index["kept_whole"] = whole
        (staging / _INDEX).write_text(json.dumps(index), encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def ensure_cache(
    records: Sequence[Record],
    image_dir: str | Path,
    label_file: str | Path,
    cache_dir: str | Path | None = None,
    input_size: int = 224,
    crop_fraction: float = 0.9,
    color: str = "gray",
    num_workers: int | None = None,
    progress: Progress = None,
    lung_weights: str | Path | None = None,
    film_size: int | None = None,
    film_jpeg: int | None = None,
) -> ImageCache:
    """The cache of ``records``' images for this geometry: reused when still valid, else built.

    Args:
        records: the images to cache, e.g. a split after ``check_images``/``scan_images``.
        image_dir: the folder holding them.
        label_file: the split's label file; its sha256 is recorded, and a change rebuilds.
        cache_dir: where caches live (default :func:`default_cache_dir`).
        input_size, crop_fraction: the model's input and the eval framing (as in
            :func:`covidtl.transforms.build_transform`); rows are ``round(input_size /
            crop_fraction)`` px squares.
        color: ``"gray"`` (luminance, 1 byte a pixel) or ``"rgb"``.
        num_workers: decoding processes; None uses every available CPU, 0 decodes here.
        progress: optional wrapper of an iterable (e.g. ``tqdm``), over images as they
            are stored; called only when the cache is built.
        lung_weights: a lung model (``covidtl.lungs``) to crop each image to its lungs
            first, or None for whole images.
        film_size: bring each image (or its lung crop) to the detail of a ``film_size``
            square copy of it first (:func:`covidtl.harmonize.at_film_size`), or None.
        film_jpeg: with `film_size`, cut each image (or its lung crop) from a JPEG copy of
            the whole film at this quality (:func:`covidtl.harmonize.film_part`), or None.

    Raises:
        ValueError: unknown ``color`` or a bad geometry.
        FileNotFoundError: an image or the label file is missing.
        covidtl.scan.CorruptImagesError: images that do not decode, all of them in its
            ``reasons`` (nothing is published); drop them (``covidtl.scan.skip_corrupt``)
            and call again.
    """
    if color not in COLORS:
        raise ValueError(f"unknown cache color {color!r}; choose from {list(COLORS)}")
    eval_geometry(input_size, crop_fraction)  # validates both
    image_dir, label_file = Path(image_dir), Path(label_file)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    lung_sha = None if lung_weights is None else sha256_file(Path(lung_weights))
    if film_jpeg is not None and film_size is None:
        raise ValueError("film_jpeg makes each film into a film_size copy: give film_size too")
    folder = cache_dir / _folder_name(image_dir, _records_fingerprint(records), input_size, crop_fraction, color,
                                      lung_sha, film_size, film_jpeg)
    side = round(input_size / crop_fraction)
    expected = {
        "version": FORMAT_VERSION,
        "input_size": input_size,
        "crop_fraction": crop_fraction,
        "side": side,
        "color": color,
        "label_file_sha256": sha256_file(label_file),
        "files_sha256": _files_fingerprint(records, image_dir),
        "filenames": [r.filename for r in records],
        "labels": [r.label for r in records],
    }
    if lung_sha is not None:
        expected["lung_model_sha256"] = lung_sha
    if film_size is not None:
        expected["film_size"] = film_size
    if film_jpeg is not None:
        expected["film_jpeg"] = film_jpeg
    with _locked(folder):
        try:
            index = json.loads((folder / _INDEX).read_text(encoding="utf-8"))
            reason = _stale_reason(index, expected)
        except (FileNotFoundError, json.JSONDecodeError):
            reason = "no cache yet"
        if reason is not None:
            workers = _available_cpus() if num_workers is None else num_workers
            logger.info("building image cache %s (%s): %d images, %s workers", folder, reason, len(records), workers)
            started = time.perf_counter()
            index = expected | {
                "image_dir": str(image_dir.resolve()),
                "label_file": str(label_file.resolve()),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            _build(folder, records, image_dir, input_size, crop_fraction, color, index, workers, progress,
                   None if lung_weights is None else Path(lung_weights), film_size, film_jpeg)
            logger.info("built %s in %.1f s", folder.name, time.perf_counter() - started)
        else:
            logger.info("using image cache %s (%d images)", folder, len(records))
    return ImageCache(
        path=folder,
        input_size=input_size,
        crop_fraction=crop_fraction,
        side=side,
        color=color,
        filenames=tuple(expected["filenames"]),
        labels=tuple(expected["labels"]),
        lung_model_sha256=lung_sha,
        kept_whole=dict(index.get("kept_whole", {})),
        film_size=film_size,
        film_jpeg=film_jpeg,
    )


def card_cache(
    card: dict[str, Any],
    records: Sequence[Record],
    image_dir: str | Path,
    label_file: str | Path,
    lung_weights: str | Path | None,
    cache_dir: str | Path | None = None,
    num_workers: int | None = None,
    progress: Progress = None,
) -> ImageCache | None:
    """The cache that frames ``records`` as an exported model's training cache framed its films,
    from the model's card: cut to the lungs by its lung model (a ``lung_crop`` card), at its
    film size (``film_size``; from its JPEG copy, ``film_jpeg``), in its cache colour
    (``config.cache``; grey for a card that does not say). None for a card that frames each
    whole film at its own resolution: the uncached pipeline then gives the same tensors (see
    the module docstring).

    Args:
        lung_weights: the card's lung model, for a ``lung_crop`` card (ignored otherwise).

    Raises:
        ValueError: a ``lung_crop`` card without ``lung_weights``, or with a lung model
            other than the one it was trained with (its sha256 is in the card).
    """
    crop, film_size = card.get("lung_crop"), card.get("film_size")
    if not crop and film_size is None:
        return None
    if crop:
        if lung_weights is None:
            raise ValueError(f"model {card['name']!r} was trained on lung crops: pass its lung model "
                             f"{crop['lung_model']!r} (weights/{crop['lung_model']}.safetensors)")
        if sha256_file(Path(lung_weights)) != crop["lung_model_sha256"]:
            raise ValueError(f"model {card['name']!r} was trained with lung model {crop['lung_model']!r} "
                             f"(sha256 {crop['lung_model_sha256'][:12]}...), but {lung_weights} is another; "
                             "pass the one shipped beside the model")
    color = card.get("config", {}).get("cache", "gray")
    return ensure_cache(records, image_dir, label_file, cache_dir, int(card["input_size"]),
                        float(card["crop_fraction"]), color=color, num_workers=num_workers, progress=progress,
                        lung_weights=lung_weights if crop else None, film_size=film_size,
                        film_jpeg=card.get("film_jpeg"))


# --------------------------------------------------------------------------- dataset


class CachedDataset(torch.utils.data.Dataset):
    """:class:`covidtl.data.CovidxDataset` over a cache: the same items, without decoding.

    Item ``i`` is ``(transform(image), label)`` where ``image`` is record ``i``'s cached
    square as an RGB ``PIL.Image``; with the ``build_transform`` of the cache's geometry
    this equals the uncached item (see the module docstring). The memmap is opened
    lazily in each process, so the dataset pickles small for worker processes.
    """

    def __init__(self, cache: ImageCache, records: Sequence[Record], transform: Callable | None) -> None:
        self.cache = cache
        self.records = list(records)
        self.transform = transform
        self.rows = cache.rows(self.records)
        self.labels = np.array([r.label for r in self.records], dtype=np.int64)
        self.sources = [r.source for r in self.records]
        self._pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_pixels": None}

    def image(self, index: int) -> Image.Image:
        """Record ``index``'s cached square, RGB, ``side x side``."""
        if self._pixels is None:
            pixels = self.cache.pixels()
            if len(pixels) != len(self.cache):  # replaced since this job opened it
                raise RuntimeError(
                    f"the image cache {self.cache.path} now holds {len(pixels)} images, not the "
                    f"{len(self.cache)} this job indexed: another process rebuilt it; run this job again"
                )
            self._pixels = pixels
        image = Image.fromarray(np.array(self._pixels[self.rows[index]]))
        return image if image.mode == "RGB" else image.convert("RGB")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.records[index].label
