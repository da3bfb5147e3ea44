"""Is this a frontal chest X-ray like the ones the models learned from? Asked before any
decision, once per image, for every model alike.

Checks, cheapest first; the first that fails refuses the image with a reason in words:

1. Colour: more than `colour_share` of the pixels are coloured (channels differ by more
   than `colour_delta` grey levels): a colour photo or drawing, not a radiograph.
2. Near-uniform: the grey levels spread less than `min_spread` (standard deviation, 0-255):
   nothing to read.
3. Distance: the Mahalanobis distance of the image's ImageNet EfficientNet-Lite0 features
   (global average of the maps of blocks 4 and 5: 112 + 192 = 304 numbers) to those of the
   training films, with a shrunk (Ledoit-Wolf) covariance, over `cutoff`. The cutoff is set
   when fitting (`train.scope`): a margin over a high percentile of the validation films'
   distances. These middle blocks describe texture and shape; the last map (1280 numbers,
   ImageNet-class specific) was tried too and refused 7-10 % of the films of a hospital left
   out of the fit (4 % or less at margins that still refuse the development images), the
   middle blocks none.

A gate is saved as `<folder>/scope.safetensors` (the fitted distance) and
`<folder>/scope.json` (its card: cutoff, rule, encoder, measured refusal rates). The
encoder's weights are not saved: they are the ImageNet weights of the registry
(`covidtl.models.create_model("efficientnet_lite0", pretrained=True)`).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file

if TYPE_CHECKING:
    from covidtl.lungs import LungCrop

log = logging.getLogger(__name__)

ENCODER = "efficientnet_lite0"
FEATURE_LAYERS = ("blocks.4", "blocks.5")  # pooled and concatenated: 112 + 192 = 304 numbers
INPUT_SIZE = 224  # the whole image is squeezed to this square: nothing is cropped away
COLOUR_DELTA = 24  # grey levels between a pixel's channels that make it "coloured"
COLOUR_SHARE = 0.05  # share of coloured pixels over which an image is a colour picture
MIN_SPREAD = 8.0  # grey-level standard deviation (0-255) under which an image is near-uniform
WEIGHTS_NAME = "scope.safetensors"
CARD_NAME = "scope.json"


@dataclass(frozen=True)
class ScopeResult:
    """The input check's answer for one image. `reason` says in words why an image was
    refused ("" when in scope); `check` names the check that refused it ("colour",
    "uniform", "distance"); `distance` is None when the distance was not computed."""

    in_scope: bool
    reason: str = ""
    check: str = ""
    distance: float | None = None


# --------------------------------------------------------------------------- cheap checks


def small_rgb(image: Image.Image, size: int = INPUT_SIZE) -> np.ndarray:
    """`image` squeezed to size x size, RGB uint8 [size, size, 3]."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0))


def colour_share(pixels: np.ndarray, delta: int = COLOUR_DELTA) -> float:
    """Share of the pixels of RGB uint8 [H, W, 3] whose channels differ by more than `delta`."""
    spread = pixels.max(axis=2).astype(np.int16) - pixels.min(axis=2).astype(np.int16)
    return float((spread > delta).mean())


