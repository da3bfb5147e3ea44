"""Question 6: how long does the normalization-statistics pass take, the project's way
versus the seed's loop, and do they agree?

On generated full-size films (as in question 5), in one run:

    seed     one image at a time (batch size 1): load_image, Resize, CenterCrop, then a
             float64 numpy array and its per-channel sum and sum of squares
    project  covidtl.stats.compute_stats from the decode-once image cache (the training
             run builds it anyway): integer histograms of the memory-mapped crops
    decoding compute_stats without a cache (decodes every file, 2 worker processes),
             for comparison; the cache's one-off build time is printed too

Values must agree within 1e-4, else the script exits with status 1 after its figures.
Ratio: seed time / project time, printed last.

    python -m benchmarks.stats_pass                   # ~2 minutes on 2 cores
"""

from __future__ import annotations

import numpy as np
from torchvision.transforms import v2

from benchmarks import common
from benchmarks.train_input import make_films
from covidtl.images import load_image
from covidtl.stats import compute_stats
from covidtl.transforms import eval_geometry

LIMIT = 10.0
TOLERANCE = 1e-4


def seed_stats(records, image_dir, size: int = 224):
    """The seed's loop: batch size 1, a float64 numpy array per image, one pass."""
    geometry = v2.Compose(eval_geometry(size, 0.9))
    total, total_sq, count = np.zeros(3), np.zeros(3), 0
    for record in records:
        pixels = np.asarray(geometry(load_image(image_dir / record.filename)), dtype=np.float64).reshape(-1, 3)
        total += pixels.sum(axis=0)
        total_sq += (pixels**2).sum(axis=0)
        count += len(pixels)
    mean = total / (count * 255.0)
    std = np.sqrt(total_sq / (count * 255.0**2) - mean**2)
    return tuple(mean.tolist()), tuple(std.tolist())


def main(argv: list[str] | None = None) -> float:
    p = common.parser(__doc__)
    p.add_argument("--images", type=int, help="films to generate (default 256)")
    args = p.parse_args(argv)
    repeats, scratch = common.start(args, 3)
    n = args.images or (16 if args.quick else 256)
    records = make_films(scratch / "films", n, args.quick)
    image_dir, label_file = scratch / "films", scratch / "films.txt"
    cache, built, how = common.timed_cache(records, image_dir, label_file, scratch / "cache")

    results = {}

    def run(name, fn):
        return lambda: results.__setitem__(name, fn())

    t = common.interleaved(
        {
            "seed": run("seed", lambda: seed_stats(records, image_dir)),
            "project": run("project", lambda: compute_stats(records, image_dir, cache=cache, batch_size=64)),
            "decoding": run("decoding", lambda: compute_stats(records, image_dir, num_workers=2)),
        },
        repeats,
        warmup=0,
    )
    gap = max(
        abs(a - b)
        for side in ("project", "decoding")
        for got, want in zip(results[side], results["seed"])
        for a, b in zip(got, want)
    )
    print(f"{n} films, 224 px crops; medians of {repeats} interleaved runs")
    common.table(
        ["pass", "time", "images/s", "mean", "std"],
        [
            [
                name,
                f"{t[name]:7.3f} s",
                f"{n / t[name]:8.0f}",
                f"{results[name][0][0]:.6f}",
                f"{results[name][1][0]:.6f}",
            ]
            for name in ("seed", "project", "decoding")
        ],
    )
    print(
        f"largest difference from the seed's values: {gap:.1e} (tolerance {TOLERANCE:g}); "
        f"image cache {how}" + (f"; build + pass vs seed: {t['seed'] / (built + t['project']):.1f}x" if built else "")
    )
    ratio = t["seed"] / t["project"]
    print(f"ratio seed loop / compute_stats time: {ratio:.0f} (target >= {LIMIT:g})")
    if not gap <= TOLERANCE:  # also catches nan
        raise SystemExit(f"error: the statistics differ from the seed's by {gap:.1e}, over the tolerance {TOLERANCE:g}")
    return ratio


if __name__ == "__main__":
    main()
