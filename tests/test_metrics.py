"""Tests for covidtl.metrics: hand-computed cases, sklearn agreement, bootstrap, threshold rule."""

import json
import math

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, roc_auc_score

from covidtl import metrics
from covidtl.metrics import (
    METRICS,
    _weighted_metrics,
    binary_metrics,
    bootstrap_intervals,
    choose_threshold,
    confusion_counts,
    evaluate_scores,
    nan_to_none,
    roc_auc,
    roc_points,
)

# 4 positives, 6 negatives. At threshold 0.5:
#   positives 0.9, 0.8, 0.6 -> TP=3; 0.3 -> FN=1
#   negatives 0.7, 0.5 -> FP=2;  0.4, 0.2, 0.1, 0.05 -> TN=4
Y_TRUE = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
Y_SCORE = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.5, 0.4, 0.2, 0.1, 0.05])


def _random_case(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    # Rounded so ties occur, which exercises tie handling in AUC and thresholds.
    s = np.round(np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1), 2)
    return y, s


def test_confusion_counts_hand_case():
    pred = (Y_SCORE >= 0.5).astype(int)
    assert confusion_counts(Y_TRUE, pred) == {"tp": 3, "fp": 2, "tn": 4, "fn": 1}


def test_confusion_counts_match_sklearn():
    y, s = _random_case()
    pred = (s >= 0.5).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    counts = confusion_counts(y, pred)
    assert counts == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    assert all(type(v) is int for v in counts.values())


def test_binary_metrics_hand_case():
    m = binary_metrics(Y_TRUE, Y_SCORE, 0.5)
    assert tuple(m) == METRICS
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["ppv"] == pytest.approx(3 / 5)
    assert m["npv"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    # Pairs (pos, neg) with pos > neg: 0.9,0.8 beat all 6; 0.6 beats 5; 0.3 beats 3 -> 20/24.
    assert m["auc"] == pytest.approx(20 / 24)


def test_threshold_is_inclusive():
    m = binary_metrics(np.array([1, 0]), np.array([0.5, 0.49]), 0.5)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0


def test_auc_matches_sklearn_with_ties():
    y, s = _random_case(500, seed=3)
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert binary_metrics(y, s, 0.5)["auc"] == pytest.approx(roc_auc_score(y, s))


def test_undefined_metrics_are_nan_not_errors():
    # No predicted positives -> PPV undefined; one class -> AUC and specificity undefined.
    m = binary_metrics(np.array([1, 1, 1]), np.array([0.1, 0.2, 0.3]), 0.9)
    assert math.isnan(m["ppv"])
    assert math.isnan(m["specificity"])
    assert math.isnan(m["auc"])
    assert m["f1"] == 0.0
    assert m["sensitivity"] == 0.0 and m["npv"] == 0.0
    # No positives and no predicted positives: F1 and sensitivity undefined.
    m = binary_metrics(np.array([0, 0]), np.array([0.1, 0.2]), 0.5)
    assert math.isnan(m["f1"]) and math.isnan(m["sensitivity"])
    assert m["specificity"] == 1.0


def test_roc_points_match_auc():
    y, s = _random_case()
    fpr, tpr, thresholds = roc_points(y, s)
    assert fpr.shape == tpr.shape == thresholds.shape
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(y, s))
    with pytest.raises(ValueError, match="both classes"):
        roc_points(np.array([0, 0]), np.array([0.1, 0.2]))