def grey(pixels: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> float32 [H, W] luminance 0-255 (ITU-R 601-2, as PIL's "L")."""
    return pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def cheap_checks(
    pixels: np.ndarray,
    max_colour_share: float = COLOUR_SHARE,
    min_spread: float = MIN_SPREAD,
) -> ScopeResult:
    """The colour and near-uniform checks on RGB uint8 [H, W, 3] (see `small_rgb`)."""
    share = colour_share(pixels)
    if share > max_colour_share:
        return ScopeResult(
            False,
            f"This is a colour picture ({100 * share:.0f} % of its pixels are coloured), like a photo "
            "or a drawing: a colour photo, not a radiograph.",
            "colour",
        )
    spread = float(grey(pixels).std())
    if spread < min_spread:
        return ScopeResult(
            False,
            f"This image is nearly uniform (its grey levels spread only {spread:.1f} of 255): "
            "there is no radiograph in it to read.",
            "uniform",
        )
    return ScopeResult(True)


# --------------------------------------------------------------------------- features


class Encoder:
    """ImageNet EfficientNet-Lite0 features of grey images: [N, 304] float32.

    Built on first use (about a second), then shared; a forward pass holds no state, so
    threads may call `features` at once.
    """

    def __init__(self, pretrained: bool = True, seed: int = 0) -> None:
        self.pretrained = pretrained
        self.seed = seed
        self._model: torch.nn.Module | None = None
        self._lock = threading.Lock()

    @property
    def model(self) -> torch.nn.Module:
        with self._lock:
            if self._model is None:
                from covidtl.models import create_model

                with torch.random.fork_rng():
                    torch.manual_seed(self.seed)  # only used when not pretrained (tests)
                    self._model = create_model(ENCODER, pretrained=self.pretrained).eval()
            return self._model

    def describe(self) -> dict[str, Any]:
        return {
            "architecture": ENCODER,
            "weights": "imagenet" if self.pretrained else f"random (seed {self.seed})",
            "layers": list(FEATURE_LAYERS),
            "pooling": "global average",
            "input": f"grey image squeezed to {INPUT_SIZE}x{INPUT_SIZE}, repeated to 3 channels, (x - 0.5) / 0.5",
        }

    @staticmethod
    def to_tensor(pixels: np.ndarray) -> torch.Tensor:
        """RGB uint8 [S, S, 3] -> grey, normalized float32 [3, S, S]."""
        x = torch.from_numpy(grey(pixels) / 255.0)
        return ((x - 0.5) / 0.5).expand(3, -1, -1)

    def features(self, batch: torch.Tensor) -> np.ndarray:
        """[N, 3, S, S] from `to_tensor` -> pooled features [N, 304] float32."""
        model = self.model
        pooled = []
        with torch.inference_mode():
            x = model.bn1(model.conv_stem(batch.float()))
            for i, block in enumerate(model.blocks):
                if len(pooled) == len(FEATURE_LAYERS):
                    break  # the later blocks are not needed
                x = block(x)
                if f"blocks.{i}" in FEATURE_LAYERS:
                    pooled.append(x.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1).numpy().astype(np.float32)


# --------------------------------------------------------------------------- distance


@dataclass
class Mahalanobis:
    """Mahalanobis distance to a fitted set of feature vectors, with a shrunk covariance.

    Features are standardized (`mean`, `scale`), then the covariance S of the training
    vectors is shrunk towards a multiple of the identity (Ledoit-Wolf):
    C = (1 - s) S + s nu I. C is kept as the eigenvectors of S (`components` [r, D],
    r <= number of training vectors) with C's eigenvalues `variances` [r], and `floor` =
    s nu, C's eigenvalue on every other direction; that is exact and much smaller than C.
    """

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    floor: float

    @classmethod
    def fit(cls, features: np.ndarray) -> Mahalanobis:
        """Fit on [N, D] feature vectors (N >= 2)."""
        from sklearn.covariance import ledoit_wolf_shrinkage

        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"need at least 2 feature vectors [N, D] to fit, got shape {x.shape}")
        mean = x.mean(axis=0)
        scale = x.std(axis=0) + 1e-6
        z = (x - mean) / scale
        shrinkage = float(ledoit_wolf_shrinkage(z, assume_centered=True))
        _, singular, vt = np.linalg.svd(z / np.sqrt(len(z)), full_matrices=False)
        eigen = singular**2  # eigenvalues of S = z^T z / N on the rows of vt
        nu = float((z**2).sum() / len(z) / z.shape[1])  # trace(S) / D
        floor = shrinkage * nu
        return cls(
            mean=mean.astype(np.float32),
            scale=scale.astype(np.float32),
            components=vt.astype(np.float32),
            variances=((1.0 - shrinkage) * eigen + floor).astype(np.float32),
            floor=max(floor, 1e-12),
        )

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """[N, D] -> distances [N] (in standard deviations of the shrunk model)."""
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        proj = z @ self.components.astype(np.float64).T
        inside = (proj**2 / self.variances).sum(axis=1)
        outside = np.maximum((z**2).sum(axis=1) - (proj**2).sum(axis=1), 0.0) / self.floor
        return np.sqrt(inside + outside)

    def tensors(self) -> dict[str, np.ndarray]:
        return {
            "mean": self.mean,
            "scale": self.scale,
            "components": self.components,
            "variances": self.variances,
            "floor": np.array([self.floor], dtype=np.float64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray]) -> Mahalanobis:
        return cls(
            mean=tensors["mean"].astype(np.float32),
            scale=tensors["scale"].astype(np.float32),
            components=tensors["components"].astype(np.float32),
            variances=tensors["variances"].astype(np.float32),
            floor=float(tensors["floor"][0]),
        )


# --------------------------------------------------------------------------- the gate


@dataclass
class ScopeGate:
    """The input check: cheap checks, then (when `distance` is fitted) the feature distance.

    A gate without `distance` runs the cheap checks only: it is what the app uses when no
    fitted gate is installed. `card` records how it was fitted and what it refuses.
    """

    distance: Mahalanobis | None = None
    cutoff: float = float("inf")
    encoder: Encoder = field(default_factory=Encoder)
    max_colour_share: float = COLOUR_SHARE
    min_spread: float = MIN_SPREAD
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def fitted(self) -> bool:
        return self.distance is not None

    def distances(self, pixels: list[np.ndarray], batch_size: int = 16) -> np.ndarray:
        """Feature distances [N] of RGB uint8 [S, S, 3] images (see `small_rgb`)."""
        if self.distance is None:
            raise ValueError("this gate has no fitted distance; fit one with `python -m train.scope fit`")
        return self.distance(features_of(self.encoder, pixels, batch_size))

    def check(self, image: Image.Image) -> ScopeResult:
        """Is `image` (any PIL mode) in scope? The first failing check gives the reason."""
        pixels = small_rgb(image)
        result = cheap_checks(pixels, self.max_colour_share, self.min_spread)
        if not result.in_scope or self.distance is None:
            return result
        distance = float(self.distances([pixels])[0])
        if distance > self.cutoff:
            return ScopeResult(
                False,
                "This image is far from the chest X-rays these models learned from "
                f"(distance {distance:.0f}, limit {self.cutoff:.0f}): it does not look like a frontal "
                "chest radiograph. It may be another kind of picture, another body part or imaging "
                "method, or a chest film unlike any they saw.",
                "distance",
                distance,
            )
        return ScopeResult(True, distance=distance)

    def summary(self) -> str:
        """One line on what this gate checks, for the app."""
        if self.distance is None:
            return (
                "Input check: colour and near-uniform images are refused; no fitted distance check is "
                "installed (`python -m train.scope fit`), so other non-radiographs are not caught."
            )
        return (
            "Input check: colour and near-uniform images are refused, then images whose features are "
            f"far (distance over {self.cutoff:.0f}) from the training chest X-rays."
        )


def features_of(encoder: Encoder, pixels: list[np.ndarray], batch_size: int = 16) -> np.ndarray:
    """Encoder features [N, 304] of RGB uint8 [S, S, 3] images, in batches."""
    out = []
    for start in range(0, len(pixels), batch_size):
        batch = torch.stack([Encoder.to_tensor(p) for p in pixels[start : start + batch_size]])
        out.append(encoder.features(batch))
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def fit_gate(
    train_pixels: list[np.ndarray],
    val_pixels: list[np.ndarray],
    percentile: float = 99.0,
    margin: float = 1.3,
    encoder: Encoder | None = None,
) -> tuple[ScopeGate, np.ndarray]:
    """Fit the distance on `train_pixels` and set the cutoff at `margin` x the `percentile`
    of the distances of `val_pixels` (RGB uint8 [S, S, 3] in-scope images, see `small_rgb`).
    Returns the gate and the validation distances."""
    encoder = encoder or Encoder()
    distance = Mahalanobis.fit(features_of(encoder, train_pixels))
    val = distance(features_of(encoder, val_pixels))
    cutoff = float(margin * np.percentile(val, percentile))
    card = {
        "cutoff": cutoff,
        "cutoff_rule": f"{margin:g} x the {percentile:g}th percentile of validation distances",
        "encoder": encoder.describe(),
        "n_train": len(train_pixels),
        "n_val": len(val_pixels),
    }
    return ScopeGate(distance, cutoff, encoder, card=card), val


def save_gate(gate: ScopeGate, folder: str | Path) -> Path:
    """Write `folder/scope.safetensors` (float32) and `folder/scope.json`; returns the folder."""
    if gate.distance is None:
        raise ValueError("only a gate with a fitted distance can be saved")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(gate.distance.tensors(), str(folder / WEIGHTS_NAME))
    card = {
        **gate.card,
        "cutoff": gate.cutoff,
        "max_colour_share": gate.max_colour_share,
        "colour_delta": COLOUR_DELTA,
        "min_spread": gate.min_spread,
        "encoder": gate.encoder.describe(),
        "weights_file": WEIGHTS_NAME,
    }
    (folder / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return folder


def load_gate(folder: str | Path) -> ScopeGate:
    """The gate saved in `folder` by `save_gate`."""
    folder = Path(folder)
    card = json.loads((folder / CARD_NAME).read_text())
    weights = card["encoder"]["weights"]
    pretrained = weights == "imagenet"
    seed = 0 if pretrained else int(weights.split("seed ")[1].rstrip(")"))
    return ScopeGate(
        distance=Mahalanobis.from_tensors(load_file(str(folder / WEIGHTS_NAME))),
        cutoff=float(card["cutoff"]),
        encoder=Encoder(pretrained=pretrained, seed=seed),
        max_colour_share=float(card.get("max_colour_share", COLOUR_SHARE)),
        min_spread=float(card.get("min_spread", MIN_SPREAD)),
        card=card,
    )


def gate_for(weights_dir: str | Path) -> ScopeGate:
    """The gate installed in `weights_dir/scope/`, else a gate of cheap checks only (logged)."""
    folder = Path(weights_dir) / "scope"
    if (folder / CARD_NAME).is_file() and (folder / WEIGHTS_NAME).is_file():
        return load_gate(folder)
    log.warning("no fitted input check in %s: only colour and near-uniform images will be refused", folder)
    return ScopeGate()



# --------------------------------------------------------------------------- lung fields

LUNG_FIELD_REASON = "no two lung fields: not a frontal chest X-ray"
# Thresholds chosen on covidx-large, covidx-plus and the lateral views of covidx-mini (and
# those laterals flipped, rotated, cropped): `python -m train.scope lungs`, whose figures
# are in weights/scope/lung_fields.json. All areas are fractions of the image.
FIELD_MIN_FRACTION = 0.005  # a region smaller than this is a speck, not a lung field
FIELD_MIN_RATIO = 0.05  # smaller field / larger: one lung may be mostly whited out
FIELD_MAX_X_OVERLAP = 0.25  # the fields' columns overlap at most this share of the narrower
FIELD_MIN_Y_OVERLAP = 0.6  # and their rows at least this share of the shorter
SPLIT_LOGITS = (1.0, 2.0, 3.0, 4.0)  # stricter lung logits at which merged lungs may part (5 lets a lateral in)
SPLIT_MIN_RATIO = 0.5  # lungs that parted there are alike in size
SPLIT_MAX_AREA = 0.45  # and were one region of at most this area (zoomed laterals are larger)


@dataclass(frozen=True)
class FieldPair:
    """The two largest regions of a lung mask: how many lung-sized regions it has, and,
    when two or more, the smaller's area over the larger's and how their boxes overlap."""

    regions: int
    ratio: float = 0.0
    x_overlap: float = 1.0  # shared columns / the narrower region's width
    y_overlap: float = 0.0  # shared rows / the shorter region's height

    def side_by_side(self, min_ratio: float) -> bool:
        return (
            self.regions >= 2
            and self.ratio >= min_ratio
            and self.x_overlap <= FIELD_MAX_X_OVERLAP
            and self.y_overlap >= FIELD_MIN_Y_OVERLAP
        )


def field_pair(mask: np.ndarray) -> FieldPair:
    """The `FieldPair` of a bool mask [H, W] (8-connected regions)."""
    import cv2

    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    big = [int(i) + 1 for i in np.argsort(-areas, kind="stable") if areas[i] >= FIELD_MIN_FRACTION * mask.size]
    if len(big) < 2:
        return FieldPair(len(big))
    (x0, y0, w0, h0, a0), (x1, y1, w1, h1, a1) = stats[big[0]], stats[big[1]]
    shared_x = max(0, min(x0 + w0, x1 + w1) - max(x0, x1))
    shared_y = max(0, min(y0 + h0, y1 + h1) - max(y0, y1))
    return FieldPair(len(big), a1 / a0, shared_x / min(w0, w1), shared_y / min(h0, h1))


def field_reason(logits: np.ndarray) -> str | None:
    """None when lung logits (float [S, S], > 0 is lung) show two lung fields, else why not.

    Two lung fields: the mask's two largest regions (each at least `FIELD_MIN_FRACTION`
    of the image, the smaller at least `FIELD_MIN_RATIO` of the larger) lie side by side:
    their columns barely overlap, their rows mostly do. Lungs that the mask joins across
    the mediastinum count too, when the joined region (at most `SPLIT_MAX_AREA`) parts into
    two side-by-side fields alike in size (`SPLIT_MIN_RATIO`) at a stricter logit in
    `SPLIT_LOGITS`: the mediastinum is less lung-like than either lung. A lateral view
    shows one lung field (both lungs overlap), as does a film of another body part, or none.
    Looser than `covidtl.lungs.check_mask` (no total-area band, any size ratio over 0.05),
    so that frontal films with a whited-out lung stay in scope.
    """
    mask = logits > 0
    pair = field_pair(mask)
    if pair.side_by_side(FIELD_MIN_RATIO):
        return None
    if pair.regions == 1 and mask.mean() <= SPLIT_MAX_AREA:
        for level in SPLIT_LOGITS:
            if field_pair(logits > level).side_by_side(SPLIT_MIN_RATIO):
                return None
    if pair.regions < 2:
        return f"{LUNG_FIELD_REASON} ({pair.regions} lung-sized component{'' if pair.regions == 1 else 's'})"
    if pair.ratio < FIELD_MIN_RATIO:
        return f"{LUNG_FIELD_REASON} (the second lung-sized component is {pair.ratio:.2f} of the first's area)"
    return f"{LUNG_FIELD_REASON} (the two largest components are not side by side)"


def lung_field_reason(lung_crop: LungCrop) -> str | None:
    """None when the lung model found two plausible lung fields in the film of
    `lung_crop` (from `covidtl.lungs.crop_to_lungs` or `locate_lungs`), else the reason it
    is not a frontal chest X-ray, e.g. "no two lung fields: not a frontal chest X-ray
    (1 lung-sized component)". See `field_reason` for the rule."""
    if lung_crop.logits is None:
        raise ValueError(
            "this LungCrop carries no lung logits; make it with covidtl.lungs.crop_to_lungs or locate_lungs"
        )
    return field_reason(lung_crop.logits)
