"""Binary screening metrics for COVID-19 scores: confusion counts, sensitivity and
specificity, PPV/NPV, F1, ROC AUC, percentile-bootstrap intervals and the
operating-threshold rule.

Conventions used by every function here:

* ``y_true`` is a 1-D array of labels in ``{0, 1}``, 1 = COVID-19 (``CLASSES[POSITIVE]``).
* ``y_score`` is a 1-D array of finite scores, normally P(COVID-19) in [0, 1].
* A sample is predicted positive iff ``score >= threshold``.
* A metric whose denominator is zero (PPV with no predicted positives, AUC with a single
  class present, ...) is ``float("nan")``, never an exception. ``nan_to_none`` turns those
  into ``None`` for JSON.

Pure functions: no I/O, no printing, no global random state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from covidtl.classes import CLASSES, POSITIVE

METRICS: tuple[str, ...] = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "auc")

# Bootstrap work is done in chunks of resamples so that the (chunk, n_samples) weight
# matrix stays around this many elements (~16 MB as float64), whatever n_samples is.
_BOOTSTRAP_CHUNK_ELEMENTS = 2_000_000


# --------------------------------------------------------------------------- validation


def _check_labels(y: Any, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of 0/1 labels; got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; metrics need at least one sample")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(
            f"{name} must hold numeric 0/1 labels (1 = {CLASSES[POSITIVE]}); got dtype {arr.dtype}"
        )
    bad = ~np.isin(arr, (0, 1))
    if bad.any():
        examples = np.unique(arr[bad])[:5].tolist()
        raise ValueError(
            f"{name} must contain only 0 ({CLASSES[1 - POSITIVE]}) and 1 ({CLASSES[POSITIVE]}); "
            f"found {examples}"
        )
    return arr.astype(np.int64)


def _check_scores(y_true: Any, y_score: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (labels, scores) pair; return them as int64 and float64 1-D arrays."""
    labels = _check_labels(y_true, "y_true")
    scores = np.asarray(y_score)
    if scores.ndim != 1:
        raise ValueError(
            f"y_score must be a 1-D array of P({CLASSES[POSITIVE]}); got shape {scores.shape} "
            f"(for an (N, 2) probability matrix pass probs[:, {POSITIVE}])"
        )
    real = np.issubdtype(scores.dtype, np.number) and not np.iscomplexobj(scores)
    if not real:
        raise ValueError(f"y_score must be real numbers; got dtype {scores.dtype}")
    scores = scores.astype(np.float64)
    if labels.shape[0] != scores.shape[0]:
        raise ValueError(
            f"y_true and y_score differ in length: {labels.shape[0]} labels vs "
            f"{scores.shape[0]} scores"
        )
    n_bad = int((~np.isfinite(scores)).sum())
    if n_bad:
        raise ValueError(f"y_score must be finite; found {n_bad} NaN/inf value(s)")
    return labels, scores


def _check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not math.isfinite(t):
        raise ValueError(f"threshold must be a finite number; got {threshold!r}")
    return t


