"""Turn scores on a split into a clinical report (metrics, intervals, per source) and plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from covidtl import metrics, plots


def report_with_plots(
    y_true: np.ndarray,
    y_score: np.ndarray,
    sources: Sequence[str],
    threshold: float,
    out_dir: Path,
    prefix: str,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, str]]:
    """`metrics.evaluate_scores` plus ROC, confusion and per-source PNGs in `out_dir`.

    Returns (report, {plot kind: file name relative to out_dir}).
    """
    report = metrics.evaluate_scores(y_true, y_score, sources, threshold, n_boot=n_boot, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "roc": plots.plot_roc(y_true, y_score, out_dir / f"{prefix}.roc.png", threshold=threshold, title=prefix),
        "confusion": plots.plot_confusion(report["confusion"], out_dir / f"{prefix}.confusion.png", title=prefix),
        "per_source": plots.plot_per_source(report, out_dir / f"{prefix}.per_source.png"),
    }
    return report, {kind: Path(path).name for kind, path in files.items()}
