"""`covidtl-predict`: the app's answer for a batch of files, as lines of text or JSON; a file
that cannot be read is reported and makes the exit status 1, the other files still answered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from PIL import Image
from synthetic_inputs import export_tiny_model, not_xrays, save_png, xray_like

import app
from covidtl.answer import ModelFolder
from covidtl.decision import FLAGGED, NOT_FLAGGED, OUT_OF_SCOPE
from train import predict

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "weights"
EXAMPLES = sorted((ROOT / "assets" / "examples").glob("*.jpg"))


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A folder with two tiny models (thresholds 0 and 1.01) and no input check or lung model."""
    weights = tmp_path_factory.mktemp("weights")
    export_tiny_model(weights, "always", threshold=0.0, seed=0, input_size=64, default=True)
    export_tiny_model(weights, "never", threshold=1.01, seed=1, input_size=64)
    return weights


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("films")
    broken = folder / "broken.png"
    broken.write_text("not an image\n" * 20)
    return {
        "film": save_png(xray_like(96, seed=3), folder / "film.png"),
        "colour": save_png(not_xrays()["colour"], folder / "colour-photo.png"),
        "text": save_png(not_xrays()["text"], folder / "text-page.png"),
        "broken": broken,
    }


def test_the_command_is_registered():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["covidtl-predict"] == "train.predict:main"


def test_one_line_per_film_and_a_failed_file_sets_the_exit_status(tiny, files, capsys):
    code = predict.main([str(files["film"]), str(files["broken"]), str(files["colour"]), "--weights-dir", str(tiny)])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert code == 1 and len(lines) == 2  # the broken file has no line, the others do
    assert lines[0].startswith(f"{files['film']}: {FLAGGED}, P(COVID-19) = ") and "threshold 0.000" in lines[0]
    assert lines[0].endswith("model always")
    assert lines[1].startswith(f"{files['colour']}: {OUT_OF_SCOPE}, model always: This is a colour picture")
    assert f"error: {files['broken']}: broken.png is not an image" in err and "1 of 3 files" in err
    assert predict.main([str(files["film"]), "--weights-dir", str(tiny), "--model", "never"]) == 0
    assert f": {NOT_FLAGGED}, P(COVID-19) = " in capsys.readouterr().out


def test_json_lines_are_the_answers_and_heatmaps_are_written(tiny, files, tmp_path, capsys):
    heatmaps = tmp_path / "heatmaps"
    argv = [str(files["film"]), str(files["broken"]), str(files["film"]), "--weights-dir", str(tiny), "--json",
            "--explain-dir", str(heatmaps)]  # fmt: skip
    assert predict.main(argv) == 1
    out, err = capsys.readouterr()
    answers = _json_lines(out)
    assert [a.get("error") is not None for a in answers] == [False, True, False]
    assert answers[1]["file"] == str(files["broken"]) and "not an image" in answers[1]["error"]
    first = answers[0]
    assert first["file"] == str(files["film"]) and first["decision"] == FLAGGED and first["model"] == "always"
    assert 0.0 <= first["p_covid"] <= 1.0 and first["threshold"] == 0.0 and first["heatmap_method"] == "Grad-CAM"
    assert "films:" not in err  # no progress bar with --json unless asked for
    written = sorted(p.name for p in heatmaps.iterdir())
    assert written == ["film-2.always.heatmap.png", "film.always.heatmap.png"]  # the same stem twice: numbered
    assert Image.open(heatmaps / written[1]).size == (64, 64)
    assert predict.main([str(files["film"]), "--weights-dir", str(tiny), "--model", "nope"]) == 2
    assert "unknown model 'nope'; choose one of always, never" in capsys.readouterr().err


def test_the_command_runs_as_a_module(tiny, files):
    result = subprocess.run(
        [sys.executable, "-m", "train.predict", str(files["film"]), "--weights-dir", str(tiny), "--json"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (answer,) = _json_lines(result.stdout)
    assert answer["decision"] == FLAGGED and answer["file"] == str(files["film"])


@pytest.fixture(scope="module")
def shipped() -> ModelFolder:
    if not list(SHIPPED.glob("*.safetensors")) or len(EXAMPLES) != 4:
        pytest.skip("no shipped models in weights/ or example films in assets/examples/")
    return ModelFolder(SHIPPED)


def test_the_example_films_get_the_apps_answers(shipped, files, capsys):
    """The four example films with the shipped models, input check and lung model: in scope,
    with the decisions and P(COVID-19) the app shows; photos and pages are out of scope."""
    others = [files["colour"], files["text"]]
    assert predict.main([*map(str, EXAMPLES), *map(str, others), "--json"]) == 0
    answers = {Path(a["file"]).name: a for a in _json_lines(capsys.readouterr().out)}
    default = shipped.default_name()
    for film in EXAMPLES:
        cli = answers[film.name]
        shown, *_ = app.classify(shipped.store, shipped.gate, str(film), None, "Grad-CAM", 0.4,
                                 lungs=shipped.lungs.get(), held_out=shipped.held_out)  # fmt: skip
        assert cli["in_scope"] and cli["model"] == shown["model"] == default, film.name
        assert cli["decision"] == shown["decision"] and cli["p_covid"] == shown["p_covid"], film.name
        assert cli["threshold"] == shown["threshold"] and cli["held_out"] == shown["held_out"], film.name
    assert answers["cohen-covid19-5782ae15.jpg"]["decision"] == FLAGGED  # the example
    assert answers["nih-no-finding-00002371_010.jpg"]["decision"] == NOT_FLAGGED
    for path in others:
        refused = answers[path.name]
        assert refused["decision"] == OUT_OF_SCOPE and refused["p_covid"] is None and refused["reason"], path.name
