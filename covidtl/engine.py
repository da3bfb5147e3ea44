"""One training epoch, one evaluation pass, and the sampler they share.

Works unchanged on CPU, one GPU (AMP + channels_last) and under DistributedDataParallel:
losses are summed across processes so every rank reports the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from covidtl.calibration import positive_scores
from covidtl.site_blind import SiteBlindHeads, tap_features

Progress = Callable[[Iterable], Iterable] | None


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def mix_batch(images: torch.Tensor, labels: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al. 2018): (lam * images + (1 - lam) * images[perm], labels[perm], lam)
    with lam ~ Beta(alpha, alpha) and `perm` a random order of the batch (torch's global RNG,
    which the training loop seeds per epoch). The loss is then lam * loss(labels) +
    (1 - lam) * loss(labels[perm])."""
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be positive, not {alpha}")
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(labels), device=labels.device)
    return lam * images + (1 - lam) * images[perm], labels[perm], lam


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    progress: Progress = None,
    mixup: float = 0.0,
    site_blind: SiteBlindHeads | None = None,
    head: str = "",
) -> dict[str, float]:
    """Train for one pass over `loader`; returns {"train_loss": mean loss per image} (the
    classification loss), plus the mean of each site-blind loss when `site_blind` is given.

    `scaler` enables fp16 autocast (CUDA); `progress` wraps the loader (e.g. tqdm);
    `mixup` > 0 blends each batch with a shuffled copy of itself (:func:`mix_batch`).
    `site_blind`: training-only heads (:mod:`covidtl.site_blind`) on the input of the model's
    head `head` (a `get_submodule` path); the loader then yields (images, labels, targets
    [B, 2]) and the heads' parameters must be in `optimizer`.
    """
    model.train()
    loss_sum, count = 0.0, 0
    extra_sums: dict[str, float] = {}
    plain = getattr(model, "module", model)  # DistributedDataParallel keeps the model as .module
    for batch in progress(loader) if progress else loader:
        images, labels = _to_device(batch[0], batch[1], device, channels_last)
        with (torch.autocast(device.type, dtype=torch.float16, enabled=scaler is not None),
              tap_features(plain, head) if site_blind is not None else nullcontext([]) as taken):
            if mixup > 0:
                images, partners, lam = mix_batch(images, labels, mixup)
                logits = model(images)
                loss = lam * criterion(logits, labels) + (1 - lam) * criterion(logits, partners)
            else:
                loss = criterion(model(images), labels)
            extra = site_blind(taken[-1].float(), labels, batch[2].to(device)) if site_blind is not None else {}
        for name, value in extra.items():
            extra_sums[name] = extra_sums.get(name, 0.0) + value.item() * len(labels)
        class_loss = loss.item()
        loss = loss + sum(extra.values())
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        loss_sum += class_loss * len(labels)
        count += len(labels)
    names = sorted(extra_sums)
    loss_sum, count, *extras = _all_reduce_sum([loss_sum, float(count), *(extra_sums[n] for n in names)], device)
    return {"train_loss": loss_sum / max(count, 1)} | {f"{n}_loss": v / max(count, 1) for n, v in zip(names, extras)}


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str,
    criterion: nn.Module | None = None,
    amp: bool = False,
    channels_last: bool = False,
    progress: Progress = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """The model's logits for every image of `loader`, in loader order.

    Returns (logits [N, n_classes] float64, labels [N] int64, mean loss or nan). Every
    process evaluates the whole loader (no sharding), so all ranks agree exactly.
    """
    device = torch.device(device)
    model.eval()
    logits_all, labels_all, loss_sum = [], [], 0.0
    for images, labels in progress(loader) if progress else loader:
        images, labels = _to_device(images, labels, device, channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits = model(images).float()
        if criterion is not None:
            loss_sum += criterion(logits, labels).item() * len(labels)
        logits_all.append(logits.double().cpu())
        labels_all.append(labels.cpu())
    n = sum(len(s) for s in logits_all)
    mean_loss = loss_sum / n if criterion is not None and n else float("nan")
    return torch.cat(logits_all).numpy(), torch.cat(labels_all).numpy(), mean_loss


def predict_scores(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str,
    criterion: nn.Module | None = None,
    amp: bool = False,
    channels_last: bool = False,
    progress: Progress = None,
    temperature: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, float]:
    """P(positive) = softmax(logits / temperature)[:, POSITIVE] for every image of `loader`.

    Returns (scores [N] float64 in [0, 1], labels [N] int64, mean loss or nan; the loss is
    that of the raw logits, as trained). See `predict_logits`.
    """
    logits, labels, mean_loss = predict_logits(model, loader, device, criterion, amp, channels_last, progress)
    return positive_scores(logits, temperature), labels, mean_loss


class EpochSampler(Sampler[int]):
    """Shuffled, optionally weighted, sharded sampling that is a pure function of
    (seed, epoch, rank): the same indices on a resumed run, disjoint shards per rank.

    `weights=None` is a plain shuffle without replacement (like DistributedSampler,
    padding so every rank gets the same count); with weights it draws
    `num_samples` (default `len(weights)`) indices with replacement (class- or
    source-balanced).
    """

    def __init__(self, n: int, weights: torch.Tensor | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_samples: int | None = None):
        if weights is not None and len(weights) != n:
            raise ValueError(f"{len(weights)} weights for {n} samples")
        if num_samples is not None and weights is None:
            raise ValueError("num_samples needs weights: an unweighted epoch is one pass over the samples")
        self.n, self.weights, self.seed, self.rank, self.world_size = n, weights, seed, rank, world_size
        self.epoch = 0
        self.per_rank = -(-(num_samples or n) // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        total = self.per_rank * self.world_size
        if self.weights is None:
            order = torch.randperm(self.n, generator=g)
            order = torch.cat([order, order[: total - self.n]])
        else:
            order = torch.multinomial(self.weights.double(), total, replacement=True, generator=g)
        return iter(order[self.rank :: self.world_size].tolist())
