"""crop = "lungs": the cache build and the Predictor cut each image to its lungs with the
same function, images with an implausible lung mask are kept whole (and counted), and
the Grad-CAM audit measures energy inside each image's own lungs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from covidtl import lungs
from covidtl.audit import cam_audit
from covidtl.cache import CachedDataset, ensure_cache
from covidtl.cards import card_markdown
from covidtl.config import TrainConfig
from covidtl.data import CovidxDataset
from covidtl.export import CardError
from covidtl.images import load_image
from covidtl.inference import Predictor
from covidtl.labels import parse_label_file, split_paths
from covidtl.models import create_model, get_spec
from covidtl.transforms import build_transform
from tests.synthetic_inputs import FakeLungs

SIZE, FRACTION = 32, 0.9
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _split(root, split="test"):
    label_file, image_dir = split_paths(root, split)
    return parse_label_file(label_file), image_dir, label_file


def test_lung_crop_needs_a_cache_and_a_known_name():
    with pytest.raises(ValueError, match="cache"):
        TrainConfig(name="m", backbone="resnet18", crop="lungs")
    with pytest.raises(ValueError, match="unknown crop"):
        TrainConfig(name="m", backbone="resnet18", crop="heart", cache="gray")
    assert TrainConfig(name="m", backbone="resnet18").crop == "none"


def test_cache_crops_plausible_images_and_keeps_the_rest_whole(tiny_covidx, tmp_path, fake_lungs):
    records, image_dir, label_file = _split(tiny_covidx)
    plain = ensure_cache(records, image_dir, label_file, tmp_path / "c", SIZE, FRACTION, num_workers=0)
    cropped = ensure_cache(records, image_dir, label_file, tmp_path / "c", SIZE, FRACTION, num_workers=0,
                           lung_weights=fake_lungs)
    assert cropped.path != plain.path and "lungs" in cropped.path.name
    negatives = {r.filename for r in records if r.label == 0}
    assert set(cropped.kept_whole) == negatives and all("0 lung-sized" in v for v in cropped.kept_whole.values())
    rows_plain, rows_cropped = plain.pixels(), cropped.pixels()
    for i, record in enumerate(records):
        same = np.array_equal(rows_plain[i], rows_cropped[i])
        assert same == (record.label == 0), record.filename  # whole images are the non-crop rows exactly
    again = ensure_cache(records, image_dir, label_file, tmp_path / "c", SIZE, FRACTION, num_workers=0,
                         lung_weights=fake_lungs)
    assert again.kept_whole == cropped.kept_whole  # read back from the index when reused
    fake_lungs.write_bytes(b"another lung model")
    other = ensure_cache(records, image_dir, label_file, tmp_path / "c", SIZE, FRACTION, num_workers=0,
                         lung_weights=fake_lungs)
    assert other.path != cropped.path  # the lung model's checksum is in the key


def _card(lung_crop: bool) -> dict:
    card = {"name": "m", "architecture": "resnet18", "threshold": 0.5, "input_size": SIZE,
            "crop_fraction": FRACTION, "mean": list(MEAN), "std": list(STD)}
    if lung_crop:
        card["lung_crop"] = {"lung_model": "fake", "lung_model_sha256": "f", "margin": lungs.CROP_MARGIN}
    return card


def test_predictor_sees_what_training_saw(tiny_covidx, tmp_path, fake_lungs):
    records, image_dir, label_file = _split(tiny_covidx)
    cache = ensure_cache(records, image_dir, label_file, tmp_path, SIZE, FRACTION, num_workers=0,
                         lung_weights=fake_lungs)
    training = CachedDataset(cache, records, build_transform(SIZE, MEAN, STD, train=False, crop_fraction=FRACTION))
    predictor = Predictor(create_model("resnet18"), _card(lung_crop=True), lung_model=FakeLungs())
    for i, record in enumerate(records):
        x = predictor.preprocess(load_image(image_dir / record.filename, grey=True))
        assert torch.equal(x[0], training[i][0]), record.filename
    assert predictor.resize_side == 2 * round(SIZE / FRACTION)


def test_one_classify_request_runs_the_lung_model_once(tiny_covidx, monkeypatch):
    """A lung-crop model's crop, the view under its heatmap and the lungs' outline all come
    from one lung-model pass, which the outline reuses."""
    import app
    from covidtl.scope import ScopeGate

    records, image_dir, _ = _split(tiny_covidx)
    film = image_dir / next(r.filename for r in records if r.label == 1)  # bright centre: FakeLungs finds lungs
    counting = FakeLungs()
    predictor = Predictor(create_model("resnet18"), _card(lung_crop=True), lung_model=counting)
    monkeypatch.setattr(app, "_predictor", lambda store, name: predictor)
    outliner = lungs.LungOutliner(counting)
    *_, timing, state = app.classify(None, ScopeGate(), str(film), None, "Grad-CAM", 0.4, lungs=outliner)
    assert counting.passes == 1 and state["lungs"] is not None and "lung outline" in timing
    assert np.array_equal(state["view"], predictor.view(load_image(film)))  # the view of the same crop
    *_, state = app.classify(None, ScopeGate(), str(film), None, "Grad-CAM", 0.4)
    assert counting.passes == 3 and state["lungs"] is None  # one more request (+ the view above): one pass each


def test_compare_crops_once_for_the_models_that_share_a_geometry(tiny_covidx, monkeypatch):
    import app
    from covidtl.scope import ScopeGate

    records, image_dir, _ = _split(tiny_covidx)
    film = image_dir / next(r.filename for r in records if r.label == 1)
    counting = FakeLungs()
    predictors = {name: Predictor(create_model("resnet18"), {**_card(lung_crop=True), "name": name}, lung_model=counting)
                  for name in ("a", "b")}

    class Store:  # the two lung-crop models, as the app's ModelStore offers them
        def __init__(self):
            self.weights_dir = tiny_covidx
            self.cards = {name: p.card for name, p in predictors.items()}

        def names(self):
            return list(predictors)

        def load_all(self):
            return predictors

    answers, _, gallery, _ = app.compare(Store(), ScopeGate(), str(film), "Grad-CAM")
    assert [a["model"] for a in answers] == ["a", "b"] and len(gallery) == 2
    assert counting.passes == 1  # one crop, shared by both models' tensors and heatmap views


def test_a_lung_crop_model_without_its_lung_model_is_refused():
    with pytest.raises(CardError, match="lung model"):
        Predictor(create_model("resnet18"), _card(lung_crop=True))
    plain = Predictor(create_model("resnet18"), _card(lung_crop=False), lung_model=FakeLungs())
    assert plain.lungs is None  # a whole-image model ignores a lung model


def test_audit_uses_each_images_own_lungs_and_counts_fallbacks(tiny_covidx, seeded):
    records, image_dir, _ = _split(tiny_covidx)
    paths = [image_dir / r.filename for r in records]
    masks = lungs.view_lung_masks(paths, FakeLungs(), SIZE, FRACTION, cropped=False)
    assert [m is None for m in masks] == [r.label == 0 for r in records]
    assert all(m.shape == (SIZE, SIZE) and 0 < m.mean() < 1 for m in masks if m is not None)
    transform = build_transform(SIZE, MEAN, STD, train=False, crop_fraction=FRACTION)
    loader = torch.utils.data.DataLoader(CovidxDataset(records, image_dir, transform), batch_size=4)
    spec = get_spec("resnet18")
    report = cam_audit(create_model("resnet18").eval(), spec.cam_layer, loader, [r.source for r in records],
                       lung_masks=masks)
    assert report["lung_fallbacks"] == sum(r.label == 0 for r in records)
    assert set(report["mean_energy_share"]) == {"lungs", "border"} and "lungs" in report["regions"]
    text = card_markdown({"name": "m", "shortcut_audit": {"split": "test", **report}})
    assert "inside its lungs" in text and f"ellipse prior used): {report['lung_fallbacks']}" in text
    with pytest.raises(ValueError, match="lung masks"):
        cam_audit(create_model("resnet18").eval(), spec.cam_layer, loader, [r.source for r in records],
                  lung_masks=masks[:-1])


def test_audit_command_rewrites_the_cards_audit_with_own_lungs(tiny_covidx, tmp_path, monkeypatch, seeded):
    from synthetic_inputs import export_tiny_model

    from train import audit as train_audit

    monkeypatch.setattr(train_audit, "load_lung_model", lambda p: (FakeLungs(), {"name": "fake"}))
    weights = tmp_path / "w"
    path = export_tiny_model(weights, "tiny", "resnet18", input_size=SIZE, evaluated_on="test", crop_fraction=FRACTION)
    before = path.with_suffix(".safetensors").read_bytes()
    assert train_audit.main(["--weights-dir", str(weights), "--data", str(tiny_covidx)]) == 0
    card = json.loads(path.with_suffix(".json").read_text())
    audit = card["shortcut_audit"]
    records = _split(tiny_covidx)[0]
    assert audit["split"] == "test" and audit["n"] == len(records)
    assert audit["lung_fallbacks"] == sum(r.label == 0 for r in records) and "lungs" in audit["mean_energy_share"]
    assert path.with_suffix(".safetensors").read_bytes() == before  # weights untouched, card still loads
    assert Predictor.from_file(path).name == "tiny"
