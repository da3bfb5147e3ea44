"""covidtl.labels, locate, images, scan, transforms and data: label files, folders, image loading,
splits, transforms, datasets."""

from __future__ import annotations

import io
import logging
import random
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from conftest import make_covidx_folder, shared_data_dir
from PIL import Image

from covidtl.classes import CLASSES, POSITIVE
from covidtl.data import CovidxDataset, balanced_sampler_weights, class_weights
from covidtl.images import UnreadableImageError, load_image
from covidtl.labels import (
    LABEL_MAP,
    SPLITS,
    LabelFileError,
    Record,
    parse_label_file,
    patient_split,
    split_paths,
    write_label_file,
)
from covidtl.locate import KAGGLE_HANDLE, DatasetUnavailableError, resolve_dataset_root
from covidtl.scan import CorruptImagesError, MissingImagesError, check_images, find_missing, scan_images
from covidtl.transforms import build_transform

EXPECTED = "expected 'patient_id filename label source'"


def write(tmp_path: Path, text: str, name: str = "labels.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


# --------------------------------------------------------------------------- label files


def test_parse_label_file_four_and_five_fields(tmp_path):
    path = write(
        tmp_path,
        "\ufeffp1 a.png positive cohen\r\n"
        "\n"
        "   \n"
        "COVID 1 COVID(1).png positive sirm\n"
        "p3   c.JPG   negative   rsna\n",
    )
    assert parse_label_file(path) == [
        Record("p1", "a.png", POSITIVE, "cohen"),
        Record("COVID 1", "COVID(1).png", 1, "sirm"),
        Record("p3", "c.JPG", 0, "rsna"),
    ]


def test_parse_label_file_three_class_names(tmp_path):
    path = write(tmp_path, "a x.png COVID-19 ricord\nb y.png normal rsna\nc z.jpeg pneumonia rsna\n")
    assert [r.label for r in parse_label_file(str(path))] == [1, 0, 0]
    assert LABEL_MAP == {"positive": 1, "negative": 0, "COVID-19": 1, "normal": 0, "pneumonia": 0}
    assert CLASSES[POSITIVE] == "positive"


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("p2 b.png positive", "found 3 fields in 'p2 b.png positive', need at least 4 (the source"),
        ("p2 b.png cohen", "found 3 fields in 'p2 b.png cohen', need at least 4;"),
        ("p2", "found 1 fields"),
        ("p2 b.png Positive cohen", "unknown label 'Positive'"),
        ("p2 b.png covid cohen", "accepted labels: COVID-19, negative, normal, pneumonia, positive"),
        ("p2 b.txt positive cohen", "filename 'b.txt' has no image extension"),
        ("p2 b positive cohen", "filename 'b' has no image extension"),
        ("COVID 2 COVID(2).png positive", "the source field is missing"),
    ],
)
def test_parse_label_file_errors_name_file_and_line(tmp_path, bad_line, message):
    path = write(tmp_path, f"p1 a.png negative cohen\n\n{bad_line}\np3 c.png negative cohen\n")
    with pytest.raises(LabelFileError) as caught:
        parse_label_file(path)
    text = str(caught.value)
    assert text.startswith(f"{path}:3: ")
    assert message in text
    assert text.endswith(EXPECTED)
    assert isinstance(caught.value, ValueError)


def test_parse_label_file_rejects_non_utf8(tmp_path):
    path = write(tmp_path, b"p1 a.png negative cohen\np2 \xff.png positive cohen\n")
    with pytest.raises(LabelFileError, match=r":2: not UTF-8"):
        parse_label_file(path)


def test_parse_label_file_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        parse_label_file(tmp_path / "nope.txt")


