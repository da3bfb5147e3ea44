"""End-to-end: `python -m train` and `python -m train.evaluate` on tiny synthetic data,
plus the offline-pretrained failure, --resume after an interruption, and torchrun."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train.run as train_run
from covidtl.cards import card_markdown
from covidtl.export import load_model
from covidtl.inference import Predictor, load_upload
from covidtl.metrics import choose_threshold
from train import evaluate as evaluate_cli
from train.run import main as train_main

REPO = Path(__file__).resolve().parents[1]


def write_recipe(tmp_path: Path, **values) -> Path:
    base = {
        "name": "tiny", "backbone": "squeezenet1_1", "mode": "finetune", "pretrained": False, "epochs": 2,
        "batch_size": 4, "lr": 1e-3, "num_workers": 0, "n_boot": 50, "seed": 3,
    } | values
    lines = [f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}" for k, v in base.items()]
    path = tmp_path / "recipe.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def cli_args(recipe: Path, data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--recipe", str(recipe), "--data", str(data), "--weights-dir", str(tmp_path / "weights"),
            "--runs-dir", str(tmp_path / "runs"), "--no-progress", *extra]


def test_train_exports_weights_card_and_plots(tiny_covidx, tmp_path):
    assert train_main(cli_args(write_recipe(tmp_path), tiny_covidx, tmp_path)) == 0
    weights = tmp_path / "weights"
    card = json.loads((weights / "tiny.json").read_text())
    assert card["architecture"] == "squeezenet1_1" and card["classes"] == ["negative", "positive"]
    test = card["metrics"]["test"]
    assert set(test["per_source"]) == {"srcA", "srcB"}
    auc = test["overall"]["auc"]
    assert auc["ci_low"] <= auc["value"] <= auc["ci_high"]
    assert card["data"]["splits"]["train"]["n"] == 12
    assert "trained from scratch" in card["initialisation"]
    assert card["config"]["epochs"] == 2 and len(json.loads((tmp_path / "runs/tiny/history.json").read_text())) == 2
    for png in card["plots"].values():
        assert (weights / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Calibration: a fitted temperature, ECE before/after on val and test, a reliability plot,
    # and a threshold that is the rule applied to the stored (calibrated) validation scores.
    assert card["temperature"] > 0 and card["calibration"]["temperature"] == card["temperature"]
    for split in ("val", "test"):
        assert set(card["calibration"][split]) == {"ece_before", "ece_after", "nll_before", "nll_after"}
    assert card["calibration"]["val"]["nll_after"] <= card["calibration"]["val"]["nll_before"] + 1e-12
    assert card["plots"]["reliability"] == "tiny.reliability.png"
    val_scores = card["metrics"]["val"]["scores"]
    assert len(val_scores) == card["metrics"]["val"]["n"]
    assert card["threshold"] == choose_threshold([r["label"] for r in val_scores], [r["p_positive"] for r in val_scores])
    assert "calibrated" in card["threshold_rule"] and "pooled over all sources" in card["threshold_rule"]
    # Marks: trained from scratch is a baseline; nothing asked for the default mark.
    assert card["baseline"] is True and card["default"] is False
    # No path of the machine that trained it (STYLE rule 13).
    text = (weights / "tiny.json").read_text()
    assert str(tmp_path) not in text and str(tiny_covidx) not in text and "root" not in card["data"]
    assert card["data"]["name"] == tiny_covidx.name and card["data"]["label_files"]["val"] == "val.txt"

    # The exported model reproduces the card's test metrics through the evaluate command.
    out = tmp_path / "report"
    assert evaluate_cli.main(["--weights", str(weights / "tiny.safetensors"), "--data", str(tiny_covidx),
                              "--out", str(out), "--n-boot", "50", "--num-workers", "0", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    for name, metric in test["overall"].items():
        assert report["overall"][name]["value"] == pytest.approx(metric["value"], abs=1e-9), name
    assert report["temperature"] == card["temperature"]
    assert [r["p_positive"] for r in report["scores"]] == pytest.approx([r["p_positive"] for r in test["scores"]], abs=1e-6)
    assert (out / "test.roc.png").is_file()


def test_an_equalizing_recipe_is_followed_by_the_card_evaluate_and_the_predictor(tiny_covidx, tmp_path):
    """equalize = true: the card says so, and `train.evaluate` and the app's Predictor score
    the test films as training's evaluation did (each fails if it skips the equalization)."""
    assert train_main(cli_args(write_recipe(tmp_path, epochs=1, equalize=True), tiny_covidx, tmp_path)) == 0
    card = json.loads((tmp_path / "weights" / "tiny.json").read_text())
    assert card["equalize"] is True
    trained = [r["p_positive"] for r in card["metrics"]["test"]["scores"]]
    out = tmp_path / "report"
    assert evaluate_cli.main(["--weights", str(tmp_path / "weights" / "tiny.safetensors"), "--data", str(tiny_covidx),
                              "--out", str(out), "--n-boot", "20", "--num-workers", "0", "--no-progress"]) == 0
    assert [r["p_positive"] for r in json.loads((out / "report.json").read_text())["scores"]] == pytest.approx(trained, abs=1e-5)
    predictor = Predictor.from_file(tmp_path / "weights" / "tiny.safetensors")
    served = [predictor.predict(load_upload(tiny_covidx / "test" / r["filename"])).p_positive
              for r in card["metrics"]["test"]["scores"]]
    assert served == pytest.approx(trained, abs=1e-5)


