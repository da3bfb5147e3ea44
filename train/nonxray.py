"""Build a development set of images that are not chest X-rays, for the input check.

    python -m train.nonxray --out runs/nonxray          # writes runs/nonxray/{tune,measure}/*.png

Kinds: scikit-image's bundled sample photos (only images inside the wheel, never its
downloads) in colour, grey and as grey crops; rendered documents and text; matplotlib
charts; drawings; noise; gradients; checkerboards; renderings that look like CT, MRI and
ultrasound. Every kind is split alternately into a `tune` half (used to choose the
cutoff's margin) and a `measure` half (only reported), so no image both sets and scores
the check. Nothing of it is committed: it is regenerated the same on every run.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SKIMAGE_COLOUR = (
    "astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right",
    "hubble_deep_field", "immunohistochemistry", "retina", "logo", "colorwheel",
)  # fmt: skip
SKIMAGE_GREY = (
    "camera", "moon", "page", "text", "coins", "horse", "brick", "grass", "gravel", "cell",
    "clock", "microaneurysms", "shepp_logan_phantom", "checkerboard", "binary_blobs",
)  # fmt: skip
WORDS = "the of patient report results figure table method data model clinical study value".split()


def _skimage_images(names: tuple[str, ...]) -> Iterator[tuple[str, np.ndarray]]:
    from skimage import data

    for name in names:
        try:
            image = getattr(data, name)()
        except Exception:  # an image this scikit-image version only downloads: not used
            continue
        image = np.asarray(image)
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        if image.dtype != np.uint8:
            image = (255 * (image.astype(np.float64) - image.min()) / max(np.ptp(image), 1e-9)).astype(np.uint8)
        if image.ndim == 3 and image.shape[2] == 4:
            image = image[..., :3]
        yield name, image


def _grey(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).convert("L")) if image.ndim == 3 else image


def _crops(name: str, image: np.ndarray, rng: np.random.Generator, n: int) -> Iterator[tuple[str, np.ndarray]]:
    h, w = image.shape[:2]
    for i in range(n):
        fh, fw = rng.uniform(0.4, 0.75, 2)
        ch, cw = max(32, int(h * fh)), max(32, int(w * fw))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        yield f"{name}-crop{i}", image[y : y + ch, x : x + cw]


def _document(rng: np.random.Generator, size: int = 512) -> np.ndarray:
    image = Image.new("L", (size, int(size * 1.3)), 255)
    draw = ImageDraw.Draw(image)
    y = 20
    while y < image.height - 20:
        words = " ".join(rng.choice(WORDS, rng.integers(4, 12)))
        draw.text((20 + int(rng.integers(0, 30)), y), words, fill=int(rng.integers(0, 80)))
        y += int(rng.integers(12, 30))
    return np.asarray(image)


def _chart(kind: int, rng: np.random.Generator) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
    x = np.arange(12)
    if kind == 0:
        ax.plot(x, rng.normal(size=12).cumsum())
    elif kind == 1:
        ax.bar(x, rng.uniform(1, 5, 12))
    elif kind == 2:
        ax.scatter(rng.normal(size=50), rng.normal(size=50))
    else:
        ax.pie(rng.uniform(1, 3, 5))
    ax.set_title("Figure")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return np.asarray(Image.open(buffer).convert("RGB"))


def _drawing(rng: np.random.Generator, size: int = 384, dark: bool = False) -> np.ndarray:
    image = Image.new("L", (size, size), 0 if dark else 255)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(5, 25)):
        box = sorted(rng.integers(0, size, 2)), sorted(rng.integers(0, size, 2))
        xy = [box[0][0], box[1][0], box[0][1], box[1][1]]
        ink = int(rng.integers(0, 256))
        shape = rng.integers(0, 3)
        if shape == 0:
            draw.ellipse(xy, outline=ink, width=int(rng.integers(1, 5)))
        elif shape == 1:
            draw.rectangle(xy, outline=ink, width=int(rng.integers(1, 5)))
        else:
            draw.line(xy, fill=ink, width=int(rng.integers(1, 6)))
    return np.asarray(image)


def _noise(kind: int, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    if kind == 0:
        image = rng.normal(128, 50, (size, size))
    elif kind == 1:
        image = rng.uniform(0, 255, (size, size))
    elif kind == 2:
        image = np.where(rng.random((size, size)) < 0.5, 0, 255).astype(float)
    else:
        blurred = Image.fromarray(rng.uniform(0, 255, (size, size)).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(float(rng.uniform(2, 8)))
        )
        image = np.asarray(blurred, dtype=float)
        image = (image - image.min()) / max(np.ptp(image), 1) * 255
    return np.clip(image, 0, 255).astype(np.uint8)


def _gradient(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    if rng.random() < 0.5:
        angle = rng.uniform(0, np.pi)
        image = np.cos(angle) * xx + np.sin(angle) * yy
    else:
        cy, cx = rng.uniform(0.2, 0.8, 2)
        image = -np.hypot(yy - cy, xx - cx)
    image = (image - image.min()) / np.ptp(image) * 255
    return image.astype(np.uint8)


def _checkerboard(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    square = int(rng.integers(4, 64))
    yy, xx = np.mgrid[0:size, 0:size] // square
    low, high = sorted(rng.integers(0, 256, 2))
    return np.where((yy + xx) % 2 == 0, low, high).astype(np.uint8)


def _ellipse(yy, xx, cy, cx, ry, rx, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    y, x = yy - cy, xx - cx
    return ((c * x + s * y) / rx) ** 2 + ((-s * x + c * y) / ry) ** 2 < 1


def _ct_like(rng: np.random.Generator, size: int = 320) -> np.ndarray:
    """An axial slice: a body ellipse on black, a bright ring of bone, dark lungs, organs."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.zeros((size, size))
    ry, rx = rng.uniform(0.3, 0.4), rng.uniform(0.4, 0.47)
    body = _ellipse(yy, xx, 0.5, 0.5, ry, rx)
    image[body] = 110
    image[body & ~_ellipse(yy, xx, 0.5, 0.5, ry - 0.02, rx - 0.02)] = 60  # fat line
    if rng.random() < 0.7:  # chest: lungs
        for cx in (0.33, 0.67):
            image[_ellipse(yy, xx, 0.47, cx, ry * 0.7, rx * 0.33, rng.uniform(-0.3, 0.3))] = 15
        image[_ellipse(yy, xx, 0.5, 0.5, 0.09, 0.07)] = 140  # heart
    else:  # abdomen: organs
        for _ in range(4):
            image[_ellipse(yy, xx, *rng.uniform(0.35, 0.65, 2), *rng.uniform(0.04, 0.12, 2))] = rng.uniform(90, 170)
    image[_ellipse(yy, xx, 0.5 + ry * 0.75, 0.5, 0.04, 0.04)] = 240  # spine
    image += rng.normal(0, 6, image.shape) * body
    return np.clip(image, 0, 255).astype(np.uint8)