def test_corrupted_copy_of_real_label_file_reports_line(tmp_path):
    shared = shared_data_dir()
    real = shared / "covidnet-labels" / "train_COVIDx9B.txt" if shared else None
    if real is None or not real.is_file():
        pytest.skip("real label file ../shared/data/covidnet-labels/train_COVIDx9B.txt is absent")
    lines = real.read_text().splitlines(keepends=True)
    for lineno, corrupt, message in [
        (12345, lambda s: s.replace(" negative ", " NEGATIVE ").replace(" positive ", " POSITIVE "),
         "unknown label 'NEGATIVE'|unknown label 'POSITIVE'"),
        (30482, lambda s: s.rsplit(" ", 1)[0] + "\n", r"found 3 fields .*\(the source field seems missing\)"),
        (1, lambda s: s.replace(".png", ".txt").replace(".jpg", ".txt"), "no image extension"),
    ]:
        copy = list(lines)
        copy[lineno - 1] = corrupt(copy[lineno - 1])
        path = write(tmp_path, "".join(copy), name=f"corrupt_{lineno}.txt")
        with pytest.raises(LabelFileError, match=message) as caught:
            parse_label_file(path)
        assert str(caught.value).startswith(f"{path}:{lineno}: ")


def test_write_label_file_round_trips(tmp_path):
    records = [
        Record("COVID 1", "COVID(1).png", 1, "sirm"),
        Record("p2", "b.jpg", 0, "rsna"),
    ]
    path = tmp_path / "out.txt"
    write_label_file(records, path)
    assert path.read_text() == "COVID 1 COVID(1).png positive sirm\np2 b.jpg negative rsna\n"
    assert parse_label_file(path) == records


@pytest.mark.parametrize(
    "record",
    [Record("p", "a b.png", 0, "s"), Record("p", "a.png", 0, "two words"), Record("p", "a.png", 2, "s")],
)
def test_write_label_file_rejects_unreadable_records(tmp_path, record):
    with pytest.raises(ValueError):
        write_label_file([record], tmp_path / "out.txt")
    assert not (tmp_path / "out.txt").exists()


# --------------------------------------------------------------------------- folders


def test_split_paths(tiny_covidx):
    for split in SPLITS:
        label_file, image_dir = split_paths(tiny_covidx, split)
        assert label_file == tiny_covidx / f"{split}.txt"
        assert image_dir == tiny_covidx / split
    (tiny_covidx / "test_extra").mkdir()
    (tiny_covidx / "test_extra.txt").write_text("")
    extra = split_paths(tiny_covidx, "test_extra")
    assert extra == (tiny_covidx / "test_extra.txt", tiny_covidx / "test_extra")
    for bad in ["", "../train", "a/b", ".."]:
        with pytest.raises(ValueError, match="plain name"):
            split_paths(tiny_covidx, bad)


