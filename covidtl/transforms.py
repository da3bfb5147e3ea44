"""Transforms: the eval framing (resize, center crop), training augmentation, and the
last steps from an 8-bit image to the model's normalized input tensor."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

__all__ = [
    "Equalize",
    "build_transform",
    "eval_geometry",
    "eval_view",
    "input_steps",
]


class Equalize(torch.nn.Module):
    """Histogram equalization of the framed 8-bit image (``PIL.ImageOps.equalize``, per
    band): every film's grey levels spread to a flat histogram, whatever the exposure and
    contrast curve of the hospital that took it. Deterministic; the same step in training,
    evaluation and the app's Predictor."""

    def forward(self, image):
        return v2.functional.equalize(image)


def eval_geometry(input_size: int, crop_fraction: float = 0.9) -> list[v2.Transform]:
    """``[Resize(round(input_size / crop_fraction)), CenterCrop(input_size)]``: the eval framing."""
    if input_size <= 0:
        raise ValueError(f"input_size must be positive, got {input_size}")
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    return [v2.Resize(round(input_size / crop_fraction)), v2.CenterCrop(input_size)]


def eval_view(input_size: int, crop_fraction: float = 0.9, equalize: bool = False) -> list[torch.nn.Module]:
    """Every step on the 8-bit image at evaluation: the eval framing (`eval_geometry`), then
    histogram equalization (`Equalize`) when `equalize`."""
    return [*eval_geometry(input_size, crop_fraction), *([Equalize()] if equalize else [])]


def build_transform(
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    crop_fraction: float = 0.9,
    hflip: bool = True,
    rotation: float = 10.0,
    color_jitter: float = 0.1,
    crop_scale: float = 1.0,
    intensity: Sequence[Callable] = (),
    equalize: bool = False,
    recode: Callable | None = None,
) -> v2.Compose:
    """RGB ``PIL.Image`` -> normalized float32 tensor ``[3, input_size, input_size]``.

    Eval: resize the shorter side to ``input_size / crop_fraction``, center crop, normalize.
    Train adds, after the crop: horizontal flip, rotation by up to ``rotation`` degrees and
    brightness/contrast jitter of ``color_jitter`` (each left out when off or zero). With
    ``crop_scale < 1`` the training crop is random instead of central: a square-ish crop of
    ``crop_scale`` to all of the resized image's area, resized to ``input_size``; it moves
    the film's edges, markers and body outline around so they are less useful as cues.
    `intensity` (training only): steps on the [0, 1] float image before normalizing,
    e.g. ``covidtl.augment.intensity_steps(...)``. `recode` (training only): a step on the
    8-bit image before the framing, e.g. ``covidtl.augment.RandomRecode(p)``, so that its
    resampling and JPEG blocks sit at the film's scale. `equalize`: histogram equalization of
    the framed image (`Equalize`), in training (after the crop, before the augmentation) and
    at evaluation alike.
    """
    if not 0 < crop_scale <= 1:
        raise ValueError(f"crop_scale must be in (0, 1], got {crop_scale}")
    steps: list[torch.nn.Module] = eval_geometry(input_size, crop_fraction)
    if train and recode is not None:
        steps.insert(0, recode)
    if train and crop_scale < 1:
        steps[-1] = v2.RandomResizedCrop(input_size, scale=(crop_scale, 1.0), ratio=(0.8, 1.25))
    if equalize:
        steps.append(Equalize())
    if train:
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        if rotation:
            steps.append(v2.RandomRotation(rotation))
        if color_jitter:
            steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter))
    to_image, to_float, normalize = input_steps(mean, std)
    # `intensity` (training only; covidtl.augment) acts on the [0, 1] float image
    return v2.Compose([*steps, to_image, to_float, *(intensity if train else ()), normalize])


def input_steps(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    """``[ToImage(), ToDtype(float32, scale=True), Normalize(mean, std)]``: the last steps of
    every transform, from a framed 8-bit ``PIL.Image`` to the model's input tensor."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
