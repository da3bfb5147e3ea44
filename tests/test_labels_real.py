"""The label parser and folder checks on real COVIDx files in ../shared/data (skipped if absent)."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import shared_data_dir

from covidtl.labels import SPLITS, Record, parse_label_file, split_paths
from covidtl.locate import resolve_dataset_root
from covidtl.scan import find_missing, scan_images

SHARED = shared_data_dir()
LABELS = SHARED / "covidnet-labels" if SHARED else None
pytestmark = pytest.mark.skipif(
    SHARED is None, reason="real data ../shared/data is absent (only on development machines)"
)


def _label_file(name: str):
    path = LABELS / name
    if not path.is_file():
        pytest.skip(f"real label file {path} is absent")
    return path


def test_train_covidx9b_all_lines():
    records = parse_label_file(_label_file("train_COVIDx9B.txt"))
    assert len(records) == 30482
    assert {r.label for r in records} == {0, 1}
    assert records[0] == Record("5", "ARDSSevere.png", 0, "cohen")


def test_train_covidx8b_patient_ids_with_spaces():
    records = parse_label_file(_label_file("train_COVIDx8B.txt"))
    assert len(records) == 15952
    spaced = [r for r in records if " " in r.patient_id]
    assert len(spaced) == 943
    assert Record("COVID 1", "COVID(1).png", 1, "sirm") in spaced
    assert all(" " not in r.filename and " " not in r.source for r in records)


def test_test_covidx9a_three_class_maps_to_binary():
    three_class = parse_label_file(_label_file("test_COVIDx9A.txt"))
    binary = parse_label_file(_label_file("test_COVIDx9B.txt"))
    assert len(three_class) == len(binary) == 400
    assert Counter(r.label for r in three_class) == {1: 200, 0: 200}
    assert [r.label for r in three_class] == [r.label for r in binary]


@pytest.fixture(scope="module")
def mini_splits():
    root = SHARED / "covidx-mini"
    if not root.is_dir():
        pytest.skip(f"real data {root} is absent")
    splits = {}
    for split in SPLITS:
        label_file, image_dir = split_paths(root, split)
        splits[split] = (parse_label_file(label_file), image_dir)
    return splits


README_COUNTS = [("train", 274, 82), ("val", 58, 16), ("test", 59, 16)]  # split, images, positives


@pytest.mark.parametrize(("split", "total", "positive"), README_COUNTS)
def test_covidx_mini_counts_and_images(mini_splits, split, total, positive):
    records, image_dir = mini_splits[split]
    assert len(records) == total
    assert sum(r.label for r in records) == positive
    assert find_missing(records, image_dir) == []
    assert scan_images(records, image_dir) == records


def test_covidx_mini_patients_disjoint(mini_splits):
    patients = {split: {r.patient_id for r in records} for split, (records, _) in mini_splits.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]


def test_covidx_mini_resolves_as_local_root():
    root = SHARED / "covidx-mini"
    if not root.is_dir():
        pytest.skip(f"real data {root} is absent")
    assert resolve_dataset_root(root) == root