def test_split_paths_says_what_is_missing(tiny_covidx):
    (tiny_covidx / "val.txt").unlink()
    missing = r"no label file .*val\.txt .*present: test\.txt, train\.txt\).*ROOT/train\.txt"
    with pytest.raises(FileNotFoundError, match=missing):
        split_paths(tiny_covidx, "val")
    for image in (tiny_covidx / "test").iterdir():
        image.unlink()
    (tiny_covidx / "test").rmdir()
    with pytest.raises(FileNotFoundError, match="no image folder"):
        split_paths(tiny_covidx, "test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        split_paths(tiny_covidx / "nowhere", "train")


def test_resolve_dataset_root_local_folder(tiny_covidx, tmp_path):
    assert resolve_dataset_root(tiny_covidx) == tiny_covidx
    assert resolve_dataset_root(str(tiny_covidx)) == tiny_covidx
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_dataset_root(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"none of the label files train\.txt, val\.txt, test\.txt"):
        resolve_dataset_root(empty)


def _offline_error() -> requests.exceptions.ConnectionError:
    # What kagglehub 1.0 raises with no network (DNS lookup of api.kaggle.com fails).
    return requests.exceptions.ConnectionError(
        "HTTPSConnectionPool(host='api.kaggle.com', port=443): Max retries exceeded with url: "
        "/v1/datasets.DatasetApiService/GetDataset (Caused by NameResolutionError(...))"
    )


def _record_sleeps(monkeypatch) -> list[float]:
    """The seconds of every `time.sleep` this test's own thread asks for (they still happen).
    "Fails fast" is then a count of waits and attempts, not a stopwatch reading a busy
    machine could push past any bound."""
    asked: list[float] = []
    real_sleep, me = time.sleep, threading.get_ident()

    def sleep(seconds: float) -> None:
        if threading.get_ident() == me:
            asked.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", sleep)
    return asked


def _assert_actionable(error: DatasetUnavailableError, handle: str) -> None:
    text = str(error)
    assert f"cannot download Kaggle dataset {handle!r}" in text
    assert "--data DIR" in text and "ROOT/train.txt" in text
    assert "Kaggle credentials" in text
    assert "\n" not in text


@pytest.mark.parametrize("version", [None, 7])
def test_resolve_dataset_root_offline_kagglehub_error(monkeypatch, version):
    import kagglehub

    calls = []

    def offline(handle, *args, **kwargs):
        calls.append(handle)
        raise _offline_error()

    monkeypatch.setattr(kagglehub, "dataset_download", offline)
    sleeps = _record_sleeps(monkeypatch)
    with pytest.raises(DatasetUnavailableError) as caught:
        resolve_dataset_root(None, version=version, connect_timeout=None)
    handle = "andyczhao/covidx-cxr2" + (f"/versions/{version}" if version else "")
    assert calls == [handle] and sleeps == []  # one attempt, no retry, no wait
    _assert_actionable(caught.value, handle)
    assert "Max retries exceeded" in str(caught.value)
    assert isinstance(caught.value.__cause__, requests.exceptions.ConnectionError)


def test_resolve_dataset_root_unauthenticated(monkeypatch):
    import kagglehub
    from kagglehub.exceptions import UnauthenticatedError

    def unauthenticated(handle, *args, **kwargs):
        raise UnauthenticatedError()

    monkeypatch.setattr(kagglehub, "dataset_download", unauthenticated)
    with pytest.raises(DatasetUnavailableError, match="User is not authenticated"):
        resolve_dataset_root(None, connect_timeout=None)


def test_resolve_dataset_root_fails_fast_when_packets_are_dropped(monkeypatch, tmp_path):
    """A network that drops packets would block kagglehub (no timeout) for minutes."""
    import kagglehub

    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path))
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.delenv("TBE_RUNTIME_ADDR", raising=False)
    timeouts = []

    def blackhole(address, timeout=None, *args, **kwargs):
        timeouts.append(timeout)  # a dropped SYN: the connect gives up when `timeout` runs out
        raise TimeoutError("timed out")

    def never(*args, **kwargs):
        raise AssertionError("kagglehub must not be called when the API host is unreachable")

    monkeypatch.setattr(socket, "create_connection", blackhole)
    monkeypatch.setattr(kagglehub, "dataset_download", never)
    sleeps = _record_sleeps(monkeypatch)
    with pytest.raises(DatasetUnavailableError, match=r"cannot reach api\.kaggle\.com:443 within 0\.5 s"):
        resolve_dataset_root(None, connect_timeout=0.5)
    assert timeouts == [0.5] and sleeps == []  # one connect bounded by 0.5 s, then no retry or wait


