"""Question 7 (a GPU machine): resnet18 training throughput at 224 px, the project's loop
(fp16 autocast + GradScaler + channels_last) versus the seed's fp32 loop, on the same
cached data; and which side limits it, the loader or the GPU.

Generates films, builds the gray image cache, and trains resnet18 (every layer, random
init, Adam, class-weighted loss) through `covidtl.engine.train_one_epoch` on a loader of
the cache with the training augmentation. Steady-state images per second after warm-up:

    loader     the cached training loader alone, batches copied to the device
    gpu fp32   training steps on one batch already on the device, fp32 (the seed)
    gpu amp    the same, fp16 autocast + GradScaler + channels_last (the project)
    e2e fp32   loader + fp32 steps: the seed's loop on cached data
    e2e amp    loader + AMP steps: what `python -m train` runs on CUDA

The bottleneck is the slower of loader and gpu amp. cuDNN runs as `python -m train` sets
it (deterministic). Ratio: e2e amp / e2e fp32, printed last, with the e2e amp images/s
(target on an H100: >= 3,000).

    python -m benchmarks.gpu_train                     # GPU machine, ~3 minutes
    python -m benchmarks.gpu_train --quick             # CPU, a few steps: proves it runs
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from benchmarks import common
from covidtl.cache import CachedDataset
from covidtl.data import class_weights
from covidtl.engine import train_one_epoch
from covidtl.labels import Record, write_label_file
from covidtl.models import create_model, get_spec
from covidtl.transforms import build_transform
from train.run import seed_everything

TARGET = 3000


def _film(args) -> None:
    path, size, seed = args
    common.write_xray(path, size, size, seed=seed)


def make_films(folder, n: int, size: int) -> list[Record]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"film{i:05d}.png" for i in range(n)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_film, [(folder / name, size, i) for i, name in enumerate(names)], chunksize=16))
    records = [Record(f"patient{i}", name, i % 2, "bench") for i, name in enumerate(names)]
    write_label_file(records, folder.with_suffix(".txt"))
    return records


class Clock:
    """A progress wrapper for train_one_epoch that notes when each batch arrives."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def __call__(self, iterable):
        for item in iterable:
            self.stamps.append(time.perf_counter())
            yield item
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def rate(self, batch_size: int, warmup: int) -> float:
        """Images per second from the end of the warm-up batches to the end."""
        steps = len(self.stamps) - 1 - warmup
        return steps * batch_size / (self.stamps[-1] - self.stamps[warmup])


def train_rate(model, batches, weight, device, amp: bool, batch_size: int, warmup: int) -> float:
    channels_last = amp and device.type == "cuda"
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" else None
    clock = Clock(device)
    train_one_epoch(
        model,
        batches,
        optimizer,
        nn.CrossEntropyLoss(weight=weight.to(device)),
        device,
        scaler,
        channels_last,
        progress=clock,
    )
    return clock.rate(batch_size, warmup)


def loader_rate(loader, device, batch_size: int, warmup: int) -> float:
    clock = Clock(device)
    for images, labels in clock(loader):
        images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    return clock.rate(batch_size, warmup)


def main(argv: list[str] | None = None) -> float:
    p = common.parser(__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, help="timed steps per measurement (after warm-up)")
    p.add_argument("--num-workers", type=int, default=os.cpu_count(), help="loader workers (default: all cores)")
    p.add_argument("--images", type=int, help="films to generate (default 1024; drawn with replacement)")
    args = p.parse_args(argv)
    common.setup_threads(args.threads)
    device = torch.device(args.device)
    quick = args.quick or device.type != "cuda"
    batch_size = args.batch_size or (4 if quick else 256)
    steps = args.steps or (2 if quick else 50)
    warmup = 1 if quick else 10
    workers = min(args.num_workers, 2) if quick else args.num_workers
    n = args.images or (32 if quick else 1024)
    if device.type != "cuda":
        print(
            f"no CUDA device ({device}): a few steps on CPU with AMP off, to prove the script runs; "
            "the numbers mean nothing"
        )
    else:
        print(f"device: {torch.cuda.get_device_name(device)}")
    seed_everything(0)
    scratch = common.workdir(args)
    size = get_spec("resnet18").input_size
    records = make_films(scratch / "films", n, 128 if quick else 512)
    cache, _, how = common.timed_cache(records, scratch / "films", scratch / "films.txt", scratch / "cache", size)
    print(f"{n} films of {128 if quick else 512} px, image cache {how}")

    transform = build_transform(size, (0.5,) * 3, (0.25,) * 3, train=True)
    dataset = CachedDataset(cache, records, transform)
    total = (warmup + steps) * batch_size
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=RandomSampler(dataset, True, total),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    x = torch.randn(batch_size, 3, size, size, device=device)
    y = torch.randint(0, 2, (batch_size,), device=device)
    resident = [(x, y)] * (warmup + steps)
    weight = class_weights([r.label for r in records])

    def model():
        torch.manual_seed(0)
        return create_model("resnet18", pretrained=False, mode="finetune")

    rates = {
        "loader": loader_rate(loader, device, batch_size, warmup),
        "gpu fp32": train_rate(model(), resident, weight, device, False, batch_size, warmup),
        "gpu amp": train_rate(model(), resident, weight, device, True, batch_size, warmup),
        "e2e fp32": train_rate(model(), loader, weight, device, False, batch_size, warmup),
        "e2e amp": train_rate(model(), loader, weight, device, True, batch_size, warmup),
    }
    print(
        f"resnet18 (finetune) at {size} px, batch {batch_size}, {steps} timed steps after {warmup}, "
        f"{workers} loader workers"
    )
    common.table(["measurement", "images/s"], [[name, f"{rate:9.0f}"] for name, rate in rates.items()])
    limit = "loader" if rates["loader"] < rates["gpu amp"] else "GPU"
    print(
        f"bottleneck: {limit} (loader {rates['loader']:.0f} vs gpu amp {rates['gpu amp']:.0f} images/s); "
        f"e2e amp reaches {rates['e2e amp'] / min(rates['loader'], rates['gpu amp']):.0%} of the slower one"
    )
    ratio = rates["e2e amp"] / rates["e2e fp32"]
    print(f"ratio e2e amp / e2e fp32: {ratio:.2f}; e2e amp {rates['e2e amp']:.0f} images/s (target >= {TARGET})")
    return ratio


if __name__ == "__main__":
    main()
