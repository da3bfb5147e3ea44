"""Images named in label files but missing or undecodable: found before training starts."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from PIL import Image

from covidtl.images import _PIL_ERRORS
from covidtl.labels import Record

logger = logging.getLogger(__name__)

__all__ = [
    "CorruptImagesError",
    "MissingImagesError",
    "check_images",
    "corrupt_images_error",
    "find_missing",
    "scan_images",
    "skip_corrupt",
]


class MissingImagesError(FileNotFoundError):
    """Images named in a label file are not in the image folder."""


class CorruptImagesError(ValueError):
    """Images that exist but cannot be decoded; `reasons` maps each file name to why."""

    def __init__(self, message: str, reasons: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.reasons = dict(reasons or {})


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
