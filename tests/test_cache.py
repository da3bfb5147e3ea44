"""covidtl.cache: decode once, then train and evaluate from a memory-mapped cache that gives
exactly the tensors of the uncached pipeline."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from covidtl.cache import CachedDataset, card_cache, crop_box, ensure_cache
from covidtl.config import TrainConfig
from covidtl.data import CovidxDataset
from covidtl.images import load_image
from covidtl.labels import Record, parse_label_file, split_paths, write_label_file
from covidtl.loaders import eval_loader, train_loader
from covidtl.scan import CorruptImagesError, skip_corrupt
from covidtl.stats import compute_stats, reference_stats
from covidtl.transforms import build_transform, eval_geometry

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SIZE = 32  # side 36 at crop fraction 0.9


def _split(root, split="train"):
    label_file, image_dir = split_paths(root, split)
    return parse_label_file(label_file), image_dir, label_file


class Counting:
    """A progress wrapper that records the length of every iterable it wraps."""

    def __init__(self):
        self.lengths = []

    def __call__(self, iterable):
        self.lengths.append(len(iterable))
        return iterable


def _odd_folder(tmp_path):
    """Images of awkward shapes and modes: wide, tall, odd sizes, 16-bit, RGB, smaller than the side."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "odd"
    folder.mkdir()
    records = []
    shapes = [(50, 71), (80, 45), (33, 90), (37, 37), (20, 26), (64, 64)]
    for i, (height, width) in enumerate(shapes):
        pixels = rng.integers(0, 256, (height, width), dtype=np.uint8)
        if i == 2:
            image = Image.fromarray(pixels.astype(np.uint16) * 16 + 7)  # 16-bit, 12 bits used
        elif i == 3:
            image = Image.fromarray(np.stack([pixels, pixels // 2, 255 - pixels], axis=-1))  # colour
        else:
            image = Image.fromarray(pixels)
        image.save(folder / f"img{i}.png")
        records.append(Record(f"p{i}", f"img{i}.png", i % 2, "odd"))
    label_file = tmp_path / "odd.txt"
    write_label_file(records, label_file)
    return records, folder, label_file


def test_cache_is_built_with_progress_then_reused(tiny_covidx, tmp_path):
    records, image_dir, label_file = _split(tiny_covidx)
    progress = Counting()
    cache = ensure_cache(
        records, image_dir, label_file, tmp_path / "cache", SIZE, 0.9, "gray", num_workers=2, progress=progress
    )
    assert progress.lengths == [len(records)]
    pixels = cache.pixels()
    assert pixels.shape == (len(records), 36, 36) and pixels.dtype == np.uint8
    assert not pixels.flags.writeable
    assert list(cache.filenames) == [r.filename for r in records]
    assert list(cache.labels) == [r.label for r in records]
    index = json.loads((cache.path / "index.json").read_text())
    assert index["input_size"] == SIZE and index["crop_fraction"] == 0.9 and index["side"] == 36
    assert index["label_file_sha256"] and index["labels"] == [r.label for r in records]

    again = ensure_cache(records, image_dir, label_file, tmp_path / "cache", SIZE, 0.9, "gray", progress=progress)
    assert progress.lengths == [len(records)]  # reused: nothing decoded
    assert again == cache


@pytest.mark.parametrize("num_workers", [0, 2])
def test_undecodable_images_are_all_named_and_nothing_is_published(tiny_covidx, tmp_path, num_workers):
    records, image_dir, label_file = _split(tiny_covidx)
    damaged = [records[2].filename, records[7].filename]
    (image_dir / damaged[0]).write_bytes(b"not an image at all")
    (image_dir / damaged[1]).write_bytes((image_dir / damaged[1]).read_bytes()[:120])  # truncated
    with pytest.raises(CorruptImagesError, match="2 of 12 images .* --on-corrupt skip") as caught:
        ensure_cache(records, image_dir, label_file, tmp_path / "cache", SIZE, num_workers=num_workers)
    assert sorted(caught.value.reasons) == sorted(damaged)
    assert not any((tmp_path / "cache").glob("*/index.json"))  # no cache, no staging left behind
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == []
    kept = skip_corrupt(records, caught.value.reasons, image_dir)
    cache = ensure_cache(kept, image_dir, label_file, tmp_path / "cache", SIZE, num_workers=num_workers)
    assert list(cache.filenames) == [r.filename for r in records if r.filename not in damaged]


def test_cache_is_rebuilt_when_label_file_records_or_images_change(tiny_covidx, tmp_path):
    records, image_dir, label_file = _split(tiny_covidx)
    progress = Counting()

    def build(records=records):
        return ensure_cache(
            records, image_dir, label_file, tmp_path / "cache", SIZE, 0.9, "gray", num_workers=0, progress=progress
        )

    first = build()
    label_file.write_text(label_file.read_text() + "\n")  # same records, different file
    build()
    assert len(progress.lengths) == 2
    fewer = build(records[:-2])  # other records: a cache of their own
    assert progress.lengths[-1] == len(records) - 2 and len(fewer) == len(records) - 2
    assert fewer.path != first.path
    build()
    assert len(progress.lengths) == 3  # the whole split's cache is still there
    relabelled = build([dataclasses.replace(records[0], label=1 - records[0].label)] + records[1:])
    assert len(progress.lengths) == 4 and relabelled.path not in (first.path, fewer.path)
    # An image replaced on disk (new size and mtime).
    path = image_dir / records[0].filename
    Image.new("RGB", (64, 64), (200, 200, 200)).save(path)
    os.utime(path, ns=(1, 1))
    rebuilt = build()
    assert len(progress.lengths) == 5 and rebuilt.path == first.path
    assert rebuilt.pixels()[0].min() == 200
    assert not list((tmp_path / "cache").glob("*.building-*"))


def test_caching_a_subset_leaves_a_running_jobs_cache_alone(tiny_covidx, tmp_path):
    """A job reading a split's cache keeps its rows while another process caches some of the same
    films; a cache replaced under a job anyway is refused by name, not read at shifted rows."""
    records, image_dir, label_file = _split(tiny_covidx)
    whole = ensure_cache(records, image_dir, label_file, tmp_path, SIZE, 0.9, "gray", num_workers=0)
    dataset = CachedDataset(whole, records, transform=None)
    expected = [np.asarray(dataset.image(i)) for i in range(len(records))]
    subset = ensure_cache(records[3:5], image_dir, label_file, tmp_path, SIZE, 0.9, "gray", num_workers=0)
    assert subset.path != whole.path and len(whole.pixels()) == len(records)
    reopened = CachedDataset(whole, records, transform=None)
    assert all((np.asarray(reopened.image(i)) == expected[i]).all() for i in range(len(records)))

    np.save(whole.path / "pixels.npy", np.zeros((2, 36, 36), dtype=np.uint8))  # what a rebuild in place did
    with pytest.raises(RuntimeError, match=r"now holds 2 images, not the 12 .* run this job again"):
        CachedDataset(whole, records, transform=None).image(len(records) - 1)


def test_other_size_or_color_gets_its_own_cache(tiny_covidx, tmp_path):
    records, image_dir, label_file = _split(tiny_covidx)
    small = ensure_cache(records, image_dir, label_file, tmp_path, SIZE, 0.9, "gray", num_workers=0)
    large = ensure_cache(records, image_dir, label_file, tmp_path, 48, 0.9, "gray", num_workers=0)
    colour = ensure_cache(records, image_dir, label_file, tmp_path, SIZE, 0.9, "rgb", num_workers=0)
    assert len({small.path, large.path, colour.path}) == 3
    assert large.pixels().shape == (12, 53, 53) and colour.pixels().shape == (12, 36, 36, 3)
    with pytest.raises(ValueError, match="not 48 px"):
        small.check_geometry(48, 0.9)
    with pytest.raises(ValueError, match="unknown cache color"):
        ensure_cache(records, image_dir, label_file, tmp_path, SIZE, 0.9, "grey")
    with pytest.raises(ValueError, match="crop_fraction"):
        ensure_cache(records, image_dir, label_file, tmp_path, SIZE, 1.5, "gray")


@pytest.mark.parametrize("color", ["gray", "rgb"])
@pytest.mark.parametrize("train", [False, True])
def test_cached_items_equal_uncached_items(tiny_covidx, tmp_path, color, train):
    records, image_dir, label_file = _split(tiny_covidx)
    cache = ensure_cache(records, image_dir, label_file, tmp_path, SIZE, 0.9, color, num_workers=0)
    transform = build_transform(SIZE, MEAN, STD, train=train)
    plain, cached = CovidxDataset(records, image_dir, transform), CachedDataset(cache, records, transform)
    assert cached.labels.tolist() == plain.labels.tolist() and cached.sources == plain.sources
    for i in range(len(records)):
        torch.manual_seed(i)
        expected, label = plain[i]
        torch.manual_seed(i)
        got, cached_label = cached[i]
        assert torch.equal(got, expected) and label == cached_label


def test_crop_box_keeps_the_center_crop_for_any_shape(tmp_path):
    records, folder, label_file = _odd_folder(tmp_path)
    for size, fraction in [(24, 0.9), (16, 0.5), (30, 1.0)]:
        cache = ensure_cache(records, folder, label_file, tmp_path / "cache", size, fraction, "rgb", num_workers=0)
        geometry = v2.Compose(eval_geometry(size, fraction))
        dataset = CachedDataset(cache, records, v2.CenterCrop(size))
        for i, record in enumerate(records):
            expected = np.asarray(geometry(load_image(folder / record.filename)))
            assert np.array_equal(np.asarray(dataset[i][0]), expected), (record.filename, size, fraction)
    for width, height in [(36, 36), (36, 90), (91, 36), (37, 36)]:
        left, top, right, bottom = crop_box(width, height, 36, 32)
        assert 0 <= left <= width - 36 and 0 <= top <= height - 36 and (right - left, bottom - top) == (36, 36)


def test_cache_of_random_crops_stays_within_the_square(tiny_covidx, tmp_path):
    records, image_dir, label_file = _split(tiny_covidx)
    cache = ensure_cache(records, image_dir, label_file, tmp_path, SIZE, 0.9, "gray", num_workers=0)
    transform = build_transform(SIZE, MEAN, STD, train=True, crop_scale=0.5)
    image, _ = CachedDataset(cache, records, transform)[0]
    assert image.shape == (3, SIZE, SIZE) and torch.isfinite(image).all()


def test_loaders_from_a_cache_give_the_same_batches(tiny_covidx, tmp_path):
    records, image_dir, label_file = _split(tiny_covidx)
    cache = ensure_cache(records, image_dir, label_file, tmp_path, SIZE, 0.9, "gray", num_workers=0)
    config = TrainConfig(name="t", backbone="squeezenet1_1", batch_size=4, num_workers=0, balance="sampler")
    batches = []
    for source in (None, cache):
        loader, sampler = train_loader(records, image_dir, config, SIZE, MEAN, STD, cache=source)
        sampler.set_epoch(1)
        torch.manual_seed(5)
        batches.append(list(loader))
    assert len(batches[0]) == len(batches[1]) == 3
    for (x0, y0), (x1, y1) in zip(*batches):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    plain = next(iter(eval_loader(records, image_dir, SIZE, MEAN, STD, batch_size=12, num_workers=0)))
    fast = next(iter(eval_loader(records, image_dir, SIZE, MEAN, STD, batch_size=12, num_workers=0, cache=cache)))
    assert torch.equal(plain[0], fast[0]) and torch.equal(plain[1], fast[1])
    with pytest.raises(ValueError, match="build one for this geometry"):
        eval_loader(records, image_dir, 48, MEAN, STD, cache=cache)


def test_dataset_pickles_without_pixels_and_loads_in_workers(tiny_covidx, tmp_path):
    records, image_dir, label_file = _split(tiny_covidx)
    cache = ensure_cache(records, image_dir, label_file, tmp_path, SIZE, 0.9, "gray", num_workers=0)
    dataset = CachedDataset(cache, records, build_transform(SIZE, MEAN, STD, train=False))
    dataset[0]  # opens the memmap in this process
    assert len(pickle.dumps(dataset)) < 20_000
    images, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=12, num_workers=2)))
    assert images.shape == (12, 3, SIZE, SIZE) and labels.tolist() == [r.label for r in records]


