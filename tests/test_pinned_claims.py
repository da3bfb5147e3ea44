"""Claims of the README and the model cards, each pinned by a check that does not reuse the
code it checks:

- Grad-CAM hooks the layer written here for each backbone; the Predictor (the app) hooks
  the registry's layer, and every shipped card's shortcut audit measured that same layer;
- the intervals in cards and reports are 95 % intervals: on a metric whose bootstrap
  distribution is known (accuracy of N independent cases is Binomial(N, p) / N), the
  interval ends are its 2.5 and 97.5 percentiles;
- the Predictor frames the central `crop_fraction` of an image and normalizes with the
  card's mean and std, and decides at the card's threshold.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats as scipy_stats
from synthetic_inputs import export_tiny_model, xray_like

import covidtl.inference
from covidtl import metrics
from covidtl.explain import explain
from covidtl.export import list_exported
from covidtl.inference import Predictor
from covidtl.models import list_models

ROOT = Path(__file__).resolve().parents[1]

# The last spatial feature map of each backbone, written out by hand: a change to the
# registry's `cam_layer` has to change this table too.
EXPECTED_CAM_LAYER = {
    "densenet121": "features.denseblock4",
    "efficientnet_b0": "features.8",
    "efficientnet_lite0": "bn2",
    "mobilenet_v3_large": "features.16",
    "resnet18": "layer4",
    "squeezenet1_1": "features.12",
}


def shipped_cards() -> list[dict]:
    return [json.loads(path.with_suffix(".json").read_text()) for path in list_exported(ROOT / "weights")]


# --------------------------------------------------------------------------- CAM layer


def test_every_backbone_has_its_expected_cam_layer():
    from covidtl.models import get_spec

    assert {name: get_spec(name).cam_layer for name in list_models()} == EXPECTED_CAM_LAYER


@pytest.mark.parametrize("name", sorted(EXPECTED_CAM_LAYER))
def test_the_predictor_hooks_the_expected_layer(name, tmp_path, monkeypatch):
    predictor = Predictor.from_file(export_tiny_model(tmp_path, architecture=name, input_size=64))
    hooked = []
    real = covidtl.inference.explain

    def spy(model, x, target_layer, *args, **kwargs):
        hooked.append(target_layer)
        return real(model, x, target_layer, *args, **kwargs)

    monkeypatch.setattr(covidtl.inference, "explain", spy)
    image = Image.fromarray(xray_like(80, seed=1, bright_disk=True))
    heatmap = predictor.explain(image)
    assert hooked == [EXPECTED_CAM_LAYER[name]]
    x = predictor.preprocess(image)
    np.testing.assert_allclose(heatmap, explain(predictor.model, x, EXPECTED_CAM_LAYER[name]), atol=1e-6)


def test_every_shipped_cards_audit_measured_the_layer_the_app_hooks():
    cards = shipped_cards()
    if not cards:
        pytest.skip("no shipped weights in weights/")
    for card in cards:
        assert card["shortcut_audit"]["layer"] == EXPECTED_CAM_LAYER[card["architecture"]], card["name"]


# --------------------------------------------------------------------------- 95 % intervals


def _binomial_case(n: int = 400, p: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """n positives, of which round(n * p) score above the threshold 0.5."""
    hits = round(n * p)
    return np.ones(n, dtype=int), np.r_[np.full(hits, 0.9), np.full(n - hits, 0.1)]


def test_bootstrap_intervals_are_95_percent_intervals():
    # Resampled accuracy is Binomial(n, p) / n: its 2.5 and 97.5 percentiles are known.
    # With n = 400 the 90 % interval's ends lie 0.0075 inside the 95 % one's; with 4000
    # resamples the percentile estimates wander about 0.001.
    n, p = 400, 0.7
    labels, scores = _binomial_case(n, p)
    want = scipy_stats.binom.ppf([0.025, 0.975], n, p) / n
    low, high = metrics.bootstrap_intervals(labels, scores, 0.5, n_boot=4000, seed=1)["accuracy"]
    assert (low, high) == pytest.approx(tuple(want), abs=0.004)
    report = metrics.evaluate_scores(labels, scores, ["s"] * n, 0.5, n_boot=4000, seed=1)
    block = report["overall"]["accuracy"]
    assert (block["ci_low"], block["ci_high"]) == pytest.approx(tuple(want), abs=0.004)
    per_source = report["per_source"]["s"]["metrics"]["sensitivity"]
    assert (per_source["ci_low"], per_source["ci_high"]) == pytest.approx(tuple(want), abs=0.004)


def test_the_interval_level_moves_the_ends_as_the_binomial_says():
    n, p = 400, 0.7
    labels, scores = _binomial_case(n, p)
    for level in (0.8, 0.99):
        want = scipy_stats.binom.ppf([(1 - level) / 2, (1 + level) / 2], n, p) / n
        got = metrics.bootstrap_intervals(labels, scores, 0.5, n_boot=4000, seed=2, level=level)["accuracy"]
        assert got == pytest.approx(tuple(want), abs=0.005), level


# --------------------------------------------------------------------------- Predictor and card


def _ramp(width: int = 400, height: int = 400) -> Image.Image:
    """Grey image whose value at column x is 255 x / (width - 1)."""
    row = np.linspace(0, 255, width)
    return Image.fromarray(np.round(np.tile(row, (height, 1))).astype(np.uint8), mode="L")


@pytest.mark.parametrize("crop", [0.75, 0.9, 1.0])
def test_the_predictor_sees_the_central_crop_fraction_of_the_image(crop, tmp_path):
    predictor = Predictor.from_file(export_tiny_model(tmp_path, input_size=64, crop_fraction=crop))
    view = predictor.view(_ramp()).astype(float)
    assert view.shape == (64, 64, 3)
    # The view spans the central `crop` of the width: its edge columns are the ramp there.
    left, right = 255 * (1 - crop) / 2, 255 * (1 + crop) / 2
    assert view[:, 0].mean() == pytest.approx(left, abs=4)
    assert view[:, -1].mean() == pytest.approx(right, abs=4)


@pytest.mark.parametrize("equalize", [False, True])
def test_the_predictor_equalizes_the_view_when_the_card_says_so(equalize, tmp_path):
    predictor = Predictor.from_file(export_tiny_model(tmp_path, input_size=64, crop_fraction=1.0, equalize=equalize))
    dim = Image.fromarray(np.round(np.asarray(_ramp()) * 0.3 + 40).astype(np.uint8))  # grey levels 40-116
    view = predictor.view(dim)
    if equalize:  # a flat histogram over the whole 8-bit range
        assert view.min() <= 8 and view.max() == 255
        assert np.percentile(view, 50) == pytest.approx(128, abs=8)
    else:
        assert 40 <= view.min() and view.max() <= 116


def test_the_predictor_normalizes_with_the_cards_mean_and_std(tmp_path):
    mean, std = [0.45, 0.4, 0.35], [0.3, 0.2, 0.1]
    predictor = Predictor.from_file(export_tiny_model(tmp_path, input_size=64, mean=mean, std=std))
    image = Image.fromarray(xray_like(64, seed=2))  # 64 px: resize to 71, crop 64
    x = predictor.preprocess(image)[0]
    pixels = torch.from_numpy(np.array(predictor.view(image))).permute(2, 0, 1).float() / 255
    want = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(x, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_the_predictor_decides_at_the_cards_threshold(threshold, tmp_path):
    predictor = Predictor.from_file(export_tiny_model(tmp_path, input_size=64, threshold=threshold))
    prediction = predictor.predict(Image.fromarray(xray_like(64, seed=3)))
    assert prediction.threshold == threshold
    assert prediction.decision is (threshold == 0.0)  # every P >= 0; no P below 1 reaches 1
    assert 0 < prediction.p_positive < 1


def test_a_probability_equal_to_the_threshold_is_flagged(tmp_path):
    """Cards: "predict COVID-19 when P(COVID-19) >= threshold"."""
    image = Image.fromarray(xray_like(64, seed=4))
    p = Predictor.from_file(export_tiny_model(tmp_path / "a", input_size=64)).predict(image).p_positive
    at_p = Predictor.from_file(export_tiny_model(tmp_path / "b", input_size=64, threshold=p)).predict(image)
    assert at_p.p_positive == p and at_p.decision is True


# --------------------------------------------------------------------------- docs: hardening figures


def _stated_number(page: str, pattern: str) -> float:
    """The number a docs page states (the README links the page)."""
    found = re.search(pattern, (ROOT / page).read_text())
    assert found, f"{page} no longer says {pattern!r}"
    return float(found.group(1))


def test_the_readmes_upload_limits_are_the_codes():
    """docs/hardening.md ("Uploads") and docs/speed.md ("Many users")."""
    import app
    from covidtl import inference

    uploads, queue = "docs/hardening.md", "docs/speed.md"
    assert inference.MAX_UPLOAD_BYTES == _stated_number(uploads, r"At most (\d+) MiB") * 2**20
    assert inference.MAX_PIXELS == _stated_number(uploads, r"and (\d+)\s+megapixels") * 1e6
    assert inference.MIN_SIDE == _stated_number(uploads, r"at\s+least (\d+) px")
    assert inference.MAX_ASPECT == _stated_number(uploads, r"aspect\s+ratio of at most (\d+):1")
    assert app.CONCURRENCY_LIMIT == _stated_number(queue, r"At most (\d+) requests run at a time")
    assert app.QUEUE_MAX_SIZE == _stated_number(queue, r"at most (\d+) wait")


@pytest.mark.parametrize(
    "width, height, accepted",
    [(32, 32, True), (31, 64, False), (128, 32, True), (132, 32, False), (32, 128, True), (32, 129, False)],
)
def test_uploads_are_refused_exactly_past_the_side_and_aspect_limits(width, height, accepted, tmp_path):
    from covidtl.inference import BadInputError, load_upload

    path = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width), dtype=np.uint8)).save(path)
    if accepted:
        assert load_upload(path).size == (width, height)
    else:
        with pytest.raises(BadInputError, match="at least 32 pixels on each side and an aspect ratio of at most 4:1"):
            load_upload(path)


def test_an_upload_one_byte_over_the_limit_is_refused_before_reading(tmp_path):
    from covidtl.inference import MAX_UPLOAD_BYTES, BadInputError, load_upload

    path = tmp_path / "big.png"
    with open(path, "wb") as f:
        f.truncate(MAX_UPLOAD_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(BadInputError, match="over the upload limit of 50 MiB"):
        load_upload(path)


# --------------------------------------------------------------------------- shipped cards, real data


def test_a_shipped_threshold_is_the_rule_applied_to_validation():
    """weights/README.md: "the threshold is each model's operating point, chosen on
    validation". Recomputed from a shipped model's validation scores (through the app's
    Predictor: calibrated, softmax(logits / T)) with the card's own rule, and the card's
    validation confusion counts follow from it. One model, the smallest (the real films
    take seconds to decode); the training run's threshold is checked the same way in
    tests/test_training_claims.py."""
    from conftest import shared_data

    from covidtl.inference import load_upload
    from covidtl.labels import parse_label_file

    shipped = list_exported(ROOT / "weights")
    if not shipped:
        pytest.skip("no shipped weights in weights/")
    predictor = Predictor.from_file(min(shipped, key=lambda p: p.stat().st_size))
    data = shared_data(predictor.card["data"]["name"])  # the data set the card was made on
    records = parse_label_file(data / "val.txt")
    labels = np.array([r.label for r in records])
    scores = np.array([predictor.predict(load_upload(data / "val" / r.filename)).p_positive for r in records])
    rule = predictor.card["config"]["min_sensitivity"]
    assert predictor.threshold == pytest.approx(metrics.choose_threshold(labels, scores, rule), abs=1e-5)
    # The rule puts the threshold exactly on one validation positive's score, computed in a
    # batch at training; one image at a time the same film scores within ~1e-7 of it, either
    # side. Only that film may sit within 1e-5 of the threshold; it counts as flagged.
    assert np.sum(np.abs(scores - predictor.threshold) < 1e-5) <= 1
    counts = metrics.confusion_counts(labels, (scores >= predictor.threshold - 1e-5).astype(int))
    assert counts == predictor.card["metrics"]["val"]["confusion"]
