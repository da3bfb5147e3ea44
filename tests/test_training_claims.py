"""What `python -m train` claims, checked against one tiny run (module-scoped, a few seconds):

- the operating threshold is chosen on validation, not test: recomputed here from the
  exported model's validation scores with `choose_threshold`; the test images are
  inverted so test would pick another threshold;
- the card's metrics are the exported model's at that threshold, overall and per source;
- the exported weights are the best validation epoch's (`best_epoch`), and training stops
  after `early_stopping_patience` epochs without a validation AUC gain;
- every epoch visits the training images in another order;
- a run resumed after an interruption after its best epoch logs the uninterrupted run's
  per-epoch history (both export the same weights then, so only the history can tell);
- a non-default framing and normalization (crop 0.75, mean 0.45, std 0.3) reach the card,
  and the Predictor built from that card makes training's evaluation tensor for a file.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_covidx_folder
from PIL import Image
from safetensors.torch import load_file

import train.run as train_run
from covidtl import metrics
from covidtl.images import load_image
from covidtl.inference import Predictor, load_upload
from covidtl.labels import parse_label_file
from covidtl.models import get_spec
from covidtl.transforms import build_transform

NAME = "claims"
EPOCHS = 6
PATIENCE = 2
CROP, MEAN, STD = 0.75, 0.45, 0.3
INPUT_SIZE = 64  # not the backbone's 224: the recipe's must reach the card, and the run is 12x cheaper
MIN_SENSITIVITY = 0.8  # not the default 0.90: the recipe's value must be the one used
RECIPE = {
    "name": NAME, "backbone": "squeezenet1_1", "mode": "finetune", "pretrained": False, "epochs": EPOCHS,
    "batch_size": 4, "lr": 1e-3, "num_workers": 0, "n_boot": 20, "seed": 3, "crop_fraction": CROP, "input_size": INPUT_SIZE,
    "mean": [MEAN] * 3, "std": [STD] * 3, "early_stopping_patience": PATIENCE, "min_sensitivity": MIN_SENSITIVITY,
}  # fmt: skip
HISTORY_KEYS_NOT_COMPARED = ("seconds",)


def _write_recipe(folder: Path) -> Path:
    lines = [f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}" for k, v in RECIPE.items()]
    path = folder / "recipe.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _args(recipe: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--recipe", str(recipe), "--data", str(data), "--weights-dir", str(out / "weights"),
            "--runs-dir", str(out / "runs"), "--no-progress", *extra]  # fmt: skip


class Run:
    def __init__(self, root: Path, data: Path, recipe: Path, out: Path, orders: list[list[int]]):
        self.root, self.data, self.recipe, self.out, self.orders = root, data, recipe, out, orders
        self.card = json.loads((out / "weights" / f"{NAME}.json").read_text())
        self.history = json.loads((out / "runs" / NAME / "history.json").read_text())
        self.predictor = Predictor.from_file(out / "weights" / f"{NAME}.safetensors")

    def snapshot(self, epochs_done: int) -> Path:
        """The run folder as a kill in epoch `epochs_done + 1` leaves it."""
        return self.root / f"after-epoch-{epochs_done}"

    def scores(self, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(labels, the exported model's P(positive) through the Predictor, sources)."""
        records = parse_label_file(self.data / f"{split}.txt")
        scores = [self.predictor.predict(load_upload(self.data / split / r.filename)).p_positive for r in records]
        return np.array([r.label for r in records]), np.array(scores), [r.source for r in records]


