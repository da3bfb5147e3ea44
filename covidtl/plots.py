"""Evaluation figures saved as PNG: training history, ROC, confusion matrix, per-source bars.

Figures are built with ``matplotlib.figure.Figure`` and written with ``fig.savefig``;
pyplot is never imported, so importing this module selects no backend and keeps no
global figure state (safe in the Gradio app and in worker threads).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from covidtl.classes import CLASSES, DISPLAY_NAMES, POSITIVE
from covidtl.metrics import binary_metrics, roc_auc, roc_points

_DPI = 120


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def _series(history: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) for one history key, skipping epochs where it is missing or NaN."""
    xs, ys = [], []
    for i, row in enumerate(history):
        value = row.get(key)
        if value is None or not math.isfinite(float(value)):
            continue
        xs.append(float(row.get("epoch", i + 1)))
        ys.append(float(value))
    return xs, ys


def plot_history(history: list[dict[str, float]], path: Path) -> Path:
    """Training curves: losses (left, learning rate on a log twin axis) and validation
    metrics (right). Plots whichever keys are present.

    Args:
        history: one dict per epoch, e.g. ``{"epoch": 1, "train_loss": 0.6, "val_loss": 0.5,
            "val_auc": 0.8, "val_sensitivity": 0.7, "val_specificity": 0.9, "lr": 1e-4}``.
            Keys containing "loss" go to the loss panel, "lr" to its twin axis, every
            other key except "epoch" to the metrics panel.
        path: output PNG.
    """
    if not history:
        raise ValueError("history is empty; pass one dict of floats per epoch")
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    loss_keys = [k for k in keys if "loss" in k]
    metric_keys = [k for k in keys if k not in loss_keys and k not in ("epoch", "lr")]

    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_loss, ax_metric = fig.subplots(1, 2)

    for key in loss_keys:
        ax_loss.plot(*_series(history, key), marker="o", markersize=3, label=key)
    ax_loss.set_xlabel("epoch")
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Loss")
    ax_loss.grid(alpha=0.3)
    handles, labels = ax_loss.get_legend_handles_labels()
    if "lr" in keys:
        xs, ys = _series(history, "lr")
        ax_lr = ax_loss.twinx()
        (line,) = ax_lr.plot(xs, ys, color="grey", linestyle="--", label="lr")
        if ys and min(ys) > 0:
            ax_lr.set_yscale("log")
        ax_lr.set_ylabel("learning rate")
        handles.append(line)
        labels.append("lr")
    if handles:
        ax_loss.legend(handles, labels, loc="best")

    for key in metric_keys:
        ax_metric.plot(*_series(history, key), marker="o", markersize=3, label=key)
    ax_metric.set_xlabel("epoch")
    ax_metric.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_metric.set_title("Validation metrics")
    ax_metric.grid(alpha=0.3)
    if metric_keys:
        ax_metric.legend(loc="best")
    return _save(fig, path)


def plot_roc(
    y_true: np.ndarray,
    y_score: np.ndarray,
    path: Path,
    threshold: float | None = None,
    title: str = "",
) -> Path:
    """ROC curve with the AUC in the legend and, if ``threshold`` is given, the operating
    point (1 - specificity, sensitivity) at that threshold marked.

    Args:
        y_true: (N,) labels in {0, 1}; both classes must be present.
        y_score: (N,) P(positive).
        path: output PNG.
        threshold: operating threshold (predict positive iff score >= threshold).
        title: figure title; defaults to "ROC".
    """
    fpr, tpr, _ = roc_points(y_true, y_score)
    auc = roc_auc(y_true, y_score)

    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    ax.plot(fpr, tpr, color="tab:blue", label=f"ROC (AUC = {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    if threshold is not None:
        m = binary_metrics(y_true, y_score, threshold)
        ax.plot(
            1.0 - m["specificity"],
            m["sensitivity"],
            marker="o",
            color="tab:red",
            linestyle="none",
            label=(
                f"threshold {threshold:.3g}: sens {m['sensitivity']:.3f}, "
                f"spec {m['specificity']:.3f}"
            ),
        )
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title or "ROC")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_confusion(counts: dict[str, int], path: Path, title: str = "") -> Path:
    """2x2 confusion matrix, rows = true class, columns = predicted class, in CLASSES order.

    Args:
        counts: ``{"tp", "fp", "tn", "fn"}`` as from ``metrics.confusion_counts``.
        path: output PNG.
        title: figure title; defaults to "Confusion matrix".
    """
    missing = {"tp", "fp", "tn", "fn"} - set(counts)
    if missing:
        raise ValueError(
            f"counts is missing {sorted(missing)}; pass metrics.confusion_counts(...) output"
        )
    neg = 1 - POSITIVE
    matrix = np.zeros((2, 2), dtype=np.int64)
    matrix[POSITIVE, POSITIVE] = counts["tp"]
    matrix[neg, POSITIVE] = counts["fp"]
    matrix[neg, neg] = counts["tn"]
    matrix[POSITIVE, neg] = counts["fn"]
    names = [DISPLAY_NAMES.get(c, c) for c in CLASSES]

    fig = Figure(figsize=(4.5, 4), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, fraction=0.046)
    half = matrix.max() / 2.0
    for i in range(2):
        for j in range(2):
            ax.text(
                j,
                i,
                str(matrix[i, j]),
                ha="center",
                va="center",
                fontsize=14,
                color="white" if matrix[i, j] > half else "black",
            )
    ax.set_xticks([0, 1], names)
    ax.set_yticks([0, 1], names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "Confusion matrix")
    return _save(fig, path)


