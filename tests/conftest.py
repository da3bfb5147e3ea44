"""Shared test fixtures: a tiny synthetic COVIDx folder and the optional real data.

``tiny_covidx`` builds a folder in the COVIDx layout (train/val/test label files and image
folders) of 64x64 images in which positives carry a bright central blob, so a small model
can learn the task in a few steps. Every split holds both labels and two sources
(``srcA``: grayscale PNG, ``srcB``: RGB JPEG); patients never cross splits, and some
patients have two images.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SOURCES = ("srcA", "srcB")
_GRADIO_TEMP_DIR = "GRADIO_TEMP_DIR"


def pytest_configure(config):
    """Each test run gets its own gradio cache folder (inherited by the apps it starts).

    Gradio reads GRADIO_TEMP_DIR when it is imported, so this runs before any test module
    imports it. With the shared default (/tmp/gradio) another gradio process on the machine
    that closes deletes files this run's servers still serve."""
    config._covidtl_gradio_temp = tempfile.mkdtemp(prefix="covidtl-tests-gradio-")
    config._covidtl_gradio_previous = os.environ.get(_GRADIO_TEMP_DIR)
    os.environ[_GRADIO_TEMP_DIR] = config._covidtl_gradio_temp


def pytest_unconfigure(config):
    folder = getattr(config, "_covidtl_gradio_temp", None)
    if folder is None:
        return
    previous = config._covidtl_gradio_previous
    if previous is None:
        os.environ.pop(_GRADIO_TEMP_DIR, None)
    else:
        os.environ[_GRADIO_TEMP_DIR] = previous
    shutil.rmtree(folder, ignore_errors=True)
DEFAULT_SPLIT_SIZES = {"train": 12, "val": 6, "test": 6}


def shared_data_dir() -> Path | None:
    """``../shared/data`` next to the repository (real images, not redistributable), or None."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    return path if path.is_dir() else None


def synthetic_xray(label: int, source: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``[size, size]`` uint8 image; positives have a bright disk in the middle."""
    yy, xx = np.mgrid[0:size, 0:size]
    radius = np.hypot(yy - size / 2, xx - size / 2)
    image = 60.0 + (15.0 if source == "srcB" else 0.0) + rng.normal(0.0, 12.0, (size, size))
    if label == 1:
        image += 140.0 * (radius < size / 4)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_covidx_folder(
    tmp_path: Path,
    n_per_split: int | dict[str, int] | None = None,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write a synthetic COVIDx folder under ``tmp_path / "covidx"`` and return it.

    Images cycle through (positive, srcA), (negative, srcA), (positive, srcB),
    (negative, srcB), so a split of 4 or more images holds both labels and both sources.
    Image ``i`` and ``i + 4`` of a split share a patient.
    """
    sizes = DEFAULT_SPLIT_SIZES if n_per_split is None else n_per_split
    if isinstance(sizes, int):
        sizes = {split: sizes for split in DEFAULT_SPLIT_SIZES}
    rng = np.random.default_rng(seed)
    combos = [(1, "srcA"), (0, "srcA"), (1, "srcB"), (0, "srcB")]
    root = tmp_path / "covidx"
    for split, count in sizes.items():
        (root / split).mkdir(parents=True)
        lines = []
        for i in range(count):
            label, source = combos[i % len(combos)]
            pixels = synthetic_xray(label, source, size, rng)
            if source == "srcA":
                filename = f"{split}_{i:03d}.png"
                Image.fromarray(pixels, mode="L").save(root / split / filename)
            else:
                filename = f"{split}_{i:03d}.jpg"
                Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(root / split / filename, quality=95)
            patient = f"{split}-{source}-{label}-{i // (2 * len(combos))}"
            lines.append(f"{patient} {filename} {'positive' if label else 'negative'} {source}\n")
        (root / f"{split}.txt").write_text("".join(lines))
    return root


@pytest.fixture
def tiny_covidx(tmp_path: Path) -> Path:
    """Root of a synthetic COVIDx folder: 12 train, 6 val, 6 test images of 64x64."""
    return make_covidx_folder(tmp_path)


def shared_data(name: str) -> Path:
    """Root of the real data set ``../shared/data/<name>``; skips the test when it is absent."""
    shared = shared_data_dir()
    if shared is None or not (shared / name).is_dir():
        pytest.skip(f"real data ../shared/data/{name} is absent (only on development machines)")
    return shared / name


@pytest.fixture
def covidx_mini() -> Path:
    """Root of the real ``covidx-mini`` folder; skips the test when it is absent."""
    return shared_data("covidx-mini")


@pytest.fixture
def covidx_plus() -> Path:
    """Root of the real ``covidx-plus`` folder; skips the test when it is absent."""
    return shared_data("covidx-plus")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread: on a small shared CPU, OpenMP threads spinning against other
    processes make the suite's tiny convolutions 10-40x slower, not faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def unrendered_plots():
    """For the modules whose training runs check no figure: covidtl.plots still builds every
    figure a run makes, but writes an empty PNG instead of rasterizing it, which is about half
    the time of a tiny training run (matplotlib's layout and rendering of 8 figures). The
    figures themselves are checked in tests/test_plots.py and tests/test_train_cli.py."""
    from covidtl import plots

    def unrendered(fig, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        return path

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plots, "_save", unrendered)
        yield


@pytest.fixture
def seeded():
    """Seed torch for one test without changing the RNG state other tests see."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


@pytest.fixture
def fake_lungs(tmp_path, monkeypatch):
    """A lung weights file (its bytes only feed the cache key) that loads as FakeLungs."""
    path = tmp_path / "fake_lungs.safetensors"
    path.write_bytes(b"fake lung model")
    from covidtl import lungs
    from tests.synthetic_inputs import FakeLungs

    monkeypatch.setattr(lungs, "load_lung_model", lambda p: (FakeLungs(), {"name": "fake", "weights_sha256": "f"}))
    return path
