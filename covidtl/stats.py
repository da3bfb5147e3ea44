"""Per-channel normalization statistics (mean, std) of a split of chest X-rays.

Statistics are of pixel values in [0, 1] after the eval framing of :mod:`covidtl.transforms`
(RGB load, ``Resize(round(size / crop_fraction))``, ``CenterCrop(size)``), over all pixels
of all images: the population mean and std that ``Normalize`` expects.

From an image cache (:mod:`covidtl.cache`) nothing is decoded: the pass counts pixel
values (256 per channel) over the memory-mapped crops, exactly, in integers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from covidtl.cache import ImageCache
from covidtl.data import CovidxDataset
from covidtl.images import load_image
from covidtl.labels import Record
from covidtl.transforms import eval_geometry

__all__ = ["COVIDX_STATS", "compute_stats", "reference_stats"]

Triple = tuple[float, float, float]

# Mean and std per RGB channel, measured with compute_stats (size 224) on the full COVIDx
# train split. X-rays are grey, so the three channels agree. The default for COVIDx recipes;
# measure your own data with compute_stats when it comes from elsewhere.
COVIDX_STATS: tuple[Triple, Triple] = ((0.5163,) * 3, (0.2481,) * 3)


def _finish(total: Sequence[float], total_sq: Sequence[float], count: int) -> tuple[Triple, Triple]:
    if count == 0:
        raise ValueError("no pixels: the split has no images")
    # Sums are of 0..255 integers, exact in float64 up to 2**53; scale to [0, 1] at the end.
    means = [s / (count * 255.0) for s in total]
    stds = [math.sqrt(max(sq / (count * 255.0**2) - m * m, 0.0)) for sq, m in zip(total_sq, means)]
    return (means[0], means[1], means[2]), (stds[0], stds[1], stds[2])


def compute_stats(
    records: Sequence[Record],
    image_dir: Path,
    size: int = 224,
    batch_size: int = 32,
    num_workers: int = 2,
    progress: Callable[[Iterable], Iterable] | None = None,
    crop_fraction: float = 0.9,
    cache: ImageCache | None = None,
) -> tuple[Triple, Triple]:
    """Return ``(mean, std)`` per RGB channel, in [0, 1] units, of ``records``' images.

    Streams uint8 batches ``[B, 3, size, size]`` from a DataLoader with ``num_workers``
    worker processes and accumulates per-channel sums and sums of squares in float64;
    with ``cache`` (built for ``size`` and ``crop_fraction``) it reads the cached crops
    ``batch_size`` at a time instead, and decodes nothing. A ``"gray"`` cache holds
    luminance: the same values for grey images, one value for all three channels.

    Args:
        progress: optional wrapper of an iterable (e.g. ``tqdm``) over the batches.
    """
    if cache is not None:
        cache.check_geometry(size, crop_fraction)
        return _cache_stats(cache, records, batch_size, progress)
    transform = v2.Compose([*eval_geometry(size, crop_fraction), v2.ToImage()])
    loader = DataLoader(
        CovidxDataset(records, image_dir, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    batches = progress(loader) if progress is not None else loader
    for images, _ in batches:
        pixels = images.as_subclass(torch.Tensor).to(torch.float64)
        total += pixels.sum(dim=(0, 2, 3))
        total_sq += pixels.square().sum(dim=(0, 2, 3))
        count += pixels.shape[0] * pixels.shape[2] * pixels.shape[3]
    return _finish(total.tolist(), total_sq.tolist(), count)


def _cache_stats(
    cache: ImageCache, records: Sequence[Record], batch_size: int, progress: Callable[[Iterable], Iterable] | None
) -> tuple[Triple, Triple]:
    rows, columns = cache.center()
    order = np.sort(cache.rows(records))  # in file order: sequential reads of the memmap
    pixels = cache.pixels()
    channels = 3 if cache.color == "rgb" else 1
    counts = np.zeros((channels, 256), dtype=np.int64)  # histogram of 0..255 per channel
    batches = range(0, len(order), max(1, batch_size))
    for start in progress(batches) if progress is not None else batches:
        block = pixels[order[start : start + batch_size], rows, columns].reshape(-1, channels)
        for c in range(channels):
            counts[c] += np.bincount(block[:, c], minlength=256)
    if channels == 1:
        counts = np.repeat(counts, 3, axis=0)
    values = np.arange(256, dtype=np.int64)
    total, total_sq = counts @ values, counts @ values**2
    return _finish(total.astype(np.float64).tolist(), total_sq.astype(np.float64).tolist(), int(counts[0].sum()))


def reference_stats(
    records: Sequence[Record],
    image_dir: Path,
    size: int = 224,
    crop_fraction: float = 0.9,
) -> tuple[Triple, Triple]:
    """The plain per-image float64 numpy loop that :func:`compute_stats` must match.

    Two passes (mean, then squared deviations from it), so it does not share the
    sum-of-squares formula it checks. Slow; for tests and benchmarks.
    """
    geometry = v2.Compose(eval_geometry(size, crop_fraction))
    image_dir = Path(image_dir)

    def pixels() -> Iterable[np.ndarray]:
        for record in records:
            image = geometry(load_image(image_dir / record.filename))
            yield np.asarray(image, dtype=np.float64).reshape(-1, 3) / 255.0

    total, count = np.zeros(3), 0
    for values in pixels():
        total += values.sum(axis=0)
        count += values.shape[0]
    if count == 0:
        raise ValueError("no pixels: the split has no images")
    mean = total / count
    squared = np.zeros(3)
    for values in pixels():
        squared += ((values - mean) ** 2).sum(axis=0)
    std = np.sqrt(squared / count)
    return tuple(mean.tolist()), tuple(std.tolist())
