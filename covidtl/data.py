"""Datasets over COVIDx records, class weights and balanced-sampler weights."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from covidtl.classes import CLASSES
from covidtl.images import load_image
from covidtl.labels import Record

__all__ = [
    "CovidxDataset",
    "balanced_sampler_weights",
    "class_weights",
]


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
