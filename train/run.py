"""`python -m train`: fit one recipe, pick the operating threshold on validation, score
the test split, export weights + card + plots. Readable top to bottom: setup, data,
model, the epoch loop, final evaluation, export."""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import platform
import random
import sys
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

import covidtl
from covidtl import calibration, metrics, plots
from covidtl.audit import cam_audit
from covidtl.cache import ImageCache, default_cache_dir, ensure_cache
from covidtl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from covidtl.config import CACHE, CROP, EXPORT_ONLY, TrainConfig, load_recipe
from covidtl.data import class_weights
from covidtl.findings import FINDINGS, METADATA, UNKNOWN, finding_targets
from covidtl.engine import predict_logits, predict_scores, train_one_epoch
from covidtl.classes import CLASSES
from covidtl.evaluation import report_with_plots
from covidtl.export import CardError, atomic_save_tensors, atomic_write_json, export_model, sha256_file, unwrap
from covidtl.labels import LabelFileError, parse_label_file, split_paths
from covidtl.loaders import eval_loader, train_loader
from covidtl.locate import KAGGLE_HANDLE, DatasetUnavailableError, resolve_dataset_root
from covidtl.models import PretrainedWeightsUnavailable, count_parameters, create_model, get_spec, list_models
from covidtl.provenance import shortcut_warnings, source_table, split_summary
from covidtl.scan import CorruptImagesError, MissingImagesError, check_images, scan_images, skip_corrupt
from covidtl.site_audit import audit_model
from covidtl.site_blind import SiteBlindHeads, feature_width, source_targets
from covidtl.stats import compute_stats
from train.cli import report_errors, setup_logging

log = logging.getLogger("train")

# The shipped recipes, inside the installed `train` package as in the checkout.
RECIPES = Path(__file__).resolve().parent / "recipes"

INTENDED_USE = (
    "Research and teaching demonstration of transfer learning and Grad-CAM on chest X-rays. "
    "Not a medical device; not for diagnosis, triage or any clinical decision."
)
# These are true of every model this command produces, whatever the data.
GENERAL_LIMITATIONS = [
    "Not validated on an external hospital's images: expect lower performance on a new site, "
    "scanner or population; validate with `python -m train.evaluate` on your own data first.",
    "Metrics come from a small test split; read the 95 % bootstrap intervals, not the point values alone.",
    "A binary COVID-19 positive/negative label: other findings are not detected or reported.",
]


def find_recipe(path: Path) -> Path:
    """`path` when it exists, else the shipped recipe it names, so that `--recipe plus/resnet18_plus`,
    `plus/resnet18_plus.toml` or `train/recipes/plus/resnet18_plus.toml` work from any folder once the
    package is installed. An unknown name comes back unchanged (loading it says what to do)."""
    if path.exists():
        return path
    name = path.as_posix().removeprefix("train/recipes/")
    for candidate in (RECIPES / name, RECIPES / f"{name}.toml"):
        if candidate.is_file():
            return candidate
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    prog = "covidtl-train" if Path(sys.argv[0]).name == "covidtl-train" else "python -m train"
    p = argparse.ArgumentParser(prog=prog, description=__doc__, allow_abbrev=False)
    p.add_argument("--recipe", type=Path, required=True,
                   help="TOML recipe: a file, or a shipped one by name (resnet18, plus/resnet18_plus, "
                        "train/recipes/plus/resnet18_plus.toml) from any folder")
    p.add_argument("--data", type=Path, help="local folder in the COVIDx layout; omit to download with kagglehub")
    p.add_argument("--kaggle-handle", default=KAGGLE_HANDLE)
    p.add_argument("--kaggle-version", type=int, help="pin the Kaggle dataset version")
    p.add_argument("--weights-dir", type=Path, default=Path("weights"), help="where the exported model goes")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="checkpoints and per-epoch logs")
    p.add_argument("--name", help="override the recipe's model name")
    p.add_argument("--backbone", choices=list_models(), help="override the recipe's backbone")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="ImageNet initialisation (--no-pretrained trains from scratch)")
    p.add_argument("--stats", choices=("recipe", "compute"), default="recipe",
                   help="normalization: the recipe's/backbone's mean and std, or compute them on the train split")
    p.add_argument("--cache", choices=CACHE,
                   help="override the recipe's image cache: decode every image once into a pre-resized memory-mapped "
                        "cache, grey (X-rays; a third of the bytes) or rgb, or none (decode every epoch)")
    p.add_argument("--crop", choices=CROP,
                   help="override the recipe's crop: 'lungs' cuts each image to its lungs (needs a cache), 'none' keeps it whole")
    p.add_argument("--lung-weights", type=Path, help="lung model for --crop lungs (default: the shipped "
                   "weights/lungs_lite0_unet.safetensors)")
    p.add_argument("--cache-dir", type=Path, help=f"where image caches live (default {default_cache_dir()}, $COVIDTL_CACHE)")
    p.add_argument("--on-missing", choices=("error", "skip"), default="error", help="images listed but absent")
    p.add_argument("--on-corrupt", choices=("error", "skip"), default="error", help="images that do not decode")
    p.add_argument("--resume", action="store_true", help="continue from runs/<name>/last after the last completed epoch")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    return p.parse_args(argv)