@pytest.mark.parametrize("connect_timeout", [5.0, None], ids=["probe", "kagglehub-only"])
def test_resolve_dataset_root_really_offline(monkeypatch, tmp_path, connect_timeout):
    """Really call kagglehub with every DNS lookup failing, as on a machine with no network."""

    lookups, real, this_thread = [], socket.getaddrinfo, threading.get_ident()

    def unreachable(host, port, *args, **kwargs):
        if threading.get_ident() != this_thread:  # another test's server thread in this worker (127.0.0.1)
            return real(host, port, *args, **kwargs)
        lookups.append((host, port))
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (network blocked by test)")

    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    sleeps = _record_sleeps(monkeypatch)
    try:
        root = resolve_dataset_root(None, connect_timeout=connect_timeout)
    except DatasetUnavailableError as error:
        _assert_actionable(error, KAGGLE_HANDLE)
    else:
        pytest.skip(f"kagglehub unexpectedly resolved the dataset offline, to {root}")
    # Gives up after one failed lookup of the API host: no retry loop, no backoff sleeps.
    assert lookups == [("api.kaggle.com", 443)] and sleeps == []


# --------------------------------------------------------------------------- images


def _gradient(dtype=np.uint8, high=255) -> np.ndarray:
    return np.tile(np.linspace(0, high, 32), (16, 1)).astype(dtype)


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _with_alpha(channels: list[np.ndarray], mode: str) -> Image.Image:
    opaque = np.full(channels[0].shape, 255, np.uint8)
    return Image.fromarray(np.stack([*channels, opaque], axis=-1), mode)


MODE_CASES = {
    "1": lambda p: _save(Image.fromarray(_gradient() > 127), p / "a.png"),
    "L": lambda p: _save(Image.fromarray(_gradient(), mode="L"), p / "a.png"),
    "LA": lambda p: _save(_with_alpha([_gradient()], "LA"), p / "a.png"),
    "I;16": lambda p: _save(Image.fromarray(_gradient(np.uint16, 4095)), p / "a.png"),
    "I": lambda p: _save(Image.fromarray(_gradient(np.int32, 70000) - 1000), p / "a.tif"),
    "F": lambda p: _save(Image.fromarray(_gradient(np.float32, 1.0) - 0.5), p / "a.tif"),
    "RGB": lambda p: _save(Image.fromarray(np.stack([_gradient()] * 3, -1)), p / "a.jpg", quality=100),
    "RGBA": lambda p: _save(_with_alpha([_gradient()] * 3, "RGBA"), p / "a.png"),
    "P": lambda p: _save(Image.fromarray(_gradient(), mode="L").convert("P"), p / "a.png"),
    "CMYK": lambda p: _save(Image.fromarray(np.stack([_gradient()] * 3, -1)).convert("CMYK"), p / "a.tif"),
}


@pytest.mark.parametrize("mode", sorted(MODE_CASES))
def test_load_image_any_mode_gives_rgb(tmp_path, mode):
    path = MODE_CASES[mode](tmp_path)
    with Image.open(path) as stored:
        assert stored.mode.startswith(mode.split(";")[0])
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (32, 16)
    pixels = np.asarray(image).astype(int)
    assert np.abs(pixels[..., 0] - pixels[..., 2]).max() <= 2, "grey input stays grey"
    assert pixels[:, :4].mean() < 40 and pixels[:, -4:].mean() > 215, "dark left, bright right"
    if mode in ("I;16", "I", "F"):
        assert pixels.min() == 0 and pixels.max() == 255
        assert 100 < pixels[:, 15:17].mean() < 155, "rescaled linearly, not clipped"


def test_load_image_sixteen_bit_not_saturated(tmp_path):
    # 12-bit data in a 16-bit PNG: PIL's own convert("L") would clip nearly all of it to 255.
    twelve_bit = np.full((8, 8), 2048, np.uint16) + np.arange(8, dtype=np.uint16)
    path = _save(Image.fromarray(twelve_bit), tmp_path / "x.png")
    pixels = np.asarray(load_image(path))[..., 0]
    assert pixels[:, 0].max() == 0 and pixels[:, -1].min() == 255
    assert len(np.unique(pixels)) == 8


def test_load_image_constant_high_depth_is_black(tmp_path):
    path = _save(Image.fromarray(np.full((8, 8), 3000, np.uint16)), tmp_path / "flat.png")
    assert np.asarray(load_image(path)).max() == 0


