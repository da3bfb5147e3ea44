"""Training faults, through the real command line: a corrupt image in the middle of a split
is named and, by choice, fatal (exit code 2, one line) or skipped; a run killed with
SIGKILL and started again with --resume loses at most the epoch it was in."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bad_inputs import png_bytes
from test_train_cli import cli_args, write_recipe

from covidtl.export import load_model
from train.run import main as train_main

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
MIDDLE = "train_005.png"  # the 6th of 12 training images


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not an image \x00\xff" * 50)


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:300])


def _undecodable_pixels(path: Path) -> None:
    # Every chunk CRC is right, so only decoding the pixels finds the damage.
    path.write_bytes(png_bytes(64, 64, bytes(range(256)) * 2))


def _command(recipe: Path, data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train", *cli_args(recipe, data, tmp_path, *extra)]


def _run(recipe: Path, data: Path, tmp_path: Path, *extra: str, timeout: float) -> subprocess.CompletedProcess:
    """`python -m train` in a child process, to its end; output captured as text."""
    return subprocess.run(
        _command(recipe, data, tmp_path, *extra), cwd=REPO, env=ENV, capture_output=True, text=True,
        timeout=timeout, check=False,
    )


def _epoch_lines(log: str, total: int) -> list[int]:
    """Epoch numbers of the "epoch i/total" lines a run logged (one per finished epoch)."""
    return [int(line.split("epoch ")[1].split("/")[0]) for line in log.splitlines() if f"/{total}  train loss" in line]


def test_a_corrupt_image_is_fatal_by_default_with_one_line_naming_it(tiny_covidx, tmp_path):
    _garbage(tiny_covidx / "train" / MIDDLE)
    recipe = write_recipe(tmp_path, epochs=1)
    proc = _run(recipe, tiny_covidx, tmp_path, timeout=900)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    assert f"{MIDDLE} (" in errors[0] and "1 of 12 images" in errors[0] and "--on-corrupt skip" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "tiny").exists() and not (tmp_path / "weights").exists()


@pytest.mark.parametrize(
    "damage, filename",
    [
        (_garbage, MIDDLE),
        (_truncated, "train_006.jpg"),
        pytest.param(
            _undecodable_pixels,
            MIDDLE,
            marks=pytest.mark.xfail(
                strict=True,
                reason="without the image cache (this recipe's cache = none), covidtl.scan._probe_image checks "
                "only the chunk CRCs of a PNG (verify()), so a PNG with intact CRCs but undecodable pixel data "
                "passes the scan and stops training mid-epoch; the cache build finds it (test below)",
            ),
        ),
    ],
    ids=["garbage", "truncated_jpeg", "png_pixels_undecodable"],
)
def test_a_corrupt_image_is_skipped_by_choice_and_named(tiny_covidx, tmp_path, caplog, damage, filename):
    damage(tiny_covidx / "train" / filename)
    recipe = write_recipe(tmp_path, epochs=1)
    with caplog.at_level(logging.WARNING):
        assert train_main(cli_args(recipe, tiny_covidx, tmp_path, "--on-corrupt", "skip")) == 0
    skipped = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(skipped) == 1 and "1 of 12" in skipped[0] and filename in skipped[0], skipped
    card = json.loads((tmp_path / "weights" / "tiny.json").read_text())
    assert card["data"]["splits"]["train"]["n"] == 11  # one fewer than the label file lists
    assert card["data"]["splits"]["val"]["n"] == 6 and card["data"]["splits"]["test"]["n"] == 6


@pytest.mark.parametrize("on_corrupt", ["error", "skip"])
@pytest.mark.parametrize("damage", [_garbage, _undecodable_pixels], ids=["garbage", "png_pixels_undecodable"])
def test_with_the_image_cache_corrupt_images_are_found_before_training(
    tiny_covidx, tmp_path, caplog, capsys, damage, on_corrupt
):
    # Cached runs skip the quick scan: the cache build decodes every image, so it finds
    # what the scan finds and what it cannot (damaged PNG pixels under intact checksums).
    damage(tiny_covidx / "train" / MIDDLE)
    recipe = write_recipe(tmp_path, epochs=1, cache="gray")
    args = cli_args(recipe, tiny_covidx, tmp_path, "--on-corrupt", on_corrupt, "--cache-dir", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        code = train_main(args)
    if on_corrupt == "error":
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and error.startswith("error: 1 of 12 images") and f"{MIDDLE} (" in error, error
        assert "--on-corrupt skip" in error
        assert not (tmp_path / "runs" / "tiny").exists() and not (tmp_path / "weights").exists()
        return
    assert code == 0
    skipped = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(skipped) == 1 and "1 of 12" in skipped[0] and MIDDLE in skipped[0], skipped
    card = json.loads((tmp_path / "weights" / "tiny.json").read_text())
    assert card["data"]["splits"]["train"]["n"] == 11


def test_sigkill_then_resume_loses_at_most_the_epoch_in_progress(tiny_covidx, tmp_path):
    epochs = 5
    recipe = write_recipe(tmp_path, epochs=epochs, early_stopping_patience=epochs)
    checkpoint = tmp_path / "runs" / "tiny" / "last.json"
    killed = subprocess.Popen(
        _command(recipe, tiny_covidx, tmp_path),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 900  # 3x the slowest first epoch seen on a loaded machine
        while not checkpoint.exists():  # the first epoch's checkpoint
            assert killed.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 900 s"
            time.sleep(0.01)
    finally:
        killed.send_signal(signal.SIGKILL)
        _, killed_log = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL

    done = json.loads(checkpoint.read_text())["epoch"] + 1  # epochs saved before the kill
    logged = _epoch_lines(killed_log, epochs)
    assert logged == list(range(1, len(logged) + 1))
    # Each epoch is checkpointed before it is logged: at most the epoch in progress is lost.
    assert len(logged) <= done <= len(logged) + 1 and 1 <= done < epochs, (done, killed_log)
    assert not (tmp_path / "weights" / "tiny.safetensors").exists()

    resumed = _run(recipe, tiny_covidx, tmp_path, "--resume", timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming tiny after epoch {done}" in resumed.stderr
    assert _epoch_lines(resumed.stderr, epochs) == list(range(done + 1, epochs + 1))  # nothing retrained
    history = json.loads((tmp_path / "runs" / "tiny" / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, epochs + 1))
    _, card = load_model(tmp_path / "weights" / "tiny.safetensors")
    assert card["epochs_run"] == epochs and card["data"]["splits"]["train"]["n"] == 12
