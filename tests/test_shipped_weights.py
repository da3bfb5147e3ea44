"""The models in weights/: sizes, honest cards (calibration, default and baseline marks,
no machine path), an up-to-date table, and (on the real test split of each card's data set)
predictions that reproduce each card's test scores and metrics exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import shared_data

from covidtl import metrics
from covidtl.cache import card_cache
from covidtl.engine import predict_scores
from covidtl.export import card_temperature, list_exported, load_model, read_card
from covidtl.labels import parse_label_file, spread, write_label_file
from covidtl.loaders import eval_loader
from train import model_table

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
SHIPPED = list_exported(WEIGHTS)
MB = 2**20
# The data sets the shipped models learned from: their sources, and those the leave-one-source-out
# run beside each card holds out (covidx-large: the four the site-blind comparison names).
SOURCES = {
    "covidx-plus": {"cohen", "fig1", "kermany", "nih"},
    "covidx-large": {"bimcv", "cohen", "fig1", "kermany", "nih", "rsna"},
}
HELD_OUT = {"covidx-plus": SOURCES["covidx-plus"], "covidx-large": {"bimcv", "rsna", "nih", "cohen"}}
REPRODUCED_FILMS = 60  # films of a covidx-large test split scored again (its 669 would take a minute a model)


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
    sources = SOURCES[card["data"]["name"]]
    assert set(card["data"]["sources"]) == sources
    assert all(info["license"] for info in card["data"]["sources"].values())
    assert "sensitivity >= 0.90" in card["threshold_rule"] and "calibrated" in card["threshold_rule"]
    test = card["metrics"]["test"]
    assert set(test["per_source"]) == sources
    assert test["adult_pooled"]["sources"] == sorted(sources - {"kermany"})
    assert test["overall"]["auc"]["ci_low"] <= test["overall"]["auc"]["value"] <= test["overall"]["auc"]["ci_high"]
    audit = card["shortcut_audit"]
    assert audit["n"] == test["n"] and set(audit["per_source"]) == set(test["per_source"])
    if card["initialisation"].startswith("none"):
        assert card["config"]["pretrained"] is False
    assert card["baseline"] is (not card["config"]["pretrained"])  # from scratch: a baseline only
    # Calibration: T, ECE before and after on val and test, the reliability plot beside the card.
    assert card["temperature"] > 0 and card["calibration"]["temperature"] == card["temperature"]
    assert {"ece_before", "ece_after"} <= set(card["calibration"]["val"]) and "test" in card["calibration"]
    assert (WEIGHTS / card["plots"]["reliability"]).is_file()
    # The threshold is the card's rule applied to its stored calibrated validation scores.
    val = card["metrics"]["val"]["scores"]
    assert card["threshold"] == metrics.choose_threshold([r["label"] for r in val], [r["p_positive"] for r in val],
                                                         min_sensitivity=card["config"]["min_sensitivity"])
    # No path of the machine that trained it (STYLE rule 13).
    text = path.with_suffix(".json").read_text()
    assert "/tmp/" not in text and "/work/" not in text and "/home/" not in text and "root" not in card["data"]


def test_exactly_one_shipped_model_is_the_default_and_it_is_no_baseline():
    cards = [read_card(path.with_suffix(".json")) for path in SHIPPED]
    defaults = [card for card in cards if card.get("default")]
    assert len(defaults) == 1 and not defaults[0]["baseline"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_each_shipped_cards_default_and_baseline_marks_are_its_recipes(path):
    """The card's command, run again, gives the same marks: the default from the recipe it names,
    the baseline mark from its initialisation (from scratch)."""
    from covidtl.config import load_recipe
    from train.run import find_recipe

    card = read_card(path.with_suffix(".json"))
    words = card["command"].split()
    recipe = load_recipe(find_recipe(Path(words[words.index("--recipe") + 1])))
    assert (recipe.name, recipe.default, not recipe.pretrained) == (card["name"], card["default"], card["baseline"])
    assert card["config"]["default"] == card["default"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_model_answers_with_its_recipe_s_leave_one_source_out_result(path):
    """The app ends each shipped model's answers with what its recipe did on sources it never
    saw: its `.loso.json` ships beside it, of the same recipe, epochs and seed, every source held out."""
    from covidtl.cards import read_held_out

    card = read_card(path.with_suffix(".json"))
    held = read_held_out(WEIGHTS, card)
    assert held is not None, f"no leave-one-source-out result of {card['name']} beside it: python -m train.loso"
    assert {fold["held_out"] for fold in held.run["folds"]} == HELD_OUT[card["data"]["name"]]
    for run in held.other_seeds:  # weights/ablation/: the same recipe and epochs, another seed
        assert (run["recipe"], run["epochs"]) == (card["name"], card["config"]["epochs"])
        assert run["seed"] != card["config"]["seed"]


def test_weights_readme_is_generated_from_the_cards():
    assert (WEIGHTS / "README.md").read_text() == model_table.render(WEIGHTS), (
        "weights/README.md is stale: python -m train.model_table"
    )


def test_the_readmes_model_table_is_generated_from_the_cards():
    readme = (WEIGHTS.parent / "README.md").read_text()
    assert readme == model_table.with_summary(readme, model_table.summary_rows(WEIGHTS)), (
        "README.md's table of shipped models is stale: python -m train.model_table"
    )
    rows = model_table.summary_rows(WEIGHTS)[2:]
    assert len(rows) == len(SHIPPED) and sum("(default)" in row for row in rows) == 1
    with pytest.raises(ValueError, match="around its model table"):
        model_table.with_summary("# A README without the markers\n", rows)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_predictions_reproduce_the_card_exactly(path, tmp_path):
    """The card's test metrics are its stored per-film scores at its threshold, and the
    exported weights give those scores again: every film of covidx-plus's test split, or
    `REPRODUCED_FILMS` spread over covidx-large's (sorted by source, so every source is in)."""
    model, card = load_model(path)
    expected = card["metrics"]["test"]
    stored = {r["filename"]: r for r in expected["scores"]}
    labels = np.array([r["label"] for r in expected["scores"]])
    scores = np.array([r["p_positive"] for r in expected["scores"]])
    assert metrics.confusion_counts(labels, (scores >= card["threshold"]).astype(int)) == expected["confusion"]
    for name, value in metrics.binary_metrics(labels, scores, card["threshold"]).items():
        want = expected["overall"][name]["value"]
        assert (np.isnan(value) and want is None) or value == pytest.approx(want, abs=1e-6), name

    root = shared_data(card["data"]["name"])
    records = parse_label_file(root / "test.txt")
    assert sorted(r.filename for r in records) == sorted(stored)
    label_file = root / "test.txt"
    if card["data"]["name"] != "covidx-plus":
        records = spread(records, REPRODUCED_FILMS)
        label_file = tmp_path / "sample.txt"  # the cache is keyed by its label file
        write_label_file(records, label_file)
    lung_weights = WEIGHTS / f"{card['lung_crop']['lung_model']}.safetensors" if card.get("lung_crop") else None
    cache = card_cache(card, records, root / "test", label_file, lung_weights, tmp_path, num_workers=0)
    loader = eval_loader(records, root / "test", card["input_size"], card["mean"], card["std"],
                         card["crop_fraction"], batch_size=32, num_workers=0, cache=cache,
                         equalize=card.get("equalize", False))
    again, _, _ = predict_scores(model, loader, "cpu", temperature=card_temperature(card))
    want = np.array([stored[r.filename]["p_positive"] for r in records])
    assert np.abs(again - want).max() < 1e-5  # the card's per-image scores are the calibrated ones


