"""One decision per image, in the same words everywhere (app, API, batch command).

A model's answer is its decision at its own operating threshold (from its card): the film
is `FLAGGED` when P(COVID-19) >= threshold, else `NOT_FLAGGED`. The larger class is never
the answer: a film at P = 0.10 under a threshold of 0.075 is flagged. When the input check
(`covidtl.scope`) refuses an image there is no decision and no probability: the answer is
`OUT_OF_SCOPE`, with the reason.
"""

from __future__ import annotations

from typing import Any

from covidtl.classes import POSITIVE_NAME
from covidtl.inference import Prediction

FLAGGED = f"Flagged for {POSITIVE_NAME} review"
NOT_FLAGGED = "Not flagged"
OUT_OF_SCOPE = "Out of scope"
OUTCOMES = (FLAGGED, NOT_FLAGGED, OUT_OF_SCOPE)  # every answer there is


def decision_label(prediction: Prediction | None) -> str:
    """`FLAGGED` or `NOT_FLAGGED` at the prediction's threshold; `OUT_OF_SCOPE` for None
    (the input check refused the image, so no model was asked)."""
    if prediction is None:
        return OUT_OF_SCOPE
    return FLAGGED if prediction.decision else NOT_FLAGGED


def shown_digits(p: float, threshold: float, least: int = 3, most: int = 6) -> int:
    """Decimals that show `p` and `threshold` apart: `least`, or more when they would read the
    same (P = 0.50155 under a threshold of 0.50210 reads "0.502 below 0.502" at 3 decimals)."""
    digits = least
    while digits < most and f"{p:.{digits}f}" == f"{threshold:.{digits}f}" and p != threshold:
        digits += 1
    return digits


def threshold_note(min_sensitivity: float | None, calibrated: bool) -> str:
    """What a model's threshold is and what its P means, in one sentence, for a card whose
    recipe chose the threshold for validation sensitivity >= `min_sensitivity` (None when
    the card does not say) and whose P is `calibrated` (the card has a temperature)."""
    chosen = (
        f"chosen on validation films for sensitivity ≥ {min_sensitivity:.2f} (the most specific such threshold)"
        if min_sensitivity is not None
        else "taken from the model's card"
    )
    p = (
        f"P({POSITIVE_NAME}) is calibrated (temperature scaling on validation films)"
        if calibrated
        else f"P({POSITIVE_NAME}) is the model's plain softmax output (its card has no calibration)"
    )
    return f"Threshold {chosen}; {p}."


# --------------------------------------------------------------------------- which models


def is_default(card: dict[str, Any]) -> bool:
    """The card says `default: true`: the model the app answers with when none is named."""
    return card.get("default") is True


def is_baseline(card: dict[str, Any]) -> bool:
    """The card says `baseline: true`: shown for comparison, never part of the ensemble."""
    return card.get("baseline") is True


def validation_auc(card: dict[str, Any]) -> float:
    """The card's validation ROC AUC (metrics.val.overall.auc.value), or -inf when absent."""
    try:
        value = card["metrics"]["val"]["overall"]["auc"]["value"]
    except (KeyError, TypeError):
        return float("-inf")
    return float(value) if isinstance(value, (int, float)) else float("-inf")


def rank_models(cards: dict[str, dict[str, Any]]) -> list[str]:
    """Model names in the order the app offers them: the default first, then by validation
    AUC (highest first; cards without one last), ties by name."""
    return sorted(cards, key=lambda name: (not is_default(cards[name]), -validation_auc(cards[name]), name))
