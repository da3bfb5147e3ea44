"""The speed paths give the same answers: reduced decoding (`load_image(min_side=...)`), the
table-based 16-bit rescale, 16-bit PNGs decoded by OpenCV, grey uploads framed in one band,
and CAMs whose backward pass stops at the hooked layer."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from synthetic_inputs import export_tiny_model, xray_like
from torchvision.transforms import v2

import covidtl.images
from covidtl.explain import cam_class, explain
from covidtl.images import (
    REDUCING_GAP,
    UnreadableImageError,
    _opencv_decodes_alike,
    _reduction,
    _to_8bit,
    load_image,
    rescale_to_uint8,
)
from covidtl.inference import Predictor, load_upload
from covidtl.models import create_model, get_spec, list_models
from covidtl.transforms import build_transform, eval_geometry

SIDE = 100  # the resize the caller makes; images of 200 px or more on the shorter side get reduced


def _view(image: Image.Image, size: int = 90) -> np.ndarray:
    geometry = v2.Compose(eval_geometry(size, 0.9))  # Resize(100), CenterCrop(90)
    return np.asarray(geometry(image)).astype(np.int16)


def _save(pixels: np.ndarray, path, **options):
    Image.fromarray(pixels).save(path, **options)
    return path


@pytest.fixture
def big_images(tmp_path):
    """A 8-bit PNG, a 16-bit PNG (12 bits used, one hot pixel), an RGB JPEG and a colour PNG."""
    gray = xray_like(520, seed=3)[:, :470]  # 470 x 520: reduced by 2
    deep = gray.astype(np.uint16) * 16 + 40
    deep[5, 5] = 4095
    colour = np.stack([gray, gray // 2, 255 - gray], axis=-1)
    return {
        "png8": _save(gray, tmp_path / "a.png"),
        "png16": _save(deep, tmp_path / "b.png"),
        "jpeg": _save(np.stack([gray] * 3, axis=-1), tmp_path / "c.jpg", quality=95),
        "colour": _save(colour, tmp_path / "d.png"),
    }


@pytest.mark.parametrize("kind", ["png8", "png16", "jpeg", "colour"])
def test_reduced_decode_is_smaller_and_nearly_identical(big_images, kind):
    path = big_images[kind]
    full, reduced = load_image(path), load_image(path, min_side=SIDE)
    assert reduced.mode == "RGB" and min(reduced.size) >= REDUCING_GAP * SIDE
    assert reduced.width < full.width and reduced.height < full.height
    difference = np.abs(_view(full) - _view(reduced))
    assert difference.mean() < 1.0 and difference.max() <= 12, (difference.mean(), difference.max())


def test_reduced_decode_leaves_small_images_alone(big_images):
    for path in big_images.values():
        full = load_image(path)
        same = load_image(path, min_side=max(full.size))  # nothing to gain
        assert same.size == full.size and np.array_equal(np.asarray(same), np.asarray(full))


def test_reduced_16_bit_keeps_the_full_range(tmp_path):
    # The hot pixel sets the maximum at full size; averaged away by the reduction, it must
    # still set the scale, or the reduced image would come out brighter.
    pixels = np.full((400, 400), 1000, dtype=np.uint16)
    pixels[0, 0], pixels[200:, :] = 4000, 2000
    path = _save(pixels, tmp_path / "hot.png")
    reduced = np.asarray(load_image(path, min_side=SIDE))[..., 0]
    assert reduced.shape == (200, 200)
    assert reduced[50, 50] == 0 and reduced[150, 100] == round(1000 * 255 / 3000)


def _pil_only(monkeypatch):
    """Make `load_image` decode 16-bit PNGs with PIL, as it does when OpenCV cannot."""
    monkeypatch.setattr(covidtl.images, "_opencv_decodes_alike", lambda opened: False)


@pytest.mark.parametrize("shape", [(403, 301), (400, 300), (150, 90)])
@pytest.mark.parametrize("min_side", [None, SIDE, 40])
def test_16_bit_png_decoded_by_opencv_equals_pil(tmp_path, monkeypatch, shape, min_side):
    pixels = np.random.default_rng(1).integers(300, 3800, shape, endpoint=True).astype(np.uint16)
    path = _save(pixels, tmp_path / "deep.png")
    with Image.open(path) as opened:
        assert _opencv_decodes_alike(opened)  # the fast path is the one taken
    fast = np.asarray(load_image(path, min_side=min_side))
    stream = np.asarray(load_image(io.BytesIO(path.read_bytes()), min_side=min_side))
    _pil_only(monkeypatch)
    slow = np.asarray(load_image(path, min_side=min_side))
    assert fast.shape == slow.shape and np.array_equal(fast, slow) and np.array_equal(stream, slow)
    # and both are the block means of the film, rescaled with the film's own range
    factor = _reduction(shape[::-1], min_side)
    height, width = shape[0] // factor, shape[1] // factor
    blocks = pixels[: height * factor, : width * factor].reshape(height, factor, width, factor)
    means = np.round(blocks.mean(axis=(1, 3)))
    expected = np.round((means - pixels.min()) * 255 / (pixels.max() - pixels.min()))
    assert fast.shape == (height, width, 3) and np.abs(fast[..., 0] - expected).max() <= 1


def test_big_endian_16_bit_images_reduce_like_little_endian():
    pixels = np.random.default_rng(2).integers(0, 65535, (64, 48), endpoint=True).astype(np.uint16)
    little = Image.fromarray(pixels)
    big = Image.frombytes("I;16B", little.size, pixels.astype(">u2").tobytes())
    for factor in (1, 3):
        assert np.array_equal(np.asarray(_to_8bit(big, factor)), np.asarray(_to_8bit(little, factor)))


def test_16_bit_pngs_opencv_would_misread_go_to_pil(tmp_path):
    pixels = (np.arange(300 * 400).reshape(300, 400) % 4096).astype(np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    rotated = tmp_path / "rotated.png"
    Image.fromarray(pixels).save(rotated, exif=exif)
    assert load_image(rotated).size == (300, 400)  # upright: EXIF applied by PIL

    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="PNG")
    raw = encoded.getvalue()
    idat = raw.index(b"IDAT")
    corrupt = bytearray(raw)
    corrupt[idat + 4 + int.from_bytes(raw[idat - 4 : idat], "big")] ^= 0xFF  # IDAT checksum
    (tmp_path / "crc.png").write_bytes(bytes(corrupt))  # OpenCV refuses it, PIL reads it
    assert np.array_equal(
        np.asarray(load_image(tmp_path / "crc.png")),
        np.asarray(load_image(_save(pixels, tmp_path / "ok.png"))),
    )

    (tmp_path / "truncated.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UnreadableImageError, match="truncated"):
        load_image(tmp_path / "truncated.png")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
def test_table_rescale_matches_the_float_formula(dtype):
    info = np.iinfo(dtype)
    values = np.random.default_rng(0).integers(info.min, info.max, (64, 64), endpoint=True).astype(dtype)
    low, high = float(values.min()), float(values.max())
    expected = np.round((values.astype(np.float64) - low) * (255.0 / (high - low))).astype(np.uint8)
    assert np.array_equal(rescale_to_uint8(values), expected)


def test_load_upload_and_predictor_use_the_reduced_decode(tmp_path, big_images):
    export_tiny_model(tmp_path, "tiny")
    predictor = Predictor.from_file(tmp_path / "tiny.safetensors")
    assert predictor.resize_side == 249
    image = load_upload(big_images["png8"], min_side=SIDE)
    assert image.size == (235, 260)
    x = predictor.preprocess(image)
    assert x.shape == (1, 3, 224, 224)
    full = predictor.predict(load_upload(big_images["png8"]))
    assert abs(predictor.predict(x).p_positive - full.p_positive) < 0.02


@pytest.mark.parametrize("mean, std", [((0.5,) * 3, (0.5,) * 3), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_grey_uploads_give_the_training_transform_exactly(tmp_path, big_images, mean, std):
    # Uploads of grey films stay "L"; the predictor frames them in one band. The input
    # must be the very tensor the training's eval transform makes from the RGB copy.
    export_tiny_model(tmp_path, "tiny", mean=list(mean), std=list(std))
    predictor = Predictor.from_file(tmp_path / "tiny.safetensors")
    for kind in ("png8", "png16"):
        grey = load_upload(big_images[kind], min_side=SIDE)
        assert grey.mode == "L"
        rgb = grey.convert("RGB")
        expected = build_transform(224, mean, std, train=False, crop_fraction=0.9)(rgb).unsqueeze(0)
        assert torch.equal(predictor.preprocess(grey), expected) and torch.equal(predictor.preprocess(rgb), expected)
        assert np.array_equal(predictor.view(grey), predictor.view(rgb))
    assert load_upload(big_images["colour"], min_side=SIDE).mode == "RGB"


@pytest.mark.parametrize("name", list_models())
def test_cam_with_a_short_backward_pass_equals_the_full_one(name, seeded):
    model = create_model(name).eval()
    layer = get_spec(name).cam_layer
    x = torch.randn(1, 3, 64, 64)
    flags = [p.requires_grad for p in model.parameters()]
    for method in ("Grad-CAM", "Grad-CAM++"):
        with torch.enable_grad(), cam_class(method)(model=model, target_layers=[model.get_submodule(layer)]) as cam:
            expected = cam(input_tensor=x, targets=[ClassifierOutputTarget(1)])[0]
        model.zero_grad(set_to_none=True)
        got = explain(model, x, layer, method)
        assert np.allclose(got, np.clip(expected, 0, 1), atol=1e-6), method
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
