"""Where a COVIDx dataset is: a local folder in the COVIDx layout, or a kagglehub download."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from covidtl.labels import LAYOUT_HELP, SPLITS

logger = logging.getLogger(__name__)

__all__ = [
    "KAGGLE_HANDLE",
    "DatasetUnavailableError",
    "resolve_dataset_root",
]


KAGGLE_HANDLE = "andyczhao/covidx-cxr2"


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
