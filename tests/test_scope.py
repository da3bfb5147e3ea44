"""The input check (covidtl.scope) and the one decision (covidtl.decision): tiny gates fitted
here on synthetic films, the shipped gate (weights/scope/, skipped when absent) on real
films and on photos, and real films through a launched app: label = decision at the threshold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_data
from gradio_client import handle_file
from PIL import Image
from synthetic_inputs import export_tiny_model, launched, not_xrays, offline_client, synthetic_gate, xray_like

import app
from covidtl.decision import FLAGGED, NOT_FLAGGED, OUT_OF_SCOPE, decision_label, rank_models
from covidtl.inference import ModelStore, Prediction
from covidtl.lungs import LungCrop, check_mask
from covidtl.scope import (
    LUNG_FIELD_REASON,
    Mahalanobis,
    ScopeGate,
    cheap_checks,
    field_reason,
    gate_for,
    load_gate,
    lung_field_reason,
    save_gate,
    small_rgb,
)

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
    assert decision_label(_pred(0.341, 0.336)) == FLAGGED  # the smaller class, flagged
    assert decision_label(_pred(0.9, 0.95)) == NOT_FLAGGED  # the larger class, not flagged
    assert decision_label(None) == OUT_OF_SCOPE


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
    answers, scale, gallery, ensemble = app.compare(store, ScopeGate(), str(path), "Grad-CAM")
    assert [a["model"] for a in answers] == ["main", "base"]
    assert [caption.split(":")[0] for _, caption in gallery] == ["main", "base (baseline)"]
    assert scale.count("(baseline)") == 1 and scale.index("main") < scale.index("base")
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
        answer, _, decision, *_ = client.predict(handle_file(str(path)), model, "Grad-CAM", 0.4, api_name="/classify")
        assert answer["in_scope"] and answer["model"] == model and answer["threshold"] == threshold, path.name
        assert answer["decision"] == (FLAGGED if answer["p_covid"] >= threshold else NOT_FLAGGED), path.name
        assert decision.startswith(f"**{answer['decision']}** by `{model}`")


# --------------------------------------------------------------------------- lung fields

S = 192  # the lung model's logits are S x S


def _logits(*regions: tuple[slice, slice, float]) -> np.ndarray:
    """float32 [S, S] lung logits: -6 (not lung) except `value` in each (rows, cols) region."""
    logits = np.full((S, S), -6.0, dtype=np.float32)
    for rows, cols, value in regions:
        logits[rows, cols] = value
    return logits


LEFT, RIGHT = (slice(40, 160), slice(30, 90), 6.0), (slice(40, 160), slice(105, 165), 6.0)


def test_two_side_by_side_lung_fields_pass():
    assert field_reason(_logits(LEFT, RIGHT)) is None
    # one lung mostly whited out: check_mask (the lung crop's rule) calls it implausible, a
    # frontal film it still is
    small = (slice(100, 150), slice(120, 140), 6.0)  # 0.14 of the left lung's area
    assert not check_mask(_logits(LEFT, small) > 0).plausible
    assert field_reason(_logits(LEFT, small)) is None


@pytest.mark.parametrize(
    "regions, detail",
    [
        ((), "(0 lung-sized components)"),
        (((slice(40, 160), slice(30, 165), 6.0),), "(1 lung-sized component)"),  # one wide region
        (((slice(20, 180), slice(50, 140), 6.0),), "(1 lung-sized component)"),  # lateral-like: one tall field
        ((LEFT, (slice(100, 115), slice(120, 135), 6.0)), "(the second lung-sized component is 0.03"),  # a speck
        (((slice(10, 70), slice(40, 150), 6.0), (slice(110, 170), slice(40, 150), 6.0)), "not side by side"),
        ((LEFT, (slice(10, 50), slice(95, 155), 6.0)), "not side by side"),  # higher up, not beside it
    ],
)
def test_no_two_lung_fields_is_refused_with_the_reason(regions, detail):
    reason = field_reason(_logits(*regions))
    assert reason is not None and reason.startswith(LUNG_FIELD_REASON) and detail in reason, reason


def test_lungs_joined_across_a_weaker_mediastinum_pass_a_uniform_blob_does_not():
    bridge = (slice(40, 100), slice(90, 105), 1.5)  # joins the lungs at the decision logit 0, parts at 2
    assert field_reason(_logits(LEFT, RIGHT, bridge)) is None
    assert "(1 lung-sized component)" in field_reason(_logits(LEFT, RIGHT, (*bridge[:2], 6.0)))
    big_left, big_right = (slice(5, 187), slice(5, 92), 6.0), (slice(5, 187), slice(100, 187), 6.0)
    wide_bridge = (slice(5, 187), slice(92, 100), 1.5)  # the same, but 88 % of the image: no pair of lungs
    assert "(1 lung-sized component)" in field_reason(_logits(big_left, big_right, wide_bridge))


def test_lung_field_reason_reads_the_lung_crops_logits():
    image = Image.new("L", (64, 64))
    two = _logits(LEFT, RIGHT)
    assert lung_field_reason(LungCrop(image, None, check_mask(two > 0), two)) is None
    one = _logits((slice(20, 180), slice(50, 140), 6.0))
    assert lung_field_reason(LungCrop(image, None, check_mask(one > 0), one)).startswith(LUNG_FIELD_REASON)
    with pytest.raises(ValueError, match="crop_to_lungs or locate_lungs"):
        lung_field_reason(LungCrop(image, None, check_mask(two > 0)))


@pytest.fixture(scope="module")
def lung_model():
    from covidtl.lungs import default_lung_weights, load_lung_model

    if not default_lung_weights().is_file():
        pytest.skip("the shipped lung model is absent")
    return load_lung_model(default_lung_weights())[0]


def test_the_lateral_views_of_covidx_mini_are_refused(lung_model):
    from covidtl.images import load_image
    from covidtl.lungs import locate_lungs
    from train.scope import LATERAL_VIEWS

    root = shared_data("covidx-mini")
    for name in LATERAL_VIEWS:
        reason = lung_field_reason(locate_lungs(load_image(root / name, grey=True), lung_model))
        assert reason is not None and reason.startswith(LUNG_FIELD_REASON), name
    for path in EXAMPLES:
        assert lung_field_reason(locate_lungs(load_image(path, grey=True), lung_model)) is None, path.name


# covidx-large val films whose lung mask check_mask calls implausible (lungs joined, small,
# lopsided): frontal films all the same
HARD_FRONTAL = ("00003437_000.jpg", "bimcv-COVID-1963.jpg", "bimcv-COVID-3615.jpg", "rsna-Normal-2881.jpg",
                "rsna-Normal-4206.jpg", "rsna-Normal-7771.jpg")  # fmt: skip


def test_frontal_films_of_every_source_keep_two_lung_fields(lung_model):
    """66 covidx-large val films: up to 12 per source, spread over it (AP, PA, supine,
    children, figures, 224 px films), plus the hard ones above."""
    from covidtl.images import load_image
    from covidtl.labels import parse_label_file
    from covidtl.lungs import locate_lungs

    root = shared_data("covidx-large")
    records = parse_label_file(root / "val.txt")
    sources = sorted({r.source for r in records})
    assert len(sources) == 6
    sample = []
    for source in sources:
        films = [r.filename for r in records if r.source == source]
        sample += [films[i] for i in np.unique(np.linspace(0, len(films) - 1, 12).round().astype(int))]
    sample += [name for name in HARD_FRONTAL if name not in sample]
    assert len(sample) >= 66 and all((root / "val" / name).is_file() for name in sample)
    refused = {}
    for name in sample:
        image = load_image(root / "val" / name, grey=True)
        found = locate_lungs(image, lung_model)
        if name in HARD_FRONTAL:
            assert not found.check.plausible, name  # hard for the lung crop's rule
        reason = lung_field_reason(found)
        if reason is not None:
            refused[name] = reason
    assert refused == {}


def test_the_lung_field_record_is_current_and_meets_its_bounds():
    """weights/scope/lung_fields.json (python -m train.scope lungs): made with today's rule,
    the laterals all refused, covidx-large's val and test films at most 1 %, no example."""
    from covidtl import scope

    record = json.loads((SHIPPED / "lung_fields.json").read_text())
    for name, value in record["rule"].items():
        assert value == (list(getattr(scope, name)) if isinstance(value, list) else getattr(scope, name)), name
    views = record["laterals"]["views"]
    assert views["refused"] == views["n"] == 4
    assert all(why.startswith(LUNG_FIELD_REASON) for why in views["refused_files"].values())
    assert record["frontal"]["covidx-large"]["val+test"]["n"] == 1342
    assert record["frontal"]["covidx-large"]["val+test"]["share"] <= 0.01
    assert record["examples"]["refused"] == 0 and record["examples"]["n"] == 4
    assert "/work" not in json.dumps(record) and str(ROOT) not in json.dumps(record)


