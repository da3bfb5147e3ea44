"""`python -m train.fold_audit`: the resolution audit (covidtl.resolution_audit) of one
leave-one-source-out fold's model, per source: does a source's score move when its films are
made into another source's kind of copy?

    python -m train.loso --recipe train/recipes/large/efficientnet_lite0_film224_jpeg.toml \\
        --data ../shared/data/covidx-large --sources rsna --n-boot 200 --out runs/jpeg.loso.json
    python -m train.fold_audit --recipe train/recipes/large/efficientnet_lite0_film224_jpeg.toml \\
        --loso runs/jpeg.loso.json --held-out rsna --data ../shared/data/covidx-large --sources rsna nih bimcv

The fold's model is the checkpoint `python -m train.loso` left in `<runs-dir>/loso/<recipe
name>/<held-out source>/best.safetensors`, scored through the app's Predictor with the fold's
own threshold and temperature (from the `--loso` JSON) and the recipe's framing (lung crop,
film size and copy, equalization). For each of `--sources`, at most `--max-films` of its films
in `--splits` (spread evenly) are scored as they are and in every variant of the resolution
audit. A source the fold never saw whose films score higher than those of a source it trained
on, until the latter are made into the former's kind of copy, is told apart by its copy.
Printed, and written to `--out` when given.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from tqdm import tqdm

from covidtl.config import TrainConfig, load_recipe
from covidtl.export import CardError, atomic_write_json
from covidtl.images import load_image
from covidtl.inference import Predictor
from covidtl.labels import LabelFileError, parse_label_file, split_paths, spread
from covidtl.locate import DatasetUnavailableError
from covidtl.models import create_model
from covidtl.resolution_audit import audit_films
from covidtl.scan import MissingImagesError, check_images
from train.run import lung_weights_for
from train.cli import report_errors, setup_logging


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.fold_audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", type=Path, required=True, help="the recipe the leave-one-source-out run trained")
    p.add_argument("--loso", type=Path, required=True, help="that run's JSON (its folds' thresholds)")
    p.add_argument("--held-out", required=True, help="the fold: the source it held out")
    p.add_argument("--data", type=Path, required=True, help="folder in the COVIDx layout")
    p.add_argument("--sources", nargs="+", help="score these sources' films (default: every source)")
    p.add_argument("--splits", nargs="+", default=["val", "test"], help="films of these splits (default: val test)")
    p.add_argument("--max-films", type=int, default=200, help="per source, spread evenly (default 200; 0: all)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="as given to train.loso (default runs)")
    p.add_argument("--lung-weights", type=Path, help="lung model for a lung-crop recipe (default: the shipped one)")
    p.add_argument("--out", type=Path, help="also write the result to this JSON")
    p.add_argument("--device", default="cpu")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p.parse_args(argv)


def fold_card(config: TrainConfig, fold: dict[str, Any], lung_card: dict[str, Any] | None) -> dict[str, Any]:
    """The card a Predictor needs for a fold's model: the recipe's framing, the fold's threshold
    and temperature (chosen on the validation films of the sources it trained on)."""
    mean, std = config.mean_std()
    card = {
        "name": f"{config.name} without {fold['held_out']}",
        "architecture": config.backbone,
        "threshold": fold["threshold"],
        "temperature": fold["temperature"],
        "input_size": config.image_size(),
        "crop_fraction": config.crop_fraction,
        "mean": list(mean),
        "std": list(std),
        "equalize": config.equalize,
        "film_size": config.film_size,
        "film_jpeg": config.film_jpeg,
    }
    if lung_card is not None:
        card["lung_crop"] = {"lung_model": lung_card["name"], "lung_model_sha256": lung_card["weights_sha256"]}
    return card


def load_fold(args: argparse.Namespace) -> Predictor:
    """The fold's model as a Predictor (see the module docstring)."""
    run = json.loads(args.loso.read_text())
    config = load_recipe(args.recipe, {"seed": run["seed"]})
    if config.name != run["recipe"]:
        raise ValueError(f"{args.loso} is a run of recipe {run['recipe']!r}, not {config.name!r} ({args.recipe})")
    folds = {fold["held_out"]: fold for fold in run["folds"]}
    if args.held_out not in folds:
        raise ValueError(f"{args.loso} has no fold holding out {args.held_out!r}; it has {sorted(folds)}")
    weights = args.runs_dir / "loso" / config.name / args.held_out / "best.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"no fold checkpoint {weights}; run the leave-one-source-out command in "
                                f"{args.loso} (its 'command') with --runs-dir {args.runs_dir}")
    model = create_model(config.backbone, pretrained=False, mode=config.mode)
    model.load_state_dict(load_file(weights))
    lung_model, lung_card = None, None
    lung_weights = lung_weights_for(config, args)
    if lung_weights is not None:
        from covidtl.lungs import load_lung_model

        lung_model, lung_card = load_lung_model(lung_weights)
    return Predictor(model, fold_card(config, folds[args.held_out], lung_card), args.device, lung_model)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.max_films < 0:
        raise ValueError(f"--max-films must be 0 (every film) or more, not {args.max_films}")
    predictor = load_fold(args)
    films = []  # (record, image folder)
    for split in args.splits:
        label_file, image_dir = split_paths(args.data, split)
        films += [(r, image_dir) for r in check_images(parse_label_file(label_file), image_dir, on_missing="error")]
    present = sorted({r.source for r, _ in films})
    unknown = sorted(set(args.sources or present) - set(present))
    if unknown:
        raise ValueError(f"no films of {unknown} in {args.splits} of {args.data}; it has {present}")
    result: dict[str, Any] = {"model": predictor.name, "threshold": predictor.threshold, "sources": {}}
    for source in args.sources or present:
        folders = {r.filename: folder for r, folder in films if r.source == source}
        chosen = spread([r for r, _ in films if r.source == source], args.max_films)
        bar = partial(tqdm, total=len(chosen), desc=source, leave=False, disable=not args.progress)
        audit = audit_films(lambda image: predictor.predict(image).p_positive,
                            ((load_image(folders[r.filename] / r.filename, grey=True), r.label) for r in chosen),
                            predictor.threshold, bar)
        result["sources"][source] = audit
        print(_line(source, audit))
    if args.out:
        atomic_write_json(args.out, result)
    return result


def _line(source: str, audit: dict[str, Any]) -> str:
    medians = {"as is": audit["as_is"]["median_p"]} | {name: v["median_p"] for name, v in audit["variants"].items()}
    shown = ", ".join(f"{name} {value:.3f}" for name, value in medians.items())
    return f"{source} ({audit['n']} films, {audit['n_positive']} COVID-19): median P(COVID-19) {shown}"


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    return report_errors(lambda: run(args), (DatasetUnavailableError, LabelFileError, MissingImagesError, CardError,
                                             FileNotFoundError, ValueError))


if __name__ == "__main__":
    raise SystemExit(main())
