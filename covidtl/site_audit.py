"""Site-shortcut audit: can the model's penultimate features tell the hospitals apart within one class?

A model that flags COVID-19 by recognising the hospital (every BIMCV film positive, every RSNA
film negative) carries the hospital in its features. This audit measures how much: for each
class, a linear probe (standardized features, L2 logistic regression with balanced class
weights) is cross-validated at predicting the *source* of films of that class, in folds that
keep each patient's films together. Its balanced accuracy is reported beside chance (1 / the
number of sources). Within one class the label cannot explain the sources apart, so a score
well above chance is site information the classifier could use as a shortcut; a model that
learned the disease alone would sit near chance.

The features are the input of the model's head (as :func:`covidtl.site_blind.tap_features`
taps them), computed on films the model did not train on (by default the validation and test
splits). Only sources with at least ``min_films`` films of a class take part in that class's
probe; a class with fewer than two such sources is reported as skipped.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from covidtl.classes import CLASSES
from covidtl.engine import Progress
from covidtl.site_blind import tap_features

log = logging.getLogger(__name__)

MIN_FILMS = 10
FOLDS = 5
PROBE_C = 0.1  # inverse L2 strength on standardized features: a linear probe, not a memoriser


@torch.no_grad()
def penultimate_features(model: nn.Module, head: str, loader: DataLoader, device: torch.device | str = "cpu",
                         progress: Progress = None) -> np.ndarray:
    """float32 [N, F]: the input of `model`'s head `head` for every film of `loader`, in order."""
    model.eval().to(device)
    rows = []
    with tap_features(model, head) as taken:
        for batch in progress(loader) if progress else loader:
            model(batch[0].to(device))
            rows.append(taken.pop().float().cpu())
    return torch.cat(rows).numpy()


def probe_sources(features: np.ndarray, sources: Sequence[str], groups: Sequence[str], seed: int = 0,
                  folds: int = FOLDS) -> dict:
    """Cross-validated balanced accuracy of a linear probe predicting `sources` from `features`
    [N, F], folds grouped by `groups` (patient ids) and stratified by source."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    names = sorted(set(sources))
    y = np.array([names.index(s) for s in sources])
    smallest = min(Counter(sources).values())
    splitter = StratifiedGroupKFold(n_splits=max(2, min(folds, smallest)), shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, class_weight="balanced", max_iter=2000))
    predicted = cross_val_predict(probe, features, y, groups=list(groups), cv=splitter)
    return {
        "sources": {name: int((y == i).sum()) for i, name in enumerate(names)},
        "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
        "chance": 1.0 / len(names),
        "folds": splitter.get_n_splits(),
    }


def site_audit(features: np.ndarray, labels: Sequence[int], sources: Sequence[str], groups: Sequence[str],
               min_films: int = MIN_FILMS, seed: int = 0) -> dict:
    """{class name: probe result (see `probe_sources`) or {"skipped": why}} for every class,
    plus "mean_excess": the mean over probed classes of (balanced accuracy - chance) /
    (1 - chance), 0 at chance and 1 for sources told apart perfectly (None if none probed)."""
    labels, sources, groups = np.asarray(labels), np.asarray(sources), np.asarray(groups)
    result: dict = {"per_class": {}, "min_films": min_films, "probe": f"logistic regression, C={PROBE_C}, "
                    "standardized features, balanced class weights, patient-grouped stratified folds"}
    excess = []
    for c, name in enumerate(CLASSES):
        counts = Counter(sources[labels == c].tolist())
        kept = sorted(s for s, n in counts.items() if n >= min_films)
        if len(kept) < 2:
            result["per_class"][name] = {"skipped": f"fewer than two sources with {min_films}+ films "
                                                    f"({dict(sorted(counts.items()))})"}
            continue
        rows = (labels == c) & np.isin(sources, kept)
        probe = probe_sources(features[rows], sources[rows].tolist(), groups[rows].tolist(), seed=seed)
        result["per_class"][name] = probe
        excess.append((probe["balanced_accuracy"] - probe["chance"]) / (1 - probe["chance"]))
        log.info("site audit, %s: balanced accuracy %.3f (chance %.3f) over %s", name, probe["balanced_accuracy"],
                 probe["chance"], probe["sources"])
    result["mean_excess"] = float(np.mean(excess)) if excess else None
    return result


def audit_model(model: nn.Module, head: str, pieces: Sequence[tuple[DataLoader, Sequence]], device: torch.device | str,
                seed: int = 0, progress: Progress = None) -> dict:
    """`site_audit` of `model` on `pieces`: [(loader, its records in loader order)], e.g. the
    validation and test splits; the records give labels, sources and patient ids."""
    features = np.concatenate([penultimate_features(model, head, loader, device, progress) for loader, _ in pieces])
    records = [r for _, rs in pieces for r in rs]
    if len(records) != len(features):
        raise ValueError(f"{len(features)} feature rows for {len(records)} records: pass each loader's own records")
    return site_audit(features, [r.label for r in records], [r.source for r in records],
                      [r.patient_id for r in records], seed=seed)