def test_records_missing_from_the_cache_or_relabelled_are_refused(tiny_covidx, tmp_path):
    records, image_dir, label_file = _split(tiny_covidx)
    cache = ensure_cache(records[:6], image_dir, label_file, tmp_path, SIZE, 0.9, "gray", num_workers=0)
    with pytest.raises(ValueError, match="not in the cache"):
        CachedDataset(cache, records, None)
    flipped = [Record(r.patient_id, r.filename, 1 - r.label, r.source) for r in records[:6]]
    with pytest.raises(ValueError, match="cached as"):
        CachedDataset(cache, flipped, None)


@pytest.mark.parametrize("color", ["gray", "rgb"])
def test_stats_from_the_cache_match_the_reference(tiny_covidx, tmp_path, color):
    records, image_dir, label_file = _split(tiny_covidx)
    cache = ensure_cache(records, image_dir, label_file, tmp_path, SIZE, 0.9, color, num_workers=0)
    progress = Counting()
    got = compute_stats(records, image_dir, size=SIZE, batch_size=5, progress=progress, cache=cache)
    assert progress.lengths == [3]
    assert np.allclose(got, reference_stats(records, image_dir, size=SIZE), atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="build one for this geometry"):
        compute_stats(records, image_dir, size=48, cache=cache)


