"""covidtl.resolution_audit and `python -m train.resolution_audit`: does a model's decision change
when the same film comes at another size?"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from covidtl.cards import card_markdown
from covidtl.labels import Record, spread
from covidtl.resolution_audit import SQUARE_SIDE, VARIANTS, audit_films
from tests.synthetic_inputs import export_tiny_model
from train import model_table
from train import resolution_audit as resolution_cli


def _films(labels, width=150, height=120):
    return [(Image.new("L", (width, height), 100), label) for label in labels]


def test_the_variants_are_half_double_the_public_square_and_its_jpeg_copy():
    film = Image.new("L", (150, 120), 90)
    sizes = {name: change(film).size for name, (_, change) in VARIANTS.items()}
    assert sizes == {"half": (75, 60), "double": (300, 240), "square": (SQUARE_SIDE, SQUARE_SIDE),
                     "jpeg": (SQUARE_SIDE, SQUARE_SIDE), "database": (SQUARE_SIDE, SQUARE_SIDE)}
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 150), dtype=np.uint8))
    square, copy = (np.asarray(VARIANTS[name][1](noisy), dtype=float) for name in ("square", "jpeg"))
    assert copy.shape == square.shape and 1 < np.abs(copy - square).mean() < 40  # the JPEG's loss, not another film
    database = np.asarray(VARIANTS["database"][1](noisy), dtype=float)
    assert 0 < np.abs(database - copy).mean() < 40  # one more resampling on the way


def test_a_card_audited_before_a_variant_existed_shows_it_as_not_audited():
    old = {"name": "old", "resolution_audit": {"n": 4, "n_positive": 2, "as_is": {"sensitivity": 1.0, "specificity": 0.5},
                                               "variants": {"half": {"flipped": 0.25, "sensitivity": 1.0,
                                                                     "specificity": 0.5}}}}
    row = model_table.resolution_audit_rows([old])[2]
    assert row.startswith("| `old` | 4 (2) | 0.500 / 1.000 | 25.0 %, 0.500 / 1.000 | not audited |")
    assert row.count("not audited") == len(VARIANTS) - 1


def test_a_decision_that_follows_the_films_width_is_counted_as_changed():
    """A 'model' that flags wide films: every decision changes at half size, none at double size,
    and sensitivity and specificity follow."""
    labels = [1, 0, 1, 0, 0]
    audit = audit_films(lambda image: 0.9 if image.width >= 100 else 0.2, _films(labels), threshold=0.5)
    assert (audit["n"], audit["n_positive"], audit["threshold"]) == (5, 2, 0.5)
    assert audit["as_is"] == {"sensitivity": 1.0, "specificity": 0.0, "median_p": 0.9}
    half, double, square = (audit["variants"][name] for name in ("half", "double", "square"))
    assert half["flipped"] == 1.0 and half["sensitivity"] == 0.0 and half["specificity"] == 1.0
    assert half["mean_abs_change"] == pytest.approx(0.7) and half["median_p"] == 0.2
    assert double["flipped"] == 0.0 and double["mean_abs_change"] == 0.0
    assert square["flipped"] == 0.0 and square["change"] == VARIANTS["square"][0]


def test_a_decision_that_ignores_the_size_changes_nowhere_and_one_class_has_no_other_rate():
    audit = audit_films(lambda image: float(np.asarray(image).mean()) / 255, _films([0, 0, 0]), threshold=0.5)
    assert all(v["flipped"] == 0.0 and v["mean_abs_change"] < 0.01 for v in audit["variants"].values())
    assert audit["as_is"] == {"sensitivity": None, "specificity": 1.0, "median_p": pytest.approx(100 / 255)}
    with pytest.raises(ValueError, match="no films"):
        audit_films(lambda image: 0.5, [], threshold=0.5)


def test_spread_keeps_every_sources_share():
    records = [Record(f"p{i}", f"{s}{i}.png", i % 2, s) for s in ("a", "b") for i in range(10)]
    picked = spread(records, 6)
    assert len(picked) == 6 and {r.source for r in picked} == {"a", "b"}
    ranked = sorted(records, key=lambda r: (r.source, r.filename))
    assert picked == [ranked[i] for i in (0, 4, 8, 11, 15, 19)]  # linspace(0, 19, 6), rounded
    assert spread(records, 0) == sorted(records, key=lambda r: (r.source, r.filename))


def test_the_command_writes_each_cards_audit_shown_in_the_card_and_the_table(tiny_covidx, tmp_path, capsys):
    weights = tmp_path / "weights"
    for seed, name in enumerate(("one", "two")):
        export_tiny_model(weights, name, "resnet18", input_size=32, crop_fraction=0.9, seed=seed)
    argv = ["--weights-dir", str(weights), "--data", str(tiny_covidx), "--max-films", "4", "--no-progress"]
    assert resolution_cli.main([*argv, "--models", "one"]) == 0
    assert "one  half:" in capsys.readouterr().out
    one = json.loads((weights / "one.json").read_text())
    audit = one["resolution_audit"]
    assert (audit["data"], audit["split"], audit["n"]) == ("covidx", "test", 4)
    assert set(audit["variants"]) == set(VARIANTS)
    assert "resolution_audit" not in json.loads((weights / "two.json").read_text())  # only the named model
    assert "Does the answer depend on the film's size?" in card_markdown(one)
    rows = model_table.resolution_audit_rows([one, json.loads((weights / "two.json").read_text())])
    assert rows[0].startswith("| model | films (COVID-19) | as stored: spec / sens | half: changed")
    assert rows[2].startswith("| `one` | 4 (2) | ") and rows[3].startswith("| `two` | not audited |")

    assert resolution_cli.main([*argv, "--models", "three"]) == 2
    assert "no classifier ['three']" in capsys.readouterr().err
    assert resolution_cli.main([*argv[:-3], "--max-films", "-1"]) == 2
