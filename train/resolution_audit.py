"""`python -m train.resolution_audit`: does each exported classifier's answer depend on the film's
resolution? (covidtl.resolution_audit), written into its card.

    python -m train.resolution_audit --weights-dir weights --data ../shared/data/covidx-large
    python -m train.resolution_audit --weights-dir weights --data my_hospital --split test --max-films 0

For every classifier card in `--weights-dir` (or those named), each film of `--split` of
`--data` (at most `--max-films`, spread evenly over the sources; 0: all) is scored through the
app's Predictor as it is, at half and at twice its size, and as a 224 x 224 square. Printed and
written into the card's ``resolution_audit`` (atomically; the weights are untouched) unless
`--no-write`: the share of decisions that changed, and sensitivity and specificity at the
card's threshold, per variant. Then regenerate weights/README.md with `python -m train.model_table`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from covidtl.export import CardError, select_exported, set_card_entry
from covidtl.images import load_image
from covidtl.inference import Predictor
from covidtl.labels import LabelFileError, Record, parse_label_file, split_paths, spread
from covidtl.locate import DatasetUnavailableError
from covidtl.resolution_audit import audit_films
from covidtl.scan import MissingImagesError, check_images
from train.cli import report_errors, setup_logging


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.resolution_audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights-dir", type=Path, default=Path("weights"))
    p.add_argument("--data", type=Path, required=True, help="folder in the COVIDx layout")
    p.add_argument("--split", default="test", help="which label file to audit (default: test)")
    p.add_argument("--models", nargs="+", help="only these models (default: every classifier in --weights-dir)")
    p.add_argument("--max-films", type=int, default=200,
                   help="films to audit, spread evenly over the sources (default 200; 0: every film)")
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=True, help="write the result into each card")
    p.add_argument("--device", default="cpu")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p.parse_args(argv)


def audit_card(path: Path, records: list[Record], image_dir: Path, args: argparse.Namespace) -> dict:
    """The resolution audit of the exported classifier `path` on `records` (in `image_dir`)."""
    predictor = Predictor.from_file(path, device=args.device)
    films = ((load_image(image_dir / r.filename, grey=True), r.label) for r in records)
    bar = lambda it: tqdm(it, total=len(records), desc=f"films {path.stem}", leave=False,  # noqa: E731
                          disable=not args.progress)
    result = audit_films(lambda image: predictor.predict(image).p_positive, films, predictor.threshold, bar)
    return {"data": args.data.resolve().name, "split": args.split, **result}


def run(args: argparse.Namespace) -> dict[str, dict]:
    if args.max_films < 0:
        raise ValueError(f"--max-films must be 0 (every film) or more, not {args.max_films}")
    paths = select_exported(args.weights_dir, args.models)
    label_file, image_dir = split_paths(args.data, args.split)
    records = spread(check_images(parse_label_file(label_file), image_dir, on_missing="error"), args.max_films)
    results = {}
    for path in paths:
        result = audit_card(path, records, image_dir, args)
        results[path.stem] = result
        for name, variant in result["variants"].items():
            print(f"{path.stem}  {name}: {variant['flipped']:.1%} of {result['n']} decisions changed; "
                  f"sensitivity {_rate(variant['sensitivity'])} (as is {_rate(result['as_is']['sensitivity'])}), "
                  f"specificity {_rate(variant['specificity'])} (as is {_rate(result['as_is']['specificity'])})")
        if args.write:
            set_card_entry(path, "resolution_audit", result)
    return results


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    return report_errors(lambda: run(args), (DatasetUnavailableError, LabelFileError, MissingImagesError, CardError,
                                             FileNotFoundError, ValueError))


if __name__ == "__main__":
    raise SystemExit(main())
