"""Tests for covidtl.plots: each function writes a real, non-empty PNG."""

import subprocess
import sys

import numpy as np
import pytest

from covidtl.metrics import confusion_counts, evaluate_scores
from covidtl.plots import plot_confusion, plot_history, plot_per_source, plot_roc

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_MAGIC


def _scores(n: int = 80, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    return y, s


def test_import_does_not_load_pyplot():
    code = "import sys, covidtl.plots; assert 'matplotlib.pyplot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plot_history(tmp_path):
    history = [
        {"epoch": 1, "train_loss": 0.7, "val_loss": 0.6, "val_auc": 0.7, "val_sensitivity": 0.6,
         "val_specificity": 0.8, "lr": 1e-3},
        {"epoch": 2, "train_loss": 0.5, "val_loss": 0.5, "val_auc": 0.8, "val_sensitivity": 0.7,
         "val_specificity": 0.85, "lr": 5e-4},
        {"epoch": 3, "train_loss": 0.4, "lr": 1e-4},  # validation skipped this epoch
    ]
    out = plot_history(history, tmp_path / "sub" / "history.png")
    assert out == tmp_path / "sub" / "history.png"
    _assert_png(out)
    loss_only = [{"train_loss": 0.9}, {"train_loss": 0.8}]
    _assert_png(plot_history(loss_only, tmp_path / "loss_only.png"))
    with pytest.raises(ValueError, match="history is empty"):
        plot_history([], tmp_path / "empty.png")


def test_plot_roc(tmp_path):
    y, s = _scores()
    _assert_png(plot_roc(y, s, tmp_path / "roc.png", threshold=0.5, title="test ROC"))
    _assert_png(plot_roc(y, s, tmp_path / "roc_plain.png"))


def test_plot_confusion(tmp_path):
    y, s = _scores()
    counts = confusion_counts(y, (s >= 0.5).astype(int))
    _assert_png(plot_confusion(counts, tmp_path / "cm.png", title="test"))
    _assert_png(plot_confusion({"tp": 0, "fp": 0, "tn": 0, "fn": 0}, tmp_path / "zeros.png"))
    with pytest.raises(ValueError, match="missing"):
        plot_confusion({"tp": 1}, tmp_path / "bad.png")


def test_plot_per_source(tmp_path):
    y, s = _scores(90)
    sources = ["a"] * 40 + ["b"] * 45 + ["neg_only"] * 5
    y[-5:] = 0  # sensitivity is None for "neg_only": must be skipped, not crash
    report = evaluate_scores(y, s, sources, threshold=0.5, n_boot=50)
    assert report["per_source"]["neg_only"]["metrics"]["sensitivity"]["value"] is None
    _assert_png(plot_per_source(report, tmp_path / "per_source.png"))
    with pytest.raises(ValueError, match="per_source"):
        plot_per_source({"per_source": {}}, tmp_path / "bad.png")