# --- setup -------------------------------------------------------------------------


def setup_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun, joins the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device_arg is None or device_arg.startswith("cuda"))
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        if not use_cuda:
            # Processes on one machine share its cores; oversubscribing them is slower.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    rank = dist.get_rank() if world_size > 1 else 0
    if use_cuda:
        device = torch.device(device_arg if device_arg and world_size == 1 else f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_arg or "cpu")
    return rank, world_size, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def load_splits(root: Path, on_missing: str, on_corrupt: str, scan: bool = True) -> dict[str, tuple[list, Path]]:
    """{split: (records, image_dir)} for train, val and (if present) test. Missing images are
    found here, before any training starts, and with `scan` corrupt ones too. Runs with an
    image cache pass scan=False: the cache build decodes every image and reports corrupt
    ones the same way (see `prepare_caches`), and a cache still valid was built from them."""
    splits = {}
    for split in ("train", "val", "test"):
        if split == "test" and not (root / "test.txt").is_file():
            continue  # a folder may hold only train and val
        label_file, image_dir = split_paths(root, split)
        records = check_images(parse_label_file(label_file), image_dir, on_missing=on_missing)
        if scan:
            records = scan_images(records, image_dir, on_corrupt=on_corrupt)
        splits[split] = (records, image_dir)
    return splits


def keep_sources(records: list, sources: tuple[str, ...] | None, split: str) -> list:
    """The records of `sources` (a recipe's ``train_sources``; None: all of them)."""
    if sources is None:
        return records
    present = {r.source for r in records}
    missing = sorted(set(sources) - present)
    if missing:
        raise ValueError(f"train_sources names {missing}, which the {split} split does not have; it has {sorted(present)}")
    return [r for r in records if r.source in sources]


def prepare_caches(config: TrainConfig, root: Path, splits, input_size: int, cache_dir: Path | None,
                   on_corrupt: str, show: bool, lung_weights: Path | None = None) -> tuple[dict, dict[str, ImageCache]]:
    """(splits, {split: image cache}) when the recipe asks for a cache: built on the first run,
    reused after (rebuilt when a label file or an image changes); concurrent ranks build each
    one once. The build decodes every image, so it is the corrupt-image check of cached runs,
    stricter than the quick scan (it also finds a PNG whose pixel data is damaged under
    intact checksums): with `on_corrupt` "skip" those records leave the split and the cache
    is built without them. With `lung_weights` (crop = "lungs") each image is cut to its lungs
    in the build; the log counts, per split, the images kept whole (implausible lung mask)."""
    if config.cache == "none":
        return splits, {}
    splits, caches = dict(splits), {}
    for split, (records, image_dir) in splits.items():
        label_file = split_paths(root, split)[0]
        bar = lambda it, split=split: tqdm(it, desc=f"caching {split}", leave=False, disable=not show)
        build = partial(ensure_cache, image_dir=image_dir, label_file=label_file, cache_dir=cache_dir,
                        input_size=input_size, crop_fraction=config.crop_fraction, color=config.cache, progress=bar,
                        lung_weights=lung_weights, film_size=config.film_size, film_jpeg=config.film_jpeg)
        try:
            caches[split] = build(records)
        except CorruptImagesError as err:
            if on_corrupt != "skip":
                raise
            records = skip_corrupt(records, err.reasons, image_dir)
            splits[split] = (records, image_dir)
            caches[split] = build(records)
        if lung_weights is not None:
            log.info("lung crop, %s: %d of %d images kept whole (implausible lung mask)", split,
                     len(caches[split].kept_whole), len(records))
    return splits, caches


