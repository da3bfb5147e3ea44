"""Predictor, ModelStore and upload handling: load once, predict, explain, refuse bad input."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_inputs import export_tiny_model, hook_count, make_dicom, save_png, xray_like

from covidtl.classes import CLASSES, POSITIVE
from covidtl.inference import (
    BadInputError,
    ModelLoadError,
    ModelStore,
    Prediction,
    Predictor,
    load_predictors,
    load_upload,
)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("weights")
    export_tiny_model(folder, "tiny", seed=0)
    export_tiny_model(folder, "tiny-b", seed=1, threshold=0.0)
    return folder


@pytest.fixture(scope="module")
def predictor(weights_dir) -> Predictor:
    return Predictor.from_file(weights_dir / "tiny.safetensors")


def rgb(seed: int = 0, size: int = 120) -> Image.Image:
    return Image.fromarray(xray_like(size, seed=seed)).convert("RGB")


# --------------------------------------------------------------------------- Predictor


def test_predict_gives_probabilities_and_a_decision_at_the_threshold(predictor):
    prediction = predictor.predict(rgb())
    assert isinstance(prediction, Prediction)
    assert list(prediction.probabilities) == list(CLASSES)
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert prediction.p_positive == prediction.probabilities[CLASSES[POSITIVE]]
    assert prediction.threshold == 0.5
    assert prediction.decision == (prediction.p_positive >= 0.5)
    assert prediction.latency_ms > 0


def test_threshold_comes_from_the_card(weights_dir):
    always = Predictor.from_file(weights_dir / "tiny-b.safetensors")  # threshold 0
    assert always.predict(rgb()).decision is True


def test_preprocess_and_view_shapes(predictor):
    x = predictor.preprocess(rgb(size=300))
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    view = predictor.view(Image.fromarray(np.zeros((300, 500, 3), dtype=np.uint8)))
    assert view.shape == (224, 224, 3) and view.dtype == np.uint8


def test_a_shared_tensor_gives_the_same_answer(predictor, weights_dir):
    other = Predictor.from_file(weights_dir / "tiny-b.safetensors")
    assert other.geometry == predictor.geometry
    image = rgb(3)
    x = predictor.preprocess(image)
    assert predictor.predict(x).probabilities == pytest.approx(predictor.predict(image).probabilities)


def test_explain_through_the_predictor(predictor):
    heatmap = predictor.explain(rgb(), "Grad-CAM++")
    assert heatmap.shape == (224, 224) and 0.0 <= heatmap.min() <= heatmap.max() <= 1.0
    assert hook_count(predictor.model) == 0


def test_concurrent_predict_and_explain_stay_separate(predictor):
    images = [rgb(seed, size=100 + 10 * seed) for seed in range(6)]
    expected = [(predictor.predict(im).p_positive, predictor.explain(im)) for im in images]
    results: dict[int, tuple[float, np.ndarray]] = {}
    errors = []

    def work(i: int) -> None:
        try:
            for _ in range(2):
                results[i] = (predictor.predict(images[i]).p_positive, predictor.explain(images[i]))
        except Exception as err:  # noqa: BLE001 - reported below with its thread
            errors.append((i, err))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, (p, heatmap) in results.items():
        assert p == pytest.approx(expected[i][0], abs=1e-6)
        np.testing.assert_allclose(heatmap, expected[i][1], atol=1e-4)
    assert hook_count(predictor.model) == 0


# --------------------------------------------------------------------------- ModelStore


def test_store_loads_each_model_once(weights_dir):
    store = ModelStore(weights_dir)
    assert sorted(store.names()) == ["tiny", "tiny-b"]
    assert store.get("tiny") is store.get("tiny")
    with pytest.raises(ValueError, match="available"):
        store.get("nope")


class _Explodes:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_store_skips_broken_files_and_never_unpickles(tmp_path):
    export_tiny_model(tmp_path, "good")
    marker = tmp_path / "UNPICKLED"
    bomb = _Explodes()
    bomb.marker = str(marker)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(bomb))
    (tmp_path / "evil.pth").write_bytes(pickle.dumps(bomb))
    (tmp_path / "lonely.safetensors").write_bytes(b"no card")
    (tmp_path / "badjson.safetensors").write_bytes(b"x")
    (tmp_path / "badjson.json").write_text("{not json")
    export_tiny_model(tmp_path, "corrupt")
    (tmp_path / "corrupt.safetensors").write_bytes(b"garbage, not safetensors")

    store = ModelStore(tmp_path)
    assert sorted(store.names()) == ["corrupt", "good"]
    assert {"evil.pt", "evil.pth", "lonely.safetensors", "badjson.safetensors"} <= set(store.skipped)
    assert "pickle" in store.skipped["evil.pt"]
    assert "card" in store.skipped["lonely.safetensors"]
    with pytest.raises(ModelLoadError, match="corrupt"):
        store.get("corrupt")
    with pytest.raises(ModelLoadError):  # the failure is remembered, not retried
        store.get("corrupt")
    assert "corrupt.safetensors" in store.skipped

    loaded = load_predictors(tmp_path)
    assert list(loaded) == ["good"]
    assert not marker.exists()


def test_store_of_a_missing_or_empty_folder(tmp_path):
    assert ModelStore(tmp_path / "absent").names() == []
    assert ModelStore(tmp_path).names() == []
    assert load_predictors(tmp_path) == {}


def test_duplicate_card_names_are_skipped(tmp_path):
    export_tiny_model(tmp_path, "same")
    (tmp_path / "copy.safetensors").write_bytes((tmp_path / "same.safetensors").read_bytes())
    (tmp_path / "copy.json").write_text((tmp_path / "same.json").read_text())
    store = ModelStore(tmp_path)
    assert store.names() == ["same"]
    assert "already used" in store.skipped["same.safetensors"]  # copy.safetensors came first


# --------------------------------------------------------------------------- uploads


@pytest.mark.parametrize("kind", ["png8", "png16", "jpeg", "bmp", "tiff16", "rgba"])
def test_load_upload_reads_image_formats(tmp_path, kind):
    pixels = xray_like(64, seed=2)
    if kind == "png8":
        path = save_png(pixels, tmp_path / "x.png")
    elif kind == "png16":
        path = tmp_path / "x16.png"
        Image.fromarray(pixels.astype(np.uint16) * 200).save(path)
    elif kind == "jpeg":
        path = tmp_path / "x.jpg"
        Image.fromarray(pixels).save(path, quality=90)
    elif kind == "bmp":
        path = tmp_path / "x.bmp"
        Image.fromarray(pixels).save(path)
    elif kind == "tiff16":
        path = tmp_path / "x.tif"
        Image.fromarray(pixels.astype(np.uint16) * 250).save(path)
    else:
        path = tmp_path / "x_rgba.png"
        Image.fromarray(np.dstack([pixels] * 3 + [np.full_like(pixels, 255)])).save(path)
    image = load_upload(path)
    assert image.mode == ("RGB" if kind == "rgba" else "L") and image.size == (64, 64)  # grey films stay grey
    array = np.asarray(image.convert("L")).astype(int)
    assert np.corrcoef(array.ravel(), pixels.ravel())[0, 1] > 0.95  # same picture, any bit depth


def test_load_upload_detects_dicom_by_signature_or_name(tmp_path):
    pixels = xray_like(64, seed=4).astype(np.uint16) * 16
    disguised = tmp_path / "scan.png"  # a DICOM with the wrong extension
    disguised.write_bytes(make_dicom(pixels, "MONOCHROME1", 12))
    raw = tmp_path / "raw.dcm"  # no preamble, recognised by its name
    raw.write_bytes(make_dicom(pixels, "MONOCHROME2", 12, preamble=False))
    inverted = np.asarray(load_upload(disguised))[..., 0].astype(int)
    plain = np.asarray(load_upload(raw))[..., 0].astype(int)
    np.testing.assert_array_equal(inverted + plain, 255)


def test_load_upload_refuses_bad_files_clearly(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is a text file renamed to .png\n" * 20)
    whole = save_png(xray_like(128, seed=5), tmp_path / "whole.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    bad_dicom = tmp_path / "bad.dcm"
    bad_dicom.write_text("not dicom at all" * 20)

    cases = {
        None: "no file was uploaded",
        empty: "empty",
        text: "not an image",
        truncated: "truncated",
        tmp_path / "gone.png": "no longer there",
        bad_dicom: "not a DICOM file",
    }
    for path, words in cases.items():
        with pytest.raises(BadInputError, match=words):
            load_upload(path)
    with pytest.raises(BadInputError, match="MiB"):
        load_upload(whole, max_bytes=100)
    with pytest.raises(BadInputError, match="megapixels"):
        load_upload(whole, max_pixels=100)
    dicom = tmp_path / "big.dcm"
    dicom.write_bytes(make_dicom(xray_like(64), bits_stored=8))
    with pytest.raises(BadInputError, match="megapixels"):
        load_upload(dicom, max_pixels=100)
    assert issubclass(BadInputError, ValueError)


# --------------------------------------------------------------------------- real images


def test_real_images_from_covidx_mini(covidx_mini, predictor):
    files = sorted((covidx_mini / "test").iterdir())[:4]
    assert files, "covidx-mini/test is empty"
    for path in files:
        image = load_upload(path)
        prediction = predictor.predict(image)
        assert 0.0 <= prediction.p_positive <= 1.0
        heatmap = predictor.explain(image)
        assert heatmap.shape == (224, 224) and np.isfinite(heatmap).all()
    assert hook_count(predictor.model) == 0
