"""Tests for covidtl.provenance: split summaries, source descriptions, shortcut warnings."""

import json

from covidtl.labels import Record
from covidtl.provenance import SOURCES, UNKNOWN, shortcut_warnings, source_table, split_summary


def _records(spec: dict[tuple[str, int], int]) -> list[Record]:
    """`spec` maps (source, label) to a count; label 1 is positive."""
    out = []
    for (source, label), count in spec.items():
        out += [Record(f"{source}-{label}-{i}", f"{source}_{label}_{i}.png", label, source) for i in range(count)]
    return out


def test_split_summary_counts_labels_per_source():
    records = _records({("cohen", 1): 3, ("kermany", 0): 4, ("kermany", 1): 1})
    summary = split_summary(records)
    assert summary == {
        "n": 8,
        "n_positive": 4,
        "per_source": {"cohen": {"positive": 3}, "kermany": {"negative": 4, "positive": 1}},
    }
    assert json.loads(json.dumps(summary)) == summary  # goes into the card as is


def test_split_summary_of_nothing():
    assert split_summary([]) == {"n": 0, "n_positive": 0, "per_source": {}}


def test_source_table_describes_known_and_unknown_sources():
    table = source_table(["kermany", "mystery", "cohen", "kermany"])
    assert list(table) == ["cohen", "kermany", "mystery"]
    assert table["kermany"]["population"] == "pediatric"
    assert table["kermany"]["license"] == SOURCES["kermany"].license
    assert table["cohen"]["population"] == "adult"
    assert table["mystery"] == {"description": UNKNOWN.description, "population": "unknown", "license": UNKNOWN.license}
    assert set(table["cohen"]) == {"description", "population", "license"}


def test_single_label_source_is_flagged():
    records = _records({("srcA", 0): 5, ("srcA", 1): 5, ("onlypos", 1): 3})
    warnings = shortcut_warnings(records)
    assert len(warnings) == 1
    assert "'onlypos'" in warnings[0] and "3 images" in warnings[0] and "positive" in warnings[0]
    assert "unknown patients" in warnings[0]


def test_adult_positive_pediatric_negative_pattern_is_flagged():
    # The classic COVIDx confound: COVID-19 images from adult collections, negatives
    # largely from a pediatric pneumonia set.
    records = _records({("cohen", 1): 10, ("fig1", 1): 4, ("kermany", 0): 20, ("fig1", 0): 2})
    warnings = shortcut_warnings(records)
    single = [w for w in warnings if "'cohen'" in w or "'kermany'" in w]
    assert len(single) == 2  # cohen all positive, kermany all negative
    assert "pediatric patients" in next(w for w in single if "'kermany'" in w)
    assert any("children from adults" in w for w in warnings)
    assert not any("'fig1'" in w for w in warnings)  # holds both labels
    assert len(warnings) == 3


def test_pediatric_positives_do_not_trigger_the_age_warning():
    records = _records({("cohen", 1): 5, ("cohen", 0): 5, ("kermany", 0): 5, ("kermany", 1): 5})
    assert shortcut_warnings(records) == []


def test_balanced_data_gives_no_warnings():
    records = _records({("srcA", 0): 6, ("srcA", 1): 6, ("srcB", 0): 6, ("srcB", 1): 6})
    assert shortcut_warnings(records) == []
    assert shortcut_warnings([]) == []