def test_load_image_transparency_composited_on_black(tmp_path):
    rgba = np.full((8, 8, 4), 200, np.uint8)
    rgba[..., 3] = 255
    rgba[:, :4, 3] = 0
    path = _save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png")
    pixels = np.asarray(load_image(path))
    assert pixels[:, :4].max() == 0 and pixels[:, 4:].min() == 200

    palette = Image.fromarray(np.array([[0, 1], [1, 1]], np.uint8), "P")
    palette.putpalette([255, 255, 255, 90, 90, 90])
    path = _save(palette, tmp_path / "p.png", transparency=0)
    pixels = np.asarray(load_image(path))
    assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[1, 1].tolist() == [90, 90, 90]


def test_load_image_applies_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(Image.new("L", (40, 20), 128), tmp_path / "rotated.jpg", exif=exif)
    assert load_image(path).size == (20, 40)


def test_load_image_from_stream(tmp_path):
    buffer = io.BytesIO()
    Image.new("L", (5, 7), 30).save(buffer, format="PNG")
    buffer.seek(0)
    image = load_image(buffer)
    assert image.mode == "RGB" and image.size == (5, 7)


def _truncated_png(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    return path


def test_load_image_unreadable_files_name_file_and_reason(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(UnreadableImageError, match=r"notes\.png: UnidentifiedImageError"):
        load_image(text)
    with pytest.raises(UnreadableImageError, match=r"cut\.png: OSError: .*[Tt]runcated"):
        load_image(_truncated_png(tmp_path / "cut.png"))
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")


def test_load_image_decompression_bomb(tmp_path, monkeypatch):
    path = _save(Image.new("L", (64, 64)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UnreadableImageError, match=r"big\.png: DecompressionBombError"):
        load_image(path)


# --------------------------------------------------------------------------- missing / corrupt


def _train(root: Path) -> tuple[list[Record], Path]:
    label_file, image_dir = split_paths(root, "train")
    return parse_label_file(label_file), image_dir


def test_find_and_check_missing_images(tiny_covidx, caplog):
    records, image_dir = _train(tiny_covidx)
    assert find_missing(records, image_dir) == []
    assert check_images(records, image_dir) == records
    gone = [records[1].filename, records[6].filename]
    for name in gone:
        (image_dir / name).unlink()
    assert find_missing(records, image_dir) == gone
    with pytest.raises(MissingImagesError, match=rf"2 of 12 .*{gone[0]}, {gone[1]}.*--on-missing skip"):
        check_images(records, image_dir)
    with caplog.at_level(logging.WARNING, logger="covidtl.scan"):
        kept = check_images(records, image_dir, on_missing="skip")
    assert [r.filename for r in kept] == [r.filename for r in records if r.filename not in gone]
    assert "skipping 2 of 12" in caplog.text and gone[0] in caplog.text
    with pytest.raises(ValueError, match="on_missing must be"):
        check_images(records, image_dir, on_missing="ignore")


def test_scan_images_reports_corrupt_files(tiny_covidx, caplog):
    records, image_dir = _train(tiny_covidx)
    wrapped = []

    def progress(iterable):
        wrapped.append(iterable)
        return iterable

    assert scan_images(records, image_dir, progress=progress) == records
    assert wrapped == [records]
    png, jpg = records[0].filename, records[2].filename
    assert png.endswith(".png") and jpg.endswith(".jpg")
    _truncated_png(image_dir / png)
    (image_dir / jpg).write_bytes((image_dir / jpg).read_bytes()[:400])
    with pytest.raises(CorruptImagesError, match=rf"2 of 12 .*{png} \(.*{jpg} \(.*--on-corrupt skip"):
        scan_images(records, image_dir)
    with caplog.at_level(logging.WARNING, logger="covidtl.scan"):
        kept = scan_images(records, image_dir, on_corrupt="skip")
    assert len(kept) == 10 and png not in {r.filename for r in kept}
    assert "skipping 2 of 12" in caplog.text
    with pytest.raises(ValueError, match="on_corrupt must be"):
        scan_images(records, image_dir, on_corrupt="warn")


# --------------------------------------------------------------------------- splits


def _many_records(n_patients: int = 600, seed: int = 1) -> list[Record]:
    rng = random.Random(seed)
    records = []
    for p in range(n_patients):
        label, source = rng.random() < 0.3, rng.choice(["cohen", "rsna", "sirm"])
        for k in range(rng.randint(1, 3)):
            records.append(Record(f"pat {p}", f"p{p}_{k}.png", int(label), source))
    return records


def test_patient_split_disjoint_deterministic_stratified():
    records = _many_records()
    split = patient_split(records, seed=3)
    assert set(split) == {"train", "val", "test"}
    patients = {name: {r.patient_id for r in rs} for name, rs in split.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert sorted(r.filename for rs in split.values() for r in rs) == sorted(r.filename for r in records)
    for name, fraction in zip(SPLITS, (0.8, 0.1, 0.1)):
        assert abs(len(split[name]) / len(records) - fraction) < 0.02
        for key in {(r.label, r.source) for r in records}:
            group = [r for r in records if (r.label, r.source) == key]
            share = sum((r.label, r.source) == key for r in split[name]) / len(group)
            assert abs(share - fraction) < 0.06, (name, key)

    assert patient_split(records, seed=3) == split
    shuffled = list(records)
    random.Random(0).shuffle(shuffled)
    again = patient_split(shuffled, seed=3)
    assert {n: {r.filename for r in rs} for n, rs in again.items()} == {
        n: {r.filename for r in rs} for n, rs in split.items()
    }
    assert patient_split(records, seed=4) != split


def test_patient_split_fractions_and_saving(tiny_covidx, tmp_path):
    records, _ = _train(tiny_covidx)
    split = patient_split(records, fractions=(0.5, 0.5, 0.0))
    assert split["test"] == [] and split["train"] and split["val"]
    for name, rs in split.items():
        write_label_file(rs, tmp_path / f"{name}.txt")
        assert parse_label_file(tmp_path / f"{name}.txt") == rs
    assert patient_split([]) == {"train": [], "val": [], "test": []}
    for bad in [(0.8, 0.1), (0.8, 0.3, -0.1), (0.5, 0.2, 0.2)]:
        with pytest.raises(ValueError, match="fractions"):
            patient_split(records, fractions=bad)


# --------------------------------------------------------------------------- transforms, dataset


MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.mark.parametrize("train", [False, True])
def test_build_transform_shape_and_dtype(train):
    transform = build_transform(224, MEAN, STD, train=train)
    out = transform(Image.new("RGB", (300, 180), (128, 128, 128)))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_build_transform_eval_geometry_and_normalization():
    transform = build_transform(8, MEAN, STD, train=False, crop_fraction=0.5)
    steps = [type(t).__name__ for t in transform.transforms]
    assert steps == ["Resize", "CenterCrop", "ToImage", "ToDtype", "Normalize"]
    assert transform.transforms[0].size == [16]
    out = transform(Image.new("RGB", (40, 20), (51, 51, 51)))
    assert torch.allclose(out, torch.full((3, 8, 8), (0.2 - 0.5) / 0.25), atol=1e-6)


def test_build_transform_train_steps_and_off_switches():
    steps = [type(t).__name__ for t in build_transform(32, MEAN, STD, train=True).transforms]
    assert steps == [
        "Resize", "CenterCrop", "RandomHorizontalFlip", "RandomRotation", "ColorJitter",
        "ToImage", "ToDtype", "Normalize",
    ]  # fmt: skip
    plain = build_transform(32, MEAN, STD, train=True, hflip=False, rotation=0, color_jitter=0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 60, 3), dtype=np.uint8))
    assert torch.equal(plain(image), build_transform(32, MEAN, STD, train=False)(image))
    with pytest.raises(ValueError, match="crop_fraction"):
        build_transform(32, MEAN, STD, train=False, crop_fraction=1.5)


def test_covidx_dataset_items(tiny_covidx):
    records, image_dir = _train(tiny_covidx)
    dataset = CovidxDataset(records, image_dir, build_transform(48, MEAN, STD, train=True))
    assert len(dataset) == 12 and dataset.records == records
    assert dataset.labels.dtype == np.int64 and dataset.labels.tolist() == [r.label for r in records]
    assert dataset.sources == [r.source for r in records]
    image, label = dataset[0]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert isinstance(label, int) and label == records[0].label
    images, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=5)))
    assert images.shape == (5, 3, 48, 48) and labels.dtype == torch.int64


