"""Turn scores on a split into a clinical report (metrics, intervals, per source, adult
sources pooled, per-image scores) and plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from covidtl import metrics, plots
from covidtl.provenance import adult_sources


def adult_pooled(y_true: np.ndarray, y_score: np.ndarray, sources: Sequence[str], threshold: float,
                 n_boot: int = 1000, seed: int = 0) -> dict[str, Any] | None:
    """Metrics with 95 % intervals on the images of adult sources taken together
    (`covidtl.provenance.adult_sources`), or None when the split has none."""
    adults = adult_sources(sources)
    if not adults:
        return None
    keep = np.isin(np.asarray(sources, dtype=object), adults)
    labels, scores = np.asarray(y_true)[keep], np.asarray(y_score)[keep]
    report = metrics.evaluate_scores(labels, scores, ["adult"] * int(keep.sum()), threshold, n_boot=n_boot, seed=seed)
    return {"sources": adults, **{k: report[k] for k in ("n", "n_positive", "overall", "confusion")}}


def report_with_plots(
    y_true: np.ndarray,
    y_score: np.ndarray,
    sources: Sequence[str],
    threshold: float,
    out_dir: Path,
    prefix: str,
    n_boot: int = 1000,
    seed: int = 0,
    filenames: Sequence[str] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """`metrics.evaluate_scores` plus the adult sources pooled (`adult_pooled`, when the
    split has any) and ROC, confusion and per-source PNGs in `out_dir`. With `filenames`,
    the report also lists every image's score (`scores`: filename, source, label,
    p_positive), the very numbers the threshold applies to.

    Returns (report, {plot kind: file name relative to out_dir}).
    """
    report = metrics.evaluate_scores(y_true, y_score, sources, threshold, n_boot=n_boot, seed=seed)
    pooled = adult_pooled(y_true, y_score, sources, threshold, n_boot=n_boot, seed=seed)
    if pooled is not None:
        report["adult_pooled"] = pooled
    if filenames is not None:
        report["scores"] = [
            {"filename": str(f), "source": str(s), "label": int(y), "p_positive": float(p)}
            for f, s, y, p in zip(filenames, sources, y_true, y_score, strict=True)
        ]
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "roc": plots.plot_roc(y_true, y_score, out_dir / f"{prefix}.roc.png", threshold=threshold, title=prefix),
        "confusion": plots.plot_confusion(report["confusion"], out_dir / f"{prefix}.confusion.png", title=prefix),
        "per_source": plots.plot_per_source(report, out_dir / f"{prefix}.per_source.png"),
    }
    return report, {kind: Path(path).name for kind, path in files.items()}