@pytest.mark.parametrize(
    ("y_true", "y_score", "match"),
    [
        ([0, 1, 1], [0.1, 0.2], "differ in length"),
        ([0, 2, 1], [0.1, 0.2, 0.3], "only 0"),
        ([0, 0.5], [0.1, 0.2], "only 0"),
        ([0, 1], [0.1, float("nan")], "finite"),
        ([0, 1], [0.1, float("inf")], "finite"),
        ([], [], "empty"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
        ([0, 1], np.zeros((2, 2)), r"probs\[:, 1\]"),
        (["a", "b"], [0.1, 0.2], "numeric"),
    ],
)
def test_bad_input_raises(y_true, y_score, match):
    with pytest.raises(ValueError, match=match):
        binary_metrics(np.asarray(y_true), np.asarray(y_score), 0.5)


def test_bad_threshold_and_options_raise():
    with pytest.raises(ValueError, match="threshold"):
        binary_metrics(Y_TRUE, Y_SCORE, float("nan"))
    with pytest.raises(ValueError, match="level"):
        bootstrap_intervals(Y_TRUE, Y_SCORE, 0.5, level=95)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_intervals(Y_TRUE, Y_SCORE, 0.5, n_boot=-1)
    with pytest.raises(ValueError, match="differ in length"):
        confusion_counts(np.array([0, 1]), np.array([1]))
    with pytest.raises(ValueError, match="one source name per sample"):
        evaluate_scores(Y_TRUE, Y_SCORE, ["a"] * 3, 0.5, n_boot=10)


def test_weighted_metrics_with_unit_weights_equal_point_metrics():
    y, s = _random_case(300, seed=5)
    batched = _weighted_metrics(np.ones((2, y.size)), y, s, 0.5)
    point = binary_metrics(y, s, 0.5)
    for name in METRICS:
        np.testing.assert_allclose(batched[name], point[name])


def test_weighted_metrics_equal_explicit_resample():
    y, s = _random_case(100, seed=6)
    idx = np.random.default_rng(1).integers(0, y.size, size=y.size)
    weights = np.bincount(idx, minlength=y.size)[None, :]
    batched = _weighted_metrics(weights, y, s, 0.4)
    explicit = binary_metrics(y[idx], s[idx], 0.4)
    for name in METRICS:
        assert batched[name][0] == pytest.approx(explicit[name])


def test_bootstrap_contains_point_and_is_deterministic():
    y, s = _random_case(300, seed=7)
    point = binary_metrics(y, s, 0.5)
    a = bootstrap_intervals(y, s, 0.5, n_boot=300, seed=11)
    b = bootstrap_intervals(y, s, 0.5, n_boot=300, seed=11)
    c = bootstrap_intervals(y, s, 0.5, n_boot=300, seed=12)
    assert a == b
    assert a != c
    assert tuple(a) == METRICS
    for name in METRICS:
        low, high = a[name]
        assert low <= point[name] <= high
        assert 0.0 <= low < high <= 1.0
    narrow = bootstrap_intervals(y, s, 0.5, n_boot=300, seed=11, level=0.5)
    assert narrow["auc"][1] - narrow["auc"][0] < a["auc"][1] - a["auc"][0]


def test_bootstrap_is_nan_aware():
    # One positive in 20: many resamples draw none, sensitivity/AUC use only the rest.
    y = np.zeros(20, dtype=int)
    y[0] = 1
    s = np.linspace(0, 1, 20)[::-1]
    ci = bootstrap_intervals(y, s, 0.5, n_boot=200, seed=0)
    assert all(not math.isnan(v) for v in ci["sensitivity"])
    # No positives at all: sensitivity is undefined in every resample.
    ci = bootstrap_intervals(np.zeros(10, dtype=int), np.linspace(0, 1, 10), 0.5, n_boot=50)
    assert all(math.isnan(v) for v in ci["sensitivity"])
    assert all(math.isnan(v) for v in ci["auc"])
    assert not math.isnan(ci["specificity"][0])
    ci = bootstrap_intervals(y, s, 0.5, n_boot=0)
    assert all(math.isnan(v) for pair in ci.values() for v in pair)


def test_bootstrap_resamples_in_bounded_chunks_with_the_same_result(monkeypatch):
    """Vectorised: a few chunks of whole resamples (not one Python step per resample), each
    holding at most _BOOTSTRAP_CHUNK_ELEMENTS weights; the chunk size never changes the answer."""
    y, s = _random_case(10_000, seed=8)
    one_chunk = metrics.bootstrap_intervals(y, s, 0.5, n_boot=200, seed=0)
    shapes = []
    weighted = metrics._weighted_metrics

    def spy(weights, *args):
        shapes.append(weights.shape)
        return weighted(weights, *args)

    monkeypatch.setattr(metrics, "_weighted_metrics", spy)
    monkeypatch.setattr(metrics, "_BOOTSTRAP_CHUNK_ELEMENTS", 64 * 10_000)
    assert metrics.bootstrap_intervals(y, s, 0.5, n_boot=200, seed=0) == one_chunk
    assert shapes == [(64, 10_000)] * 3 + [(8, 10_000)]


def test_nan_to_none_makes_json_safe():
    obj = {"a": float("nan"), "b": [np.float32(1.5), (np.nan, 2)], "c": np.int64(3),
           "d": np.array([np.inf, 0.0]), "e": None, "f": "x"}
    out = nan_to_none(obj)
    assert out == {"a": None, "b": [1.5, [None, 2]], "c": 3, "d": [None, 0.0], "e": None, "f": "x"}
    json.dumps(out, allow_nan=False)


def test_evaluate_scores_report():
    y, s = _random_case(120, seed=9)
    sources = np.where(np.arange(120) < 80, "cohen", "rsna")
    sources[:5] = "tiny"
    y[:5] = 0  # "tiny" has no positives -> sensitivity and AUC undefined there
    report = evaluate_scores(y, s, list(sources), threshold=0.5, n_boot=100, seed=0)
    text = json.dumps(report, allow_nan=False)
    assert json.loads(text) == report

    assert report["threshold"] == 0.5
    assert report["n"] == 120 and report["n_positive"] == int(y.sum())
    assert set(report["overall"]) == set(METRICS)
    assert report["confusion"] == confusion_counts(y, (s >= 0.5).astype(int))
    point = binary_metrics(y, s, 0.5)
    for name in METRICS:
        entry = report["overall"][name]
        assert entry["value"] == pytest.approx(point[name])
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]

    assert list(report["per_source"]) == ["cohen", "rsna", "tiny"]
    assert sum(v["n"] for v in report["per_source"].values()) == 120
    tiny = report["per_source"]["tiny"]
    assert tiny["n"] == 5 and tiny["n_positive"] == 0
    assert tiny["metrics"]["sensitivity"] == {"value": None, "ci_low": None, "ci_high": None}
    assert tiny["metrics"]["auc"]["value"] is None
    assert tiny["confusion"]["tp"] == 0 and tiny["confusion"]["fn"] == 0
    per_source = report["per_source"].values()
    totals = {k: sum(v["confusion"][k] for v in per_source) for k in report["confusion"]}
    assert totals == report["confusion"]


