"""`pip install .` ships what a user needs: the library, the training command with every
recipe folder, app.py at the top level, the two commands and the pinned requirements.

The wheel is built offline from a copy of the sources (no `build/` left in the checkout)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from train.run import RECIPES, find_recipe

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "requirements.txt", "requirements-dev.txt", "app.py", "covidtl", "train")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out),
         str(source)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    (built,) = out.glob("covidtl-*.whl")
    with zipfile.ZipFile(built) as archive:
        yield archive


def _dist_info(archive: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in archive.namelist() if n.endswith(f".dist-info/{name}")]
    return archive.read(path).decode()


def test_the_wheel_holds_the_library_the_training_command_and_the_app(wheel):
    names = set(wheel.namelist())
    modules = {p.relative_to(REPO).as_posix() for folder in ("covidtl", "train") for p in (REPO / folder).rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert "app.py" in names  # top level, as a Hugging Face Space runs it
    assert not {n for n in names if n.split("/")[0] in {"tests", "benchmarks", "weights", "assets"}}


def test_the_wheel_holds_every_recipe_folder(wheel):
    recipes = {p.relative_to(REPO).as_posix() for p in RECIPES.rglob("*.toml")}
    assert any("/" in r.removeprefix("train/recipes/") for r in recipes)  # subfolders exist and are covered
    assert recipes <= set(wheel.namelist()), sorted(recipes - set(wheel.namelist()))


def test_the_wheel_declares_the_commands_the_pins_and_the_python(wheel):
    entry_points = _dist_info(wheel, "entry_points.txt")
    assert "covidtl-train = train.run:main" in entry_points
    assert "covidtl-app = app:main" in entry_points
    assert "covidtl-predict = train.predict:main" in entry_points
    metadata = Parser().parsestr(_dist_info(wheel, "METADATA"))
    pins = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    pins = [line for line in pins if line and not line.startswith("#")]
    required = [r for r in metadata.get_all("Requires-Dist") if "extra ==" not in r]
    assert sorted(required) == sorted(pins)
    assert metadata["Requires-Python"] == ">=3.11"


def test_a_shipped_recipe_is_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = RECIPES / "plus" / "resnet18_plus.toml"
    for name in ("plus/resnet18_plus", "plus/resnet18_plus.toml", "train/recipes/plus/resnet18_plus.toml"):
        assert find_recipe(Path(name)) == shipped
    (tmp_path / "plus").mkdir()
    (tmp_path / "plus" / "resnet18_plus.toml").write_text("name = 'mine'\n")
    assert find_recipe(Path("plus/resnet18_plus.toml")) == Path("plus/resnet18_plus.toml")  # a real file comes first
    assert find_recipe(Path("no/such/recipe")) == Path("no/such/recipe")  # unknown: left for load_recipe to refuse


def test_ci_runs_exactly_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    ci = [line for line in ci if "pytest" in line and not line.startswith("#")]
    readme = [line.strip() for line in (REPO / "README.md").read_text().splitlines() if "-m pytest" in line]
    assert ci == readme == ["python3 -m pytest -q -n 2 --durations=15"]