def test_the_lung_field_command_counts_every_set_and_writes_no_machine_path(tmp_path, monkeypatch, lung_model, capsys):
    import train.nonxray
    from train import scope as train_scope

    def covidx(root: Path, per_split: int) -> Path:
        for split in ("train", "val", "test"):
            (root / split).mkdir(parents=True)
            lines = []
            for i in range(per_split):
                Image.fromarray(xray_like(96, seed=i)).save(root / split / f"{split}{i}.png")
                lines.append(f"p{split}{i} {split}{i}.png negative {('a', 'b')[i % 2]}\n")
            (root / f"{split}.txt").write_text("".join(lines))
        return root

    data, mini = covidx(tmp_path / "films", 2), covidx(tmp_path / "mini", 1)
    examples = tmp_path / "examples"
    examples.mkdir()
    Image.fromarray(xray_like(96, seed=9)).save(examples / "ex.png")
    monkeypatch.setattr(train_scope, "LATERAL_VIEWS", ("val/val0.png",))
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    monkeypatch.setattr(train.nonxray, "split_halves", lambda seed: {"tune": [("noise", "n0", noise)], "measure": []})
    out = tmp_path / "lung_fields.json"
    argv = ["lungs", "--data", str(data), "--laterals", str(mini), "--augment", "2", "--examples", str(examples),
            "--gate", str(tmp_path / "no-weights"), "--out", str(out), "--threads", "1"]  # fmt: skip
    assert train_scope.main(argv) == 0
    record = json.loads(out.read_text())
    films = record["frontal"]["films"]
    assert [films[s]["n"] for s in ("train", "val", "test", "val+test")] == [2, 2, 2, 4]
    assert sorted(films["val"]["by_source"]) == ["a", "b"]
    assert record["frontal"]["mini"]["all but the laterals"]["n"] == 2
    assert record["laterals"]["views"]["n"] == 1 and record["laterals"]["variants"]["n"] == 3  # mirrored + 2
    assert record["examples"]["n"] == 1 and record["non_chest"]["all"]["n"] == 1 + 3  # noise, the example's parts
    assert record["command"].startswith("python -m train.scope lungs --data films ")
    assert str(tmp_path) not in out.read_text()
    assert "films val+test: refused" in capsys.readouterr().out
