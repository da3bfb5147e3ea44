"""Site-blind training: losses on the penultimate features that stop rewarding the hospital.

In COVIDx each large source holds one class, so a network can reach a low loss by recognising
the source. Two training-only heads read the features the classifier head reads (its input,
tapped with a forward pre-hook, so every registered backbone works unchanged):

- a **class-conditional source adversary**: for each class, a linear head that predicts which
  source a film of that class came from. Its gradient is reversed (scaled by ``-adversary``)
  on the way into the backbone (Ganin et al., JMLR 2016), so the backbone learns features from
  which, *within one class*, the hospitals cannot be told apart. Conditioning on the class keeps
  the label itself learnable: only the site information that is not the label is removed.
  A class with films of one source only has nothing to tell apart and no head.
- a **pathology head** (``auxiliary``): no finding / other pneumonia / COVID-19
  (:mod:`covidtl.findings`), a target that NIH, Kermany and Cohen films each hold several
  values of, so it is learnt within sites.

The heads are not part of the exported model: its state dict, card and inference are those of
the plain classifier.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from covidtl.classes import CLASSES
from covidtl.findings import FINDINGS, UNKNOWN
from covidtl.labels import Record

NO_SOURCE = -1  # a film whose class has one source only: no adversary target


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity forward; the gradient is multiplied by ``-scale`` backward."""
    return _GradReverse.apply(x, scale)


@contextmanager
def tap_features(model: nn.Module, head: str) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward of `model` appends the input of its head `head` (a
    `get_submodule` path, the spec's ``head``) to the yielded list, pooled to [B, F] (a
    convolutional head's input map is averaged over space). The hook is removed on exit."""
    taken: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        taken.append(x.mean(dim=(2, 3)) if x.dim() == 4 else x.flatten(1))

    handle = model.get_submodule(head).register_forward_pre_hook(hook)
    try:
        yield taken
    finally:
        handle.remove()


def feature_width(model: nn.Module, head: str) -> int:
    """How many features the head `head` of `model` reads (a Linear's inputs, a 1x1 conv's channels)."""
    module = model.get_submodule(head)
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels
    raise TypeError(f"cannot read the feature width of a head of type {type(module).__name__}")


def source_targets(records: Sequence[Record]) -> tuple[np.ndarray, dict[int, list[str]]]:
    """(int64 [N]: each film's index among its class's sources, or NO_SOURCE where its class
    has one source only; {class: its sources, sorted} for the classes with two or more)."""
    by_class: dict[int, list[str]] = {}
    for c in range(len(CLASSES)):
        sources = sorted({r.source for r in records if r.label == c})
        if len(sources) >= 2:
            by_class[c] = sources
    targets = [by_class[r.label].index(r.source) if r.label in by_class else NO_SOURCE for r in records]
    return np.array(targets, dtype=np.int64), by_class


class WithTargets(Dataset):
    """`dataset`'s (image, label) items with a row of extra targets: (image, label, targets[i])."""

    def __init__(self, dataset: Dataset, targets: np.ndarray) -> None:
        if len(targets) != len(dataset):
            raise ValueError(f"{len(targets)} target rows for {len(dataset)} films")
        self.dataset, self.targets = dataset, torch.as_tensor(targets, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        image, label = self.dataset[index]
        return image, label, self.targets[index]


class SiteBlindHeads(nn.Module):
    """The training-only heads on features [B, F]; ``forward`` returns the added loss.

    `sources_by_class`: {class: its sources} (from :func:`source_targets`); `adversary` and
    `auxiliary` are the two losses' weights (0: that head is not built)."""

    def __init__(self, features: int, sources_by_class: dict[int, list[str]], adversary: float, auxiliary: float):
        super().__init__()
        self.adversary, self.auxiliary = adversary, auxiliary
        self.sources_by_class = {int(c): list(s) for c, s in sources_by_class.items()}
        self.source_heads = nn.ModuleDict(
            {str(c): nn.Linear(features, len(s)) for c, s in self.sources_by_class.items()} if adversary > 0 else {})
        self.pathology = nn.Linear(features, len(FINDINGS)) if auxiliary > 0 else None

    def forward(self, features: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """`targets` int64 [B, 2]: (source index within the class or NO_SOURCE, finding or
        UNKNOWN). Returns {"adversary": loss, "auxiliary": loss} for the heads built (each a
        mean over the films it has a target for; 0 when none in the batch has one)."""
        losses: dict[str, torch.Tensor] = {}
        zero = features.sum() * 0.0
        if self.source_heads:
            reversed_features = grad_reverse(features, self.adversary)
            total, count = zero, 0
            for c, head in self.source_heads.items():
                keep = (labels == int(c)) & (targets[:, 0] != NO_SOURCE)
                if keep.any():
                    total = total + F.cross_entropy(head(reversed_features[keep]), targets[keep, 0], reduction="sum")
                    count += int(keep.sum())
            # The reversal already carries the weight into the backbone; the head itself learns at full rate.
            losses["adversary"] = total / max(count, 1)
        if self.pathology is not None:
            keep = targets[:, 1] != UNKNOWN
            losses["auxiliary"] = (self.auxiliary * F.cross_entropy(self.pathology(features[keep]), targets[keep, 1])
                                   if keep.any() else zero)
        return losses
