"""Shortcut audit: does the model look at the lungs, or at the edges of the film?

Models trained on pooled chest X-ray sources can learn where an image came from (text
markers, borders, patient size) instead of the disease (DeGrave et al., Nature Machine
Intelligence 2021). This audit measures, over a split, where the Grad-CAM energy of the
positive class falls on the network's input (the resized, center-cropped S x S image):

- lung field: two ellipses, one per lung, centred at 30 % and 70 % of the width and 50 %
  of the height, with semi-axes of 17 % of the width and 32 % of the height. On a
  centred PA/AP film these cover the lung fields and leave out the neck, shoulders,
  abdomen and the film's edges. It is a fixed geometric prior, not a segmentation: it
  is approximate, and pediatric films (smaller, less centred thoraxes) fit it less well.
- border: the outer 10 % frame of the image, where burnt-in text, rulers and
  collimation edges sit.

- lungs (when the caller passes each image's own lung mask, from covidtl.lungs): the
  segmented lungs of that image, in the same frame; an image without a plausible mask
  falls back to the two-ellipse prior, and the result counts how many did.

A uniform map would put exactly each region's area share of energy in it; a model that
looks at the lungs puts clearly more than the area share there, and little in the border.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from covidtl.explain import DEFAULT_METHOD, explain

LUNG_CENTRES = ((0.30, 0.50), (0.70, 0.50))  # (x, y) as fractions of width and height
LUNG_SEMI_AXES = (0.17, 0.32)  # (x, y) as fractions of width and height
BORDER_FRACTION = 0.10


def lung_mask(size: int) -> np.ndarray:
    """bool [size, size]: the two-ellipse lung-field prior described above."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    ax, ay = LUNG_SEMI_AXES
    inside = [((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0 for cx, cy in LUNG_CENTRES]
    return np.logical_or(*inside)


def border_mask(size: int, fraction: float = BORDER_FRACTION) -> np.ndarray:
    """bool [size, size]: the outer `fraction` frame of the image."""
    width = max(1, round(size * fraction))
    mask = np.ones((size, size), dtype=bool)
    mask[width:-width, width:-width] = False
    return mask


def energy_shares(heatmap: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, float]:
    """Share of the map's total energy (sum of values) inside each mask; nan for an all-zero map."""
    total = float(heatmap.sum())
    if total <= 0:
        return {name: float("nan") for name in masks}
    return {name: float(heatmap[mask].sum()) / total for name, mask in masks.items()}


def cam_audit(
    model: nn.Module,
    cam_layer: str,
    loader: DataLoader,
    sources: Sequence[str],
    method: str = DEFAULT_METHOD,
    device: torch.device | str = "cpu",
    progress: Callable[[Iterable], Iterable] | None = None,
    lung_masks: Sequence[np.ndarray | None] | None = None,
) -> dict:
    """Mean Grad-CAM energy share in the lung field and in the border, overall and per source.

    `loader` yields normalized images in the order of `sources`. Returns a JSON-ready dict
    with the region definitions, their area shares, and the mean shares.

    `lung_masks`: one bool [S, S] mask per image (in the order of `sources`), or None for
    an image without a plausible one. Given, the lung region is each image's own mask
    ("lungs"; the ellipse prior for the None ones, counted in ``lung_fallbacks``) instead
    of the prior ("lung_field").
    """
    if lung_masks is not None and len(lung_masks) != len(sources):
        raise ValueError(f"{len(lung_masks)} lung masks but {len(sources)} sources")
    model.eval()
    shares: list[dict[str, float]] = []
    masks: dict[str, np.ndarray] = {}
    areas: list[float] = []
    fallbacks = 0
    for images, _ in progress(loader) if progress else loader:
        for image in images:
            heatmap = explain(model, image.unsqueeze(0).to(device), cam_layer, method=method)
            size = heatmap.shape[0]
            if lung_masks is None:
                if not masks:
                    masks = {"lung_field": lung_mask(size), "border": border_mask(size)}
            else:
                if len(shares) >= len(lung_masks):
                    raise ValueError(f"more images than the {len(lung_masks)} lung masks")
                own = lung_masks[len(shares)]
                if own is None:
                    fallbacks += 1
                    own = lung_mask(size)
                elif own.shape != heatmap.shape:
                    raise ValueError(f"lung mask {own.shape} does not match the CAM map {heatmap.shape}")
                masks = {"lungs": own, "border": border_mask(size)}
                areas.append(float(own.mean()))
            shares.append(energy_shares(heatmap, masks))
    if len(shares) != len(sources):
        raise ValueError(f"{len(shares)} images but {len(sources)} sources")

    def mean_of(rows: list[dict[str, float]]) -> dict[str, float | None]:
        out = {}
        for name in masks:
            values = np.array([r[name] for r in rows], dtype=float)
            out[name] = None if np.isnan(values).all() else round(float(np.nanmean(values)), 4)
        return out

    prior = f"two ellipses centred at {LUNG_CENTRES} (x, y fractions), semi-axes {LUNG_SEMI_AXES}"
    if lung_masks is None:
        regions = {"lung_field": prior}
        area_share = {name: round(float(mask.mean()), 4) for name, mask in masks.items()}
    else:
        regions = {"lungs": f"each image's own lung mask (covidtl.lungs); the prior ({prior}) where it has none"}
        area_share = {"lungs": round(float(np.mean(areas)), 4) if areas else None,
                      "border": round(float(border_mask(size).mean()), 4) if shares else None}
    extra = {} if lung_masks is None else {"lung_fallbacks": fallbacks}
    return {
        "method": method,
        "layer": cam_layer,
        "regions": regions | {"border": f"outer {BORDER_FRACTION:.0%} frame"},
        "area_share": area_share,
        "n": len(shares),
        **extra,
        "mean_energy_share": mean_of(shares),
        "per_source": {
            source: mean_of([row for row, s in zip(shares, sources) if s == source]) for source in sorted(set(sources))
        },
    }