def test_tiny_covidx_fixture_is_balanced_and_learnable(tiny_covidx):
    sizes = {"train": 12, "val": 6, "test": 6}
    patients = {}
    for split, size in sizes.items():
        label_file, image_dir = split_paths(tiny_covidx, split)
        records = parse_label_file(label_file)
        assert len(records) == size
        assert {r.label for r in records} == {0, 1} and {r.source for r in records} == {"srcA", "srcB"}
        assert find_missing(records, image_dir) == []
        patients[split] = {r.patient_id for r in records}
        centre = {
            r.label: np.asarray(load_image(image_dir / r.filename))[24:40, 24:40].mean() for r in records
        }
        assert centre[1] > centre[0] + 80
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    other = make_covidx_folder(tiny_covidx.parent / "other", n_per_split=4, size=32)
    with Image.open(other / "val" / "val_000.png") as image:
        assert image.size == (32, 32)


def test_class_weights():
    weights = class_weights([0, 0, 0, 1])
    assert weights.dtype == torch.float32 and weights.shape == (2,)
    assert torch.allclose(weights, torch.tensor([4 / 6, 2.0]))
    assert torch.allclose(class_weights(torch.tensor([1, 0])), torch.ones(2))
    with pytest.raises(ValueError, match="no examples of class"):
        class_weights(np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match="indices into"):
        class_weights([0, 1, 2])


