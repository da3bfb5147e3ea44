"""`python -m train.site_audit`: how well each exported classifier's features tell the hospitals
apart within one class (covidtl.site_audit), written into its card.

    python -m train.site_audit --weights-dir weights --data ../shared/data/covidx-large
    python -m train.site_audit --weights-dir weights --data my_multisite_set --models efficientnet_lite0_large

For every classifier card in `--weights-dir` (or those named), on the `--splits` of `--data`
(default validation and test: films the model did not train on), framed exactly as the model
was trained (its card's input size, crop, lung crop, equalization, normalization): a
cross-validated linear probe predicts each film's source from the model's penultimate
features, within each class. Balanced accuracy far above chance means the model carries the
hospital in its features. The card's ``site_audit`` is replaced (atomically; the weights are
untouched) unless `--no-write`; then regenerate weights/README.md with
`python -m train.model_table`. Works on any data set in the COVIDx layout with several sources.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from covidtl.cache import card_cache
from covidtl.classes import CLASSES
from covidtl.export import CardError, load_model, select_exported, set_card_entry
from covidtl.labels import LabelFileError, parse_label_file, split_paths
from covidtl.loaders import eval_loader
from covidtl.locate import DatasetUnavailableError
from covidtl.lungs import card_lung_weights
from covidtl.models import get_spec
from covidtl.scan import CorruptImagesError, MissingImagesError, check_images
from covidtl.site_audit import audit_model
from train.cli import report_errors, setup_logging


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.site_audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights-dir", type=Path, default=Path("weights"))
    p.add_argument("--data", type=Path, required=True, help="folder in the COVIDx layout with several sources")
    p.add_argument("--models", nargs="+", help="only these models (default: every classifier in --weights-dir)")
    p.add_argument("--splits", nargs="+", default=["val", "test"], help="splits to probe (default: val test)")
    p.add_argument("--lung-weights", type=Path, help="lung model for lung-crop models (default: the shipped one)")
    p.add_argument("--cache-dir", type=Path, help="where image caches live")
    p.add_argument("--num-workers", type=int, default=2, help="data loader workers")
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=True, help="write the result into each card")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p.parse_args(argv)


def audit_card(path: Path, args: argparse.Namespace) -> dict:
    """The site audit of the exported classifier `path` on `args.splits` of `args.data`, its films
    framed by `covidtl.cache.card_cache` as the model's training cache framed them."""
    model, card = load_model(path, device=args.device)
    lung_weights = card_lung_weights(card, args.lung_weights)
    pieces = []
    for split in args.splits:
        label_file, image_dir = split_paths(args.data, split)
        records = check_images(parse_label_file(label_file), image_dir, on_missing="error")
        bar = lambda it, split=split: tqdm(it, desc=f"caching {split}", leave=False, disable=not args.progress)  # noqa: E731
        cache = card_cache(card, records, image_dir, label_file, lung_weights, args.cache_dir, progress=bar)
        loader = eval_loader(records, image_dir, card["input_size"], card["mean"], card["std"],
                             card.get("crop_fraction", 0.9), num_workers=args.num_workers, cache=cache,
                             equalize=bool(card.get("equalize", False)))
        pieces.append((loader, records))
    bar = lambda it: tqdm(it, desc=f"features {path.stem}", leave=False, disable=not args.progress)  # noqa: E731
    result = audit_model(model, get_spec(card["architecture"]).head, pieces, args.device,
                         seed=int(card.get("config", {}).get("seed", 0)), progress=bar)
    return {"data": args.data.resolve().name, "splits": list(args.splits), **result}


def run(args: argparse.Namespace) -> dict[str, dict]:
    paths = select_exported(args.weights_dir, args.models)
    results = {}
    for path in paths:
        result = audit_card(path, args)
        results[path.stem] = result
        for name in CLASSES:
            probe = result["per_class"][name]
            shown = (f"balanced accuracy {probe['balanced_accuracy']:.3f} (chance {probe['chance']:.3f}) "
                     f"over {probe['sources']}" if "skipped" not in probe else f"skipped: {probe['skipped']}")
            print(f"{path.stem}  {name}: {shown}")
        if args.write:
            set_card_entry(path, "site_audit", result)
    return results


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    return report_errors(lambda: run(args), (DatasetUnavailableError, LabelFileError, MissingImagesError,
                                             CorruptImagesError, CardError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    raise SystemExit(main())
