"""Per-channel mean and std of a split, to feed into a training run.

    python -m train.stats --data ../shared/data/covidx-mini --split train --size 224

Prints the values as a TOML snippet (`mean = [...]`, `std = [...]`) to paste into a
recipe; `python -m train --stats compute` does the same inside a run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from covidtl.labels import LabelFileError, parse_label_file, split_paths
from covidtl.scan import MissingImagesError, check_images
from covidtl.stats import compute_stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.stats", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder in the COVIDx layout")
    p.add_argument("--split", default="train")
    p.add_argument("--size", type=int, default=224, help="input size: resize to size/0.9, center crop to size")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--on-missing", choices=("error", "skip"), default="error")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    try:
        label_file, image_dir = split_paths(args.data, args.split)
        records = check_images(parse_label_file(label_file), image_dir, on_missing=args.on_missing)
    except (LabelFileError, MissingImagesError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    bar = lambda it: tqdm(it, desc=f"stats {args.split}", disable=not args.progress)  # noqa: E731
    mean, std = compute_stats(records, image_dir, size=args.size, batch_size=args.batch_size,
                              num_workers=args.num_workers, progress=bar)
    print(f"# {len(records)} images of {args.data}/{args.split}, {args.size} px")
    print(f"mean = [{', '.join(f'{m:.4f}' for m in mean)}]")
    print(f"std = [{', '.join(f'{s:.4f}' for s in std)}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