# --------------------------------------------------------------------------- point metrics


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, int]:
    """Binary confusion counts.

    Args:
        y_true: (N,) labels in {0, 1}, 1 = positive.
        y_pred: (N,) predicted labels in {0, 1}.

    Returns:
        ``{"tp", "fp", "tn", "fn"}`` as Python ints (they sum to N).
    """
    truth = _check_labels(y_true, "y_true").astype(bool)
    pred = _check_labels(y_pred, "y_pred").astype(bool)
    if truth.shape != pred.shape:
        raise ValueError(
            f"y_true and y_pred differ in length: {truth.shape[0]} vs {pred.shape[0]}"
        )
    return {
        "tp": int(np.sum(truth & pred)),
        "fp": int(np.sum(~truth & pred)),
        "tn": int(np.sum(~truth & ~pred)),
        "fn": int(np.sum(truth & ~pred)),
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den == 0 (an undefined metric, not an error)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _metrics_from_counts(
    tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray
) -> dict[str, np.ndarray]:
    """Every metric in METRICS except AUC, from (possibly fractional/batched) counts."""
    return {
        "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve (sklearn ``roc_auc_score``); NaN if only one class is present."""
    labels, scores = _check_scores(y_true, y_score)
    if np.unique(labels).size < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def binary_metrics(y_true: np.ndarray, y_score: np.ndarray, threshold: float) -> dict[str, float]:
    """All METRICS at one operating threshold.

    Args:
        y_true: (N,) labels in {0, 1}.
        y_score: (N,) P(positive); predicted positive iff ``score >= threshold``.
        threshold: decision threshold, same units as ``y_score``.

    Returns:
        ``{metric: value}`` for every name in METRICS, values in [0, 1] or NaN when
        undefined (e.g. PPV with no predicted positives, AUC with one class).
    """
    labels, scores = _check_scores(y_true, y_score)
    t = _check_threshold(threshold)
    counts = confusion_counts(labels, (scores >= t).astype(np.int64))
    values = _metrics_from_counts(**{k: np.float64(v) for k, v in counts.items()})
    out = {name: float(v) for name, v in values.items()}
    out["auc"] = roc_auc(labels, scores)
    return {name: out[name] for name in METRICS}


def roc_points(
    y_true: np.ndarray, y_score: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve via sklearn ``roc_curve``.

    Returns:
        ``(fpr, tpr, thresholds)``, each (K,); ``thresholds[0]`` is ``inf`` (nothing positive).

    Raises:
        ValueError: if y_true holds only one class (the curve is undefined).
    """
    labels, scores = _check_scores(y_true, y_score)
    if np.unique(labels).size < 2:
        raise ValueError(
            "a ROC curve needs both classes in y_true; got only "
            f"{CLASSES[int(labels[0])]!r} samples"
        )
    fpr, tpr, thresholds = roc_curve(labels, scores)
    return fpr, tpr, thresholds


# --------------------------------------------------------------------------- bootstrap


def _weighted_metrics(
    weights: np.ndarray, labels: np.ndarray, scores: np.ndarray, threshold: float
) -> dict[str, np.ndarray]:
    """Metrics for a batch of resamples given as per-sample multiplicities.

    A resample with replacement is equivalent to weighting each original sample by how
    many times it was drawn, which lets all resamples share one sort of the scores.

    Args:
        weights: (B, N) non-negative multiplicities, one row per resample.
        labels: (N,) labels in {0, 1}.
        scores: (N,) scores.
        threshold: predicted positive iff score >= threshold.

    Returns:
        ``{metric: (B,) array}`` for every name in METRICS, NaN where undefined.
    """
    is_pos = labels == 1
    pred = scores >= threshold
    w = weights.astype(np.float64, copy=False)
    tp = w @ (is_pos & pred).astype(np.float64)
    fp = w @ (~is_pos & pred).astype(np.float64)
    tn = w @ (~is_pos & ~pred).astype(np.float64)
    fn = w @ (is_pos & ~pred).astype(np.float64)
    out = _metrics_from_counts(tp, fp, tn, fn)

    # AUC = P(score_pos > score_neg) + 0.5 * P(tie), computed with weights over groups of
    # equal score (the Mann-Whitney form, identical to the trapezoidal ROC area).
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    w_sorted = w[:, order]
    pos_sorted = is_pos[order]
    pos_group = np.add.reduceat(w_sorted * pos_sorted, starts, axis=1)
    neg_group = np.add.reduceat(w_sorted * ~pos_sorted, starts, axis=1)
    neg_below = np.cumsum(neg_group, axis=1) - neg_group
    concordant = np.sum(pos_group * (neg_below + 0.5 * neg_group), axis=1)
    out["auc"] = _ratio(concordant, pos_group.sum(axis=1) * neg_group.sum(axis=1))
    return {name: out[name] for name in METRICS}


def bootstrap_intervals(
    y_true: np.ndarray,
    y_score: np.ndarray,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap confidence intervals for every metric in METRICS.

    Draws ``n_boot`` resamples of the N samples with replacement (``default_rng(seed)``,
    so the result is deterministic per seed) and takes the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` percentiles of each metric. Resamples in which a metric is
    undefined (e.g. no positives drawn) are ignored for that metric; if it is undefined
    in all of them, or ``n_boot == 0``, its interval is ``(nan, nan)``.

    Returns:
        ``{metric: (low, high)}``.
    """
    labels, scores = _check_scores(y_true, y_score)
    t = _check_threshold(threshold)
    if int(n_boot) != n_boot or n_boot < 0:
        raise ValueError(f"n_boot must be a non-negative integer; got {n_boot!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be strictly between 0 and 1 (e.g. 0.95); got {level!r}")
    n_boot = int(n_boot)
    if n_boot == 0:
        return {name: (float("nan"), float("nan")) for name in METRICS}

    n = labels.shape[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    per_chunk: list[dict[str, np.ndarray]] = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        # Row r's multiplicities: bincount of idx[r], done for all rows in one call.
        flat = (idx + (np.arange(b) * n)[:, None]).ravel()
        weights = np.bincount(flat, minlength=b * n).reshape(b, n)
        per_chunk.append(_weighted_metrics(weights, labels, scores, t))

    q = 100.0 * np.array([(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    intervals: dict[str, tuple[float, float]] = {}
    for name in METRICS:
        values = np.concatenate([c[name] for c in per_chunk])
        values = values[~np.isnan(values)]
        if values.size == 0:
            intervals[name] = (float("nan"), float("nan"))
        else:
            low, high = np.percentile(values, q)
            intervals[name] = (float(low), float(high))
    return intervals


# --------------------------------------------------------------------------- reports


def nan_to_none(obj: Any) -> Any:
    """Recursively convert NaN/inf floats to ``None`` and numpy scalars/arrays to Python
    types, so ``json.dumps(obj, allow_nan=False)`` succeeds. Tuples become lists."""
    if isinstance(obj, dict):
        return {str(k): nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return nan_to_none(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _metric_block(
    labels: np.ndarray, scores: np.ndarray, threshold: float, n_boot: int, seed: int
) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    values = binary_metrics(labels, scores, threshold)
    intervals = bootstrap_intervals(labels, scores, threshold, n_boot=n_boot, seed=seed)
    metrics = {
        name: {"value": values[name], "ci_low": intervals[name][0], "ci_high": intervals[name][1]}
        for name in METRICS
    }
    counts = confusion_counts(labels, (scores >= threshold).astype(np.int64))
    return metrics, counts


def evaluate_scores(
    y_true: np.ndarray,
    y_score: np.ndarray,
    sources: Sequence[str],
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Full evaluation report, overall and per data source, with bootstrap 95% CIs.

    Args:
        y_true: (N,) labels in {0, 1}.
        y_score: (N,) P(positive).
        sources: (N,) name of the dataset each sample came from (e.g. COVIDx source).
        threshold: predicted positive iff ``score >= threshold``.
        n_boot: bootstrap resamples per interval (0 skips intervals: CIs are None).
        seed: bootstrap seed, used for the overall and every per-source interval.

    Returns:
        JSON-safe dict (undefined values are ``None``)::

            {"threshold", "n", "n_positive",
             "overall": {metric: {"value", "ci_low", "ci_high"}},
             "confusion": {"tp", "fp", "tn", "fn"},
             "per_source": {source: {"n", "n_positive", "metrics": {...}, "confusion": {...}}}}

        Sources are listed in sorted order.
    """
    labels, scores = _check_scores(y_true, y_score)
    t = _check_threshold(threshold)
    src = np.asarray([str(s) for s in sources], dtype=object)
    if src.shape[0] != labels.shape[0]:
        raise ValueError(
            f"sources has {src.shape[0]} entries but y_true has {labels.shape[0]}; "
            "give one source name per sample"
        )

    overall, confusion = _metric_block(labels, scores, t, n_boot, seed)
    per_source: dict[str, dict] = {}
    for name in sorted(set(src.tolist())):
        mask = src == name
        metrics, counts = _metric_block(labels[mask], scores[mask], t, n_boot, seed)
        per_source[name] = {
            "n": int(mask.sum()),
            "n_positive": int(labels[mask].sum()),
            "metrics": metrics,
            "confusion": counts,
        }
    report = {
        "threshold": t,
        "n": int(labels.shape[0]),
        "n_positive": int(labels.sum()),
        "overall": overall,
        "confusion": confusion,
        "per_source": per_source,
    }
    return nan_to_none(report)


# --------------------------------------------------------------------------- threshold


def choose_threshold(
    y_true: np.ndarray, y_score: np.ndarray, min_sensitivity: float = 0.90
) -> float:
    """Pick the operating threshold on a validation split.

    Rule: among the distinct values of ``y_score`` used as thresholds (predict positive
    iff ``score >= t``), keep those with sensitivity >= ``min_sensitivity`` and return the
    one with the highest specificity; ties go to the highest threshold. Because
    specificity never falls as t rises, this is the highest threshold that still meets
    the sensitivity target. The lowest score always qualifies (sensitivity 1), so a
    threshold is always found. With no negatives, specificity is undefined and the
    highest qualifying threshold is returned.

    Raises:
        ValueError: if y_true has no positives, or min_sensitivity is outside [0, 1].
    """
    labels, scores = _check_scores(y_true, y_score)
    if not 0.0 <= min_sensitivity <= 1.0:
        raise ValueError(f"min_sensitivity must be in [0, 1]; got {min_sensitivity!r}")
    n_pos = int(labels.sum())
    n_neg = labels.shape[0] - n_pos
    if n_pos == 0:
        raise ValueError(
            "choose_threshold needs positives: the validation split has no "
            f"{CLASSES[POSITIVE]!r} samples, so sensitivity is undefined; "
            "re-split so validation contains positive cases"
        )

    candidates = np.unique(scores)  # ascending
    pos_sorted = np.sort(scores[labels == 1])
    neg_sorted = np.sort(scores[labels == 0])
    tp = n_pos - np.searchsorted(pos_sorted, candidates, side="left")
    tn = np.searchsorted(neg_sorted, candidates, side="left")
    sensitivity = tp / n_pos
    specificity = tn / n_neg if n_neg else np.zeros_like(sensitivity)

    feasible = sensitivity >= min_sensitivity
    best_spec = specificity[feasible].max()
    best = np.flatnonzero(feasible & (specificity == best_spec))[-1]
    return float(candidates[best])
