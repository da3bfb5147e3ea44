"""Score an exported model on any folder in the COVIDx layout, any split.

    python -m train.evaluate --weights weights/efficientnet_lite0.safetensors \\
        --data /path/to/hospital_cxr --split test --out reports/hospital

Writes `<out>/report.json` (metrics with 95 % bootstrap intervals, overall and per
source, at the card's operating threshold) and ROC / confusion / per-source PNGs. This
is how to validate a model on your own hospital's images before trusting it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from covidtl.cache import card_cache
from covidtl.engine import predict_scores
from covidtl.evaluation import report_with_plots
from covidtl.export import CardError, atomic_write_json, card_temperature, load_model
from covidtl.labels import LabelFileError, parse_label_file, split_paths
from covidtl.loaders import eval_loader
from covidtl.locate import DatasetUnavailableError
from covidtl.lungs import card_lung_weights
from covidtl.scan import CorruptImagesError, MissingImagesError, check_images, scan_images
from train.cli import report_errors, setup_logging

log = logging.getLogger("train.evaluate")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, required=True, help="an exported .safetensors (its .json card beside it)")
    p.add_argument("--data", type=Path, required=True, help="folder in the COVIDx layout (<split>.txt + <split>/)")
    p.add_argument("--split", default="test", help="which label file to score: train, val, test or any <name>.txt")
    p.add_argument("--out", type=Path, required=True, help="folder for report.json and the plots")
    p.add_argument("--threshold", type=float, help="override the card's operating threshold")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95 %% intervals")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--on-missing", choices=("error", "skip"), default="error")
    p.add_argument("--on-corrupt", choices=("error", "skip"), default="error")
    p.add_argument("--lung-weights", type=Path, help="lung model for a lung-crop model (default: the shipped one)")
    p.add_argument("--cache-dir", type=Path, help="where the image cache of a lung-crop or film-size model lives (default: $COVIDTL_CACHE)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p.parse_args(argv)


def evaluate(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    model, card = load_model(args.weights, device=device)
    label_file, image_dir = split_paths(args.data, args.split)
    records = check_images(parse_label_file(label_file), image_dir, on_missing=args.on_missing)
    records = scan_images(records, image_dir, on_corrupt=args.on_corrupt)
    # cut each film to its lungs and bring it to the card's film size, in the card's colour, as in
    # training and in the app (None: whole films at their own size, which the loader frames alike)
    lung_weights = card_lung_weights(card, args.lung_weights)
    bar = lambda it: tqdm(it, desc="caching films", leave=False, disable=not args.progress)  # noqa: E731
    cache = card_cache(card, records, image_dir, label_file, lung_weights, args.cache_dir, progress=bar)
    loader = eval_loader(records, image_dir, card["input_size"], card["mean"], card["std"],
                         card.get("crop_fraction", 0.9), batch_size=args.batch_size, num_workers=args.num_workers,
                         cache=cache, equalize=bool(card.get("equalize", False)))
    bar = lambda it: tqdm(it, desc=f"scoring {args.split}", disable=not args.progress)  # noqa: E731
    # calibrated P(COVID-19), softmax(logits / T): the scores the card's threshold applies to
    scores, labels, _ = predict_scores(model, loader, device, progress=bar, temperature=card_temperature(card))
    threshold = card["threshold"] if args.threshold is None else args.threshold
    report, plots = report_with_plots(labels, scores, [r.source for r in records], threshold, args.out,
                                      args.split, n_boot=args.n_boot, filenames=[r.filename for r in records])
    report = {
        "model": card["name"],
        "weights": args.weights.name,
        "data": args.data.resolve().name,  # the data set's name, not a path of this machine
        "temperature": card_temperature(card),
        "split": args.split,
        "threshold_source": "card" if args.threshold is None else "command line",
        **report,
        "plots": plots,
    }
    atomic_write_json(args.out / "report.json", report)
    return report


def summary_lines(report: dict) -> list[str]:
    lines = [f"{report['model']} on {report['split']} ({report['n']} images, {report['n_positive']} positive), "
             f"threshold {report['threshold']:.4f}"]
    for name, m in report["overall"].items():
        value = "n/a" if m["value"] is None else f"{m['value']:.3f}"
        ci = "" if m["ci_low"] is None else f"  [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
        lines.append(f"  {name:<12} {value}{ci}")
    return lines


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)

    def work() -> None:
        report = evaluate(args)
        print("\n".join(summary_lines(report)))
        print(f"report: {args.out / 'report.json'}")

    return report_errors(work, (DatasetUnavailableError, LabelFileError, MissingImagesError, CorruptImagesError,
                                CardError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    raise SystemExit(main())
