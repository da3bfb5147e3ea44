"""`python -m train.loso`: leave-one-source-out validation of a recipe.

    python -m train.loso --recipe train/recipes/plus/efficientnet_lite0_plus.toml \\
        --data ../shared/data/covidx-plus --epochs 2 --out weights/efficientnet_lite0_plus.loso.json

For each source S of the data set (a fold): train the recipe on the train split without
S (model selection, temperature and threshold on the validation split without S, exactly
as `python -m train` does on the whole data set), then score every image of S, from all
splits (none of them was seen). That is the honest estimate of how the recipe does at a
hospital it has never seen. Writes one JSON that `python -m train.model_table` turns
into the leave-one-source-out table of weights/README.md; no weights are exported.
A source whose images are all of one class gets only the rate of that class (all
negative: specificity at the fold's threshold); AUC needs both. The JSON is written after
every fold; `--resume` runs only the sources a stopped run's JSON lacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from covidtl import calibration, metrics
from covidtl.cards import held_out_path
from covidtl.config import load_recipe, replace
from covidtl.engine import predict_logits
from covidtl.export import atomic_write_json
from covidtl.labels import LabelFileError
from covidtl.loaders import train_loader
from covidtl.locate import DatasetUnavailableError
from covidtl.models import PretrainedWeightsUnavailable, create_model, get_spec
from covidtl.scan import CorruptImagesError, MissingImagesError
from covidtl.site_audit import audit_model
from train.run import (
    fit,
    keep_sources,
    load_splits,
    lung_weights_for,
    make_criterion,
    prepare_caches,
    scoring_loader,
    seed_everything,
    shipped_command,
    site_blind_setup,
)
from train.cli import report_errors, setup_logging

log = logging.getLogger("train.loso")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.loso", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="folder in the COVIDx layout with several sources")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs for every fold (e.g. 2 on a CPU)")
    p.add_argument("--sources", nargs="+", help="hold out only these sources (default: every source)")
    p.add_argument("--out", type=Path, help="the JSON (default weights/<recipe name>.loso.json)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="per-fold checkpoints: <runs>/loso/<name>/<source>")
    p.add_argument("--cache-dir", type=Path, help="where image caches live")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--n-boot", type=int, help="override the recipe's bootstrap resamples")
    p.add_argument("--seed", type=int, help="override the recipe's seed (a second run of a recipe, to see its spread)")
    p.add_argument("--lung-weights", type=Path, help="lung model for a crop = \"lungs\" recipe (default: the shipped one)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the folds already in --out (a stopped run of the same recipe, data, epochs and "
                        "seed) and run only the sources it lacks")
    return p.parse_args(argv)


def resumed_folds(out: Path, result: dict) -> list[dict]:
    """The folds of the earlier run in `out`, which must be `result`'s run (recipe, data, epochs,
    seed); [] when there is no `out` yet."""
    if not out.is_file():
        return []
    earlier = json.loads(out.read_text())
    differ = [key for key in ("recipe", "data", "epochs", "seed") if earlier.get(key) != result[key]]
    if differ:
        raise ValueError(f"--resume: {out} is another run ({', '.join(f'{k} {earlier.get(k)!r}' for k in differ)}, "
                         f"not {', '.join(repr(result[k]) for k in differ)}); give another --out or leave out --resume")
    return list(earlier["folds"])


def _fold_logits(model, pieces, caches, config, mean, std, device) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of `pieces`: [(split, records, image_dir)], concatenated."""
    all_logits, all_labels = [], []
    for split, records, image_dir in pieces:
        if not records:
            continue
        loader = scoring_loader(records, image_dir, split, caches, config, mean, std)
        z, y, _ = predict_logits(model, loader, device)
        all_logits.append(z)
        all_labels.append(y)
    return np.concatenate(all_logits), np.concatenate(all_labels)


def auc_against_validation(labels: np.ndarray, scores: np.ndarray, val_labels: np.ndarray,
                           val_scores: np.ndarray) -> float | None:
    """A one-class held-out source's threshold-free figure: the AUC of its films (`labels`,
    `scores`) against the fold's validation films of the other class, from the sources it trained
    on. None where the held-out source has both classes (its own AUC says more)."""
    if len(set(labels.tolist())) != 1:
        return None
    other = val_labels != labels[0]
    return metrics.roc_auc(np.r_[labels, val_labels[other]], np.r_[scores, val_scores[other]])