def scoring_loader(records, image_dir: Path, split: str, caches: dict, config: TrainConfig, mean, std):
    """The evaluation loader of `records` (of `split`; from its cache in `caches`, if any), in
    record order and framed as the recipe trains: the validation and test loaders of
    `python -m train`, and every loader `python -m train.loso` scores with."""
    return eval_loader(records, image_dir, config.image_size(), mean, std, config.crop_fraction,
                       batch_size=config.batch_size * 2, num_workers=config.num_workers, cache=caches.get(split),
                       equalize=config.equalize)


def lung_weights_for(config: TrainConfig, args: argparse.Namespace) -> Path | None:
    """The lung model file of a crop = "lungs" run (None otherwise); checked before any data work."""
    if config.crop != "lungs":
        return None
    from covidtl.lungs import default_lung_weights, load_lung_model

    path = args.lung_weights or default_lung_weights()
    load_lung_model(path)  # a missing or damaged lung model fails now, with its path
    return path


def lung_crop_card(lung_weights: Path, caches: dict[str, ImageCache]) -> dict:
    """The card's record of a lung-cropped run: which lung model, and the images kept whole."""
    from covidtl.lungs import CROP_MARGIN, load_lung_model

    lung_card = load_lung_model(lung_weights)[1]
    return {
        "lung_model": lung_card["name"],
        "lung_model_sha256": lung_card["weights_sha256"],
        "margin": CROP_MARGIN,
        "kept_whole": {split: len(cache.kept_whole) for split, cache in caches.items()},
        "images": {split: len(cache) for split, cache in caches.items()},
        "rule": "crop to the lungs' bounding box plus the margin (of its width/height, each side) before the resize "
                "and center crop; an image whose predicted lung mask is implausible (covidtl.lungs.check_mask) is "
                "kept whole",
    }


def audit_lung_masks(config: TrainConfig, args: argparse.Namespace, split, input_size: int,
                     lung_weights: Path | None) -> list | None:
    """Each evaluation image's own lung mask in the model's input frame, for the Grad-CAM audit:
    from the crop's lung model, else `--lung-weights` or the shipped one; None (the ellipse
    prior) when there is no lung model."""
    from covidtl.lungs import default_lung_weights, load_lung_model, view_lung_masks

    path = lung_weights or args.lung_weights or default_lung_weights()
    if not Path(path).is_file():
        log.info("no lung model at %s: the Grad-CAM audit uses the two-ellipse lung prior", path)
        return None
    records, image_dir = split
    lung_model = load_lung_model(path)[0]
    masks = view_lung_masks([image_dir / r.filename for r in records], lung_model, input_size, config.crop_fraction,
                            cropped=config.crop == "lungs")
    log.info("Grad-CAM audit: own lung masks for %d of %d images (the rest: ellipse prior)",
             sum(m is not None for m in masks), len(masks))
    return masks


def normalization(config: TrainConfig, args: argparse.Namespace, train_split, input_size: int, show: bool,
                  cache: ImageCache | None = None):
    spec = get_spec(config.backbone)
    if args.stats == "compute":
        if config.equalize:
            raise ValueError("--stats compute measures the films before equalization, but this recipe equalizes "
                             "them (equalize = true), which leaves every film with a flat histogram; use the "
                             "backbone's mean and std (leave out --stats) or set mean and std in the recipe")
        records, image_dir = train_split
        bar = lambda it: tqdm(it, desc="normalization stats", leave=False, disable=not show)  # noqa: E731
        mean, std = compute_stats(records, image_dir, size=input_size, num_workers=config.num_workers, progress=bar,
                                  crop_fraction=config.crop_fraction, cache=cache)
        return mean, std, "computed on the train split (python -m train --stats compute)"
    if config.mean is not None:
        return config.mean, config.std, "from the recipe"
    return spec.mean, spec.std, f"the {config.backbone} backbone's default"