def test_a_recipe_input_size_is_trained_on_recorded_and_served(tiny_covidx, tmp_path):
    """input_size = 48 (the backbone's is 224): training's evaluation, the card and the app's
    Predictor all use it, so the Predictor reproduces the card's test scores."""
    assert train_main(cli_args(write_recipe(tmp_path, epochs=1, input_size=48), tiny_covidx, tmp_path)) == 0
    card = json.loads((tmp_path / "weights" / "tiny.json").read_text())
    assert card["input_size"] == 48 and card["config"]["input_size"] == 48
    predictor = Predictor.from_file(tmp_path / "weights" / "tiny.safetensors")
    assert predictor.input_size == 48
    trained = [r["p_positive"] for r in card["metrics"]["test"]["scores"]]
    served = [predictor.predict(load_upload(tiny_covidx / "test" / r["filename"])).p_positive
              for r in card["metrics"]["test"]["scores"]]
    assert served == pytest.approx(trained, abs=1e-5)


@pytest.mark.parametrize("film_jpeg", [None, 60])
def test_a_film_size_recipe_is_trained_on_recorded_and_served(tiny_covidx, tmp_path, film_jpeg):
    """film_size = 40 (tiny_covidx's films are 64 px), and with film_jpeg = 60 made into JPEG copies
    of that size: the training cache, the card and the app's Predictor all bring each film to that
    detail (and copy), so the Predictor reproduces the card's test scores."""
    copy = {} if film_jpeg is None else {"film_jpeg": film_jpeg}
    recipe = write_recipe(tmp_path, epochs=1, input_size=48, cache="gray", film_size=40, **copy)
    assert train_main(cli_args(recipe, tiny_covidx, tmp_path, "--cache-dir", str(tmp_path / "cache"))) == 0
    card = json.loads((tmp_path / "weights" / "tiny.json").read_text())
    assert card["film_size"] == 40 and card["film_jpeg"] == film_jpeg
    cached = [p.name for p in (tmp_path / "cache").iterdir()]
    assert any("film40" in name for name in cached)
    assert any("jpeg60" in name for name in cached) == (film_jpeg is not None)
    predictor = Predictor.from_file(tmp_path / "weights" / "tiny.safetensors")
    trained = [r["p_positive"] for r in card["metrics"]["test"]["scores"]]
    served = [predictor.predict(load_upload(tiny_covidx / "test" / r["filename"])).p_positive
              for r in card["metrics"]["test"]["scores"]]
    assert served == pytest.approx(trained, abs=1e-5)


def test_a_mixup_recipe_mixes_every_training_batch(tiny_covidx, tmp_path, monkeypatch):
    from covidtl import engine

    calls = []
    real = engine.mix_batch
    monkeypatch.setattr(engine, "mix_batch", lambda *a: calls.append(a[2]) or real(*a))
    assert train_main(cli_args(write_recipe(tmp_path, epochs=1, mixup=0.4), tiny_covidx, tmp_path)) == 0
    assert calls and set(calls) == {0.4}
    assert json.loads((tmp_path / "weights" / "tiny.json").read_text())["config"]["mixup"] == 0.4


def _validation_auc_falls_every_epoch(monkeypatch):
    """Patch the epoch loop's validation metrics: AUC 1, 1/2, 1/3, ... (never a gain after epoch 1)."""
    real, calls = train_run.metrics.binary_metrics, []

    def falling_auc(labels, scores, threshold):
        calls.append(1)
        return real(labels, scores, threshold) | {"auc": 1.0 / len(calls)}

    monkeypatch.setattr(train_run.metrics, "binary_metrics", falling_auc)