def test_balanced_sampler_weights():
    records = (
        [Record(f"a{i}", f"a{i}.png", 1, "cohen") for i in range(2)]
        + [Record(f"b{i}", f"b{i}.png", 0, "kermany") for i in range(9)]
        + [Record(f"c{i}", f"c{i}.png", 0, "rsna") for i in range(3)]
    )
    by_label = balanced_sampler_weights(records)
    assert by_label.shape == (14,)
    assert by_label[:2].sum() == pytest.approx(by_label[2:].sum())
    by_source = balanced_sampler_weights(records, by="label_source")
    assert by_source[:2].sum() == pytest.approx(0.5)
    assert by_source[2:11].sum() == pytest.approx(0.25) and by_source[11:].sum() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="by must be"):
        balanced_sampler_weights(records, by="source")


def test_random_crop_scale_is_training_only():
    from covidtl.transforms import build_transform

    image = Image.new("RGB", (300, 400))
    train = build_transform(64, [0.5] * 3, [0.5] * 3, train=True, crop_scale=0.6)
    assert any(type(t).__name__ == "RandomResizedCrop" for t in train.transforms)
    assert train(image).shape == (3, 64, 64)
    evaluation = build_transform(64, [0.5] * 3, [0.5] * 3, train=False, crop_scale=0.6)
    assert not any(type(t).__name__ == "RandomResizedCrop" for t in evaluation.transforms)
    with pytest.raises(ValueError, match="crop_scale"):
        build_transform(64, [0.5] * 3, [0.5] * 3, train=True, crop_scale=0.0)