def test_stats_of_a_colour_image_from_an_rgb_cache(tmp_path):
    records, folder, label_file = _odd_folder(tmp_path)
    cache = ensure_cache(records, folder, label_file, tmp_path / "cache", 16, 0.9, "rgb", num_workers=0)
    got = compute_stats(records, folder, size=16, cache=cache)
    assert np.allclose(got, reference_stats(records, folder, size=16), atol=1e-9, rtol=0)
    assert len(set(got[0])) == 3  # the colour image makes the channels differ


def test_cache_built_on_real_images_matches_the_uncached_loader(covidx_mini, tmp_path):
    records, image_dir, label_file = _split(covidx_mini, "val")
    records = records[:16]
    cache = ensure_cache(records, image_dir, label_file, tmp_path, 224, 0.9, "rgb", num_workers=2)
    plain = next(iter(eval_loader(records, image_dir, 224, MEAN, STD, batch_size=16, num_workers=0)))
    fast = next(iter(eval_loader(records, image_dir, 224, MEAN, STD, batch_size=16, num_workers=0, cache=cache)))
    assert torch.equal(plain[0], fast[0])


def test_train_cli_with_a_cache(tiny_covidx, tmp_path):
    from test_train_cli import cli_args, write_recipe

    from train.run import main as train_main

    recipe = write_recipe(tmp_path, epochs=1, cache="gray")
    args = cli_args(recipe, tiny_covidx, tmp_path, "--cache-dir", str(tmp_path / "cache"), "--stats", "compute")
    assert train_main(args) == 0
    card = json.loads((tmp_path / "weights" / "tiny.json").read_text())
    assert card["config"]["cache"] == "gray"
    folders = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir() if p.is_dir())
    assert folders == ["test", "train", "val"]
    expected = compute_stats(*_split(tiny_covidx)[:2], size=224, num_workers=0)
    assert np.allclose(card["mean"], expected[0], atol=1e-6) and np.allclose(card["std"], expected[1], atol=1e-6)