@pytest.fixture(scope="module")
def run(tmp_path_factory, unrendered_plots) -> Run:
    root = tmp_path_factory.mktemp("claims")
    data = make_covidx_folder(root, {"train": 16, "val": 12, "test": 12}, seed=5)
    for path in (data / "test").iterdir():  # test films inverted: test would pick another threshold
        image = Image.open(path)
        Image.eval(image, lambda v: 255 - v).save(path, quality=95)
    recipe, out, orders = _write_recipe(root), root / "straight", []
    real_epoch = train_run.train_one_epoch

    def recording_epoch(model, loader, *args, **kwargs):
        runs = out / "runs" / NAME
        if orders:  # epochs already done: keep the folder as a kill now would leave it
            shutil.copytree(runs, root / f"after-epoch-{len(orders)}" / "runs" / NAME)
        orders.append(list(loader.sampler))
        return real_epoch(model, loader, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_run, "train_one_epoch", recording_epoch)
        assert train_run.main(_args(recipe, data, out)) == 0
    return Run(root, data, recipe, out, orders)


def _resume(run: Run, epochs_done: int) -> list[dict]:
    folder = run.snapshot(epochs_done)
    assert folder.is_dir(), f"the run ended before epoch {epochs_done + 1}"
    assert train_run.main(_args(run.recipe, run.data, folder, "--resume")) == 0
    return json.loads((folder / "runs" / NAME / "history.json").read_text())


def _same_history(resumed: list[dict], straight: list[dict]) -> None:
    assert [row["epoch"] for row in resumed] == [row["epoch"] for row in straight]
    for a, b in zip(resumed, straight):
        for key in b:
            if key not in HISTORY_KEYS_NOT_COMPARED:
                assert a[key] == pytest.approx(b[key], abs=1e-6, nan_ok=True), (b["epoch"], key)


# --------------------------------------------------------------------------- threshold and metrics


def test_the_threshold_is_chosen_on_validation_not_test(run):
    labels, scores, _ = run.scores("val")
    on_val = metrics.choose_threshold(labels, scores, min_sensitivity=MIN_SENSITIVITY)
    on_test = metrics.choose_threshold(*run.scores("test")[:2], min_sensitivity=MIN_SENSITIVITY)
    default_rule = metrics.choose_threshold(labels, scores, min_sensitivity=0.90)
    assert abs(on_val - on_test) > 1e-3, "the test split must pick another threshold, else this proves nothing"
    assert abs(on_val - default_rule) > 1e-4, "the default rule must pick another threshold, else this proves nothing"
    assert run.card["threshold"] == pytest.approx(on_val, abs=1e-5)
    assert run.predictor.threshold == run.card["threshold"]
    assert f"validation sensitivity >= {MIN_SENSITIVITY:.2f}" in run.card["threshold_rule"]


def _as_stored(value: float | None) -> float:
    """A card's metric as a number: the card stores an undefined one (no positive call: PPV) as null."""
    return float("nan") if value is None else value


def test_the_card_test_metrics_are_the_exported_models_at_its_threshold(run):
    labels, scores, sources = run.scores("test")
    threshold = run.card["threshold"]
    test = run.card["metrics"]["test"]
    assert run.card["evaluated_on"] == "test"
    for name, value in metrics.binary_metrics(labels, scores, threshold).items():
        assert _as_stored(test["overall"][name]["value"]) == pytest.approx(value, abs=1e-5, nan_ok=True), name
    for source in sorted(set(sources)):
        mask = np.array(sources) == source
        expected = metrics.binary_metrics(labels[mask], scores[mask], threshold)
        got = test["per_source"][source]["metrics"]
        assert test["per_source"][source]["n"] == int(mask.sum())
        for name in ("accuracy", "sensitivity", "specificity"):
            assert _as_stored(got[name]["value"]) == pytest.approx(expected[name], abs=1e-5, nan_ok=True), (source, name)


# --------------------------------------------------------------------------- epochs