def test_evaluate_scores_without_bootstrap():
    report = evaluate_scores(Y_TRUE, Y_SCORE, ["a"] * 10, 0.5, n_boot=0)
    assert report["overall"]["auc"]["value"] == pytest.approx(20 / 24)
    assert report["overall"]["auc"]["ci_low"] is None


def test_choose_threshold_hand_case():
    # Sorted positives 0.3, 0.6, 0.8, 0.9. Sensitivity >= 0.75 needs t <= 0.6; the highest
    # such candidate is 0.6 (specificity 5/6 there, vs 4/6 at 0.5).
    assert choose_threshold(Y_TRUE, Y_SCORE, min_sensitivity=0.75) == 0.6
    assert choose_threshold(Y_TRUE, Y_SCORE, min_sensitivity=1.0) == 0.3
    assert choose_threshold(Y_TRUE, Y_SCORE, min_sensitivity=0.0) == 0.9


def _brute_force_threshold(y, s, target):
    best = None
    for t in np.unique(s):
        c = confusion_counts(y, (s >= t).astype(int))
        sensitivity = c["tp"] / (c["tp"] + c["fn"])
        specificity = c["tn"] / (c["tn"] + c["fp"])
        if sensitivity >= target and (best is None or (specificity, t) > best):
            best = (specificity, t)
    return best[1]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_choose_threshold_matches_brute_force(seed, target):
    y, s = _random_case(150, seed=seed)
    t = choose_threshold(y, s, min_sensitivity=target)
    assert t in set(s.tolist())
    assert binary_metrics(y, s, t)["sensitivity"] >= target
    assert t == _brute_force_threshold(y, s, target)


def test_choose_threshold_errors_and_edge_cases():
    with pytest.raises(ValueError, match="needs positives"):
        choose_threshold(np.zeros(5, dtype=int), np.linspace(0, 1, 5))
    with pytest.raises(ValueError, match="min_sensitivity"):
        choose_threshold(Y_TRUE, Y_SCORE, min_sensitivity=90)
    # Only positives: specificity undefined, highest threshold meeting the target wins.
    assert choose_threshold(np.ones(4, dtype=int), np.array([0.2, 0.4, 0.6, 0.8]), 0.5) == 0.6
