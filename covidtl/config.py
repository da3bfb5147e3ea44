"""Typed run configuration, loaded from a small TOML recipe (one per backbone).

Unknown keys are rejected so a typo never silently falls back to a default. The final
config is written into the model card.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covidtl.models import MODES, get_spec, list_models

# Keys that change only what is exported, not the training: a --resume may change them.
EXPORT_ONLY = ("epochs", "default", "n_boot", "min_sensitivity")
BALANCE = ("none", "loss", "sampler", "sampler_source")
CACHE = ("none", "gray", "rgb")  # "none", or the colour of a covidtl.cache image cache
CROP = ("none", "lungs")  # "lungs": cut each image to its lungs (covidtl.lungs.crop_to_lungs)
# Which epoch's weights a run keeps: "val_auc", the best by validation AUC (early stopping on
# it); "last", the last epoch's (a fixed schedule, for validation sets too small to choose by).
KEEP_EPOCH = ("val_auc", "last")
# How the learning rate moves: "plateau", ReduceLROnPlateau on validation AUC; "cosine", from
# `lr` down to 0 over `epochs` on a half cosine, one step per epoch (fixed: validation not used).
LR_SCHEDULE = ("plateau", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the seed recipes' (Adam 1e-4, wd 1e-4, 50 epochs,
    ReduceLROnPlateau on validation AUC, resize then center crop at 0.9)."""

    name: str
    backbone: str
    mode: str = "finetune"
    pretrained: bool = True
    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 1e-4
    lr_schedule: str = "plateau"  # one of LR_SCHEDULE
    plateau_patience: int = 3
    plateau_factor: float = 0.1
    early_stopping_patience: int = 10
    keep_epoch: str = "val_auc"  # one of KEEP_EPOCH
    crop_fraction: float = 0.9
    hflip: bool = True
    rotation: float = 10.0
    color_jitter: float = 0.1
    crop_scale: float = 1.0  # < 1: random crops of this much of the area or more (training only)
    # intensity augmentation (training only, covidtl.augment): gamma range log(1 + gamma),
    # Gaussian blur probability, Gaussian noise std up to `noise` (on [0, 1] pixels)
    gamma: float = 0.0
    blur: float = 0.0
    noise: float = 0.0
    # probability of showing a training film as another copy would (covidtl.augment.RandomRecode:
    # shrunk with a random filter, JPEG at a random quality, resized back); 0: off
    recode: float = 0.0
    label_smoothing: float = 0.0  # CrossEntropyLoss(label_smoothing=...)
    # > 0: mixup (Zhang et al. 2018) in training: each batch is blended with a shuffled copy
    # of itself, weight lambda ~ Beta(mixup, mixup), and so are the two images' losses.
    mixup: float = 0.0
    # Side of the square the network sees, in pixels; None: the backbone's (covidtl.models).
    # The card records it and the Predictor follows it.
    input_size: int | None = None
    # "loss": class-weighted cross entropy; "sampler": class-balanced sampling;
    # "sampler_source": balanced over (label, source) pairs, against source shortcuts.
    balance: str = "loss"
    # With a balanced sampler ("sampler", "sampler_source"): draw this many films an epoch
    # (with replacement) instead of the training split's size; a CPU budget for large sets.
    samples_per_epoch: int | None = None
    # Site-blind training (covidtl.site_blind), both off at 0. `adversary`: weight of the
    # class-conditional source-adversarial loss, a source head per class on the penultimate
    # features whose gradient is reversed into the backbone (Ganin et al. 2016); `auxiliary`:
    # weight of the within-site pathology target (no finding / other pneumonia / COVID-19,
    # covidtl.findings), learnt from the metadata where a source has several findings.
    adversary: float = 0.0
    auxiliary: float = 0.0
    mean: tuple[float, ...] | None = None  # None: the backbone's; or e.g. COVIDx stats
    std: tuple[float, ...] | None = None
    min_sensitivity: float = 0.90  # operating point chosen on validation
    n_boot: int = 1000
    seed: int = 0
    num_workers: int = 2
    # "gray"/"rgb": decode each image once into a pre-resized, memory-mapped cache
    # (covidtl.cache) and train and evaluate from it; "none" decodes every epoch.
    cache: str = "none"
    # "lungs": before the usual framing, crop each image to its lungs' bounding box plus a
    # margin (covidtl.lungs); done once per image in the cache build, so it needs a cache.
    crop: str = "none"
    # True: histogram-equalize every framed film, in training and at inference alike
    # (covidtl.transforms.Equalize); the card records it and the Predictor follows it.
    equalize: bool = False
    # N: every film seen at the detail of an N x N copy of it (covidtl.harmonize), as
    # covidx-large's bimcv and rsna films are at 224; done in the cache build and by the
    # Predictor, so it needs a cache. None: each film at its own resolution.
    film_size: int | None = None
    # Q (with film_size): every film is first made into a film_size x film_size JPEG copy at
    # quality Q (covidtl.harmonize.film_copy), as covidx-large's bimcv and rsna films are; None: no copy.
    film_jpeg: int | None = None
    # Only these sources train and select the model (train and validation splits), e.g.
    # ["cohen", "fig1", "nih"] for adult films only; None: every source. The test split is
    # scored whole, so the card also shows the sources left out.
    train_sources: tuple[str, ...] | None = None
    amp: bool = True  # CUDA only
    channels_last: bool = True  # CUDA only
    weights_dtype: str = "float32"
    # Export marks, not training settings (a resumed run may change them): `default` marks
    # the card of the model the app uses when none is named (one shipped model only).
    default: bool = False

    def __post_init__(self) -> None:
        if self.backbone not in list_models():
            raise ValueError(f"unknown backbone {self.backbone!r}; choose from {list_models()}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose from {list(MODES)}")
        if self.balance not in BALANCE:
            raise ValueError(f"unknown balance {self.balance!r}; choose from {list(BALANCE)}")
        if self.cache not in CACHE:
            raise ValueError(f"unknown cache {self.cache!r}; choose from {list(CACHE)}")
        if self.keep_epoch not in KEEP_EPOCH:
            raise ValueError(f"unknown keep_epoch {self.keep_epoch!r}; choose from {list(KEEP_EPOCH)}")
        if self.lr_schedule not in LR_SCHEDULE:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose from {list(LR_SCHEDULE)}")
        if self.crop not in CROP:
            raise ValueError(f"unknown crop {self.crop!r}; choose from {list(CROP)}")
        if self.crop == "lungs" and self.cache == "none":
            raise ValueError('crop = "lungs" is computed in the image cache build: set cache = "gray" or "rgb"')
        if self.film_size is not None and self.cache == "none":
            raise ValueError('film_size is applied in the image cache build: set cache = "gray" or "rgb"')
        if self.film_size is not None and self.film_size < 32:
            raise ValueError(f"film_size must be 32 px or more (or left out for each film's own), not {self.film_size}")
        if self.film_jpeg is not None and self.film_size is None:
            raise ValueError("film_jpeg makes each film into a film_size copy: set film_size too")
        if self.film_jpeg is not None and not 1 <= self.film_jpeg <= 95:
            raise ValueError(f"film_jpeg is a JPEG quality, 1 to 95, not {self.film_jpeg}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.weights_dtype not in ("float32", "float16"):
            raise ValueError(f"weights_dtype must be 'float32' or 'float16', not {self.weights_dtype!r}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], not {self.crop_fraction}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), not {self.label_smoothing}")
        if not 0 <= self.recode <= 1:
            raise ValueError(f"recode is a probability in [0, 1], not {self.recode}")
        if self.mixup < 0:
            raise ValueError(f"mixup is the Beta distribution's parameter: 0 (off) or positive, not {self.mixup}")
        if self.input_size is not None and self.input_size < 32:
            raise ValueError(f"input_size must be 32 px or more (or left out for the backbone's), not {self.input_size}")
        if self.train_sources is not None and not self.train_sources:
            raise ValueError("train_sources is empty: name the sources to train on, or leave it out for all")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be positive (or left out for the split's size), not {self.samples_per_epoch}")
        if self.samples_per_epoch is not None and self.balance not in ("sampler", "sampler_source"):
            raise ValueError('samples_per_epoch draws from a balanced sampler: set balance = "sampler" or "sampler_source"')
        if self.adversary < 0 or self.auxiliary < 0:
            raise ValueError(f"adversary and auxiliary are loss weights: 0 (off) or positive, not {self.adversary}, {self.auxiliary}")
        if self.mixup > 0 and (self.adversary > 0 or self.auxiliary > 0):
            raise ValueError("mixup blends two films' labels, which the site-blind heads cannot read: use one or the other")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")

    def image_size(self) -> int:
        """The side of the square the network sees: the recipe's `input_size`, else the backbone's."""
        return self.input_size if self.input_size is not None else get_spec(self.backbone).input_size

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The normalization the network sees: the recipe's `mean` and `std`, else the backbone's."""
        if self.mean is not None:
            return self.mean, self.std
        spec = get_spec(self.backbone)
        return spec.mean, spec.std

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def defaults() -> dict[str, Any]:
        """Every field that has a default, with it (what an older config without it meant)."""
        return {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


def config_from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a TrainConfig, rejecting unknown keys (naming them and the known ones)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}; known keys are {sorted(known)}")
    values = dict(values)
    for key in ("mean", "std"):
        if values.get(key) is not None:
            values[key] = tuple(float(v) for v in values[key])
    if values.get("train_sources") is not None:
        values["train_sources"] = tuple(str(s) for s in values["train_sources"])
    return TrainConfig(**values)


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a TOML recipe and apply `overrides` (None values are ignored)."""
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"recipe {path} not found; recipes live in train/recipes/") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: invalid TOML ({err})") from None
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return config_from_dict(values, source=str(path))


def replace(config: TrainConfig, **changes: Any) -> TrainConfig:
    return dataclasses.replace(config, **changes)