def write_history(history: list[dict], run_dir: Path) -> None:
    atomic_write_json(run_dir / "history.json", metrics.nan_to_none(history))
    with open(run_dir / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def package_versions() -> dict[str, str]:
    import timm
    import torchvision

    return {
        "covidtl": covidtl.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
    }


def hardware(device: torch.device) -> str:
    """What the run ran on, for the card: the GPU's name, or the CPU core count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({torch.cuda.device_count()} visible)"
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


# Options naming folders of the machine that trained: left out of the card's command.
MACHINE_FOLDER_OPTIONS = ("--cache-dir", "--runs-dir", "--weights-dir")


def shipped_command(argv: list[str], prog: str = "python -m train") -> str:
    """The training command for the card: without this machine's folders (cache, runs,
    weights), with any other absolute path cut to its last part (STYLE rule 13), and
    without --resume (a resumed run reproduces the uninterrupted one)."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        option = token.split("=", 1)[0]
        if option == "--resume":
            continue
        if option in MACHINE_FOLDER_OPTIONS:
            skip = "=" not in token
            continue
        if os.path.isabs(token.split("=", 1)[-1]):
            head, _, value = token.rpartition("=")
            token = (head + "=" if head else "") + ".../" + Path(value).name
        kept.append(token)
    return " ".join([prog, *kept])


def finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def site_blind_setup(config: TrainConfig, records, root: Path, model: nn.Module,
                     device: torch.device) -> tuple[np.ndarray | None, SiteBlindHeads | None]:
    """(targets int64 [N, 2], heads) of a site-blind recipe's training `records` (adversary or
    auxiliary > 0; covidtl.site_blind), or (None, None): the source within each class, and the
    finding from `root`'s metadata.csv and file names (covidtl.findings)."""
    if config.adversary == 0 and config.auxiliary == 0:
        return None, None
    sources, by_class = source_targets(records)
    findings = finding_targets(records, root)
    if config.adversary > 0 and not by_class:
        raise ValueError("adversary > 0 needs a class with films from two or more sources; every class here has one")
    if config.auxiliary > 0 and len(set(findings.tolist()) - {UNKNOWN}) < 2:
        raise ValueError(f"auxiliary > 0 needs films of two or more findings; {root / METADATA} and the file names "
                         "give fewer (see covidtl.findings)")
    log.info("site-blind: source heads for %s; findings known for %d of %d films (%s)",
             {CLASSES[c]: s for c, s in by_class.items()}, int((findings != UNKNOWN).sum()), len(records),
             ", ".join(f"{name} {int((findings == i).sum())}" for i, name in enumerate(FINDINGS)))
    heads = SiteBlindHeads(feature_width(model, get_spec(config.backbone).head), by_class, config.adversary,
                           config.auxiliary)
    return np.stack([sources, findings], axis=1), heads.to(device)


def make_criterion(config: TrainConfig, train_records, device: torch.device) -> nn.Module:
    """Cross entropy, class-weighted when the recipe balances by loss, with the recipe's label smoothing."""
    weight = class_weights(np.array([r.label for r in train_records])).to(device) if config.balance == "loss" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    """The recipe's `lr_schedule`: ReduceLROnPlateau on validation AUC ("plateau", stepped with
    it), or a half cosine from `lr` towards 0 over `epochs` ("cosine", stepped once an epoch;
    it reads the epoch budget when it steps, so a resume with more epochs stretches it)."""
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda done: 0.5 * (1 + math.cos(math.pi * min(done, config.epochs) / config.epochs)))
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=config.plateau_factor,
                                                      patience=config.plateau_patience)


