"""Synthetic inputs shared by the app tests: X-ray-like images, DICOM files written with
pydicom, tiny exported models, a launched app. Nothing here touches the network."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from torch import nn

from covidtl.classes import CLASSES
from covidtl.export import export_model
from covidtl.models import create_model

# Seconds one HTTP call of a test client may take: a request on a loaded 2-core machine took
# tens of seconds, and a deadline is only there so a broken server cannot hang the suite.
CLIENT_TIMEOUT_S = 120

DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage, for presentation


def xray_like(size: int = 96, seed: int = 0, bright_disk: bool = False) -> np.ndarray:
    """uint8 [size, size]: noisy gray field, two darker "lungs", optionally a bright disk."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = 150.0 + rng.normal(0.0, 15.0, (size, size))
    for cx in (0.3, 0.7):
        image -= 80.0 * (((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)
    if bright_disk:
        image += 90.0 * (np.hypot(xx - 0.5, yy - 0.5) < 0.15)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_dicom(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    preamble: bool = True,
    **elements,
) -> bytes:
    """A DICOM Part 10 file (Explicit VR Little Endian) holding `pixels`.

    `pixels` is [rows, cols] (one frame), [frames, rows, cols] (multi-frame) or
    [rows, cols, 3] with photometric "RGB". Extra keyword arguments become data elements
    (e.g. ``RescaleSlope=2, WindowCenter=1000, WindowWidth=400``). `preamble=False`
    drops the 128-byte preamble and the DICM signature (a "raw" dataset).
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = DX_IMAGE_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    bits = bits_stored or (8 if pixels.dtype == np.uint8 else 16)
    ds.set_pixel_data(pixels, photometric, bits)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    if preamble:
        ds.save_as(buffer, enforce_file_format=True)
    else:
        ds.save_as(buffer, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


def export_tiny_model(
    weights_dir: Path,
    name: str = "tiny",
    architecture: str = "squeezenet1_1",
    threshold: float = 0.5,
    seed: int = 0,
    **card,
) -> Path:
    """Export an untrained `architecture` (random weights from `seed`) with a minimal card."""
    import torch

    torch.manual_seed(seed)
    base = {
        "name": name,
        "architecture": architecture,
        "classes": list(CLASSES),
        "input_size": 224,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "threshold": threshold,
    }
    return export_model(create_model(architecture), {**base, **card}, weights_dir)


def save_png(pixels: np.ndarray, path: Path) -> Path:
    Image.fromarray(pixels).save(path)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (it may be taken by the time
    it is used: `launch` retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(demo, attempts: int = 5) -> str:
    """Serve `demo` (a gr.Blocks of app.py) on 127.0.0.1 at a free port; its URL.

    `free_port` lets its port go before gradio binds it, so another process on a busy machine
    can take it in between; gradio then raises OSError and a new port is tried. (Port 0
    cannot be passed: gradio builds and checks its URL from the number it was given.)"""
    import app

    def once() -> str:
        _, url, _ = demo.launch(**app.launch_options("127.0.0.1", free_port()), prevent_thread_lock=True, quiet=True)
        return url

    for _ in range(attempts - 1):
        try:
            return once()
        except OSError:
            pass  # the offered port was taken meanwhile: ask for another
    return once()


def hook_count(model) -> int:
    """Forward, forward-pre and backward hooks registered on any module of `model`."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def offline_client(url: str) -> Client:
    """A client that starts no telemetry thread (gradio_client reads the variable, not the argument)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        env.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        # gradio_client's httpx calls time out after 5 s by default: too short on a busy machine.
        return Client(url, verbose=False, analytics_enabled=False, httpx_kwargs={"timeout": CLIENT_TIMEOUT_S})


@contextmanager
def launched(demo) -> Iterator[str]:
    """Serve `demo` (a gr.Blocks of app.py) on 127.0.0.1 at a free port; yield its URL."""
    url = launch(demo)
    try:
        yield url
    finally:
        demo.close()


def scope_training_films(n: int = 24) -> list[np.ndarray]:
    """`xray_like` films of several sizes and seeds, half with a bright disk, as RGB [224, 224, 3]."""
    from covidtl.scope import small_rgb

    return [
        small_rgb(Image.fromarray(xray_like(64 + 8 * (i % 16), seed=100 + i, bright_disk=i % 2 == 1)))
        for i in range(n)
    ]


def synthetic_gate(margin: float = 3.0):
    """An input check fitted on `xray_like` films with the ImageNet encoder: `xray_like`
    images are in scope, other kinds of images are far. Skips when the encoder's ImageNet
    weights are not installed."""
    from covidtl.models import PretrainedWeightsUnavailable
    from covidtl.scope import Encoder, fit_gate

    films = scope_training_films()
    try:
        gate, val = fit_gate(films[::2] + films[1::4], films[3::4], percentile=100.0, margin=margin, encoder=Encoder())
    except PretrainedWeightsUnavailable as err:
        pytest.skip(f"no ImageNet weights for the input check's encoder: {err}")
    return gate


def not_xrays(size: int = 160) -> dict[str, np.ndarray]:
    """Images that are not chest X-rays: a colour picture, a uniform grey, a gradient,
    noise, a checkerboard, a page of text (uint8, grey [H, W] or RGB [H, W, 3])."""
    from PIL import ImageDraw

    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:size, 0:size]
    colour = np.stack([xx * 255 // size, yy * 255 // size, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    page = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(page)
    for row in range(8, size - 8, 14):
        draw.text((6, row), "lorem ipsum dolor sit amet", fill=0)
    return {
        "colour": colour,
        "uniform": np.full((size, size), 120, dtype=np.uint8) + (xx % 2 == 0).astype(np.uint8),
        "gradient": (xx * 255 // size).astype(np.uint8),
        "noise": rng.integers(0, 256, (size, size), dtype=np.uint8),
        "checkerboard": np.where((yy // 20 + xx // 20) % 2 == 0, 30, 220).astype(np.uint8),
        "text": np.asarray(page),
    }


class FakeLungs(nn.Module):
    """Stands in for the lung model: two lungs (the left and right thirds of the middle rows)
    when the film's centre is brighter than `bright` (tiny_covidx's positives at 0.3,
    `xray_like(bright_disk=True)` at 0.6); otherwise no lungs, or with `blob` one central blob
    (not a frontal chest). `passes` counts the films it has seen."""

    def __init__(self, bright: float = 0.3, blob: bool = False) -> None:
        super().__init__()
        self.bright, self.blob, self.passes = bright, blob, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.passes += len(x)
        b, _, h, w = x.shape
        logits = torch.full((b, 1, h, w), -10.0)
        for i in range(b):
            if x[i, 0, h // 2, w // 2] > self.bright:
                logits[i, 0, h // 4 : 3 * h // 4, w // 8 : 3 * w // 8] = 10.0
                logits[i, 0, h // 4 : 3 * h // 4, 5 * w // 8 : 7 * w // 8] = 10.0
            elif self.blob:
                logits[i, 0, h // 4 : 3 * h // 4, 3 * w // 8 : 5 * w // 8] = 10.0
        return logits