@pytest.mark.parametrize("keep_epoch, epochs_run, kept", [("val_auc", 2, 1), ("last", 4, 4)])
def test_keep_epoch_last_runs_the_whole_schedule_and_ships_its_last_weights(tiny_covidx, tmp_path, monkeypatch,
                                                                              keep_epoch, epochs_run, kept):
    """Validation AUC falls every epoch (patched): "val_auc" keeps epoch 1 and stops early,
    "last" runs all 4 epochs and exports the last epoch's weights; the card says which."""
    _validation_auc_falls_every_epoch(monkeypatch)
    recipe = write_recipe(tmp_path, epochs=4, early_stopping_patience=1, keep_epoch=keep_epoch)
    assert train_main(cli_args(recipe, tiny_covidx, tmp_path)) == 0
    card = json.loads((tmp_path / "weights" / "tiny.json").read_text())
    assert len(json.loads((tmp_path / "runs/tiny/history.json").read_text())) == epochs_run
    assert card["best_epoch"] == kept
    shipped = load_file(tmp_path / "weights" / "tiny.safetensors")
    last = {k.removeprefix("model."): v for k, v in load_file(tmp_path / "runs/tiny/last.safetensors").items()
            if k.startswith("model.")}
    assert all(torch.equal(shipped[k].float(), last[k].float()) for k in shipped) == (keep_epoch == "last")
    assert ("(the last)" in card_markdown(card)) == (keep_epoch == "last")


@pytest.mark.parametrize("schedule", ["plateau", "cosine"])
def test_a_cosine_schedule_follows_the_epoch_budget_not_validation(tiny_covidx, tmp_path, monkeypatch, schedule):
    """Validation AUC falls every epoch (patched): "plateau" (patience 0) cuts the rate tenfold
    after each epoch without a gain; "cosine" goes down the half cosine of its 3-epoch budget
    whatever validation says. Each history row has the rate the next epoch trains at."""
    _validation_auc_falls_every_epoch(monkeypatch)
    recipe = write_recipe(tmp_path, epochs=3, lr=1e-3, lr_schedule=schedule, plateau_patience=0, keep_epoch="last")
    assert train_main(cli_args(recipe, tiny_covidx, tmp_path)) == 0
    rates = [row["lr"] for row in json.loads((tmp_path / "runs/tiny/history.json").read_text())]
    expected = {"plateau": [1e-3, 1e-4, 1e-5], "cosine": [7.5e-4, 2.5e-4, 0.0]}[schedule]
    assert rates == pytest.approx(expected, abs=1e-12)
    assert json.loads((tmp_path / "weights" / "tiny.json").read_text())["config"]["lr_schedule"] == schedule


def test_train_sources_limit_training_and_selection_but_test_is_scored_whole(tiny_covidx, tmp_path, capsys):
    assert train_main(cli_args(write_recipe(tmp_path, epochs=1, train_sources=["srcA"]), tiny_covidx, tmp_path)) == 0
    card = json.loads((tmp_path / "weights" / "tiny.json").read_text())
    for split in ("train", "val"):
        lines = (tiny_covidx / f"{split}.txt").read_text().splitlines()
        assert card["data"]["splits"][split]["n"] == sum(line.endswith(" srcA") for line in lines) < len(lines)
    assert card["metrics"]["val"]["n"] == card["data"]["splits"]["val"]["n"]
    assert set(card["metrics"]["test"]["per_source"]) == {"srcA", "srcB"}
    assert card["config"]["train_sources"] == ["srcA"]
    recipe = write_recipe(tmp_path, epochs=1, train_sources=["srcA", "elsewhere"])
    assert train_main(cli_args(recipe, tiny_covidx, tmp_path)) != 0
    assert "train_sources names ['elsewhere']" in capsys.readouterr().err
    assert train_main(cli_args(write_recipe(tmp_path, train_sources=[]), tiny_covidx, tmp_path)) != 0
    assert "train_sources is empty" in capsys.readouterr().err


def test_stats_compute_refuses_an_equalizing_recipe(tiny_covidx, tmp_path, capsys):
    recipe = write_recipe(tmp_path, epochs=1, equalize=True)
    assert train_main(cli_args(recipe, tiny_covidx, tmp_path, "--stats", "compute")) != 0
    assert "equalize = true" in capsys.readouterr().err
    assert not (tmp_path / "weights" / "tiny.json").exists()