def run_fold(source: str, config, splits, caches, runs_dir: Path, device: torch.device, show: bool,
             root: Path) -> dict:
    """Train without `source`, score every image of it; the fold's JSON entry."""
    started = time.perf_counter()
    seed_everything(config.seed)
    spec = get_spec(config.backbone)
    mean, std = config.mean_std()
    train_records, train_dir = splits["train"]
    kept = [r for r in keep_sources(train_records, config.train_sources, "train") if r.source != source]
    val_records, val_dir = splits["val"]
    val_kept = [r for r in keep_sources(val_records, config.train_sources, "val") if r.source != source]
    if len({r.label for r in kept}) < 2 or len({r.label for r in val_kept}) < 2:
        raise ValueError(f"without {source!r} the train or validation split lacks a class; this fold cannot be trained")
    model = create_model(config.backbone, pretrained=config.pretrained, mode=config.mode).to(device)
    targets, site_blind = site_blind_setup(config, kept, root, model, device)
    loader, sampler = train_loader(kept, train_dir, config, config.image_size(), mean, std, cache=caches.get("train"),
                                   targets=targets)
    val_loader = scoring_loader(val_kept, val_dir, "val", caches, config, mean, std)
    run_dir = runs_dir / source
    history, best_epoch = fit(model, loader, sampler, val_loader, make_criterion(config, kept, device), config,
                              device, run_dir, show=show, site_blind=site_blind)
    model.load_state_dict(load_file(run_dir / "best.safetensors", device=str(device)))

    val_logits, val_labels = _fold_logits(model, [("val", val_kept, val_dir)], caches, config, mean, std, device)
    temperature = calibration.fit_temperature(val_logits, val_labels)
    val_scores = calibration.positive_scores(val_logits, temperature)
    threshold = metrics.choose_threshold(val_labels, val_scores, min_sensitivity=config.min_sensitivity)
    # The site audit on the films of the other sources this fold did not train on (validation, test).
    unseen = [(split, [r for r in keep_sources(records, config.train_sources, split) if r.source != source], image_dir)
              for split, (records, image_dir) in splits.items() if split != "train"]
    site = audit_model(model, spec.head, [(scoring_loader(records, image_dir, split, caches, config, mean, std), records)
                                          for split, records, image_dir in unseen if records], device, seed=config.seed)
    held_out = [(split, [r for r in records if r.source == source], image_dir)
                for split, (records, image_dir) in splits.items()]
    logits, labels = _fold_logits(model, held_out, caches, config, mean, std, device)
    scores = calibration.positive_scores(logits, temperature)
    report = metrics.evaluate_scores(labels, scores, [source] * len(labels), threshold, n_boot=config.n_boot,
                                     seed=config.seed)
    return {
        "held_out": source,
        "auc_against_validation": auc_against_validation(labels, scores, val_labels, val_scores),
        "train_images": len(kept),
        "n": report["n"],
        "n_positive": report["n_positive"],
        "splits_scored": [split for split, records, _ in held_out if records],
        "threshold": threshold,
        "temperature": temperature,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "overall": report["overall"],
        "confusion": report["confusion"],
        "site_audit": {"splits": [split for split, records, _ in unseen if records], **site},
        "seconds": round(time.perf_counter() - started, 1),
    }


def run(args: argparse.Namespace) -> dict:
    config = load_recipe(args.recipe, {"epochs": args.epochs, "num_workers": args.num_workers, "n_boot": args.n_boot,
                                       "seed": args.seed})
    device = torch.device(args.device)
    create_model(config.backbone, pretrained=config.pretrained, mode=config.mode)  # fail fast, before data work
    lung_weights = lung_weights_for(config, args)
    splits = load_splits(args.data, "error", "error", scan=config.cache == "none")
    splits, caches = prepare_caches(config, args.data, splits, config.image_size(), args.cache_dir, "error", args.progress,
                                    lung_weights=lung_weights)
    sources = sorted({r.source for records, _ in splits.values() for r in records})
    chosen = args.sources or sources
    unknown = sorted(set(chosen) - set(sources))
    if unknown:
        raise ValueError(f"unknown sources {unknown}; the data set has {sources}")
    # No early stop on a short schedule's noise: every fold runs the same epochs.
    config = replace(config, early_stopping_patience=max(config.early_stopping_patience, config.epochs))
    out = args.out or held_out_path(Path("weights"), config.name)
    result = {
        "recipe": config.name,
        "data": args.data.resolve().name,
        "epochs": config.epochs,
        "seed": config.seed,
        "command": shipped_command(sys.argv[1:], prog="python -m train.loso"),
        "folds": [],
    }
    if args.resume:
        earlier = resumed_folds(out, result)
        result["folds"] = [fold for fold in earlier if fold["held_out"] in chosen]
        done = {fold["held_out"] for fold in result["folds"]}
        if done:
            log.info("resuming %s: keeping the folds %s", out, sorted(done))
        chosen = [source for source in chosen if source not in done]
    for source in chosen:
        log.info("fold: hold out %s", source)
        fold = run_fold(source, config, splits, caches, args.runs_dir / "loso" / config.name, device, args.progress,
                        args.data)
        overall = fold["overall"]
        log.info("held out %s: n %d (%d positive), AUC %s, sens %s, spec %s at %.4f (T %.2f), %.0f s", source,
                 fold["n"], fold["n_positive"], overall["auc"]["value"], overall["sensitivity"]["value"],
                 overall["specificity"]["value"], fold["threshold"], fold["temperature"], fold["seconds"])
        result["folds"].append(fold)
        result["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        atomic_write_json(out, metrics.nan_to_none(result))  # after every fold: a stopped run keeps its folds
    log.info("wrote %s", out)
    return result


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    return report_errors(lambda: run(args), (DatasetUnavailableError, PretrainedWeightsUnavailable, LabelFileError,
                                             MissingImagesError, CorruptImagesError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    raise SystemExit(main())
