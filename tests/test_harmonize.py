"""film_size: every film seen at the detail of a fixed-size square copy of it (covidtl.harmonize),
in the cache build, in train.evaluate and in the Predictor alike; film_jpeg: every film made into
such a copy, JPEG-compressed, before its lungs are cut out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from covidtl.cache import CachedDataset, ensure_cache
from covidtl.cards import card_markdown
from covidtl.config import TrainConfig
from covidtl.export import load_model
from covidtl.harmonize import at_film_size, film_copy, film_part
from covidtl.images import load_image
from covidtl.inference import Predictor
from covidtl.labels import parse_label_file, split_paths
from covidtl.models import create_model
from covidtl.transforms import build_transform
from tests.synthetic_inputs import FakeLungs, export_tiny_model
from tests.test_lung_crop import FRACTION, MEAN, SIZE, STD, _card, _split
from train import evaluate as evaluate_cli

FILM = 48  # tiny_covidx's films are 64 x 64: brought to the detail of a 48 x 48 copy


def _smooth_film(width: int, height: int, seed: int = 0) -> Image.Image:
    """A film-like grey image: random blobs, smooth enough that resampling orders barely matter."""
    coarse = np.random.default_rng(seed).integers(0, 256, (12, 12), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


def test_a_part_is_scaled_as_the_whole_film_would_be_to_the_film_size():
    film = _smooth_film(400, 200)
    assert at_film_size(film, film.size, 224).size == (224, 224)
    part = film.crop((100, 40, 200, 90))  # 100 x 50 of a 400 x 200 film: x 0.56 across, x 1.12 down
    small = at_film_size(part, film.size, 224)
    assert small.size == (56, 56)
    # what the part looks like in a 224 x 224 copy of the whole film
    copy = film.resize((224, 224), Image.Resampling.BILINEAR).crop((56, 45, 112, 101))
    assert np.abs(np.asarray(small, float) - np.asarray(copy, float)).mean() < 3


def test_no_film_size_or_a_film_already_that_size_is_left_alone():
    film = _smooth_film(224, 224)
    assert at_film_size(film, film.size, None) is film
    assert at_film_size(film, film.size, 224) is film
    part = film.crop((10, 10, 50, 60))
    assert at_film_size(part, film.size, 224) is part
    with pytest.raises(ValueError, match="no pixels"):
        at_film_size(part, (0, 10), 224)


def test_a_512_px_film_loses_the_detail_a_224_px_copy_lacks():
    fine = np.indices((512, 512)).sum(0) % 2 * 255  # a one-pixel checkerboard: detail no 224 px copy keeps
    film = Image.fromarray(fine.astype(np.uint8))
    seen = np.asarray(at_film_size(film.crop((0, 0, 256, 256)), film.size, 224), float)
    assert seen.shape == (112, 112) and seen.std() < 0.1 * fine.std()


def test_film_size_needs_a_cache_and_a_sensible_size():
    with pytest.raises(ValueError, match="cache"):
        TrainConfig(name="m", backbone="resnet18", film_size=224)
    with pytest.raises(ValueError, match="32 px or more"):
        TrainConfig(name="m", backbone="resnet18", cache="gray", film_size=8)
    assert TrainConfig(name="m", backbone="resnet18").film_size is None


@pytest.mark.parametrize("lung_crop", [False, True])
def test_the_predictor_sees_the_film_size_the_training_cache_saw(tiny_covidx, tmp_path, fake_lungs, lung_crop):
    records, image_dir, label_file = _split(tiny_covidx)
    lung_weights = fake_lungs if lung_crop else None
    own = ensure_cache(records, image_dir, label_file, tmp_path, SIZE, FRACTION, num_workers=0, lung_weights=lung_weights)
    cache = ensure_cache(records, image_dir, label_file, tmp_path, SIZE, FRACTION, num_workers=0,
                         lung_weights=lung_weights, film_size=FILM)
    assert cache.path != own.path and f"film{FILM}" in cache.path.name and cache.film_size == FILM
    assert not np.array_equal(cache.pixels(), own.pixels())  # the films lost detail
    training = CachedDataset(cache, records, build_transform(SIZE, MEAN, STD, train=False, crop_fraction=FRACTION))
    card = _card(lung_crop) | {"film_size": FILM}
    predictor = Predictor(create_model("resnet18"), card, lung_model=FakeLungs() if lung_crop else None)
    plain = Predictor(create_model("resnet18"), _card(lung_crop), lung_model=FakeLungs() if lung_crop else None)
    assert predictor.geometry != plain.geometry  # Compare does not hand one's tensor to the other
    assert f"{FILM} x {FILM} px copy" in card_markdown(card) and "copy of it" not in card_markdown(_card(lung_crop))
    for i, record in enumerate(records):
        film = load_image(image_dir / record.filename, grey=True)
        assert torch.equal(predictor.preprocess(film)[0], training[i][0]), record.filename
        assert not torch.equal(plain.preprocess(film)[0], training[i][0]), record.filename


@pytest.mark.parametrize(("framing", "left_out"), [({"film_size": FILM}, "film_size"),
                                                  ({"film_size": FILM, "film_jpeg": 40}, "film_jpeg")])
def test_evaluate_brings_the_films_to_the_cards_film_size_like_the_predictor(tiny_covidx, tmp_path, framing, left_out):
    """train.evaluate frames each film as the card says (film size; JPEG copy), as the Predictor does."""
    path = export_tiny_model(tmp_path / "w", "tiny", "resnet18", input_size=SIZE, crop_fraction=FRACTION, seed=1,
                             **framing)
    out = tmp_path / "report"
    assert evaluate_cli.main(["--weights", str(path.with_suffix(".safetensors")), "--data", str(tiny_covidx),
                              "--out", str(out), "--n-boot", "20", "--num-workers", "0", "--no-progress",
                              "--cache-dir", str(tmp_path / "cache")]) == 0
    scored = [row["p_positive"] for row in json.loads((out / "report.json").read_text())["scores"]]
    model, card = load_model(path)
    label_file, image_dir = split_paths(tiny_covidx, "test")
    films = [load_image(image_dir / r.filename) for r in parse_label_file(label_file)]
    assert scored == pytest.approx([Predictor(model, card).predict(f).p_positive for f in films], abs=1e-4)
    without = Predictor(model, {k: v for k, v in card.items() if k != left_out})
    assert scored != pytest.approx([without.predict(f).p_positive for f in films], abs=1e-4)



def _blockiness(image: Image.Image) -> float:
    """Mean step across the 8 px JPEG block edges over the mean step elsewhere (1: no blocks)."""
    steps = np.abs(np.diff(np.asarray(image, dtype=float), axis=1))
    return float(steps[:, 7::8].mean() / np.delete(steps, np.s_[7::8], axis=1).mean())


def test_a_film_copy_is_the_film_size_square_with_jpeg_blocks_and_a_copy_changes_little_when_copied_again():
    film = _smooth_film(400, 300)
    film = Image.fromarray((np.asarray(film, float) + np.random.default_rng(1).normal(0, 6, (300, 400))).clip(0, 255)
                           .astype(np.uint8))
    copy = film_copy(film, 224, 60)
    assert copy.size == (224, 224) and copy.mode == "L"
    plain = film.resize((224, 224), Image.Resampling.BICUBIC)
    assert _blockiness(copy) > _blockiness(plain) + 0.05
    again = film_copy(copy, 224, 60)  # the bimcv and rsna films: copies already
    assert np.abs(np.asarray(again, float) - np.asarray(copy, float)).mean() < 0.5
    assert film_copy(film.convert("RGB"), 224, 60).mode == "RGB"
    with pytest.raises(ValueError, match="quality"):
        film_copy(film, 224, 100)


def test_a_part_of_the_copy_is_its_box_scaled_into_the_copy():
    film = _smooth_film(400, 200)
    box = (100, 40, 300, 190)
    part = film_part(film, box, 224, 90)
    assert part.size == (112, 168)  # x 0.56 across, x 1.12 down
    assert np.array_equal(np.asarray(part), np.asarray(film_copy(film, 224, 90).crop((56, 45, 168, 213))))
    assert np.array_equal(np.asarray(film_part(film, None, 224, 90)), np.asarray(film_copy(film, 224, 90)))
    assert np.array_equal(np.asarray(film_part(film, box, 224)), np.asarray(at_film_size(film.crop(box), film.size, 224)))
    with pytest.raises(ValueError, match="film_size"):
        film_part(film, box, None, 90)
    with pytest.raises(ValueError, match="film_size"):
        TrainConfig(name="m", backbone="resnet18", cache="gray", film_jpeg=90)
    with pytest.raises(ValueError, match="1 to 95"):
        TrainConfig(name="m", backbone="resnet18", cache="gray", film_size=224, film_jpeg=0)


@pytest.mark.parametrize("lung_crop", [False, True])
def test_the_predictor_cuts_from_the_jpeg_copy_the_training_cache_cut_from(tiny_covidx, tmp_path, fake_lungs,
                                                                            lung_crop):
    records, image_dir, label_file = _split(tiny_covidx)
    lung_weights = fake_lungs if lung_crop else None
    sized = ensure_cache(records, image_dir, label_file, tmp_path, SIZE, FRACTION, num_workers=0,
                         lung_weights=lung_weights, film_size=FILM)
    cache = ensure_cache(records, image_dir, label_file, tmp_path, SIZE, FRACTION, num_workers=0,
                         lung_weights=lung_weights, film_size=FILM, film_jpeg=50)
    assert cache.path != sized.path and "jpeg50" in cache.path.name and cache.film_jpeg == 50
    assert not np.array_equal(cache.pixels(), sized.pixels())
    training = CachedDataset(cache, records, build_transform(SIZE, MEAN, STD, train=False, crop_fraction=FRACTION))
    card = _card(lung_crop) | {"film_size": FILM, "film_jpeg": 50}
    lungs = FakeLungs() if lung_crop else None
    predictor = Predictor(create_model("resnet18"), card, lung_model=lungs)
    sized_only = Predictor(create_model("resnet18"), _card(lung_crop) | {"film_size": FILM}, lung_model=lungs)
    assert predictor.geometry != sized_only.geometry
    assert "JPEG copy (quality 50)" in card_markdown(card)
    for i, record in enumerate(records):
        film = load_image(image_dir / record.filename, grey=True)
        assert torch.equal(predictor.preprocess(film)[0], training[i][0]), record.filename
        assert not torch.equal(sized_only.preprocess(film)[0], training[i][0]), record.filename
