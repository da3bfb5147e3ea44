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
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from covidtl.classes import CLASSES
from covidtl.config import config_from_dict, replace
from covidtl.export import CARD_SUFFIX, CardError, load_model, select_exported, set_card_entry
from covidtl.labels import LabelFileError
from covidtl.locate import DatasetUnavailableError
from covidtl.models import get_spec
from covidtl.scan import CorruptImagesError, MissingImagesError
from covidtl.site_audit import audit_model
from train.run import load_splits, lung_weights_for, prepare_caches, scoring_loader


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.site_audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights-dir", type=Path, default=Path("weights"))
    p.add_argument("--data", type=Path, required=True, help="folder in the COVIDx layout with several sources")
    p.add_argument("--models", nargs="+", help="only these models (default: every classifier in --weights-dir)")
    p.add_argument("--splits", nargs="+", default=["val", "test"], help="splits to probe (default: val test)")
    p.add_argument("--lung-weights", type=Path, help="lung model for lung-crop models (default: the shipped one)")
    p.add_argument("--cache-dir", type=Path, help="where image caches live")
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=True, help="write the result into each card")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p.parse_args(argv)


def audit_card(path: Path, args: argparse.Namespace) -> dict:
    """The site audit of the exported classifier `path` on `args.splits` of `args.data`."""
    model, card = load_model(path, device=args.device)
    config = config_from_dict({k: tuple(v) if isinstance(v, list) else v for k, v in card["config"].items()},
                              source=str(path.with_suffix(CARD_SUFFIX)))
    if config.cache == "none" and config.crop == "none":
        config = replace(config, cache="gray")  # decode each film once
    lung_weights = lung_weights_for(config, SimpleNamespace(lung_weights=args.lung_weights))
    every = load_splits(args.data, "error", "error", scan=False)
    missing = sorted(set(args.splits) - set(every))
    if missing:
        raise ValueError(f"{args.data} has no {missing} split; it has {sorted(every)}")
    splits = {s: every[s] for s in args.splits}
    splits, caches = prepare_caches(config, args.data, splits, config.image_size(), args.cache_dir, "error",
                                    args.progress, lung_weights)
    pieces = []
    for split, (records, image_dir) in splits.items():
        pieces.append((scoring_loader(records, image_dir, split, caches, config, card["mean"], card["std"]), records))
    bar = lambda it: tqdm(it, desc=f"features {path.stem}", leave=False, disable=not args.progress)  # noqa: E731
    result = audit_model(model, get_spec(card["architecture"]).head, pieces, args.device, seed=config.seed,
                         progress=bar)
    return {"data": args.data.resolve().name, "splits": list(splits), **result}


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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    try:
        run(args)
    except (DatasetUnavailableError, LabelFileError, MissingImagesError, CorruptImagesError, CardError,
            FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
