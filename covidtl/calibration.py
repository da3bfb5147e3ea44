"""Temperature scaling and calibration error: pure functions, no I/O.

A model's softmax is often over- or under-confident. Temperature scaling (Guo et al. 2017)
divides the logits by one number ``T > 0`` fitted on validation to minimise the negative
log-likelihood: ``P = softmax(logits / T)``. It changes no ranking (AUC is unchanged), only
how far the probabilities sit from 0 and 1, so a shown "P(COVID-19) = 0.8" means about
80 % of such films are positive on data like the validation split.

Conventions: ``logits`` is a float array ``[N, len(CLASSES)]``; ``y_true`` holds 0/1 labels,
1 = COVID-19 (``CLASSES[POSITIVE]``); ``p_positive`` is P(COVID-19) in [0, 1].

Calibration error here is that of P(COVID-19) (the number the app shows and thresholds),
not of the top-class confidence: the expected calibration error (ECE) over ``n_bins``
equal-width bins of P(COVID-19) is ``sum_b (n_b / N) * |mean(y in b) - mean(p in b)|``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from covidtl.classes import POSITIVE

# The fitted T is searched in [1/100, 100]: beyond, the scores are all ~0.5 or all 0/1
# (a weak model with near-constant logits can want T well below 1).
T_BOUNDS = (0.01, 100.0)
N_BINS = 10


def _as_logits(logits: Any) -> np.ndarray:
    array = np.asarray(logits, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] < 2:
        raise ValueError(f"logits must be [N, n_classes >= 2]; got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("logits must be finite")
    return array


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def log_softmax(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """log softmax(logits / T), float64 [N, C]."""
    z = _as_logits(logits) / _check_temperature(temperature)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def calibrated_probabilities(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T), float64 [N, C]."""
    return np.exp(log_softmax(logits, temperature))


def positive_scores(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """P(COVID-19) = softmax(logits / T)[:, POSITIVE], float64 [N]."""
    return calibrated_probabilities(logits, temperature)[:, POSITIVE]


def nll(logits: Any, y_true: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (nats per image) of the labels under softmax(logits / T)."""
    labels = np.asarray(y_true, dtype=np.int64)
    logp = log_softmax(logits, temperature)
    if labels.shape != (logp.shape[0],):
        raise ValueError(f"{labels.shape} labels for {logp.shape[0]} rows of logits")
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: Any, y_true: Any, bounds: tuple[float, float] = T_BOUNDS, tol: float = 1e-6) -> float:
    """The T in `bounds` minimising `nll(logits, y_true, T)`: golden-section search on log T.

    The NLL is convex in 1/T, hence unimodal in log T, so the search finds its minimum
    (at a bound when the optimum lies outside). Deterministic; needs both classes.
    """
    labels = np.asarray(y_true, dtype=np.int64)
    if len(set(labels.tolist())) < 2:
        raise ValueError("fitting a temperature needs both positive and negative images")
    logits = _as_logits(logits)
    low, high = math.log(bounds[0]), math.log(bounds[1])
    inv_phi = (math.sqrt(5) - 1) / 2
    f = lambda log_t: nll(logits, labels, math.exp(log_t))  # noqa: E731
    a, b = low, high
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = f(d)
    best = (a + b) / 2
    # the interior point may lose to a bound when the optimum is beyond it
    candidates = [(f(x), x) for x in (low, best, high)]
    return math.exp(min(candidates)[1])


def reliability_bins(y_true: Any, p_positive: Any, n_bins: int = N_BINS) -> list[dict[str, float | int]]:
    """Per equal-width bin of P(COVID-19) over [0, 1] (the last bin closed at 1): its
    range, image count, mean score and fraction positive (nan when empty)."""
    labels = np.asarray(y_true, dtype=np.float64)
    scores = np.asarray(p_positive, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be 1-D of one length")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    index = np.clip((scores * n_bins).astype(np.int64), 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        inside = index == b
        n = int(inside.sum())
        bins.append({
            "low": b / n_bins, "high": (b + 1) / n_bins, "n": n,
            "mean_score": float(scores[inside].mean()) if n else float("nan"),
            "fraction_positive": float(labels[inside].mean()) if n else float("nan"),
        })
    return bins


def expected_calibration_error(y_true: Any, p_positive: Any, n_bins: int = N_BINS) -> float:
    """ECE of P(COVID-19) over `n_bins` equal-width bins: sum of (n_b / N) * |fraction
    positive - mean score| over the non-empty bins."""
    bins = reliability_bins(y_true, p_positive, n_bins)
    total = sum(b["n"] for b in bins)
    if total == 0:
        raise ValueError("no scores to compute a calibration error on")
    return float(sum(b["n"] / total * abs(b["fraction_positive"] - b["mean_score"]) for b in bins if b["n"]))


def calibration_summary(logits_by_split: dict[str, tuple[Any, Any]], temperature: float,
                        n_bins: int = N_BINS) -> dict[str, Any]:
    """The card's ``calibration`` block: for each split, ECE and NLL before (T = 1) and
    after (the fitted T). `logits_by_split` maps split -> (logits [N, C], labels [N])."""
    block: dict[str, Any] = {"temperature": float(temperature), "n_bins": n_bins,
                             "ece_of": "P(COVID-19), equal-width bins over [0, 1]"}
    for split, (logits, labels) in logits_by_split.items():
        before, after = positive_scores(logits, 1.0), positive_scores(logits, temperature)
        block[split] = {
            "ece_before": expected_calibration_error(labels, before, n_bins),
            "ece_after": expected_calibration_error(labels, after, n_bins),
            "nll_before": nll(logits, labels, 1.0),
            "nll_after": nll(logits, labels, temperature),
        }
    return block