def fit(model: nn.Module, loader, sampler, val_loader, criterion: nn.Module, config: TrainConfig,
        device: torch.device, run_dir: Path, resume: bool = False, main_process: bool = True, show: bool = False,
        use_amp: bool = False, channels_last: bool = False,
        site_blind: SiteBlindHeads | None = None) -> tuple[list[dict], int]:
    """The epoch loop: Adam, the recipe's learning-rate schedule, early stopping after
    `config.early_stopping_patience` epochs without a gain. Keeps the best epoch's weights in
    `run_dir/best.safetensors` (with `keep_epoch = "last"`, every epoch counts as the best, so
    the last is kept and nothing stops early) and a resumable checkpoint in `run_dir/last`
    (main process).
    Returns (history: one dict per epoch, best epoch, 1-based); the model ends with the last
    epoch's weights. Used by `python -m train` and by `python -m train.loso`. `site_blind`: the
    training-only heads of a site-blind recipe (`site_blind_setup`), trained with the model."""
    if resume and site_blind is not None:
        raise CheckpointError("a site-blind run (adversary or auxiliary > 0) cannot resume: its training-only heads "
                              "are not in the checkpoint; start it again without --resume")
    params = [p for p in model.parameters() if p.requires_grad]
    params += list(site_blind.parameters()) if site_blind is not None else []
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = make_scheduler(optimizer, config)
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    start_epoch, best_auc, best_epoch, stale = 0, -math.inf, 0, 0
    if resume:
        state = load_checkpoint(run_dir / "last", model, optimizer)
        saved = TrainConfig.defaults() | state["config"]  # keys added since the checkpoint: their defaults
        # JSON gave back tuples (mean, std) as lists
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
        changed = sorted(k for k, v in config.to_dict().items() if k not in EXPORT_ONLY and saved.get(k) != v)
        if changed:  # only the epoch budget and export marks may change on resume
            raise CheckpointError(f"{run_dir}/last was made with other settings ({changed}); resume with the same recipe and flags")
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history, start_epoch = state["history"], state["epoch"] + 1
        best_auc, best_epoch, stale = state["best_auc"], state["best_epoch"], state["stale"]
        log.info("resuming %s after epoch %d (best val AUC %.4f at epoch %d)", config.name, start_epoch, best_auc, best_epoch)

    for epoch in range(start_epoch, config.epochs):
        torch.manual_seed(config.seed + epoch)  # with EpochSampler: identical epochs after --resume
        sampler.set_epoch(epoch)
        started = time.perf_counter()
        bar = lambda it: tqdm(it, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=not show)  # noqa: E731
        row = {"epoch": epoch + 1}
        row |= train_one_epoch(model, loader, optimizer, criterion, device, scaler, channels_last, progress=bar,
                               mixup=config.mixup, site_blind=site_blind, head=get_spec(config.backbone).head)
        scores, labels, val_loss = predict_scores(model, val_loader, device, criterion, use_amp, channels_last)
        val = metrics.binary_metrics(labels, scores, threshold=0.5)
        if config.lr_schedule == "plateau":
            scheduler.step(val["auc"])
        else:
            scheduler.step()
        row |= {"val_loss": val_loss} | {f"val_{k}": v for k, v in val.items()}
        row |= {"lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started}
        history.append(row)
        improved = val["auc"] > best_auc or config.keep_epoch == "last"
        if improved:
            best_auc, best_epoch, stale = val["auc"], epoch + 1, 0
        else:
            stale += 1
        if main_process:
            if improved:
                atomic_save_tensors(unwrap(model).state_dict(), run_dir / "best.safetensors")
            write_history(history, run_dir)
            save_checkpoint(run_dir / "last", model, optimizer, {
                "epoch": epoch, "history": history, "config": config.to_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "best_auc": best_auc, "best_epoch": best_epoch, "stale": stale,
            })
        log.info("epoch %d/%d  train loss %.4f  val loss %.4f  val AUC %.4f  sens %.3f spec %.3f @0.5  %.0fs%s",
                 epoch + 1, config.epochs, row["train_loss"], val_loss, val["auc"], val["sensitivity"],
                 val["specificity"], row["seconds"], "  *best" if improved and config.keep_epoch == "val_auc" else "")
        if stale >= config.early_stopping_patience:
            log.info("early stopping: no val AUC gain in %d epochs", stale)
            break
    return history, best_epoch


# --- the run -----------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    overrides = {
        "name": args.name, "backbone": args.backbone, "epochs": args.epochs, "batch_size": args.batch_size,
        "num_workers": args.num_workers, "lr": args.lr, "seed": args.seed, "pretrained": args.pretrained,
        "cache": args.cache, "crop": args.crop,
    }
    config = load_recipe(find_recipe(args.recipe), overrides)
    rank, world_size, device = setup_distributed(args.device)
    main_process = rank == 0
    show = args.progress and main_process
    seed_everything(config.seed)
    on_cuda = device.type == "cuda"

    # Model first: a missing pretrained file is reported in seconds, before any data work.
    model = create_model(config.backbone, pretrained=config.pretrained, mode=config.mode)
    trainable, total = count_parameters(model)
    log.info("%s (%s, mode %s): %s of %s parameters trainable", config.name, config.backbone, config.mode,
             f"{trainable:,}", f"{total:,}")

    root = resolve_dataset_root(args.data, handle=args.kaggle_handle, version=args.kaggle_version)
    splits = load_splits(root, args.on_missing, args.on_corrupt, scan=config.cache == "none")
    lung_weights = lung_weights_for(config, args)
    splits, caches = prepare_caches(config, root, splits, config.image_size(), args.cache_dir, args.on_corrupt, show,
                                    lung_weights)
    for split in ("train", "val"):  # train and select on the recipe's sources; test is scored whole
        splits[split] = (keep_sources(splits[split][0], config.train_sources, split), splits[split][1])
    (train_records, train_dir), val_records = splits["train"], splits["val"][0]
    val_labels = np.array([r.label for r in val_records])
    if len(set(val_labels.tolist())) < 2:
        raise ValueError("the validation split needs both positive and negative images to select a model")
    mean, std, norm_source = normalization(config, args, splits["train"], config.image_size(), show, caches.get("train"))
    log.info("data %s: %s; mean %s std %s (%s)", root,
             ", ".join(f"{s} {len(r)}" for s, (r, _) in splits.items()),
             [round(m, 4) for m in mean], [round(s, 4) for s in std], norm_source)

    targets, site_blind = site_blind_setup(config, train_records, root, model, device)
    loader, sampler = train_loader(train_records, train_dir, config, config.image_size(), mean, std, rank, world_size,
                                   cache=caches.get("train"), targets=targets)
    loaders = {  # val and test: scored in record order (train is scored by training itself)
        split: scoring_loader(records, image_dir, split, caches, config, mean, std)
        for split, (records, image_dir) in splits.items() if split != "train"
    }

    use_amp = config.amp and on_cuda
    channels_last = config.channels_last and on_cuda
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.to(device)
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if on_cuda else None)
    criterion = make_criterion(config, train_records, device)
    run_dir = args.runs_dir / config.name
    history, best_epoch = fit(model, loader, sampler, loaders["val"], criterion, config, device, run_dir,
                              resume=args.resume, main_process=main_process, show=show, use_amp=use_amp,
                              channels_last=channels_last, site_blind=site_blind)

    if world_size > 1:
        dist.barrier()  # rank 0 has written best.safetensors
    unwrap(model).load_state_dict(load_file(run_dir / "best.safetensors", device=str(device)))
    final = evaluate_and_export(model, config, args, root, splits, loaders, mean, std, norm_source, history,
                                best_epoch, device, use_amp, channels_last, write=main_process,
                                lung_weights=lung_weights, caches=caches, started=started)
    log.info("rank %d/%d final: threshold %.4f, test %s", rank, world_size, final["threshold"], final["summary"])
    if world_size > 1:
        dist.destroy_process_group()
    return 0


