"""One decision per image, shown one way everywhere (app headline, Compare table, API).

A model's answer is its decision at its own operating threshold (from its card):
`POSITIVE_NAME` ("COVID-19") when P(COVID-19) >= threshold, else "Negative". The larger
class is never the headline: a film at P = 0.34 with threshold 0.336 is flagged. When the
input check (`covidtl.scope`) refuses an image there is no decision at all: the label is
`OUT_OF_SCOPE` and no confidences are given.
"""

from __future__ import annotations

from typing import Any

from covidtl.classes import CLASSES, DISPLAY_NAMES, POSITIVE, POSITIVE_NAME
from covidtl.inference import Prediction

OUT_OF_SCOPE = "Out of scope"
NEGATIVE_NAME: str = DISPLAY_NAMES[CLASSES[1 - POSITIVE]]  # "Negative"
LABELS = (POSITIVE_NAME, NEGATIVE_NAME, OUT_OF_SCOPE)  # every label the app can show


def decision_label(prediction: Prediction | None) -> str:
    """"COVID-19" or "Negative" at the prediction's threshold; "Out of scope" for None
    (the input check refused the image, so no model was asked)."""
    if prediction is None:
        return OUT_OF_SCOPE
    return POSITIVE_NAME if prediction.decision else NEGATIVE_NAME


def label_data(prediction: Prediction | None) -> dict[str, Any]:
    """The gr.Label payload {"label", "confidences"}: the label is the decision (not the
    larger class); confidences (display name -> probability, largest first) are given only
    when there is a decision."""
    if prediction is None:
        return {"label": OUT_OF_SCOPE, "confidences": []}
    ranked = sorted(prediction.probabilities.items(), key=lambda item: item[1], reverse=True)
    return {
        "label": decision_label(prediction),
        "confidences": [{"label": DISPLAY_NAMES[name], "confidence": p} for name, p in ranked],
    }


def probability_text(prediction: Prediction) -> str:
    """P(COVID-19) with the threshold it is compared with, e.g. "0.341 (threshold 0.336)"."""
    return f"{prediction.p_positive:.3f} (threshold {prediction.threshold:.3f})"


def decision_markdown(model_name: str, prediction: Prediction | None, reason: str = "") -> str:
    """The decision in words; for a refused image (`prediction` None), why it was refused."""
    if prediction is None:
        return (
            f"**{OUT_OF_SCOPE}: no decision.** {reason} The models were trained on frontal chest X-rays "
            "only, so their output on this image would mean nothing; it was not classified."
        )
    p, t = prediction.p_positive, prediction.threshold
    relation = "at or above" if prediction.decision else "below"
    return (
        f"**{decision_label(prediction)}** by `{model_name}`: P({POSITIVE_NAME}) = {p:.3f} is {relation} "
        f"the model's operating threshold {t:.3f}. A research model's output, not a diagnosis."
    )


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
