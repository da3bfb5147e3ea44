"""`python -m train.evaluate` scores a lung-crop model on lung crops, as it was trained and as the
app serves it (before 2026-12-02 it scored the whole film)."""

from __future__ import annotations

import json

import pytest

from covidtl import lungs
from covidtl.export import load_model, sha256_file
from covidtl.images import load_image
from covidtl.inference import Predictor
from covidtl.labels import parse_label_file, split_paths
from tests.synthetic_inputs import FakeLungs, export_tiny_model
from train import evaluate as evaluate_cli


def test_evaluate_cuts_a_lung_crop_models_films_to_their_lungs_like_the_predictor(tiny_covidx, tmp_path,
                                                                                  monkeypatch):
    fake = (FakeLungs(), {"name": "fake", "weights_sha256": "f"})
    monkeypatch.setattr(lungs, "load_lung_model", lambda path: fake)
    lung_file = tmp_path / "fake.safetensors"
    lung_file.write_bytes(b"fake lung model")  # its bytes feed the cache key and the card's check
    weights = tmp_path / "w"
    path = export_tiny_model(weights, "tiny", "resnet18", input_size=32, crop_fraction=0.9, seed=1,
                             lung_crop={"lung_model": "fake", "lung_model_sha256": sha256_file(lung_file),
                                        "margin": lungs.CROP_MARGIN})
    out = tmp_path / "report"
    assert evaluate_cli.main(["--weights", str(path.with_suffix(".safetensors")), "--data", str(tiny_covidx),
                              "--out", str(out), "--n-boot", "20", "--num-workers", "0", "--no-progress",
                              "--lung-weights", str(lung_file), "--cache-dir", str(tmp_path / "cache")]) == 0
    scored = [row["p_positive"] for row in json.loads((out / "report.json").read_text())["scores"]]

    model, card = load_model(path)
    predictor = Predictor(model, card, lung_model=FakeLungs())
    label_file, image_dir = split_paths(tiny_covidx, "test")
    served = [predictor.predict(load_image(image_dir / r.filename)).p_positive
              for r in parse_label_file(label_file)]
    assert scored == pytest.approx(served, abs=1e-4)
    # Half the test films (the negatives) have no plausible lungs and are kept whole: the crop changes the rest.
    whole = Predictor(model, {k: v for k, v in card.items() if k != "lung_crop"})
    uncropped = [whole.predict(load_image(image_dir / r.filename)).p_positive for r in parse_label_file(label_file)]
    assert scored != pytest.approx(uncropped, abs=1e-4)
