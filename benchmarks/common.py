"""What every benchmark shares: interleaved timing, generated X-ray-like images, the models.

Timing: the two sides of a ratio are measured in one run, alternately (A, B, A, B, ...),
and each side is summarised by its median, so a burst of load on a noisy machine hits
both sides alike instead of one. Nothing here asserts a time.

Models: the shipped models in ``weights/`` (safetensors + card) when there are any, else
every registry backbone with random weights and a stand-in card, which costs the same
time per image; the output says which.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from covidtl.classes import CLASSES
from covidtl.export import export_model
from covidtl.inference import ModelStore, Predictor
from covidtl.models import create_model, get_spec, list_models

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: proves the script runs, times nothing")
    p.add_argument("--repeats", type=int, help="timed repeats per side (median reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (default: all cores)")
    p.add_argument("--weights-dir", type=Path, default=WEIGHTS, help="shipped models to time (default weights/)")
    p.add_argument("--models", nargs="+", help="only these models (names or architectures)")
    p.add_argument("--workdir", type=Path, help="keep generated images here (default: a temporary folder)")
    return p


def workdir(args: argparse.Namespace) -> Path:
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return args.workdir
    scratch = Path(tempfile.mkdtemp(prefix="covidtl-bench-"))
    atexit.register(shutil.rmtree, scratch, True)
    return scratch


def setup_threads(threads: int) -> None:
    torch.set_num_threads(max(1, threads))
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")


def start(args: argparse.Namespace, repeats: int, threads: bool = True) -> tuple[int, Path]:
    """Set torch's threads (unless `threads` is False) and say so; return (timed repeats:
    --repeats, else 1 with --quick, else `repeats`; the folder for generated files)."""
    if threads:
        setup_threads(args.threads)
    return args.repeats or (1 if args.quick else repeats), workdir(args)


# --------------------------------------------------------------------------- timing


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(sides: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each side, measured alternately `repeats` times after `warmup` rounds."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            times[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def ms(seconds: float) -> str:
    return f"{1000 * seconds:8.1f} ms"


def table(header: list[str], rows: list[list[object]]) -> None:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print(
            "  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(row, widths)))
        )


# --------------------------------------------------------------------------- images


def xray_pixels(width: int, height: int, bits: int = 8, seed: int = 0) -> np.ndarray:
    """An X-ray-like film [height, width]: bright body, two darker lungs, a spine, soft
    gradients and sensor noise; uint8, or uint16 using 12 of 16 bits for ``bits=16``.

    Noise matters: it sets how well a PNG compresses, so how long it takes to decode.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy /= height
    xx /= width
    image = 0.55 + 0.25 * np.exp(-(((xx - 0.5) / 0.45) ** 2)) - 0.15 * yy
    for cx in (0.32, 0.68):
        image -= 0.3 * (((xx - cx) / 0.14) ** 2 + ((yy - 0.48) / 0.28) ** 2 < 1)
    image += 0.2 * (np.abs(xx - 0.5) < 0.03)
    image += rng.normal(0.0, 0.02, image.shape).astype(np.float32)
    image = np.clip(image, 0.0, 1.0)
    if bits == 16:
        return np.round(image * 4095).astype(np.uint16)
    return np.round(image * 255).astype(np.uint8)


def write_xray(path: Path, width: int, height: int, bits: int = 8, seed: int = 0) -> Path:
    """Write an X-ray-like film (PNG, or JPEG at quality 90 by the suffix) unless it exists."""
    if not path.is_file():
        pixels = xray_pixels(width, height, bits, seed)
        options = {"quality": 90} if path.suffix.lower() in (".jpg", ".jpeg") else {}
        Image.fromarray(pixels).save(path, **options)
    return path


EXAMPLE_FILM = REPO / "assets" / "examples" / "nih-no-finding-00002371_010.jpg"  # shipped, with its credits


def write_film(path: Path, width: int, height: int, bits: int = 8, source: Path = EXAMPLE_FILM) -> Path:
    """Write a real chest X-ray (`source`, one of the shipped example films) resized to
    `width` x `height` as a PNG, 8-bit or 16-bit (values x 257), unless it exists. Unlike a
    drawn film, a lung model finds its lungs, so a lung-crop model takes its crop path."""
    if not path.is_file():
        with Image.open(source) as film:
            pixels = np.asarray(film.convert("L").resize((width, height), Image.BICUBIC))
        Image.fromarray(pixels.astype(np.uint16) * 257 if bits == 16 else pixels).save(path)
    return path


def decode(path: Path) -> None:
    """Plain decode, the floor any loader pays: PIL reads every pixel, converts nothing."""
    with Image.open(path) as image:
        image.load()


def timed_cache(records, image_dir: Path, label_file: Path, folder: Path, size: int = 224):
    """(gray image cache of `records` in `folder`, seconds it took, how: built or reused)."""
    from covidtl.cache import ensure_cache

    built = []  # ensure_cache calls `progress` only when it builds

    def progress(iterable):
        built.append(len(iterable))
        return iterable

    started = time.perf_counter()
    cache = ensure_cache(records, image_dir, label_file, folder, size, 0.9, "gray", progress=progress)
    seconds = time.perf_counter() - started
    how = f"built in {seconds:.1f} s, {len(records) / seconds:.0f} images/s, all cores" if built else "reused"
    return cache, seconds if built else 0.0, how


# --------------------------------------------------------------------------- models


def _stand_in_card(name: str) -> dict:
    spec = get_spec(name)
    return {
        "name": f"{name}-untrained",
        "architecture": name,
        "classes": list(CLASSES),
        "input_size": spec.input_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "threshold": 0.5,
    }


def model_folder(args: argparse.Namespace, scratch: Path) -> tuple[Path, str]:
    """A folder of exported models: the shipped ones, else stand-ins exported to `scratch`."""
    store = ModelStore(args.weights_dir)
    if store.names():
        return args.weights_dir, f"shipped models in {args.weights_dir}: {', '.join(store.names())}"
    names = args.models or list_models()
    if args.quick:
        names = ["squeezenet1_1"] if "squeezenet1_1" in names else names[:1]  # the cheapest
    folder = scratch / "untrained-models"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not (folder / f"{name}-untrained.safetensors").is_file():
            torch.manual_seed(0)
            export_model(create_model(name, pretrained=False), _stand_in_card(name), folder)
    return folder, (
        f"no shipped models in {args.weights_dir}: untrained registry models ({', '.join(names)}), "
        "random weights; same cost per image, meaningless outputs"
    )


def predictors(args: argparse.Namespace, scratch: Path) -> tuple[list[Predictor], str]:
    """The models to time, loaded once, and a line saying which they are."""
    folder, note = model_folder(args, scratch)
    loaded = [
        p
        for p in ModelStore(folder).load_all().values()
        if not args.models or p.name in args.models or p.spec.name in args.models
    ]
    return (loaded[:1] if args.quick else loaded), note


def ready_input(predictor: Predictor) -> torch.Tensor:
    """A normalized input tensor [1, 3, S, S], as `preprocess` makes it."""
    return torch.randn(1, 3, predictor.input_size, predictor.input_size)


def bare_forward(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """A call of `model` on the ready tensor `x` (inference mode), to time."""

    def run() -> object:
        with torch.inference_mode():
            return model(x)

    return run
