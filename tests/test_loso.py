"""`python -m train.loso`: each fold trains without its source (through train.run's fit)
and scores every image of it; the table generator renders the result."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import train.run as train_run
from covidtl import cards
from train import loso, model_table
from covidtl.config import load_recipe
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
    monkeypatch.chdir(tmp_path)  # without --out: weights/<recipe name>.loso.json, where the app and the table read it
    out = cards.held_out_path(tmp_path / "weights", "tiny")
    assert loso.main(["--recipe", str(recipe), "--data", str(tiny_covidx), "--epochs", "1", "--n-boot", "20",
                      "--runs-dir", str(tmp_path / "runs")]) == 0
    result = json.loads(out.read_text())
    assert model_table.read_loso(tmp_path / "weights") == [result]
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


def _recipe(path, extra: str = ""):
    path.write_text('name = "tiny"\nbackbone = "squeezenet1_1"\npretrained = false\nepochs = 3\nbatch_size = 4\n'
                    'lr = 1e-3\nnum_workers = 0\nseed = 1\ncache = "gray"\n' + extra)
    return path


def test_folds_follow_the_recipes_train_sources_lung_crop_equalize_input_size_and_seed(tiny_covidx, tmp_path,
                                                                                      monkeypatch):
    seen, seeds, lung_weights, equalized, sizes = [], [], [], [], []

    def spy_fit(model, loader, sampler, val_loader, criterion, config, *args, **kwargs):
        seen.append({r.source for r in loader.dataset.records})
        seeds.append(config.seed)
        return run_fit(model, loader, sampler, val_loader, criterion, config, *args, **kwargs)

    def spy_eval_loader(*args, **kwargs):
        equalized.append(kwargs.get("equalize"))
        sizes.append(args[2])
        return real_eval_loader(*args, **kwargs)

    def spy_caches(*args, **kwargs):
        lung_weights.append(kwargs.get("lung_weights"))
        return real_caches(*args, **{**kwargs, "lung_weights": None})  # the crop itself: tests/test_lung_crop.py

    real_caches, real_eval_loader = loso.prepare_caches, train_run.eval_loader
    monkeypatch.setattr(train_run, "eval_loader", spy_eval_loader)  # under train.run.scoring_loader
    monkeypatch.setattr(loso, "fit", spy_fit)
    monkeypatch.setattr(loso, "prepare_caches", spy_caches)
    monkeypatch.setattr(loso, "lung_weights_for", lambda config, args: tmp_path / "lungs.safetensors"
                        if config.crop == "lungs" else None)
    data = tmp_path / "three"  # a third source, srcC: the 5th and 6th image of each split (one of each label)
    shutil.copytree(tiny_covidx, data)
    for split in ("train", "val", "test"):
        lines = (data / f"{split}.txt").read_text().splitlines()
        lines = [line.replace(" srcA", " srcC") if i in (4, 5) else line for i, line in enumerate(lines)]
        (data / f"{split}.txt").write_text("\n".join(lines) + "\n")
    recipe = _recipe(tmp_path / "recipe.toml",
                     'crop = "lungs"\ntrain_sources = ["srcA"]\nequalize = true\ninput_size = 48\n')
    out = tmp_path / "tiny.loso.json"
    assert loso.main(["--recipe", str(recipe), "--data", str(data), "--epochs", "1", "--n-boot", "20",
                      "--sources", "srcB", "--seed", "5", "--out", str(out), "--runs-dir", str(tmp_path / "runs"),
                      "--cache-dir", str(tmp_path / "cache")]) == 0
    assert lung_weights == [tmp_path / "lungs.safetensors"]
    assert seen == [{"srcA"}]  # not srcC: the recipe trains on srcA only
    assert equalized and all(equalized)  # validation and the held-out films are scored as trained
    assert set(sizes) == {48}  # at the recipe's input size, not the backbone's 224
    assert seeds == [5] and json.loads(out.read_text())["seed"] == 5  # --seed, not the recipe's 1
    fold = json.loads(out.read_text())["folds"][0]
    assert fold["held_out"] == "srcB" and fold["n"] == 10 and fold["train_images"] == 4
    assert fold["auc_against_validation"] is None  # srcB holds both classes: its own AUC is reported


def test_the_ingredient_table_names_each_recipes_change_and_its_folds(tmp_path):
    (tmp_path / "recipes").mkdir()
    _recipe(tmp_path / "recipes" / "ref.toml")
    _recipe(tmp_path / "recipes" / "eq.toml", "equalize = true\ngamma = 0.5\n")

    def result(name, auc, spec):
        folds = [{"held_out": "a", "overall": {"auc": {"value": auc, "ci_low": auc - 0.1, "ci_high": auc + 0.1},
                                                "sensitivity": {"value": 0.5},
                                                "specificity": {"value": 0.25}}},
                 {"held_out": "b", "overall": {"auc": None, "sensitivity": None, "specificity": {"value": spec}}}]
        return {"recipe": name, "epochs": 2, "folds": folds,
                "command": f"python -m train.loso --recipe recipes/{name}.toml --data x --epochs 2"}

    again = result("ref", 0.65, 0.1) | {"seed": 4}  # the reference run again with another seed (train.loso --seed)
    rows = model_table.ingredient_rows(result("ref", 0.6, 0.05), [result("eq", 0.7, 0.5), again], tmp_path)
    assert rows[0] == "| recipe | change from the reference | a held out | b held out |"
    assert rows[2] == "| `ref` | none (the reference) | AUC 0.600 (0.50–0.70), sens 0.500, spec 0.250 | spec 0.050 |"
    assert rows[3].startswith("| `ref` | seed 4 | AUC 0.650")  # a recipe's other seeds right after it
    assert rows[4] == "| `eq` | gamma 0.5, equalize true | AUC 0.700 (0.60–0.80), sens 0.500, spec 0.250 | spec 0.500 |"


def test_the_site_blind_table_adds_each_recipes_mean_site_audit(tmp_path):
    (tmp_path / "recipes").mkdir()
    _recipe(tmp_path / "recipes" / "ref.toml")

    def audit(negative, positive):
        probe = lambda bacc, chance: {"balanced_accuracy": bacc, "chance": chance, "sources": {}}  # noqa: E731
        return {"per_class": {"negative": probe(negative, 0.25), "positive": probe(positive, 0.5)}}

    folds = [{"held_out": "a", "overall": {"auc": None, "sensitivity": {"value": 0.9}, "specificity": None},
              "site_audit": audit(0.8, 0.9), "auc_against_validation": 0.75},
             {"held_out": "b", "overall": {"auc": None, "sensitivity": None, "specificity": {"value": 0.7}},
              "site_audit": audit(0.6, 0.7)}]
    result = {"recipe": "ref", "epochs": 2, "folds": folds, "command": "python -m train.loso --recipe recipes/ref.toml"}
    rows = model_table.ingredient_rows(result, [], tmp_path, audit=True)
    assert rows[0].endswith("| b held out | site audit: source probe balanced accuracy (chance) |")
    assert rows[2].endswith("| sens 0.900, AUC against validation 0.750 | spec 0.700 | Negative 0.70 (0.25), "
                            "COVID-19 0.80 (0.50) |")


def test_the_site_blind_comparison_is_read_against_the_references_full_run():
    def run(folds, **extra):
        return {"recipe": model_table.SITE_BLIND_REFERENCE, "folds": [{"held_out": s} for s in folds]} | extra

    full, longer, seed1 = run("abcd"), run("d", epochs=8), run("abcd", seed=1)
    other = run("abcd") | {"recipe": "another"}
    assert model_table.site_blind_reference([longer, seed1, other, full]) is full
    assert model_table.site_blind_reference([other]) is None


def test_a_one_class_source_is_ranked_against_the_validation_films_of_the_other_class():
    val_labels, val_scores = np.array([0, 0, 1]), np.array([0.85, 0.1, 0.95])
    covid = loso.auc_against_validation(np.array([1, 1]), np.array([0.9, 0.8]), val_labels, val_scores)
    assert covid == pytest.approx(0.75)  # 0.9 and 0.8 against the validation negatives 0.85 and 0.1
    normal = loso.auc_against_validation(np.array([0, 0]), np.array([0.2, 0.97]), val_labels, val_scores)
    assert normal == pytest.approx(0.5)  # the validation positive 0.95 against 0.2 and 0.97
    assert loso.auc_against_validation(np.array([0, 1]), np.array([0.2, 0.9]), val_labels, val_scores) is None


def test_the_fold_audit_scores_a_folds_model_as_the_fold_scored_it(tiny_covidx, tmp_path, capsys):
    """`python -m train.fold_audit` rebuilds a fold's model from its checkpoint, the recipe's framing
    (film size, JPEG copy, equalization) and the fold's threshold and temperature: on every film
    of the held-out source it reaches the very sensitivity and specificity the fold reported."""
    from covidtl.resolution_audit import VARIANTS
    from train import fold_audit

    recipe = _recipe(tmp_path / "recipe.toml", "film_size = 40\nfilm_jpeg = 60\nequalize = true\ninput_size = 48\n")
    out, runs = tmp_path / "tiny.loso.json", tmp_path / "runs"
    common = ["--data", str(tiny_covidx), "--runs-dir", str(runs)]
    assert loso.main(["--recipe", str(recipe), "--epochs", "1", "--n-boot", "20", "--sources", "srcA", "--out",
                      str(out), "--cache-dir", str(tmp_path / "cache"), *common]) == 0
    fold = json.loads(out.read_text())["folds"][0]
    audit_out = tmp_path / "audit.json"
    argv = ["--recipe", str(recipe), "--loso", str(out), *common, "--no-progress", "--max-films", "0"]
    assert fold_audit.main([*argv, "--held-out", "srcA", "--splits", "train", "val", "test", "--sources", "srcA",
                            "srcB", "--out", str(audit_out)]) == 0
    result = json.loads(audit_out.read_text())
    assert result["model"] == "tiny without srcA" and result["threshold"] == fold["threshold"]
    held_out = result["sources"]["srcA"]
    assert (held_out["n"], held_out["n_positive"]) == (fold["n"], fold["n_positive"])
    for rate in ("sensitivity", "specificity"):
        assert held_out["as_is"][rate] == pytest.approx(fold["overall"][rate]["value"])
    assert set(held_out["variants"]) == set(VARIANTS) and set(result["sources"]) == {"srcA", "srcB"}
    assert "srcA (14 films, 7 COVID-19): median P(COVID-19) as is " in capsys.readouterr().out

    assert fold_audit.main([*argv, "--held-out", "srcB"]) == 2
    assert "no fold holding out 'srcB'" in capsys.readouterr().err
    assert fold_audit.main([*argv, "--held-out", "srcA", "--runs-dir", str(tmp_path / "elsewhere")]) == 2
    assert "no fold checkpoint" in capsys.readouterr().err


def test_a_resumed_run_keeps_the_folds_it_has_and_runs_the_rest(tiny_covidx, tmp_path, monkeypatch, capsys):
    trained = []

    def spy_fit(model, loader, *args, **kwargs):
        trained.append({r.source for r in loader.dataset.records})
        return run_fit(model, loader, *args, **kwargs)

    monkeypatch.setattr(loso, "fit", spy_fit)
    recipe, out = _recipe(tmp_path / "recipe.toml"), tmp_path / "tiny.loso.json"
    argv = ["--recipe", str(recipe), "--data", str(tiny_covidx), "--epochs", "1", "--n-boot", "20", "--out", str(out),
            "--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    assert loso.main([*argv, "--sources", "srcA"]) == 0
    first = json.loads(out.read_text())["folds"][0]
    assert loso.main([*argv, "--sources", "srcA", "srcB", "--resume"]) == 0
    assert trained == [{"srcB"}, {"srcA"}]  # srcA's fold (trained on srcB) once, then srcB's only
    result = json.loads(out.read_text())
    assert [fold["held_out"] for fold in result["folds"]] == ["srcA", "srcB"] and result["folds"][0] == first
    assert loso.main([*argv, "--sources", "srcA", "srcB", "--resume", "--seed", "7"]) == 2
    assert "is another run (seed 1, not 7)" in capsys.readouterr().err


def test_a_fold_is_normalized_as_its_recipe_says(tmp_path):
    """TrainConfig.mean_std: the recipe's mean and std when it gives them, else the backbone's; the
    fold audit's card (and train.loso's folds) use it."""
    from covidtl.models import get_spec
    from train.fold_audit import fold_card

    fold = {"held_out": "srcA", "threshold": 0.4, "temperature": 1.2}
    own = load_recipe(_recipe(tmp_path / "own.toml", "mean = [0.3, 0.3, 0.3]\nstd = [0.2, 0.2, 0.2]\n"))
    backbone = load_recipe(_recipe(tmp_path / "backbone.toml"))
    assert own.mean_std() == ((0.3,) * 3, (0.2,) * 3)
    spec = get_spec("squeezenet1_1")
    assert backbone.mean_std() == (spec.mean, spec.std)
    card = fold_card(own, fold, None)
    assert (card["mean"], card["std"], card["threshold"]) == ([0.3] * 3, [0.2] * 3, 0.4) and "lung_crop" not in card
