"""The input check (covidtl.scope) and the one decision (covidtl.decision): tiny gates fitted
here on synthetic films, the shipped gate (weights/scope/, skipped when absent) on real
films and on photos, and real films through a launched app: label = decision at the threshold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image
from synthetic_inputs import export_tiny_model, launched, not_xrays, offline_client, synthetic_gate, xray_like

import app
from covidtl.decision import OUT_OF_SCOPE, decision_label, label_data, rank_models
from covidtl.inference import ModelStore, Prediction
from covidtl.scope import Mahalanobis, ScopeGate, cheap_checks, gate_for, load_gate, save_gate, small_rgb

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "weights" / "scope"
EXAMPLES = sorted((ROOT / "assets" / "examples").glob("*.jpg"))


@pytest.fixture(scope="module")
def gate() -> ScopeGate:
    return synthetic_gate()


@pytest.fixture(scope="module")
def shipped() -> ScopeGate:
    if not (SHIPPED / "scope.json").is_file():
        pytest.skip("no fitted input check in weights/scope (python -m train.scope fit --data ...)")
    return load_gate(SHIPPED)


def _image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels)


# --------------------------------------------------------------------------- decision


def _pred(p: float, threshold: float) -> Prediction:
    return Prediction({"negative": 1 - p, "positive": p}, p, p >= threshold, threshold, 1.0)


def test_the_label_is_the_decision_at_the_threshold_not_the_larger_class():
    assert decision_label(_pred(0.341, 0.336)) == "COVID-19"  # the smaller class, flagged
    assert decision_label(_pred(0.9, 0.95)) == "Negative"  # the larger class, not flagged
    assert decision_label(None) == OUT_OF_SCOPE
    payload = label_data(_pred(0.341, 0.336))
    assert payload["label"] == "COVID-19"
    assert [c["label"] for c in payload["confidences"]] == ["Negative", "COVID-19"]
    assert label_data(None) == {"label": OUT_OF_SCOPE, "confidences": []}


def test_models_are_ranked_default_first_then_by_validation_auc():
    def card(auc=None, **flags):
        metrics = {} if auc is None else {"val": {"overall": {"auc": {"value": auc}}}}
        return {"metrics": metrics, **flags}

    cards = {"a": card(0.7), "b": card(0.9, baseline=True), "c": card(0.8, default=True), "d": card(), "e": card(0.95)}
    assert rank_models(cards) == ["c", "e", "b", "a", "d"]


def test_compare_leaves_baselines_out_of_the_ensemble_and_marks_them(tmp_path):
    export_tiny_model(tmp_path, "base", threshold=0.0, seed=0, baseline=True)
    export_tiny_model(tmp_path, "main", threshold=1.01, seed=1, default=True)
    store = ModelStore(tmp_path)
    path = tmp_path / "film.png"
    _image(xray_like(128, seed=4)).save(path)
    rows, gallery, ensemble = app.compare(store, ScopeGate(), str(path), "Grad-CAM")
    assert [row[0] for row in rows] == ["main", "base (baseline)"]
    assert "Baselines left out: base" in ensemble and "Only one model" in ensemble
    assert [shown for shown, _ in app.model_choices(store)] == ["main (default)", "base (baseline)"]


# --------------------------------------------------------------------------- checks


def test_cheap_checks_refuse_colour_and_uniform_images_with_a_reason():
    images = not_xrays()
    colour = cheap_checks(small_rgb(_image(images["colour"])))
    assert not colour.in_scope and colour.check == "colour" and "a colour photo, not a radiograph" in colour.reason
    uniform = cheap_checks(small_rgb(_image(images["uniform"])))
    assert not uniform.in_scope and uniform.check == "uniform"
    assert cheap_checks(small_rgb(_image(xray_like(128)))).in_scope
    grey_rgb = np.stack([xray_like(128)] * 3, axis=-1)  # a grey film saved as RGB is still grey
    assert cheap_checks(small_rgb(_image(grey_rgb))).in_scope


def test_mahalanobis_equals_the_full_shrunk_covariance_formula():
    from sklearn.covariance import ledoit_wolf_shrinkage

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 50)) @ rng.normal(size=(50, 50)) + 3.0  # fewer vectors than dimensions
    fitted = Mahalanobis.fit(x)
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    s = ledoit_wolf_shrinkage(z, assume_centered=True)
    cov = z.T @ z / len(z)
    shrunk = (1 - s) * cov + s * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    queries = x[:5] + 3 * rng.normal(size=(5, 50)) * x.std(0)  # training films moved off their cloud
    zq = (queries - x.mean(0)) / (x.std(0) + 1e-6)
    expected = np.sqrt(np.einsum("nd,de,ne->n", zq, np.linalg.inv(shrunk), zq))
    np.testing.assert_allclose(fitted(queries), expected, rtol=1e-3)
    assert fitted(x).max() < fitted(queries).min()


def test_a_fitted_gate_refuses_what_is_not_a_chest_xray_and_survives_a_round_trip(gate, tmp_path):
    for seed in (1, 2, 3):
        assert gate.check(_image(xray_like(160, seed=seed))).in_scope
    for kind, pixels in not_xrays().items():
        result = gate.check(_image(pixels))
        assert not result.in_scope, kind
        if result.check == "distance":
            assert "far from the chest X-rays these models learned from" in result.reason
    assert gate.check(_image(not_xrays()["gradient"])).check == "distance"
    loaded = load_gate(save_gate(gate, tmp_path / "scope"))
    films = [small_rgb(_image(xray_like(100, seed=7))), small_rgb(_image(not_xrays()["noise"]))]
    np.testing.assert_allclose(loaded.distances(films), gate.distances(films), rtol=1e-4)
    assert loaded.cutoff == gate.cutoff
    assert gate_for(tmp_path).fitted and not gate_for(tmp_path / "absent").fitted


# --------------------------------------------------------------------------- the shipped gate


def test_the_shipped_gate_passes_the_app_examples_and_refuses_photos(shipped):
    for path in EXAMPLES:
        result = shipped.check(Image.open(path))
        assert result.in_scope, (path.name, result.reason)
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (requirements-dev.txt) is not installed")
    for name in ("astronaut", "camera", "coffee", "page"):
        assert not shipped.check(Image.fromarray(getattr(skimage_data, name)())).in_scope, name


def test_the_shipped_gate_card_records_what_it_refuses(shipped):
    card = json.loads((SHIPPED / "scope.json").read_text())
    refusals = card["refusals"]
    assert refusals["examples"]["refused"] == 0
    assert refusals["measure"]["share"] >= 0.9 and refusals["test"]["share"] <= 0.05
    assert card["cutoff"] == shipped.cutoff


def test_the_shipped_gate_passes_real_test_films(shipped, covidx_mini):
    paths = sorted((covidx_mini / "test").iterdir())[:6]
    refused = [p.name for p in paths if not shipped.check(Image.open(p)).in_scope]
    assert refused == []


# --------------------------------------------------------------------------- real films through the API


@pytest.fixture(scope="module")
def real_client(tmp_path_factory):
    """An app with two tiny models (thresholds 0 and 1.01) and the shipped gate, or the
    cheap checks alone when none is installed: real films get a decision."""
    weights = tmp_path_factory.mktemp("weights")
    export_tiny_model(weights, "always", threshold=0.0, seed=0)
    export_tiny_model(weights, "never", threshold=1.01, seed=1)
    gate = load_gate(SHIPPED) if (SHIPPED / "scope.json").is_file() else ScopeGate()
    with launched(app.build_demo(weights, gate=gate)) as url:
        yield offline_client(url), ModelStore(weights)


def _real_films() -> list[Path]:
    from conftest import shared_data_dir

    shared = shared_data_dir()
    mini = shared / "covidx-mini" / "test" if shared else None
    return EXAMPLES + (sorted(mini.iterdir())[:2] if mini and mini.is_dir() else [])


@pytest.mark.parametrize("model", ["always", "never"])
def test_real_films_through_the_client_get_the_decision_at_the_threshold(real_client, model):
    client, store = real_client
    threshold = store.cards[model]["threshold"]
    assert len(_real_films()) >= 4
    for path in _real_films():
        label, decision, *_ = client.predict(handle_file(str(path)), model, "Grad-CAM", 0.4, api_name="/classify")
        p = next(c["confidence"] for c in label["confidences"] if c["label"] == "COVID-19")
        assert label["label"] == ("COVID-19" if p >= threshold else "Negative"), path.name
        assert f"threshold {threshold:.3f}" in decision