def plot_per_source(report: dict, path: Path) -> Path:
    """Sensitivity and specificity per data source, with bootstrap CIs as error bars.

    Args:
        report: output of ``metrics.evaluate_scores``. Values that are ``None``
            (undefined, e.g. sensitivity for a source without positives) are not drawn
            and are marked "n/a".
        path: output PNG.
    """
    per_source = report.get("per_source") or {}
    if not per_source:
        raise ValueError("report has no per_source entries; pass metrics.evaluate_scores output")
    sources = list(per_source)
    metrics = ("sensitivity", "specificity")
    colors = ("tab:red", "tab:blue")
    width = 0.38
    x = np.arange(len(sources))

    fig = Figure(figsize=(max(5.0, 1.2 * len(sources) + 2), 4), layout="constrained")
    ax = fig.subplots()
    for k, (metric, color) in enumerate(zip(metrics, colors)):
        offset = (k - 0.5) * width
        labelled = False  # one legend entry per metric, on its first drawn bar
        for i, source in enumerate(sources):
            entry = per_source[source]["metrics"][metric]
            value = entry.get("value")
            if value is None:
                ax.text(x[i] + offset, 0.02, "n/a", ha="center", va="bottom", fontsize=8)
                continue
            low, high = entry.get("ci_low"), entry.get("ci_high")
            yerr = None
            if low is not None and high is not None:
                yerr = [[max(value - low, 0.0)], [max(high - value, 0.0)]]
            ax.bar(
                x[i] + offset,
                value,
                width,
                color=color,
                yerr=yerr,
                capsize=3,
                label=None if labelled else metric,
            )
            labelled = True
    labels = [f"{s}\n(n={per_source[s]['n']}, pos={per_source[s]['n_positive']})" for s in sources]
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 1.15)  # headroom so the legend sits above the bars
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("value")
    threshold = report.get("threshold")
    ax.set_title(
        "Per-source sensitivity / specificity"
        + (f" (threshold {threshold:.3g})" if threshold is not None else "")
    )
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper center", ncols=2)
    return _save(fig, path)


def plot_reliability(panels: dict[str, dict[str, list[dict]]], path: Path, title: str = "") -> Path:
    """Reliability diagram: fraction positive against mean P(COVID-19) per score bin.

    Args:
        panels: one panel per key (e.g. a split), each mapping a curve label (e.g.
            "before, ECE 0.08") to `covidtl.calibration.reliability_bins` output; empty
            bins are left out, marker area grows with the bin's image count.
        path: output PNG.
        title: figure title.
    """
    if not panels:
        raise ValueError("panels is empty; pass at least one {curve label: bins}")
    fig = Figure(figsize=(4.5 * len(panels), 4.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (panel, curves) in zip(axes, panels.items()):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
        for (label, bins), color in zip(curves.items(), ("tab:orange", "tab:blue", "tab:green")):
            kept = [b for b in bins if b["n"]]
            xs = [b["mean_score"] for b in kept]
            ys = [b["fraction_positive"] for b in kept]
            ax.plot(xs, ys, color=color, marker="o", label=label)
            ax.scatter(xs, ys, s=[8 + 4 * b["n"] for b in kept], color=color, alpha=0.3)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(f"mean P({DISPLAY_NAMES[CLASSES[POSITIVE]]}) in bin")
        ax.set_ylabel("fraction positive in bin")
        ax.set_title(panel)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
