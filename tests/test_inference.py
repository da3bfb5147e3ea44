"""Predictor, ModelStore and upload handling: load once, predict, explain, refuse bad input;
and the answer to a film (covidtl.answer): the same pipeline for one model or several, the
lung-field check for every model, loading on first use."""

from __future__ import annotations

import json
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_inputs import FakeLungs, export_tiny_model, hook_count, make_dicom, not_xrays, save_png, xray_like
from torch import nn

from covidtl.answer import LUNG_CHECK, ModelFolder, answer_film, compare_film
from covidtl.classes import CLASSES, POSITIVE
from covidtl.decision import FLAGGED, NOT_FLAGGED, OUT_OF_SCOPE
from covidtl.inference import (
    BadInputError,
    LoadOnce,
    ModelLoadError,
    ModelStore,
    Prediction,
    Predictor,
    load_predictors,
    load_upload,
)
from covidtl.lungs import LungOutliner, crop_located
from covidtl.models import create_model
from covidtl.scope import ScopeGate


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


# --------------------------------------------------------------------------- loading on first use


def test_load_once_loads_once_for_threads_that_ask_together():
    calls = []

    def slow() -> object:
        calls.append(threading.current_thread().name)
        time.sleep(0.2)  # every thread asks while this load runs
        return object()

    once = LoadOnce(slow)
    assert not once.loaded
    got = []
    threads = [threading.Thread(target=lambda: got.append(once.get())) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 6 and all(value is got[0] for value in got) and once.loaded


def test_a_load_that_fails_is_tried_again():
    outcomes = [OSError("disk hiccup"), "model"]

    def load():
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    once = LoadOnce(load)
    with pytest.raises(OSError, match="hiccup"):
        once.get()
    assert not once.loaded and once.get() == "model" and once.get() == "model"


# --------------------------------------------------------------------------- the answer


def two_or_one_lungs() -> FakeLungs:
    """Two side-by-side lung fields when the film's centre is bright
    (`xray_like(bright_disk=True)`), one central blob (not a frontal chest) otherwise."""
    return FakeLungs(bright=0.6, blob=True)


def _lung_crop_predictor(lung_model: nn.Module, name: str = "cropped") -> Predictor:
    torch.manual_seed(0)
    card = {"name": name, "architecture": "squeezenet1_1", "classes": list(CLASSES), "input_size": 64,
            "mean": [0.5] * 3, "std": [0.25] * 3, "threshold": 0.0,
            "lung_crop": {"lung_model": "fake", "lung_model_sha256": "f"}}  # fmt: skip
    return Predictor(create_model("squeezenet1_1"), card, lung_model=lung_model)


@pytest.fixture(scope="module")
def films(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("films")
    return {
        "frontal": save_png(xray_like(128, seed=1, bright_disk=True), folder / "frontal.png"),
        "one field": save_png(xray_like(128, seed=2), folder / "one-field.png"),
        "colour": save_png(not_xrays()["colour"], folder / "colour.png"),
    }


def test_an_answer_is_the_models_prediction_at_its_threshold(predictor, films):
    answer = answer_film(films["frontal"], predictor, ScopeGate())
    expected = predictor.predict(load_upload(films["frontal"]))
    assert answer.p_covid == pytest.approx(expected.p_positive, abs=1e-6) and answer.threshold == 0.5
    assert answer.decision == (FLAGGED if expected.decision else NOT_FLAGGED) and answer.in_scope
    assert answer.model == "tiny" and not answer.lung_crop and answer.lung_box is None
    assert answer.film_size == (128, 128) and answer.heatmap is None and answer.view is None  # none unless asked
    assert set(answer.timings_ms) == {"decode", "input check", "preprocess", "prediction", "total"}
    assert json.loads(json.dumps(answer.to_json())) == answer.to_json()
    explained = answer_film(films["frontal"], predictor, ScopeGate(), heatmap="Grad-CAM++")
    assert explained.p_covid == answer.p_covid and explained.heatmap.shape == (224, 224)
    assert explained.view.shape == (224, 224, 3) and "heatmap" in explained.timings_ms
    assert explained.lungs_in_view is None and hook_count(predictor.model) == 0  # no lung model given
    with pytest.raises(ValueError, match="unknown CAM method"):
        answer_film(films["frontal"], predictor, ScopeGate(), heatmap="Magic")
    with pytest.raises(BadInputError, match="no file"):
        answer_film(None, predictor, ScopeGate())


def test_an_image_the_input_check_refuses_gets_no_probability(predictor, films):
    answer = answer_film(films["colour"], predictor, ScopeGate(), heatmap="Grad-CAM")
    assert answer.decision == OUT_OF_SCOPE and answer.p_covid is None and not answer.in_scope
    assert answer.refused_by == "colour" and "colour photo" in answer.reason and answer.heatmap is None
    assert answer.to_json()["reason"] == answer.reason and answer.to_json()["p_covid"] is None


def test_a_film_without_two_lung_fields_is_out_of_scope_for_every_model(predictor, films):
    """A whole-film model asks the lung model; a lung-crop model checks its own crop: both
    refuse a film in which no two lung fields are found, with the reason."""
    lung_model = two_or_one_lungs()
    models = [predictor, _lung_crop_predictor(lung_model)]
    refused = compare_film(films["one field"], models, ScopeGate(), lungs=LungOutliner(lung_model), heatmap="Grad-CAM")
    assert [a.decision for a in refused] == [OUT_OF_SCOPE] * 2 and all(a.p_covid is None for a in refused)
    assert all(a.refused_by == LUNG_CHECK and "no two lung fields" in a.reason for a in refused)
    assert lung_model.passes == 2  # one for the whole film, one for the crop
    found = compare_film(films["frontal"], models, ScopeGate(), lungs=LungOutliner(lung_model), heatmap="Grad-CAM")
    assert [a.in_scope for a in found] == [True, True]
    whole, cropped = found
    assert whole.lung_box is None and cropped.lung_box is not None and cropped.lung_crop
    assert whole.lungs_in_view.shape == (224, 224) and cropped.lungs_in_view.shape == (64, 64)  # outlines to draw
    # without a lung model, a whole-film model is not asked about lung fields
    assert answer_film(films["one field"], predictor, ScopeGate()).in_scope


def test_a_lung_crop_model_trained_with_the_folders_lung_model_reuses_its_pass(predictor, films):
    """Compare with a whole-film model and a lung-crop model whose card names the lung model
    of the folder (same weights checksum): one lung-model pass serves the lung check, the
    crop and both outlines, and the answers are those of separate passes."""
    lung_model = two_or_one_lungs()
    models = [predictor, _lung_crop_predictor(lung_model)]
    separate = compare_film(films["frontal"], models, ScopeGate(), lungs=LungOutliner(lung_model), heatmap="Grad-CAM")
    assert lung_model.passes == 2  # an outliner of unknown weights: the crop makes its own pass
    lung_model.passes = 0
    shared = compare_film(films["frontal"], models[::-1], ScopeGate(), lungs=LungOutliner(lung_model, "f"),
                          heatmap="Grad-CAM")[::-1]
    assert lung_model.passes == 1
    for one, other in zip(separate, shared):
        assert (one.p_covid, one.lung_box) == (other.p_covid, other.lung_box)
        assert np.array_equal(one.view, other.view) and np.array_equal(one.lungs_in_view, other.lungs_in_view)
    assert not models[1].uses_lung_model("g") and not predictor.uses_lung_model("f")
    crop = models[1].lung_crop(load_upload(films["frontal"]))
    with pytest.raises(ValueError, match="whole film"):
        crop_located(crop)


def test_compare_film_decodes_checks_and_locates_the_lungs_once(weights_dir, films):
    class CountingGate(ScopeGate):
        checks = 0

        def check(self, image):
            CountingGate.checks += 1
            return super().check(image)

    lung_model = two_or_one_lungs()
    store = ModelStore(weights_dir)
    models = [store.get("tiny"), store.get("tiny-b")]  # two whole-film models of one geometry
    answers = compare_film(films["frontal"], models, CountingGate(), lungs=LungOutliner(lung_model))
    assert [a.model for a in answers] == ["tiny", "tiny-b"] and CountingGate.checks == 1 and lung_model.passes == 1
    assert "preprocess" in answers[0].timings_ms and "preprocess" not in answers[1].timings_ms  # one shared tensor
    alone = answer_film(films["frontal"], models[1], ScopeGate())
    assert answers[1].p_covid == pytest.approx(alone.p_covid, abs=1e-6) and answers[1].decision == FLAGGED
    with pytest.raises(ValueError, match="at least one model"):
        compare_film(films["frontal"], [], ScopeGate())


def test_a_model_folder_loads_on_first_use_and_answers_with_its_default(weights_dir, films):
    folder = ModelFolder(weights_dir, gate=ScopeGate())
    assert folder.store._predictors == {} and not folder.lungs.loaded  # nothing loaded yet
    assert folder.default_name() == "tiny"  # no default in the cards, no AUC: by name
    folder.warm_up()
    assert list(folder.store._predictors) == ["tiny"] and folder.lungs.loaded and folder.lungs.get() is None
    assert folder.answer(films["frontal"]).model == "tiny"
    assert folder.answer(films["frontal"], "tiny-b").decision == FLAGGED
    with pytest.raises(ValueError, match="unknown model"):
        folder.answer(films["frontal"], "nope")
