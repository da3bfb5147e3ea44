"""Question 5: how many images per second does the training loader deliver, decoding every
epoch (the seed's way) versus from the decode-once cache?

Generates full-size X-ray-like films (3 of 4 are 1024 x 1024 8-bit PNGs as in RSNA/COVIDx,
1 of 4 a 2000 x 2000 JPEG), then times whole epochs of `covidtl.loaders.train_loader`,
alternately, with the same records, recipe, batch size and workers:

    seed     no cache: every image opened at full size, Resize, CenterCrop, flip, rotation,
             colour jitter, to tensor, normalize, in the loader's worker processes
    cached   the same transform on the cache's pre-resized squares (built once, timed
             separately; `ensure_cache` with every core)

Both epochs include starting the workers, as every epoch of a training run does. It also
checks that both loaders give the same labels and the same augmented tensors for the same
seed. Ratio: cached / seed images per second, printed last.

    python -m benchmarks.train_input                  # ~2 minutes on 2 cores
"""

from __future__ import annotations

import torch

from benchmarks import common
from covidtl.config import TrainConfig
from covidtl.labels import Record, write_label_file
from covidtl.loaders import train_loader

LIMIT = 5.0
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def make_films(folder, n: int, quick: bool) -> list[Record]:
    """`n` films in `folder`, with a label file beside it; returns their records."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        if quick:
            name, size = f"film{i:04d}.png", (256, 256)
        elif i % 4 == 3:
            name, size = f"film{i:04d}.jpg", (2000, 2000)
        else:
            name, size = f"film{i:04d}.png", (1024, 1024)
        common.write_xray(folder / name, *size, seed=i)
        records.append(Record(f"patient{i}", name, i % 2, "bench"))
    write_label_file(records, folder.with_suffix(".txt"))
    return records


def epoch(loader, sampler, number: int) -> int:
    sampler.set_epoch(number)
    torch.manual_seed(number)
    return sum(len(labels) for _, labels in loader)


def same_batches(seed_loader, cached_loader, sampler) -> bool:
    results = []
    for loader in (seed_loader, cached_loader):
        sampler.set_epoch(0)
        torch.manual_seed(0)
        results.append(next(iter(loader)))
    (x0, y0), (x1, y1) = results
    return torch.equal(y0, y1) and torch.equal(x0, x1)


def main(argv: list[str] | None = None) -> float:
    p = common.parser(__doc__)
    p.add_argument("--images", type=int, help="films to generate (default 256)")
    p.add_argument("--num-workers", type=int, default=2, help="loader workers, the same for both (default 2)")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    repeats, scratch = common.start(args, 3)
    n = args.images or (16 if args.quick else 256)
    records = make_films(scratch / "films", n, args.quick)
    image_dir, label_file = scratch / "films", scratch / "films.txt"
    config = TrainConfig(name="bench", backbone="resnet18", batch_size=args.batch_size, num_workers=args.num_workers)
    cache, _, how = common.timed_cache(records, image_dir, label_file, scratch / "cache")

    seed_loader, sampler = train_loader(records, image_dir, config, 224, MEAN, STD)
    cached_loader, cached_sampler = train_loader(records, image_dir, config, 224, MEAN, STD, cache=cache)
    identical = same_batches(seed_loader, cached_loader, sampler)
    counter = iter(range(1, 10**6))
    t = common.interleaved(
        {
            "seed": lambda: epoch(seed_loader, sampler, next(counter)),
            "cached": lambda: epoch(cached_loader, cached_sampler, next(counter)),
        },
        repeats,
        warmup=0 if args.quick else 1,
    )
    delivered = len(sampler) // config.batch_size * config.batch_size if seed_loader.drop_last else len(sampler)
    rate = {name: delivered / seconds for name, seconds in t.items()}
    ratio = rate["cached"] / rate["seed"]
    print(
        f"{n} films ({'256 px PNGs' if args.quick else '3/4 1024 px PNG, 1/4 2000 px JPEG'}), batch "
        f"{config.batch_size}, {args.num_workers} workers, flip + rotation + jitter; medians of {repeats} epochs"
    )
    common.table(
        ["loader", "epoch", "images/s"],
        [
            ["seed (decode every epoch)", f"{t['seed']:6.2f} s", f"{rate['seed']:7.0f}"],
            ["cached", f"{t['cached']:6.2f} s", f"{rate['cached']:7.0f}"],
        ],
    )
    print(f"image cache {how}; same labels and augmented tensors for the same seed: {identical}")
    print(f"ratio cached / seed images per second: {ratio:.1f} (target >= {LIMIT:g})")
    return ratio


if __name__ == "__main__":
    main()
