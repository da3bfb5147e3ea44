"""Does an answer depend on the film's resolution? The same films at other sizes, scored again.

Hospitals export the same film at different sizes: a 3000 px original, a 1024 px PACS copy,
a 224 x 224 square in a public collection (the COVID-19 Radiography Database, which
covidx-large's bimcv and rsna films come from). A model whose decision flips when a film
arrives at half or twice its size, or as such a square, decides partly by the copy, not by
the lungs, and its answers at a new site depend on how that site exports. The "jpeg" variant is
that collection's kind of copy (224 x 224, JPEG quality 92), and "database" the same made from
the database's 299 x 299 film: the cue covidx-large ties to both of its largest one-class
sources. Each film is scored as it is and in each of `VARIANTS`; the audit reports, per variant, the share of decisions that
changed and the sensitivity and specificity at the model's own threshold beside the
unchanged films'. Scoring goes through `covidtl.inference.Predictor`, the app's path (lung
crop, film size and equalization included).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from PIL import Image

from covidtl.engine import Progress
from covidtl.harmonize import film_copy

SQUARE_SIDE = 224
# The JPEG quality of covidx-large's 224 x 224 copies (bimcv, rsna), read from their quantization tables.
COPY_QUALITY = 92
# The COVID-19 Radiography Database, where those copies come from, published its films at 299 x 299.
DATABASE_SIDE = 299


def _half(image: Image.Image) -> Image.Image:
    return image.reduce(2)


def _double(image: Image.Image) -> Image.Image:
    return image.resize((2 * image.width, 2 * image.height), Image.Resampling.BICUBIC)


def _square(image: Image.Image) -> Image.Image:
    return image.resize((SQUARE_SIDE, SQUARE_SIDE), Image.Resampling.BILINEAR)


def _jpeg(image: Image.Image) -> Image.Image:
    return film_copy(image, SQUARE_SIDE, COPY_QUALITY)


def _database_copy(image: Image.Image) -> Image.Image:
    database = image.resize((DATABASE_SIDE, DATABASE_SIDE), Image.Resampling.BILINEAR)
    return film_copy(database, SQUARE_SIDE, COPY_QUALITY)


# name -> (what it stands for, the change); the one list the audit, its command, the cards and the
# model table follow
VARIANTS: dict[str, tuple[str, Callable[[Image.Image], Image.Image]]] = {
    "half": ("half the width and height (box average), a smaller export", _half),
    "double": ("twice the width and height (bicubic), a larger export of the same detail", _double),
    "square": (f"a {SQUARE_SIDE} x {SQUARE_SIDE} px square (bilinear), as public collections resize them", _square),
    "jpeg": (f"a {SQUARE_SIDE} x {SQUARE_SIDE} px JPEG copy at quality {COPY_QUALITY} (bicubic), as covidx-large's "
             "bimcv and rsna films are", _jpeg),
    "database": (f"the same copy made from a {DATABASE_SIDE} x {DATABASE_SIDE} px one (bilinear), the COVID-19 "
                 "Radiography Database's path", _database_copy),
}


def _rates(labels: np.ndarray, flagged: np.ndarray) -> dict[str, float | None]:
    positives, negatives = labels == 1, labels == 0
    return {
        "sensitivity": float(flagged[positives].mean()) if positives.any() else None,
        "specificity": float(1.0 - flagged[negatives].mean()) if negatives.any() else None,
    }


def audit_films(
    score: Callable[[Image.Image], float],
    films: Iterable[tuple[Image.Image, int]],
    threshold: float,
    progress: Progress = None,
) -> dict[str, Any]:
    """Score each (film, label) as it is and in every one of `VARIANTS`.

    Args:
        score: P(COVID-19) of one image (e.g. ``lambda im: predictor.predict(im).p_positive``).
        films: the films with their labels (1 = COVID-19); iterated once.
        threshold: the decision threshold (the card's).
        progress: optional wrapper of `films` (e.g. ``tqdm``).

    Returns:
        ``{"n", "n_positive", "threshold", "as_is": {sensitivity, specificity, median_p},
        "variants": {name: {"change", "flipped", "mean_abs_change", "sensitivity", "specificity",
        "median_p"}}}``; ``flipped`` is the share of films whose decision differs from their
        unchanged one's, ``mean_abs_change`` the mean absolute change of P(COVID-19),
        ``median_p`` the median P(COVID-19).

    Raises:
        ValueError: no films.
    """
    labels, scores = [], {name: [] for name in ("as_is", *VARIANTS)}
    for image, label in progress(films) if progress else films:
        labels.append(int(label))
        scores["as_is"].append(score(image))
        for name, (_, change) in VARIANTS.items():
            scores[name].append(score(change(image)))
    if not labels:
        raise ValueError("no films to audit")
    y = np.asarray(labels)
    p = {name: np.asarray(values, dtype=float) for name, values in scores.items()}
    decided = {name: values >= threshold for name, values in p.items()}
    return {
        "n": len(y),
        "n_positive": int(y.sum()),
        "threshold": float(threshold),
        "as_is": {**_rates(y, decided["as_is"]), "median_p": float(np.median(p["as_is"]))},
        "variants": {
            name: {
                "change": description,
                "flipped": float((decided[name] != decided["as_is"]).mean()),
                "mean_abs_change": float(np.abs(p[name] - p["as_is"]).mean()),
                "median_p": float(np.median(p[name])),
                **_rates(y, decided[name]),
            }
            for name, (description, _) in VARIANTS.items()
        },
    }