def evaluate_and_export(model, config, args, root, splits, loaders, mean, std, norm_source, history, best_epoch,
                        device, use_amp, channels_last, write: bool, lung_weights: Path | None = None,
                        caches: dict | None = None, started: float | None = None) -> dict:
    """Temperature on val, threshold on calibrated val scores, reports on val/test
    (`loaders`), plots, card, export (when `write`)."""
    spec = get_spec(config.backbone)
    if config.weights_dtype == "float16":  # score the weights as they will be stored, so the card tells their truth
        plain = unwrap(model)
        plain.load_state_dict({k: v.half().to(v.dtype) if v.is_floating_point() else v
                               for k, v in plain.state_dict().items()})
    logits = {}
    for split in loaders:
        z, y, _ = predict_logits(model, loaders[split], device, amp=use_amp, channels_last=channels_last)
        logits[split] = (z, y)
    temperature = calibration.fit_temperature(*logits["val"])
    scores = {  # calibrated P(COVID-19): what the card's threshold applies to, as in the Predictor
        split: (y, calibration.positive_scores(z, temperature), [r.source for r in splits[split][0]])
        for split, (z, y) in logits.items()
    }
    threshold = metrics.choose_threshold(scores["val"][0], scores["val"][1], min_sensitivity=config.min_sensitivity)
    eval_split = "test" if "test" in scores else "val"
    summary = metrics.binary_metrics(scores[eval_split][0], scores[eval_split][1], threshold)
    result = {"threshold": threshold, "temperature": temperature,
              "summary": {k: round(v, 4) for k, v in summary.items()}}
    if not write:
        return result

    weights_dir = args.weights_dir
    reports, plot_files = {}, {}
    for split, (y, s, sources) in scores.items():
        filenames = [r.filename for r in splits[split][0]]
        reports[split], files = report_with_plots(y, s, sources, threshold, weights_dir, f"{config.name}.{split}",
                                                  n_boot=config.n_boot, seed=config.seed, filenames=filenames)
        plot_files |= {f"{split}_{kind}": name for kind, name in files.items()}
    calibration_block = calibration.calibration_summary(logits, temperature)
    panels = {}
    for split, (z, y) in logits.items():
        block = calibration_block[split]
        panels[split] = {
            f"T = 1, ECE {block['ece_before']:.3f}": calibration.reliability_bins(y, calibration.positive_scores(z)),
            f"T = {temperature:.2f}, ECE {block['ece_after']:.3f}":
                calibration.reliability_bins(y, calibration.positive_scores(z, temperature)),
        }
    reliability_png = plots.plot_reliability(panels, weights_dir / f"{config.name}.reliability.png",
                                             title=f"{config.name}: reliability before and after temperature scaling")
    plot_files["reliability"] = Path(reliability_png).name
    history_png = plots.plot_history(history, weights_dir / f"{config.name}.history.png")
    plot_files["history"] = Path(history_png).name

    bar = lambda it: tqdm(it, desc="Grad-CAM audit", leave=False, disable=not args.progress)  # noqa: E731
    lung_masks = audit_lung_masks(config, args, splits[eval_split], config.image_size(), lung_weights)
    audit = cam_audit(unwrap(model), spec.cam_layer, loaders[eval_split], scores[eval_split][2], device=device,
                      progress=bar, lung_masks=lung_masks)
    audit_splits = [split for split in ("val", "test") if split in loaders]  # films it did not train on
    site = audit_model(unwrap(model), spec.head, [(loaders[split], splits[split][0]) for split in audit_splits], device,
                       seed=config.seed)
    train_records = splits["train"][0]
    all_sources = [r.source for records, _ in splits.values() for r in records]
    label_files = {split: split_paths(root, split)[0] for split in splits}
    card = {
        "name": config.name,
        "architecture": config.backbone,
        "input_size": config.image_size(),
        "crop_fraction": config.crop_fraction,
        "equalize": config.equalize,
        "film_size": config.film_size,
        "film_jpeg": config.film_jpeg,
        "mean": list(mean),
        "std": list(std),
        "normalization_source": norm_source,
        "default": config.default,
        "baseline": not config.pretrained,
        "temperature": temperature,
        "calibration": calibration_block,
        "threshold": threshold,
        "threshold_rule": (f"on the calibrated validation scores softmax(logits / temperature), pooled over all "
                           f"sources: the highest validation specificity among thresholds with validation "
                           f"sensitivity >= {config.min_sensitivity:.2f}; predict COVID-19 when calibrated "
                           f"P(COVID-19) >= threshold"),
        "metrics": reports,
        "evaluated_on": eval_split,
        "shortcut_audit": {"split": eval_split, **audit},
        "site_audit": {"data": root.name, "splits": audit_splits, **site},
        **({"lung_crop": lung_crop_card(lung_weights, caches or {})} if lung_weights is not None else {}),
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "initialisation": (spec.pretrained_source if config.pretrained
                           else "none: trained from scratch (random initialisation), no ImageNet weights"),
        "data": {
            "kaggle_handle": None if args.data else args.kaggle_handle,
            "kaggle_version": None if args.data else args.kaggle_version,
            "name": root.name,
            "splits": {split: split_summary(records) for split, (records, _) in splits.items()},
            "sources": source_table(all_sources),
            # relative to the data set's root (never a path of the machine that trained it)
            "label_files": {split: path.name for split, path in label_files.items()},
            "label_files_sha256": {split: sha256_file(path) for split, path in label_files.items()},
        },
        "intended_use": INTENDED_USE,
        "limitations": shortcut_warnings(train_records) + GENERAL_LIMITATIONS,
        "config": config.to_dict(),
        "plots": plot_files,
        "versions": package_versions(),
        "command": shipped_command(sys.argv[1:]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # The whole command's wall time (data checks, caches, training, evaluation, export) and where it ran.
        **({"wall_seconds": round(time.perf_counter() - started, 1)} if started is not None else {}),
        "hardware": hardware(device),
    }
    dtype = torch.float16 if config.weights_dtype == "float16" else torch.float32
    path = export_model(unwrap(model).cpu(), card, weights_dir, dtype=dtype)
    log.info("exported %s (+ card, plots) to %s", path.name, weights_dir)
    return result


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    return report_errors(lambda: run(args), (DatasetUnavailableError, PretrainedWeightsUnavailable, LabelFileError,
                                             MissingImagesError, CorruptImagesError, CheckpointError, CardError,
                                             FileNotFoundError, ValueError))
