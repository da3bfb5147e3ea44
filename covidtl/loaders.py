"""DataLoaders for training and evaluation, built from label records and a recipe.

With an :class:`covidtl.cache.ImageCache` of the split (``cache=``) the images come
pre-resized from the cache instead of being decoded every epoch; the tensors are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from covidtl.augment import RandomRecode, intensity_steps
from covidtl.cache import CachedDataset, ImageCache
from covidtl.config import TrainConfig
from covidtl.data import CovidxDataset, balanced_sampler_weights
from covidtl.engine import EpochSampler
from covidtl.labels import Record
from covidtl.site_blind import WithTargets
from covidtl.transforms import build_transform


def _dataset(
    records: Sequence[Record],
    image_dir: Path,
    transform,
    input_size: int,
    crop_fraction: float,
    cache: ImageCache | None,
) -> torch.utils.data.Dataset:
    if cache is None:
        return CovidxDataset(records, image_dir, transform)
    cache.check_geometry(input_size, crop_fraction)
    return CachedDataset(cache, records, transform)


def eval_loader(
    records: Sequence[Record],
    image_dir: Path,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_fraction: float = 0.9,
    batch_size: int = 64,
    num_workers: int = 2,
    cache: ImageCache | None = None,
    equalize: bool = False,
) -> DataLoader:
    """Deterministic loader in record order (resize, center crop, (equalize,) normalize).

    `cache`: a cache of `records` built for (input_size, crop_fraction), or None to decode.
    `equalize`: histogram equalization after the crop, as the model was trained (its card's
    ``equalize``).
    """
    transform = build_transform(input_size, mean, std, train=False, crop_fraction=crop_fraction, equalize=equalize)
    return DataLoader(
        _dataset(records, image_dir, transform, input_size, crop_fraction, cache),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


def train_loader(
    records: Sequence[Record],
    image_dir: Path,
    config: TrainConfig,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    rank: int = 0,
    world_size: int = 1,
    cache: ImageCache | None = None,
    targets: np.ndarray | None = None,
) -> tuple[DataLoader, EpochSampler]:
    """Augmented, shuffled (or balanced, per `config.balance`) loader, sharded by rank.

    Call `sampler.set_epoch(epoch)` before each epoch: the order is a function of
    (seed, epoch, rank), so a resumed run sees the same batches. `cache`: a cache of
    `records` built for (input_size, config.crop_fraction), or None to decode every epoch.
    `targets`: int64 [N, k] extra targets per record (site-blind training); the loader then
    yields (images, labels, targets) batches.
    """
    transform = build_transform(
        input_size,
        mean,
        std,
        train=True,
        crop_fraction=config.crop_fraction,
        hflip=config.hflip,
        rotation=config.rotation,
        color_jitter=config.color_jitter,
        crop_scale=config.crop_scale,
        intensity=intensity_steps(config.gamma, config.blur, config.noise),
        equalize=config.equalize,
        recode=RandomRecode(config.recode) if config.recode else None,
    )
    weights = None
    if config.balance == "sampler":
        weights = balanced_sampler_weights(records, by="label")
    elif config.balance == "sampler_source":
        weights = balanced_sampler_weights(records, by="label_source")
    sampler = EpochSampler(len(records), weights, seed=config.seed, rank=rank, world_size=world_size,
                           num_samples=config.samples_per_epoch)
    dataset = _dataset(records, image_dir, transform, input_size, config.crop_fraction, cache)
    loader = DataLoader(
        dataset if targets is None else WithTargets(dataset, targets),
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=len(sampler) > config.batch_size,  # no size-1 batches for BatchNorm
        # Fresh workers each epoch take their seeds from the main RNG, which the
        # training loop seeds per epoch: augmentation is then identical after --resume.
        persistent_workers=False,
    )
    return loader, sampler
