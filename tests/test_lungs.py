"""covidtl.lungs and `python -m train.lungs`: the lung segmentation network, mask checks,
boxes, outlines, export/load, and the shipped lung model on real masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covidtl import lungs
from covidtl.cards import lung_model_markdown
from covidtl.export import CardError, list_exported
from covidtl.inference import ModelStore
from covidtl.lungs import check_mask, lung_box, outline
from tests.conftest import shared_data_dir
from train import lungs as train_lungs

ROOT = Path(__file__).resolve().parents[1]


def two_lungs(height: int = 100, width: int = 100) -> np.ndarray:
    """bool [height, width]: two side-by-side rectangles covering about 36 % of the image."""
    mask = np.zeros((height, width), dtype=bool)
    mask[int(0.2 * height) : int(0.8 * height), int(0.15 * width) : int(0.45 * width)] = True
    mask[int(0.2 * height) : int(0.8 * height), int(0.55 * width) : int(0.85 * width)] = True
    return mask


def test_two_side_by_side_lungs_are_plausible():
    check = check_mask(two_lungs())
    assert check.plausible and check.reason is None
    assert check.lungs.sum() == two_lungs().sum()


def test_implausible_masks_say_why():
    one = two_lungs()
    one[:, 40:60] = True  # the two joined into one blob
    joined = check_mask(one)
    assert "1 lung-sized" in joined.reason
    # no two lungs: no lungs to draw, an empty mask of the image's own shape
    assert joined.lungs.shape == one.shape and joined.lungs.dtype == bool and not joined.lungs.any()
    assert "0 lung-sized" in check_mask(np.zeros((100, 100), bool)).reason
    stacked = np.zeros((100, 100), dtype=bool)
    stacked[10:40, 20:80] = stacked[60:90, 20:80] = True
    assert "side by side" in check_mask(stacked).reason
    small = np.zeros((100, 100), dtype=bool)
    small[40:55, 20:35] = small[40:55, 60:75] = True  # 4.5 % in all
    assert "cover" in check_mask(small).reason
    lopsided = two_lungs()
    lopsided[:, 55:80] = False  # right lung a fifth of the left
    assert check_mask(lopsided).reason == "one lung is 0.17 of the other's area"  # 300 of 1800 pixels
    noise = two_lungs()
    noise[0, 0] = True  # a speck is not a third lung
    assert check_mask(noise).plausible


def test_lung_box_adds_the_margin_and_stays_inside():
    mask = two_lungs()  # rows 20..79, columns 15..84
    assert lung_box(mask, margin=0.0) == (15, 20, 85, 80)
    assert lung_box(mask, margin=0.1) == (8, 14, 92, 86)
    assert lung_box(mask, margin=1.0) == (0, 0, 100, 100)
    with pytest.raises(ValueError, match="at least one"):
        lung_box(np.zeros((5, 5), bool))


def test_outline_is_the_inner_boundary():
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:8, 2:8] = True
    ring = outline(mask)
    assert ring.sum() == 6 * 6 - 4 * 4 and not ring[4, 4] and ring[2, 5]
    assert not (ring & ~mask).any()


def test_network_shape_size_and_input():
    model = lungs.create_lung_model(pretrained=False).eval()
    params = sum(p.numel() for p in model.parameters())
    assert 500_000 < params < 1_000_000  # about 3 MB in fp32
    images = [Image.new("L", (60, 90), 30), Image.new("RGB", (300, 200), (200, 200, 200))]
    x = lungs.lung_input(images)
    assert x.shape == (2, 3, 192, 192) and x.min() >= -1 and x.max() <= 1
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 1, 192, 192) and torch.isfinite(logits).all()
    assert lungs.segment(model, images[0]).shape == (90, 60)


def test_lung_crops_carry_the_logits_their_mask_came_from():
    """crop_to_lungs and locate_lungs keep the network's logits [S, S] (what the lung-field
    check reads), and the full-size mask from them is `segment`'s; a LungCrop made without
    them still builds."""
    torch.manual_seed(0)
    model = lungs.create_lung_model(pretrained=False).eval()
    image = Image.fromarray(np.where(two_lungs(90, 120), 40, 200).astype(np.uint8))
    for found in (lungs.locate_lungs(image, model), lungs.crop_to_lungs(image, model)):
        assert found.logits.shape == (lungs.LUNG_INPUT_SIZE, lungs.LUNG_INPUT_SIZE) and found.logits.dtype == np.float32
        mask = lungs.mask_from_logits(found.logits, image.height, image.width)
        np.testing.assert_array_equal(mask, lungs.segment(model, image))
        assert found.check.reason == check_mask(mask).reason
    assert lungs.LungCrop(image, None, check_mask(two_lungs())).logits is None


def _lung_folder(tmp_path, n: int = 4):
    """A synthetic lung-masks folder: dark rectangles (the lungs) on a bright film."""
    root = tmp_path / "lung-masks"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    lines = []
    for i in range(n * 3):
        mask = two_lungs(64 + 4 * i, 64)
        Image.fromarray(np.where(mask, 40, 200).astype(np.uint8)).save(root / "images" / f"im{i}.jpg", quality=92)
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"im{i}.png")
        lines.append(f"im{i} {('train', 'val', 'test')[i % 3]}\n")
    (root / "split.txt").write_text("".join(lines))
    return root


def test_fit_exports_a_card_and_evaluate_prints_dice_mean_last(tmp_path, capsys, seeded):
    root = _lung_folder(tmp_path)
    out = tmp_path / "w"
    assert train_lungs.main(["fit", "--data", str(root), "--epochs", "1", "--batch-size", "2",
                             "--no-pretrained", "--weights-dir", str(out)]) == 0
    card = json.loads((out / "lungs_lite0_unet.json").read_text())
    assert card["task"] == "lung_segmentation" and card["input_size"] == 192
    assert set(card["metrics"]) == {"val", "test"} and 0 <= card["metrics"]["test"]["dice_mean"] <= 1
    assert list_exported(out) == [] and list_exported(out, task="lung_segmentation")[0].stem == "lungs_lite0_unet"
    store = ModelStore(out)  # the app's classifiers: the lung model is listed apart, not skipped as broken
    assert store.names() == [] and store.skipped == {}
    text = lung_model_markdown(card)
    assert "lung segmentation" in text and f"{card['metrics']['test']['dice_mean']:.4f}" in text
    capsys.readouterr()
    weights = out / "lungs_lite0_unet.safetensors"
    assert train_lungs.main(["evaluate", "--data", str(root), "--split", "test", "--weights", str(weights)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("dice_mean=") and float(last.split("=")[1]) == pytest.approx(card["metrics"]["test"]["dice_mean"], abs=1e-4)
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(CardError, match="checksum"):
        lungs.load_lung_model(weights)


SHIPPED = lungs.default_lung_weights()


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped lung model is absent")
def test_shipped_lung_model_segments_real_films():
    shared = shared_data_dir()
    if shared is None or not (shared / "lung-masks").is_dir():
        pytest.skip("real data ../shared/data/lung-masks is absent")
    root = shared / "lung-masks"
    model, card = lungs.load_lung_model(SHIPPED)
    assert SHIPPED.stat().st_size <= 15 * 2**20
    assert card["metrics"]["test"]["dice_mean"] >= 0.90
    scores = lungs.evaluate_masks(model, root, lungs.read_split(root, "test")[:4])
    assert scores["dice_mean"] >= 0.85


def test_draw_outline_marks_the_boundary_and_leaves_the_rest():
    image = np.full((40, 40, 3), 7, dtype=np.uint8)
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:30, 5:15] = True
    drawn = lungs.draw_outline(image, mask)
    edge = outline(mask, thickness=2)
    assert (drawn[edge] == lungs.OUTLINE_COLOUR).all()
    assert (drawn[~edge] == 7).all() and (image == 7).all()  # the rest, and the input, untouched
    assert edge[10, 5] and not edge[20, 10]  # a corner is on it, the middle is not
    with pytest.raises(ValueError, match="does not match"):
        lungs.draw_outline(image, mask[:20])


def test_the_app_outlines_the_lungs_the_model_sees():
    """Classify with the shipped lung model: the heatmap carries the lungs' outline, found on
    the part of the film the classifier sees, and keeps it when the opacity changes."""
    import app
    from covidtl.scope import ScopeGate

    weights = ROOT / "weights"
    outliner = lungs.LungOutliner.from_folder(weights)
    if outliner is None or not list_exported(weights):
        pytest.skip("no shipped lung model or classifier in weights/")
    store = ModelStore(weights)
    film = ROOT / "assets" / "examples" / "nih-no-finding-00002371_010.jpg"
    *_, heatmap, timing, state = app.classify(store, ScopeGate(), str(film), None, "Grad-CAM", 0.4, lungs=outliner)
    mask = state["lungs"]
    assert mask is not None and mask.shape == heatmap.shape[:2]
    assert 0.15 < mask.mean() < 0.6  # two adult lungs fill a good part of a frontal film's centre crop
    left, right = mask[:, : mask.shape[1] // 2].mean(), mask[:, mask.shape[1] // 2 :].mean()
    assert min(left, right) > 0.3 * max(left, right)  # one lung on each side
    edge = outline(mask, thickness=2)
    assert (heatmap[edge] == lungs.OUTLINE_COLOUR).all() and "lung outline" in timing
    assert (app.reblend(state, 0.9)[edge] == lungs.OUTLINE_COLOUR).all()
    *_, timing, state = app.classify(store, ScopeGate(), str(film), None, "Grad-CAM", 0.4)
    assert state["lungs"] is None and "lung outline" not in timing
