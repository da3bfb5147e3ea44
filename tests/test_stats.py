"""covidtl.stats: streaming normalization statistics match the plain per-image loop."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from covidtl.labels import Record, parse_label_file, split_paths
from covidtl.stats import COVIDX_STATS, compute_stats, reference_stats


def _split(root, split="train"):
    label_file, image_dir = split_paths(root, split)
    return parse_label_file(label_file), image_dir


@pytest.mark.parametrize("num_workers", [0, 2])
def test_compute_stats_matches_reference(tiny_covidx, num_workers):
    records, image_dir = _split(tiny_covidx)
    expected = reference_stats(records, image_dir, size=48)
    got = compute_stats(records, image_dir, size=48, batch_size=5, num_workers=num_workers)
    assert np.allclose(got, expected, atol=1e-4, rtol=0)
    assert all(isinstance(v, float) for triple in got for v in triple)


def test_compute_stats_exact_on_known_pixels(tmp_path):
    # Two flat images, 0.2 and 0.6 in every channel: mean 0.4, population std 0.2.
    for name, value in [("a.png", 51), ("b.png", 153)]:
        Image.new("L", (30, 20), value).save(tmp_path / name)
    records = [Record("p1", "a.png", 0, "s"), Record("p2", "b.png", 1, "s")]
    mean, std = compute_stats(records, tmp_path, size=16, batch_size=1, num_workers=0)
    assert mean == pytest.approx((0.4,) * 3, abs=1e-9)
    assert std == pytest.approx((0.2,) * 3, abs=1e-9)


def test_compute_stats_progress_and_empty(tiny_covidx):
    records, image_dir = _split(tiny_covidx, "val")
    wrapped = []

    def progress(iterable):
        wrapped.append(iterable)
        return iterable

    compute_stats(records, image_dir, size=32, batch_size=4, num_workers=0, progress=progress)
    assert len(wrapped) == 1 and len(wrapped[0]) == 2
    with pytest.raises(ValueError, match="no images"):
        compute_stats([], image_dir, num_workers=0)
    with pytest.raises(ValueError, match="no images"):
        reference_stats([], image_dir)


def test_compute_stats_matches_reference_on_covidx_mini(covidx_mini):
    records, image_dir = _split(covidx_mini, "val")
    expected = reference_stats(records, image_dir)
    got = compute_stats(records, image_dir, batch_size=16, num_workers=2)
    assert np.allclose(got, expected, atol=1e-4, rtol=0)
    assert all(0.2 < m < 0.8 for m in got[0]) and all(0.1 < s < 0.4 for s in got[1])


def test_covidx_stats_constant():
    mean, std = COVIDX_STATS
    assert len(mean) == len(std) == 3
    assert all(0 < m < 1 for m in mean) and all(0 < s < 0.5 for s in std)
