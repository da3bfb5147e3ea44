"""The models in weights/: sizes, honest cards, an up-to-date table, and (on the real
covidx-mini test split) predictions that reproduce each card's test metrics exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from covidtl import metrics
from covidtl.engine import predict_scores
from covidtl.export import list_exported, load_model, read_card
from covidtl.labels import parse_label_file
from covidtl.loaders import eval_loader
from train import model_table

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
SHIPPED = list_exported(WEIGHTS)
MB = 2**20


def test_at_least_three_models_ship_within_size_limits():
    assert len(SHIPPED) >= 3, f"expected the shipped models in {WEIGHTS}"
    assert all(path.stat().st_size <= 50 * MB for path in SHIPPED)
    assert sum(path.stat().st_size for path in SHIPPED) <= 100 * MB
    assert not list(WEIGHTS.glob("*.pt")) + list(WEIGHTS.glob("*.pth")), "pickles never ship"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_card_tells_the_truth(path):
    card = read_card(path.with_suffix(".json"))
    assert "not a medical device" in card["intended_use"].lower()
    text = " ".join(card["limitations"]).lower()
    assert "pediatric" in text and "external hospital" in text
    assert card["data"]["name"] == "covidx-mini"
    assert set(card["data"]["sources"]) == {"cohen", "fig1", "kermany"}
    assert all(info["license"] for info in card["data"]["sources"].values())
    assert "sensitivity >= 0.90" in card["threshold_rule"]
    test = card["metrics"]["test"]
    assert set(test["per_source"]) == {"cohen", "fig1", "kermany"}
    assert test["overall"]["auc"]["ci_low"] <= test["overall"]["auc"]["value"] <= test["overall"]["auc"]["ci_high"]
    audit = card["shortcut_audit"]
    assert audit["n"] == test["n"] and set(audit["per_source"]) == set(test["per_source"])
    if card["initialisation"].startswith("none"):
        assert card["config"]["pretrained"] is False


def test_weights_readme_is_generated_from_the_cards():
    assert (WEIGHTS / "README.md").read_text() == model_table.render(WEIGHTS), (
        "weights/README.md is stale: python -m train.model_table"
    )


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_predictions_reproduce_the_card_exactly(path, covidx_mini):
    model, card = load_model(path)
    records = parse_label_file(covidx_mini / "test.txt")
    loader = eval_loader(records, covidx_mini / "test", card["input_size"], card["mean"], card["std"],
                         card["crop_fraction"], batch_size=32, num_workers=0)
    scores, labels, _ = predict_scores(model, loader, "cpu")
    expected = card["metrics"]["test"]
    assert metrics.confusion_counts(labels, (scores >= card["threshold"]).astype(int)) == expected["confusion"]
    point = metrics.binary_metrics(labels, scores, card["threshold"])
    for name, value in point.items():
        want = expected["overall"][name]["value"]
        assert (np.isnan(value) and want is None) or value == pytest.approx(want, abs=1e-6), name
