"""Lung fields: a small segmentation network, mask checks, the lung crop and outlines.

The network is a light U-Net: efficientnet_lite0's stem and blocks 0-4 (ImageNet
weights, strides 2-16) as the encoder, three small upsampling stages that take the
encoder's skip features, and a one-channel head. It sees the whole film squashed to
`LUNG_INPUT_SIZE` x `LUNG_INPUT_SIZE` grey pixels (repeated to three channels, scaled
to [-1, 1] like efficientnet_lite0) and returns lung logits at that size; `segment`
brings them back to the image's own size.

Shipped like the classifiers: `weights/<name>.safetensors` plus a JSON card, whose
``task`` is ``"lung_segmentation"`` so that classifier listings leave it out.

A predicted mask is *plausible* when it holds two lung-sized components (one per lung)
whose total area is in a chest film's range. The lung crop (`crop_to_lungs`) cuts an
image to the lungs' bounding box plus a margin, and keeps the image whole when the mask
is implausible: a crop to a wrong box would hide the chest from the classifier.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

log = logging.getLogger(__name__)

LUNG_TASK = "lung_segmentation"
LUNG_ARCHITECTURE = "lite0_unet"
LUNG_MODEL_NAME = "lungs_lite0_unet"
LUNG_INPUT_SIZE = 192
LUNG_MEAN = 0.5  # efficientnet_lite0's normalization, one value for the grey channel
LUNG_STD = 0.5
PREPROCESSING = (
    "decode as 8-bit grey (covidtl.images.load_image grey=True, then convert('L')); resize the "
    f"whole image to {LUNG_INPUT_SIZE}x{LUNG_INPUT_SIZE} with PIL bilinear (aspect not kept); "
    f"scale to [0, 1], normalize with mean {LUNG_MEAN} and std {LUNG_STD}, repeat to 3 channels"
)

# Plausibility, as fractions of the image area. In the 408 ground-truth masks of
# lung-masks each lung covers 4.5-33 % (1st percentile 9 %) and both lungs 9-62 %
# (1st-99th percentile 20-57 %); 407 of them pass `check_mask`.
MIN_LUNG_FRACTION = 0.02  # a component smaller than this is noise, not a lung
MIN_TOTAL_FRACTION = 0.06
MAX_TOTAL_FRACTION = 0.70
MIN_SIZE_RATIO = 0.2  # smaller lung / larger lung
CROP_MARGIN = 0.10  # of the box's width/height, added on each side


# --- the network --------------------------------------------------------------------


def _up_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class LungUNet(nn.Module):
    """Input: float [B, 3, S, S] (S divisible by 16), normalized as `PREPROCESSING`
    says; output: lung logits [B, 1, S, S]."""

    def __init__(self, pretrained: bool = False) -> None:
        super().__init__()
        from covidtl.models import get_spec

        lite0 = get_spec("efficientnet_lite0").build(pretrained)
        self.conv_stem, self.bn1 = lite0.conv_stem, lite0.bn1
        self.blocks = nn.ModuleList(lite0.blocks[:5])  # strides 2, 4, 8, 16, 16
        self.up3 = _up_stage(112 + 40, 32)  # 1/16 -> 1/8
        self.up2 = _up_stage(32 + 24, 24)  # 1/8 -> 1/4
        self.up1 = _up_stage(24 + 16, 16)  # 1/4 -> 1/2
        self.head = nn.Conv2d(16, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = self.bn1(self.conv_stem(x))
        skips = []
        for block in self.blocks:
            x = block(x)
            skips.append(x)
        s2, s4, s8 = skips[0], skips[1], skips[2]
        x = skips[4]
        for up, skip in ((self.up3, s8), (self.up2, s4), (self.up1, s2)):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = up(torch.cat([x, skip], dim=1))
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False)


def create_lung_model(pretrained: bool = False) -> LungUNet:
    """A `LungUNet`; `pretrained` loads efficientnet_lite0's ImageNet encoder (offline)."""
    return LungUNet(pretrained=pretrained)


# --- preprocessing and prediction ---------------------------------------------------


def to_grey(image: Image.Image) -> Image.Image:
    return image if image.mode == "L" else image.convert("L")


