"""CAM maps for every registered backbone, hooks released, overlays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic_inputs import hook_count

from covidtl.explain import CAM_METHODS, DEFAULT_METHOD, explain, overlay
from covidtl.models import create_model, get_spec, list_models

SIZE = 96  # the last feature map of every backbone is still at least 3 x 3


@pytest.fixture(scope="module")
def squeezenet():
    torch.manual_seed(0)
    return create_model("squeezenet1_1").eval()


def _check_heatmap(heatmap: np.ndarray, size: int = SIZE) -> None:
    assert heatmap.shape == (size, size)
    assert heatmap.dtype == np.float32
    assert np.isfinite(heatmap).all()
    assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0


def test_registry_offers_grad_cam_and_others():
    assert DEFAULT_METHOD == "Grad-CAM" and "Grad-CAM" in CAM_METHODS
    assert len(CAM_METHODS) >= 2


@pytest.mark.parametrize("name", list_models())
def test_grad_cam_on_every_backbone_releases_its_hooks(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    heatmap = explain(model, x, get_spec(name).cam_layer)
    _check_heatmap(heatmap)
    assert hook_count(model) == 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", list(CAM_METHODS))
def test_every_method(squeezenet, method):
    x = torch.randn(1, 3, SIZE, SIZE)
    _check_heatmap(explain(squeezenet, x, get_spec("squeezenet1_1").cam_layer, method))
    assert hook_count(squeezenet) == 0


def test_accepts_an_unbatched_tensor_and_other_classes(squeezenet):
    x = torch.randn(3, SIZE, SIZE)
    _check_heatmap(explain(squeezenet, x, "features.12", class_index=0))


def test_repeated_calls_do_not_pile_up_hooks(squeezenet):
    x = torch.randn(1, 3, SIZE, SIZE)
    first = explain(squeezenet, x, "features.12")
    for _ in range(3):
        again = explain(squeezenet, x, "features.12")
    np.testing.assert_allclose(first, again, atol=1e-5)
    assert hook_count(squeezenet) == 0


def test_hooks_are_released_when_the_forward_pass_fails(squeezenet):
    with pytest.raises(RuntimeError):
        explain(squeezenet, torch.randn(1, 5, SIZE, SIZE), "features.12")  # 5 channels: conv fails
    assert hook_count(squeezenet) == 0


def test_bad_arguments_say_what_is_accepted(squeezenet):
    x = torch.randn(1, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="Grad-CAM"):
        explain(squeezenet, x, "features.12", method="Magic-CAM")
    with pytest.raises(ValueError, match="class_index"):
        explain(squeezenet, x, "features.12", class_index=7)
    with pytest.raises(ValueError, match="one image"):
        explain(squeezenet, torch.randn(2, 3, SIZE, SIZE), "features.12")
    with pytest.raises(AttributeError):
        explain(squeezenet, x, "features.99")


def test_overlay_blends_in_the_jet_colormap():
    image = np.full((40, 60, 3), 100, dtype=np.uint8)
    heat = np.zeros((10, 15), dtype=np.float32)
    heat[5:, :] = 1.0
    np.testing.assert_array_equal(overlay(image, heat, alpha=0.0), image)
    full = overlay(image, heat, alpha=1.0)
    assert full.shape == (40, 60, 3) and full.dtype == np.uint8
    assert tuple(full[0, 0]) == (0, 0, 128)  # jet(0): dark blue
    assert tuple(full[-1, -1]) == (128, 0, 0)  # jet(1): dark red
    half = overlay(image, heat, alpha=0.5)
    assert tuple(half[0, 0]) == (50, 50, 114)


def test_overlay_rejects_bad_input():
    with pytest.raises(ValueError, match="RGB"):
        overlay(np.zeros((4, 4), dtype=np.uint8), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="alpha"):
        overlay(np.zeros((4, 4, 3), dtype=np.uint8), np.zeros((4, 4)), alpha=1.5)


def test_frozen_backbone_still_gets_a_map(seeded):
    # In "frozen" mode no parameter before the head needs a gradient; the map must not
    # depend on them (the seed's ResNet18 recipe).
    model = create_model("resnet18", mode="frozen").eval()
    heatmap = explain(model, torch.randn(1, 3, 64, 64), get_spec("resnet18").cam_layer)
    assert heatmap.shape == (64, 64) and np.isfinite(heatmap).all()
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("fc."))
