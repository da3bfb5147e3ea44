"""`python -m train.loso`: each fold trains without its source (through train.run's fit)
and scores every image of it; the table generator renders the result."""

from __future__ import annotations

import json


import train.loso as loso
from train import model_table
from train.run import fit as run_fit


def test_each_fold_trains_without_its_source_and_scores_all_of_it(tiny_covidx, tmp_path, monkeypatch):
    seen = []

    def spy_fit(model, loader, *args, **kwargs):  # the one training loop, train.run.fit
        seen.append({r.source for r in loader.dataset.records})
        return run_fit(model, loader, *args, **kwargs)

    monkeypatch.setattr(loso, "fit", spy_fit)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('name = "tiny"\nbackbone = "squeezenet1_1"\npretrained = false\nepochs = 3\n'
                      'batch_size = 4\nlr = 1e-3\nnum_workers = 0\nseed = 1\n')
    out = tmp_path / "weights" / "tiny.loso.json"
    assert loso.main(["--recipe", str(recipe), "--data", str(tiny_covidx), "--epochs", "1", "--n-boot", "20",
                      "--out", str(out), "--runs-dir", str(tmp_path / "runs")]) == 0
    result = json.loads(out.read_text())
    assert [fold["held_out"] for fold in result["folds"]] == ["srcA", "srcB"]
    assert seen == [{"srcB"}, {"srcA"}]
    # every image of the held-out source, from all splits: srcA 6 + 4 + 4 (7 positive), srcB 6 + 2 + 2 (5)
    assert [(fold["n"], fold["n_positive"]) for fold in result["folds"]] == [(14, 7), (10, 5)]
    for fold in result["folds"]:
        assert fold["train_images"] == 6  # half of the 12 train images belong to each source
        assert fold["splits_scored"] == ["train", "val", "test"]
        assert fold["epochs_run"] == 1 and fold["temperature"] > 0
        assert 0 <= fold["overall"]["specificity"]["value"] <= 1
    assert result["data"] == tiny_covidx.name and str(tmp_path) not in out.read_text()

    table = "\n".join(model_table.loso_rows([result]))
    assert "| `tiny` | srcA | 14 (7) |" in table and "| `tiny` | srcB | 10 (5) |" in table


def test_an_unknown_source_is_refused(tiny_covidx, tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('name = "tiny"\nbackbone = "squeezenet1_1"\npretrained = false\nnum_workers = 0\n')
    assert loso.main(["--recipe", str(recipe), "--data", str(tiny_covidx), "--sources", "nowhere",
                      "--out", str(tmp_path / "x.json"), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "unknown sources ['nowhere']" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_loso_uses_the_training_loop_of_python_m_train():
    assert loso.fit is run_fit  # one loop: a change to its schedule or stopping rule reaches both


def test_the_table_shows_calibration_marks_and_adult_pooled_rows():
    block = {"temperature": 1.5, "val": {"ece_before": 0.2, "ece_after": 0.05, "nll_before": 0.6, "nll_after": 0.4},
             "test": {"ece_before": 0.25, "ece_after": 0.1, "nll_before": 0.7, "nll_after": 0.5}}
    card = {"name": "m", "calibration": block, "default": True, "baseline": False}
    assert model_table.calibration_rows([card])[2] == "| `m` | 1.500 | 0.200 → 0.050 | 0.250 → 0.100 | 0.600 → 0.400 |"
    assert model_table.calibration_rows([{"name": "old"}])[2].startswith("| `old` | 1 (not calibrated)")
    assert model_table.model_label(card) == "`m` (default)"
    metric = {"value": 0.9, "ci_low": 0.8, "ci_high": 1.0}
    report = {"per_source": {}, "adult_pooled": {"sources": ["cohen", "nih"], "n": 10, "n_positive": 2,
                                                  "overall": {"auc": metric, "sensitivity": metric, "specificity": metric}}}
    rows = model_table.source_rows([{"name": "m", "metrics": {"test": report}}])
    assert rows[2].startswith("| `m` | **adult pooled** (cohen + nih) | 10 (2) | 0.900 (0.80–1.00) |")


def test_the_card_command_carries_no_machine_folder():
    from train.run import shipped_command

    argv = ["--recipe", "train/recipes/plus/x.toml", "--data", "/home/me/data/covidx-plus", "--cache-dir", "/tmp/c",
            "--runs-dir=/tmp/r", "--weights-dir", "w", "--resume", "--epochs", "3", "--no-progress"]
    assert shipped_command(argv) == ("python -m train --recipe train/recipes/plus/x.toml --data .../covidx-plus "
                                     "--epochs 3 --no-progress")