def test_resume_from_a_checkpoint_older_than_the_cache_option(tiny_covidx, tmp_path, capsys):
    from test_train_cli import cli_args, write_recipe

    from train.run import main as train_main

    args = cli_args(write_recipe(tmp_path, epochs=1), tiny_covidx, tmp_path)
    assert train_main(args) == 0
    last = tmp_path / "runs" / "tiny" / "last.json"
    state = json.loads(last.read_text())
    del state["config"]["cache"]  # as written before the option existed
    last.write_text(json.dumps(state))
    longer = cli_args(write_recipe(tmp_path, epochs=2), tiny_covidx, tmp_path, "--resume")
    assert train_main([*longer, "--cache", "gray", "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "cache" in capsys.readouterr().err
    assert train_main(longer) == 0


def _card(**framing):
    return {"name": "m", "input_size": SIZE, "crop_fraction": 0.9, "config": {"cache": "rgb"}} | framing


def test_a_cards_cache_is_framed_as_its_training_cache_was(tiny_covidx, tmp_path, fake_lungs):
    """`card_cache` (train.evaluate, the shipped-weights test): the card's colour, film size and
    lung model; nothing for a card that frames whole films at their own size."""
    records, image_dir, label_file = _split(tiny_covidx)
    assert card_cache(_card(), records, image_dir, label_file, None, tmp_path) is None
    film = card_cache(_card(film_size=24), records, image_dir, label_file, None, tmp_path, num_workers=0)
    assert (film.color, film.film_size, film.lung_model_sha256) == ("rgb", 24, None)
    assert film.pixels().shape[-1] == 3
    from covidtl.export import sha256_file

    crop = {"lung_model": "fake", "lung_model_sha256": sha256_file(fake_lungs)}
    grey = _card(lung_crop=crop) | {"config": {"cache": "gray"}}
    cut = card_cache(grey, records, image_dir, label_file, fake_lungs, tmp_path, num_workers=0)
    assert (cut.color, cut.film_size, cut.lung_model_sha256) == ("gray", None, crop["lung_model_sha256"])
    assert cut.path == ensure_cache(records, image_dir, label_file, tmp_path, SIZE, 0.9, "gray", num_workers=0,
                                    lung_weights=fake_lungs).path


def test_a_lung_crop_cards_cache_needs_the_lung_model_it_was_trained_with(tiny_covidx, tmp_path, fake_lungs):
    records, image_dir, label_file = _split(tiny_covidx)
    card = _card(lung_crop={"lung_model": "lungs_x", "lung_model_sha256": "0" * 64})
    with pytest.raises(ValueError, match="pass its lung model 'lungs_x'"):
        card_cache(card, records, image_dir, label_file, None, tmp_path)
    with pytest.raises(ValueError, match="is another; pass the one shipped beside the model"):
        card_cache(card, records, image_dir, label_file, fake_lungs, tmp_path)
    assert not any(tmp_path.glob("*px-*"))  # nothing was built


def test_a_card_names_the_lung_model_file_it_needs(tmp_path):
    from covidtl.lungs import card_lung_weights, default_lung_weights

    crop = {"lung_crop": {"lung_model": "lungs_lite0_unet", "lung_model_sha256": "f"}}
    assert card_lung_weights(crop, None) == default_lung_weights()
    assert card_lung_weights(crop, str(tmp_path / "mine.safetensors")) == tmp_path / "mine.safetensors"
    assert card_lung_weights({"name": "whole"}, tmp_path / "mine.safetensors") is None