def test_pretrained_offline_fails_fast_with_actionable_message(tiny_covidx, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    work = []  # fast, counted instead of timed: no connection and no data work before the error

    def record(*args, **kwargs):
        work.append(args[:1])
        raise AssertionError("reached after the pretrained weights were found missing")

    monkeypatch.setattr(socket, "create_connection", record)
    monkeypatch.setattr(socket.socket, "connect", record)
    monkeypatch.setattr(train_run, "resolve_dataset_root", record)
    code = train_main(cli_args(write_recipe(tmp_path, backbone="resnet18", pretrained=True), tiny_covidx, tmp_path))
    assert code == 2 and work == []
    err = capsys.readouterr().err
    assert "resnet18-f37072fd.pth" in err and "--no-pretrained" in err and "Traceback" not in err
    assert not (tmp_path / "weights").exists()


def test_errors_are_one_line_not_tracebacks(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train_main(cli_args(write_recipe(tmp_path), tmp_path / "empty", tmp_path)) == 2
    assert "error:" in capsys.readouterr().err
    assert train_main(cli_args(write_recipe(tmp_path, lr_typo=1.0), tmp_path / "empty", tmp_path)) == 2
    assert "lr_typo" in capsys.readouterr().err


@pytest.mark.parametrize("schedule", ["plateau", "cosine"])
def test_resume_after_interruption_matches_uninterrupted_run(tiny_covidx, tmp_path, monkeypatch, schedule):
    recipe = write_recipe(tmp_path, epochs=3, lr_schedule=schedule)
    straight = tmp_path / "straight"
    assert train_main(cli_args(recipe, tiny_covidx, straight)) == 0

    # Interrupt the second run in the middle of its second epoch, then resume it.
    broken = tmp_path / "broken"
    calls = {"n": 0}
    real_epoch = train_run.train_one_epoch

    def dies_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_run, "train_one_epoch", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_main(cli_args(recipe, tiny_covidx, broken))
    state = json.loads((broken / "runs/tiny/last.json").read_text())
    assert state["epoch"] == 0  # epoch 1 completed and was checkpointed
    monkeypatch.setattr(train_run, "train_one_epoch", real_epoch)
    assert train_main(cli_args(recipe, tiny_covidx, broken, "--resume")) == 0

    history = json.loads((broken / "runs/tiny/history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]
    uninterrupted = json.loads((straight / "runs/tiny/history.json").read_text())
    assert [row["lr"] for row in history] == [row["lr"] for row in uninterrupted]
    a = load_file(straight / "weights/tiny.safetensors")
    b = load_file(broken / "weights/tiny.safetensors")
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_resume_without_checkpoint_says_how_to_start(tiny_covidx, tmp_path, capsys):
    assert train_main(cli_args(write_recipe(tmp_path), tiny_covidx, tmp_path, "--resume")) == 2
    assert "without --resume" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_processes_agree_and_only_rank0_writes(tiny_covidx, tmp_path):
    recipe = write_recipe(tmp_path, epochs=1)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "train", *cli_args(recipe, tiny_covidx, tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,  # 3x a loaded machine's slowest
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    finals = [line.split("final:", 1)[1] for line in proc.stderr.splitlines() if "final:" in line]
    assert len(finals) == 2 and finals[0] == finals[1], finals
    assert sum("rank 0/2" in line for line in proc.stderr.splitlines()) == 1
    assert sum("exported" in line for line in proc.stderr.splitlines()) == 1
    model, card = load_model(tmp_path / "weights/tiny.safetensors")
    assert card["data"]["splits"]["train"]["n"] == 12


def test_every_command_reports_an_expected_failure_in_one_line_and_a_bug_with_its_traceback(capsys):
    """train.cli.report_errors, around every long `python -m train.*` command."""
    from train.cli import EXIT_ERROR, report_errors

    def fails():
        raise FileNotFoundError("no label file val.txt in /data: is it a COVIDx folder?")

    assert report_errors(fails, (FileNotFoundError, ValueError)) == EXIT_ERROR == 2
    assert capsys.readouterr().err == "error: no label file val.txt in /data: is it a COVIDx folder?\n"
    assert report_errors(lambda: None, (ValueError,)) == 0
    assert report_errors(lambda: 3, (ValueError,)) == 3
    assert report_errors(lambda: {"auc": 0.9}, (ValueError,)) == 0  # a result, not a status
    with pytest.raises(KeyError):  # not an expected failure: a bug, with its traceback
        report_errors(lambda: {}["missing"], (FileNotFoundError, ValueError))