def lung_input(images: Sequence[Image.Image], size: int = LUNG_INPUT_SIZE) -> torch.Tensor:
    """float [B, 3, size, size]: the network's input for PIL images of any size and mode."""
    arrays = [np.asarray(to_grey(im).resize((size, size), Image.BILINEAR), dtype=np.float32) for im in images]
    x = torch.from_numpy(np.stack(arrays))[:, None] / 255.0
    return ((x - LUNG_MEAN) / LUNG_STD).expand(-1, 3, -1, -1).contiguous()


@torch.inference_mode()
def lung_logits(model: nn.Module, image: Image.Image) -> np.ndarray:
    """float32 [S, S] (S = `LUNG_INPUT_SIZE`): the lung logits of `image` squashed to the
    network's input, from `model` in eval mode; > 0 is lung."""
    return model(lung_input([image]))[0, 0].numpy()


@torch.inference_mode()
def mask_from_logits(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool [height, width]: `lung_logits` brought back to the image's own size (bilinear), > 0."""
    full = F.interpolate(torch.from_numpy(logits)[None, None], size=(height, width), mode="bilinear", align_corners=False)
    return (full[0, 0] > 0).numpy()


def segment(model: nn.Module, image: Image.Image) -> np.ndarray:
    """bool [H, W]: the lungs in `image` (H x W its own size), from `model` in eval mode."""
    return mask_from_logits(lung_logits(model, image), image.height, image.width)


# --- mask checks, boxes, outlines ---------------------------------------------------


@dataclass(frozen=True)
class MaskCheck:
    """What `check_mask` found: `reason` is None for a plausible mask."""

    reason: str | None
    lungs: np.ndarray  # bool [H, W]: the two largest lung-sized components (empty if none)

    @property
    def plausible(self) -> bool:
        return self.reason is None


def _components(mask: np.ndarray) -> tuple[np.ndarray, list[int], np.ndarray, np.ndarray]:
    """(label image, component labels sorted by area, largest first, each label's area,
    each label's centroid (x, y)) of a bool mask: one pass over the pixels."""
    import cv2

    count, labels, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas = stats[:, cv2.CC_STAT_AREA]
    order = sorted(range(1, count), key=lambda i: -areas[i])
    return labels, order, areas, centroids


def check_mask(mask: np.ndarray) -> MaskCheck:
    """Is `mask` (bool [H, W]) two lungs? Two components of at least `MIN_LUNG_FRACTION`
    of the image each, no third one that large, the smaller at least `MIN_SIZE_RATIO` of
    the larger, side by side (centroids apart horizontally more than vertically), and
    together `MIN_TOTAL_FRACTION`..`MAX_TOTAL_FRACTION` of the image. Areas and centroids
    come from the labelling pass, so an upload's check costs one pass over its pixels
    (plus one to draw the two lungs)."""
    area = mask.size
    labels, order, areas, centroids = _components(mask)
    sizes = [int(areas[i]) for i in order[:3]]
    big = [s for s in sizes if s >= MIN_LUNG_FRACTION * area]
    if len(big) != 2:
        return MaskCheck(f"{len(big)} lung-sized components, expected 2", np.zeros_like(mask, dtype=bool))
    first, second = order[:2]
    lungs = (labels == first) | (labels == second)
    total = (big[0] + big[1]) / area
    if big[1] < MIN_SIZE_RATIO * big[0]:
        return MaskCheck(f"one lung is {big[1] / big[0]:.2f} of the other's area", lungs)
    if not MIN_TOTAL_FRACTION <= total <= MAX_TOTAL_FRACTION:
        return MaskCheck(f"lungs cover {total:.2f} of the image", lungs)
    (x0, y0), (x1, y1) = centroids[first], centroids[second]
    if abs(x0 - x1) <= abs(y0 - y1):
        return MaskCheck("the two components are not side by side", lungs)
    return MaskCheck(None, lungs)


def lung_box(lungs: np.ndarray, margin: float = CROP_MARGIN) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixel box around the True pixels of `lungs`, widened by
    `margin` of its width and height on each side and clipped to the image."""
    rows, cols = np.any(lungs, axis=1), np.any(lungs, axis=0)
    if not rows.any():
        raise ValueError("lung_box needs a mask with at least one lung pixel")
    top, bottom = np.flatnonzero(rows)[[0, -1]]
    left, right = np.flatnonzero(cols)[[0, -1]]
    dx, dy = margin * (right + 1 - left), margin * (bottom + 1 - top)
    height, width = lungs.shape
    return (
        max(0, math.floor(left - dx)),
        max(0, math.floor(top - dy)),
        min(width, math.ceil(right + 1 + dx)),
        min(height, math.ceil(bottom + 1 + dy)),
    )


def outline(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """bool [H, W]: the boundary pixels of `mask` (inside pixels next to the outside),
    `thickness` pixels wide, for drawing the lungs' outline on an image."""
    import cv2

    mask = mask.astype(np.uint8)
    eroded = cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=thickness, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return (mask > 0) & (eroded == 0)


# --- the crop -----------------------------------------------------------------------


@dataclass(frozen=True)
class LungCrop:
    """`crop_to_lungs`'s result: the image to classify, the box cut (None if kept
    whole), the mask check (its reason says why an image was kept whole), and the lung
    model's logits for the whole image (float32 [S, S] at the network's input size, > 0 is
    lung; None when made without them), which `covidtl.scope.lung_field_reason` reads."""

    image: Image.Image
    box: tuple[int, int, int, int] | None
    check: MaskCheck
    logits: np.ndarray | None = None


def crop_to_lungs(image: Image.Image, model: nn.Module, margin: float = CROP_MARGIN) -> LungCrop:
    """Crop `image` to its lungs' bounding box plus `margin`; keep it whole when the
    predicted mask is implausible. The one function both the image cache build and the
    Predictor call, so that inference sees what training saw."""
    return crop_located(locate_lungs(image, model), margin)


def locate_lungs(image: Image.Image, model: nn.Module) -> LungCrop:
    """`image` kept whole, with its lung mask check (for audits of uncropped models)."""
    logits = lung_logits(model, image)
    return LungCrop(image, None, check_mask(mask_from_logits(logits, image.height, image.width)), logits)


def crop_located(located: LungCrop, margin: float = CROP_MARGIN) -> LungCrop:
    """`crop_to_lungs` of a film whose lungs `locate_lungs` has already found (`located`,
    kept whole): the same crop, without another pass of the lung model."""
    if located.box is not None:
        raise ValueError("crop_located needs a whole film's lungs (locate_lungs), not a crop")
    if not located.check.plausible:
        return located
    box = lung_box(located.check.lungs, margin)
    return LungCrop(located.image.crop(box), box, located.check, located.logits)


def lungs_in_view(lung_crop: LungCrop, input_size: int, crop_fraction: float) -> np.ndarray | None:
    """bool [input_size, input_size]: the lungs of `lung_crop` where the classifier sees
    them (after the crop, if any, then the eval resize and center crop); None when the mask
    is implausible."""
    from covidtl.transforms import eval_geometry

    if not lung_crop.check.plausible:
        return None
    lungs = lung_crop.check.lungs
    if lung_crop.box is not None:
        left, top, right, bottom = lung_crop.box
        lungs = lungs[top:bottom, left:right]
    framed = eval_geometry(input_size, crop_fraction)
    mask = Image.fromarray(lungs.astype(np.uint8) * 255)
    for step in framed:
        mask = step(mask)
    return np.asarray(mask) >= 128


def view_lung_masks(
    paths: Sequence[Path], model: nn.Module, input_size: int, crop_fraction: float, cropped: bool
) -> list[np.ndarray | None]:
    """Each image's lungs where a classifier sees them (see `lungs_in_view`), for the CAM
    audit; `cropped` for models trained on lung crops. None where the mask is implausible."""
    from covidtl.images import load_image

    out = []
    for path in paths:
        image = load_image(path, grey=True)
        found = crop_to_lungs(image, model) if cropped else locate_lungs(image, model)
        out.append(lungs_in_view(found, input_size, crop_fraction))
    return out


OUTLINE_COLOUR = (255, 255, 255)


def draw_outline(image_rgb: np.ndarray, lungs: np.ndarray, colour: tuple[int, int, int] = OUTLINE_COLOUR) -> np.ndarray:
    """uint8 [H, W, 3]: `image_rgb` with the outline of the bool mask `lungs` [H, W] drawn
    in `colour`, two pixels wide (a copy; the input is left as it is)."""
    if lungs.shape != image_rgb.shape[:2]:
        raise ValueError(f"lung mask {lungs.shape} does not match the image {image_rgb.shape[:2]}")
    drawn = image_rgb.copy()
    drawn[outline(lungs, thickness=2)] = colour
    return drawn


class LungOutliner:
    """The lung model, loaded once and shared between threads (a lock serializes its
    forward passes): `covidtl.answer` locates the lungs of a film with it, to check for two
    lung fields and to outline them on the part of the film a classifier sees."""

    def __init__(self, model: nn.Module, sha256: str | None = None) -> None:
        """`sha256`: the checksum of the model's weights (its card's ``weights_sha256``), by
        which a lung-crop classifier trained with the same lung model is recognised."""
        self.model = model.eval()
        self.sha256 = sha256
        self.lock = threading.Lock()

    @classmethod
    def from_folder(cls, weights_dir: str | Path) -> LungOutliner | None:
        """The lung model in `weights_dir` (``lungs_lite0_unet.safetensors``), or None when
        there is none there."""
        path = Path(weights_dir) / f"{LUNG_MODEL_NAME}.safetensors"
        if not path.is_file():
            log.info("no lung model at %s: heatmaps are shown without the lungs' outline", path)
            return None
        model, card = load_lung_model(path)
        return cls(model, card["weights_sha256"])


# --- export and load ----------------------------------------------------------------


def export_lung_model(model: nn.Module, card: dict[str, Any], weights_dir: Path) -> Path:
    """Save `model` as `weights_dir/<card['name']>.safetensors` (fp32) and its card."""
    from covidtl.export import CARD_SUFFIX, WEIGHTS_SUFFIX, atomic_save_tensors, atomic_write_json, sha256_file

    name = card["name"]
    path = Path(weights_dir) / f"{name}{WEIGHTS_SUFFIX}"
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save_tensors(state, path, metadata={"architecture": LUNG_ARCHITECTURE, "name": name})
    card = {
        **card,
        "task": LUNG_TASK,
        "architecture": LUNG_ARCHITECTURE,
        "input_size": LUNG_INPUT_SIZE,
        "mean": [LUNG_MEAN] * 3,
        "std": [LUNG_STD] * 3,
        "preprocessing": PREPROCESSING,
        "weights_file": path.name,
        "weights_sha256": sha256_file(path),
    }
    atomic_write_json(path.with_suffix(CARD_SUFFIX), card)
    return path


def load_lung_model(path: str | Path) -> tuple[LungUNet, dict[str, Any]]:
    """Load a lung model exported by `export_lung_model` (fp32, CPU, eval mode)."""
    import json

    from safetensors.torch import load_file

    from covidtl.export import CARD_SUFFIX, WEIGHTS_SUFFIX, CardError, sha256_file

    path = Path(path)
    if path.suffix == CARD_SUFFIX:
        path = path.with_suffix(WEIGHTS_SUFFIX)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: lung model weights not found; train one with `python -m train.lungs fit`")
    card = json.loads(path.with_suffix(CARD_SUFFIX).read_text())
    if card.get("task") != LUNG_TASK:
        raise CardError(f"{path}: not a lung model card (task {card.get('task')!r}, expected {LUNG_TASK!r})")
    if sha256_file(path) != card.get("weights_sha256"):
        raise CardError(f"{path}: weights do not match the checksum in their card; re-export the lung model")
    model = create_lung_model(pretrained=False)
    model.load_state_dict(load_file(path, device="cpu"))
    return model.eval(), card


def default_lung_weights() -> Path:
    """The shipped lung model: weights/lungs_lite0_unet.safetensors beside covidtl/."""
    return Path(__file__).resolve().parents[1] / "weights" / f"{LUNG_MODEL_NAME}.safetensors"


def card_lung_weights(card: dict[str, Any], given: str | Path | None) -> Path | None:
    """The lung model file a classifier's card needs: `given`, else the shipped one, for a card
    trained on lung crops (``lung_crop``); None for any other card. Which lung model it is, is
    checked where it is used (`covidtl.cache.card_cache`)."""
    if not card.get("lung_crop"):
        return None
    return Path(given) if given is not None else default_lung_weights()


# --- training data and metrics ------------------------------------------------------


def read_split(root: Path, split: str) -> list[str]:
    """Image names (no suffix) of `split` in a lung-masks folder's split.txt."""
    names = []
    for lineno, line in enumerate((Path(root) / "split.txt").read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{root}/split.txt line {lineno}: expected '<name> train|val|test', got {line!r}")
        if parts[1] == split:
            names.append(parts[0])
    if not names:
        raise ValueError(f"{root}/split.txt lists no image in split {split!r}")
    return names


def read_pair(root: Path, name: str) -> tuple[Image.Image, np.ndarray]:
    """(grey image, bool mask [H, W]) of one lung-masks item."""
    from covidtl.images import load_image

    image = to_grey(load_image(Path(root) / "images" / f"{name}.jpg", grey=True))
    mask = np.asarray(Image.open(Path(root) / "masks" / f"{name}.png")) >= 128
    if mask.shape != (image.height, image.width):
        raise ValueError(f"{root}/masks/{name}.png is {mask.shape[::-1]}, its image {image.size}")
    return image, mask


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of two bool masks; 1.0 when both are empty."""
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


def evaluate_masks(model: nn.Module, root: Path, names: Sequence[str]) -> dict[str, Any]:
    """Dice at each image's own size, over `names`: mean, median, min, and how many
    predicted masks `check_mask` calls implausible."""
    model.eval()
    scores, implausible = [], 0
    for name in names:
        image, truth = read_pair(root, name)
        pred = segment(model, image)
        scores.append(dice(pred, truth))
        implausible += not check_mask(pred).plausible
    values = np.array(scores)
    return {
        "images": len(values),
        "dice_mean": float(values.mean()),
        "dice_median": float(np.median(values)),
        "dice_min": float(values.min()),
        "implausible": implausible,
    }


def _preload(root: Path, names: Sequence[str], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = [], []
    for name in names:
        image, mask = read_pair(root, name)
        images.append(lung_input([image], size)[:, :1])
        small = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
        masks.append(torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)[None, None])
    return torch.cat(images), torch.cat(masks)


def _augment(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flip, rotation (+-10 deg), scale (0.85-1.15), shift (+-6 %), and
    brightness/contrast/gamma for a batch x [B, 1, S, S] (normalized) and y [B, 1, S, S]."""
    b = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, generator=generator)

    angle = uniform(-10, 10) * math.pi / 180
    scale = uniform(0.85, 1.15)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, uniform(-0.12, 0.12)], 1), torch.stack([sin * flip, cos, uniform(-0.12, 0.12)], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    y = F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    pixels = (x * LUNG_STD + LUNG_MEAN).clamp(0, 1) ** uniform(0.7, 1.4).view(b, 1, 1, 1)
    pixels = (pixels - 0.5) * uniform(0.75, 1.25).view(b, 1, 1, 1) + 0.5 + uniform(-0.1, 0.1).view(b, 1, 1, 1)
    return (pixels.clamp(0, 1) - LUNG_MEAN) / LUNG_STD, y


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE plus soft Dice (1 - Dice over the batch)."""
    prob = torch.sigmoid(logits)
    soft_dice = (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + (1 - soft_dice)


def fit_lung_model(
    model: LungUNet,
    root: Path,
    train_names: Sequence[str],
    val_names: Sequence[str],
    epochs: int,
    batch_size: int = 8,
    lr: float = 2e-3,
    seed: int = 0,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train `model` in place (AdamW, cosine schedule, BCE + soft Dice) and leave it in
    eval mode with the weights of its best epoch by val Dice. Returns one dict per epoch
    (train loss, val Dice at full resolution)."""
    size = LUNG_INPUT_SIZE
    x_all, y_all = _preload(root, train_names, size)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x_all) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    history, best, best_state = [], -1.0, None
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x_all), generator=generator)
        losses = []
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            x, y = _augment(x_all[idx], y_all[idx], generator)
            loss = _loss(model(x.expand(-1, 3, -1, -1)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        scores = evaluate_masks(model, root, val_names)
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_dice_mean": scores["dice_mean"]}
        history.append(row)
        if on_epoch:
            on_epoch(row)
        if scores["dice_mean"] > best:
            best = scores["dice_mean"]
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return history
