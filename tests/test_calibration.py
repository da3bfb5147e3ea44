"""Temperature scaling, calibration error, and the temperature in the Predictor."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from covidtl import calibration
from covidtl.calibration import (
    calibration_summary,
    expected_calibration_error,
    fit_temperature,
    nll,
    positive_scores,
    reliability_bins,
)
from covidtl.classes import POSITIVE
from covidtl.export import CardError, card_temperature, export_model, read_card
from covidtl.inference import Predictor
from covidtl.models import create_model


def synthetic_logits(n: int, true_temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits z * T0 whose labels are drawn from softmax(z): the calibrating T is T0."""
    rng = np.random.default_rng(seed)
    z = np.stack([np.zeros(n), rng.normal(0.0, 2.0, n)], axis=1)
    labels = (rng.random(n) < 1 / (1 + np.exp(-z[:, 1]))).astype(np.int64)
    return z * true_temperature, labels


@pytest.mark.parametrize("t0", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_a_known_temperature(t0):
    logits, labels = synthetic_logits(20_000, t0)
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(t0, rel=0.05)
    # it is the NLL minimum: nearby temperatures do worse
    assert nll(logits, labels, t) <= min(nll(logits, labels, t * 1.1), nll(logits, labels, t / 1.1))


def test_fit_temperature_stops_at_a_bound_and_needs_both_classes():
    logits = np.array([[0.0, 50.0], [0.0, -50.0]])
    assert fit_temperature(logits, [1, 0]) == pytest.approx(calibration.T_BOUNDS[0])  # separable: sharpen all the way
    with pytest.raises(ValueError, match="both"):
        fit_temperature(logits, [1, 1])


def test_ece_hand_case():
    # bin [0.1, 0.2): scores 0.1, 0.1, labels 0, 1 -> |0.5 - 0.1| = 0.4, weight 2/4
    # bin [0.9, 1.0]: scores 0.9, 1.0 (1.0 falls in the last bin), labels 1, 1 -> |1 - 0.95| = 0.05, weight 2/4
    ece = expected_calibration_error([0, 1, 1, 1], [0.1, 0.1, 0.9, 1.0])
    assert ece == pytest.approx(0.5 * 0.4 + 0.5 * 0.05)
    bins = reliability_bins([0, 1, 1, 1], [0.1, 0.1, 0.9, 1.0])
    assert [b["n"] for b in bins] == [0, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert math.isnan(bins[0]["mean_score"])
    assert expected_calibration_error([1, 0], [1.0, 0.0]) == 0.0


def test_calibration_lowers_ece_and_nll_on_overconfident_logits():
    logits, labels = synthetic_logits(5_000, 3.0, seed=1)
    t = fit_temperature(logits, labels)
    block = calibration_summary({"val": (logits, labels)}, t)
    assert block["temperature"] == t
    assert block["val"]["nll_after"] < block["val"]["nll_before"]
    assert block["val"]["ece_after"] < block["val"]["ece_before"]
    # the ranking (hence AUC) is unchanged
    assert np.array_equal(np.argsort(positive_scores(logits, 1.0)), np.argsort(positive_scores(logits, t)))


def test_positive_scores_are_softmax_of_logits_over_t():
    logits = np.array([[0.3, -1.2], [2.0, 2.5]])
    expected = torch.softmax(torch.tensor(logits) / 1.7, dim=1)[:, POSITIVE].numpy()
    assert positive_scores(logits, 1.7) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        positive_scores(logits, 0.0)


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    model = create_model("squeezenet1_1", pretrained=False).eval()
    card = {"name": "calib", "architecture": "squeezenet1_1", "input_size": 224, "crop_fraction": 0.9,
            "mean": [0.5] * 3, "std": [0.25] * 3, "threshold": 0.5, "temperature": 2.5}
    path = export_model(model, card, tmp_path)
    return path, model


def test_predictor_probabilities_are_softmax_of_logits_over_the_card_temperature(exported):
    path, model = exported
    predictor = Predictor.from_file(path)
    assert predictor.temperature == 2.5
    image = Image.fromarray((np.random.default_rng(0).random((300, 260)) * 255).astype(np.uint8))
    x = predictor.preprocess(image)
    with torch.inference_mode():
        logits = predictor.model(x).float()
    expected = torch.softmax(logits / 2.5, dim=1)[0]
    prediction = predictor.predict(image)
    assert prediction.p_positive == pytest.approx(expected[POSITIVE].item(), abs=1e-6)
    assert prediction.p_positive != pytest.approx(torch.softmax(logits, dim=1)[0, POSITIVE].item(), abs=1e-4)
    assert prediction.decision == (prediction.p_positive >= predictor.threshold)


def test_a_card_without_temperature_means_t_1_and_a_bad_one_is_refused(exported):
    path, _ = exported
    card_path = path.with_suffix(".json")
    card = json.loads(card_path.read_text())
    del card["temperature"]
    card_path.write_text(json.dumps(card))
    assert card_temperature(read_card(card_path)) == 1.0  # exported before calibration: plain softmax
    assert Predictor.from_file(path).temperature == 1.0
    for bad in (0, -1.0, "2", None, True):
        card_path.write_text(json.dumps(card | {"temperature": bad}))
        with pytest.raises(CardError, match="temperature .*re-export"):
            read_card(card_path)