def test_the_default_on_the_four_example_films():
    """docs/model-selection.md ("The default"): through the app's Predictor, one of
    the two COVID-19 films from Hannover (a hospital in none of the training data) is flagged (P 0.622)
    and one is not (0.299); neither NIH example is (0.118, no finding; 0.369, pneumonia), though the
    pneumonia film scores above the second Hannover film."""
    from covidtl.inference import Predictor, load_upload

    default = next(path for path in SHIPPED if read_card(path.with_suffix(".json")).get("default"))
    predictor = Predictor.from_file(default)
    examples = WEIGHTS.parent / "assets" / "examples"
    answers = {film.stem: predictor.predict(load_upload(film)) for film in sorted(examples.glob("*.jpg"))}
    order = ["cohen-covid19-5782ae15", "cohen-covid19-ec083e35", "nih-no-finding-00002371_010",
             "nih-pneumonia-00005638_000"]
    assert [round(answers[name].p_positive, 3) for name in order] == [0.622, 0.299, 0.118, 0.369]
    assert [answers[name].decision for name in order] == [True, False, False, False]


def test_the_table_names_unshipped_loso_recipes_and_compares_every_ingredient():
    """weights/README.md: a leave-one-source-out recipe with no shipped model is named as such,
    and the ingredient comparison has a row for the reference, each shipped recipe's result and each
    ablation result."""
    text = model_table.render(WEIGHTS)
    shipped = {read_card(path.with_suffix(".json"))["name"] for path in SHIPPED}
    unshipped = [r["recipe"] for r in model_table.read_loso(WEIGHTS) if r["recipe"] not in shipped]
    assert unshipped == [model_table.INGREDIENT_REFERENCE]
    assert f"Recipes whose model is not shipped (the ingredient comparison's reference, below): `{unshipped[0]}`." in text
    section = text[text.index("## Ingredient comparison"):text.index("## Lung segmentation model")]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    results = model_table.read_loso(WEIGHTS) + model_table.read_loso(WEIGHTS / "ablation")
    data = next(r["data"] for r in results if r["recipe"] == model_table.INGREDIENT_REFERENCE)
    same_data = [r for r in results if r["data"] == data]  # the comparison is on the reference's data set
    assert len(rows) == len(same_data) < len(results)
    shipped_loso = shipped & {r["recipe"] for r in same_data}
    assert shipped_loso and all(any(row.startswith(f"| `{name}` |") for row in rows) for name in shipped_loso)
    assert rows[0].startswith(f"| `{model_table.INGREDIENT_REFERENCE}` | none (the reference) |")


def test_the_folders_lung_model_is_recognised_by_every_shipped_lung_crop_model():
    """Compare locates the lungs once and crops from them (covidtl.answer.compare_film) for the
    lung-crop models trained with the folder's lung model: `LungOutliner.from_folder` carries
    its weights' checksum, and every shipped lung-crop card names that checksum."""
    from covidtl.lungs import LUNG_MODEL_NAME, LungOutliner, load_lung_model

    outliner = LungOutliner.from_folder(WEIGHTS)
    assert outliner is not None
    assert outliner.sha256 == load_lung_model(WEIGHTS / f"{LUNG_MODEL_NAME}.safetensors")[1]["weights_sha256"]
    cropping = [card for card in (read_card(p.with_suffix(".json")) for p in SHIPPED) if card.get("lung_crop")]
    assert cropping and all(card["lung_crop"]["lung_model_sha256"] == outliner.sha256 for card in cropping)