def _mri_like(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A head slice: skull ring, grey brain with darker ventricles and textured folds."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.zeros((size, size))
    head = _ellipse(yy, xx, 0.5, 0.5, 0.42, 0.35)
    image[head] = 200
    brain = _ellipse(yy, xx, 0.5, 0.5, 0.38, 0.31)
    folds = np.asarray(
        Image.fromarray(rng.uniform(0, 255, (size, size)).astype(np.uint8)).filter(ImageFilter.GaussianBlur(3)),
        dtype=float,
    )
    image[brain] = 90 + 0.5 * folds[brain]
    for cx in (0.45, 0.55):
        image[_ellipse(yy, xx, 0.48, cx, 0.1, 0.03, 0.2 * (cx - 0.5) * 10)] = 30
    return np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)


def _ultrasound_like(rng: np.random.Generator, size: int = 320) -> np.ndarray:
    """A fan-shaped sector of speckle on black, with a dark cyst or two."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    r, theta = np.hypot(yy - 0.05, xx - 0.5), np.arctan2(xx - 0.5, yy - 0.05)
    sector = (r < 0.9) & (r > 0.1) & (np.abs(theta) < rng.uniform(0.5, 0.8))
    speckle = rng.rayleigh(40, (size, size)) * np.exp(-1.2 * r)
    for _ in range(rng.integers(1, 3)):
        speckle[_ellipse(yy, xx, *rng.uniform(0.35, 0.7, 2), *rng.uniform(0.04, 0.1, 2))] *= 0.15
    return np.clip(speckle * sector * 1.6, 0, 255).astype(np.uint8)


def generate(seed: int = 0) -> Iterator[tuple[str, str, np.ndarray]]:
    """(kind, name, uint8 grey [H, W] or RGB [H, W, 3]) for every development image."""
    rng = np.random.default_rng(seed)
    for name, image in _skimage_images(SKIMAGE_COLOUR):
        yield "photo-colour", name, image
        yield "photo-grey", f"{name}-grey", _grey(image)
        for crop_name, crop in _crops(name, _grey(image), rng, 2):
            yield "photo-grey-crop", crop_name, crop
    for name, image in _skimage_images(SKIMAGE_GREY):
        yield "grey-sample", name, _grey(image)
        for crop_name, crop in _crops(name, _grey(image), rng, 2):
            yield "grey-sample-crop", crop_name, crop
    for i in range(12):
        yield "document", f"document{i}", _document(rng)
    for i in range(12):
        yield "chart", f"chart{i}", _chart(i % 4, rng)
    for i in range(16):
        yield "drawing", f"drawing{i}", _drawing(rng, dark=i % 2 == 1)
    for i in range(16):
        yield "noise", f"noise{i}", _noise(i % 4, rng)
    for i in range(10):
        yield "gradient", f"gradient{i}", _gradient(rng)
    for i in range(10):
        yield "checkerboard", f"checkerboard{i}", _checkerboard(rng)
    for i in range(20):
        yield "ct-like", f"ct{i}", _ct_like(rng)
    for i in range(14):
        yield "mri-like", f"mri{i}", _mri_like(rng)
    for i in range(14):
        yield "ultrasound-like", f"ultrasound{i}", _ultrasound_like(rng)


def split_halves(seed: int = 0) -> dict[str, list[tuple[str, str, np.ndarray]]]:
    """The development images, each kind split alternately into "tune" and "measure"."""
    halves: dict[str, list] = {"tune": [], "measure": []}
    seen: dict[str, int] = {}
    for kind, name, image in generate(seed):
        index = seen.get(kind, 0)
        seen[kind] = index + 1
        halves["tune" if index % 2 == 0 else "measure"].append((kind, name, image))
    return halves


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.nonxray", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("runs/nonxray"), help="folder for tune/ and measure/")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for half, items in split_halves(args.seed).items():
        folder = args.out / half
        folder.mkdir(parents=True, exist_ok=True)
        for kind, name, image in items:
            Image.fromarray(image).save(folder / f"{kind}--{name}.png")
        print(f"{half}: {len(items)} images in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