def test_the_exported_weights_are_the_best_validation_epoch(run):
    aucs = [row["val_auc"] for row in run.history]
    best = int(np.argmax(aucs)) + 1  # the first epoch with the highest validation AUC
    assert run.card["best_epoch"] == best
    assert run.card["epochs_run"] == len(run.history)
    labels, scores, _ = run.scores("val")
    assert metrics.roc_auc(labels, scores) == pytest.approx(aucs[best - 1], abs=1e-6)
    best_file = load_file(run.out / "runs" / NAME / "best.safetensors")
    exported = load_file(run.out / "weights" / f"{NAME}.safetensors")
    assert all(torch.equal(best_file[k], exported[k]) for k in exported)


def test_training_stops_after_patience_epochs_without_a_gain(run):
    best, stale, stop = -np.inf, 0, EPOCHS
    for row in run.history:
        if row["val_auc"] > best:
            best, stale = row["val_auc"], 0
        else:
            stale += 1
        if stale >= PATIENCE:
            stop = row["epoch"]
            break
    assert stop < EPOCHS, "the run must stop early, else this proves nothing"
    assert len(run.history) == stop


def test_each_epoch_is_logged_to_history_csv_and_json(run):
    with open(run.out / "runs" / NAME / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in rows] == [row["epoch"] for row in run.history] == list(
        range(1, len(run.history) + 1)
    )
    for row, logged in zip(rows, run.history):
        assert float(row["val_auc"]) == pytest.approx(logged["val_auc"])
        assert float(row["train_loss"]) == pytest.approx(logged["train_loss"])


def test_every_epoch_visits_the_training_images_in_another_order(run):
    n = len(parse_label_file(run.data / "train.txt"))
    assert len(run.orders) == len(run.history) >= 2
    for order in run.orders:
        assert sorted(order) == list(range(n))
    assert len({tuple(order) for order in run.orders}) == len(run.orders)


# --------------------------------------------------------------------------- resume


def test_a_run_resumed_after_its_best_epoch_logs_the_uninterrupted_history(run):
    """Killed in its last epoch: after the best epoch and with epochs without a gain behind
    it, so the resumed run must also carry the early-stopping count to stop where the
    uninterrupted one did."""
    best, last = run.card["best_epoch"], len(run.history)
    assert best < last - 1, "the run must go on for two epochs after its best, else this proves nothing"
    resumed = _resume(run, last - 1)
    _same_history(resumed, run.history)
    card = json.loads((run.snapshot(last - 1) / "weights" / f"{NAME}.json").read_text())
    assert card["best_epoch"] == best and card["threshold"] == pytest.approx(run.card["threshold"], abs=1e-9)
    resumed_weights = load_file(run.snapshot(last - 1) / "weights" / f"{NAME}.safetensors")
    straight_weights = load_file(run.out / "weights" / f"{NAME}.safetensors")
    assert all(torch.equal(resumed_weights[k], straight_weights[k]) for k in straight_weights)


# --------------------------------------------------------------------------- framing and normalization


def test_the_card_records_the_recipes_framing_and_normalization(run):
    assert run.card["crop_fraction"] == CROP
    assert run.card["mean"] == [MEAN] * 3 and run.card["std"] == [STD] * 3
    assert run.card["equalize"] is False
    # False: not equalized; None: no lung crop, each film at its own size, no JPEG copy
    assert run.predictor.geometry == (INPUT_SIZE, CROP, False, (MEAN,) * 3, (STD,) * 3, None, None, None)
    assert run.card["shortcut_audit"]["layer"] == get_spec("squeezenet1_1").cam_layer


@pytest.mark.parametrize("split", ["val", "test"])
def test_training_and_the_predictor_make_the_same_tensor_for_a_file(run, split):
    evaluation = build_transform(INPUT_SIZE, [MEAN] * 3, [STD] * 3, train=False, crop_fraction=CROP)
    for record in parse_label_file(run.data / f"{split}.txt")[:4]:  # a PNG and a JPEG of each label
        path = run.data / split / record.filename
        trained = evaluation(load_image(path))
        served = run.predictor.preprocess(load_upload(path))[0]
        assert torch.allclose(trained, served, atol=1e-5), record.filename
