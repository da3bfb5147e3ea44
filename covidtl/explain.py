"""Class activation maps (where the model looked) and their overlays on the image.

The CAM methods come from the `grad-cam` package (``pytorch_grad_cam``). The layer they
hook is not chosen here: it is the registry's ``ModelSpec.cam_layer`` for the backbone
(the last spatial feature map), a ``model.get_submodule`` path.

Each call builds one CAM object inside a ``with`` block, so its forward hooks are removed
when the call ends, even on error. Hooks on a shared model would also catch a concurrent
forward pass from another thread, so callers that share a model between threads must
serialize `explain` with every other forward on it; :class:`covidtl.inference.Predictor`
does this with its lock.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from torch import nn

from covidtl.classes import CLASSES, POSITIVE

# Method name -> class name in `pytorch_grad_cam`, imported on first use: the package pulls
# in scikit-learn and OpenCV, seconds an app's start would otherwise wait for.
# Score-CAM and Ablation-CAM are left out: they run hundreds of forward passes per map.
CAM_METHODS: dict[str, str] = {
    "Grad-CAM": "GradCAM",
    "Grad-CAM++": "GradCAMPlusPlus",
    "XGrad-CAM": "XGradCAM",
    "Layer-CAM": "LayerCAM",
    "Eigen-CAM": "EigenCAM",  # class-agnostic: first principal component of the activations
}
DEFAULT_METHOD = "Grad-CAM"


def check_method(method: str) -> None:
    """Raise ValueError unless `method` is a key of `CAM_METHODS`."""
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose from {list(CAM_METHODS)}")


def cam_class(method: str) -> type:
    """The `pytorch_grad_cam` class of `method` (a key of `CAM_METHODS`)."""
    check_method(method)
    return getattr(importlib.import_module("pytorch_grad_cam"), CAM_METHODS[method])


@contextmanager
def _gradients_from(model: nn.Module, layer: nn.Module) -> Iterator[None]:
    """Backward passes stop at `layer`: its output becomes a leaf that requires grad, and no
    parameter does, so the graph (and the backward pass) covers only the layers after it.

    A CAM needs d(class score)/d(activation) and nothing else; without this, backward runs
    through the whole network to reach every parameter, for gradients no one reads.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def cut(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        # clone: layers after it may work in place (DenseNet's ReLU), which a leaf forbids.
        return output.detach().requires_grad_(True).clone()

    for p, _ in flags:
        p.requires_grad_(False)
    handle = layer.register_forward_hook(cut)  # before the CAM's hooks, which then see the cut
    try:
        yield
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


def explain(
    model: nn.Module,
    input_tensor: torch.Tensor,
    target_layer: str,
    method: str = DEFAULT_METHOD,
    class_index: int = POSITIVE,
) -> np.ndarray:
    """Activation map of `class_index` for one image.

    Args:
        model: classifier in eval mode, output logits [1, len(CLASSES)].
        input_tensor: normalized image [1, 3, S, S] (or [3, S, S]) on the model's device.
        target_layer: `get_submodule` path of the hooked layer (``ModelSpec.cam_layer``).
        method: a key of `CAM_METHODS`.
        class_index: index into `CLASSES`; default the positive (COVID-19) class.

    Returns:
        float32 array [S, S] in [0, 1]; 1 marks the regions that raised the class score
        most. Not thread-safe on a shared model (see the module docstring).
    """
    cam = cam_class(method)
    if not 0 <= class_index < len(CLASSES):
        raise ValueError(f"class_index {class_index} is out of range for CLASSES {CLASSES}")
    if input_tensor.dim() == 3:
        input_tensor = input_tensor.unsqueeze(0)
    if input_tensor.dim() != 4 or input_tensor.shape[0] != 1:
        raise ValueError(f"explain takes one image [1, 3, S, S]; got shape {tuple(input_tensor.shape)}")
    layer = model.get_submodule(target_layer)

    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    heatmap = None
    # grad-cam's __exit__ prints and swallows IndexError, so `heatmap` is checked after.
    # Left to right: the cut's hook is registered before the CAM's.
    with (
        torch.enable_grad(),
        _gradients_from(model, layer),
        cam(model=model, target_layers=[layer]) as hooked,
    ):
        heatmap = hooked(input_tensor=input_tensor, targets=[ClassifierOutputTarget(class_index)])[0]
    if heatmap is None:
        raise RuntimeError(f"{method} produced no map for layer {target_layer!r}")
    return np.clip(np.nan_to_num(heatmap.astype(np.float32)), 0.0, 1.0)


def overlay(image_rgb: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend `heatmap` in the jet colormap over an image.

    Args:
        image_rgb: uint8 [H, W, 3].
        heatmap: float [h, w] in [0, 1]; resized (bilinear) to H x W when it differs.
        alpha: heatmap opacity in [0, 1]; 0 gives the image back, 1 the colormap alone.

    Returns:
        uint8 [H, W, 3].
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"overlay needs an RGB image [H, W, 3]; got shape {image_rgb.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    height, width = image_rgb.shape[:2]
    heat = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    if heat.shape != (height, width):
        heat = np.asarray(Image.fromarray(heat).resize((width, height), Image.Resampling.BILINEAR))
    colour = colormaps["jet"](heat)[..., :3] * 255.0
    blended = (1.0 - alpha) * image_rgb.astype(np.float32) + alpha * colour
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)
