"""Intensity augmentation for training: gamma, blur and noise on the [0, 1] float image.

Chest films from different hospitals differ in exposure, contrast curve, sharpness and
noise more than in geometry; a model that has seen only one site's look learns it as a
cue. These transforms vary the look at training time only (evaluation and the Predictor
never use them). They act on the float tensor ``[C, H, W]`` in [0, 1], after
``ToDtype`` and before ``Normalize`` (see `covidtl.transforms.build_transform`), and draw from
torch's global generator, which the training loop seeds per epoch.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.transforms import v2


class RandomGamma(nn.Module):
    """``x ** g`` with ``log g`` uniform in ``[-log(1 + strength), log(1 + strength)]``."""

    def __init__(self, strength: float) -> None:
        super().__init__()
        if strength < 0:
            raise ValueError(f"gamma strength must be >= 0, got {strength}")
        self.strength = strength

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bound = math.log1p(self.strength)
        g = math.exp((torch.rand(()).item() * 2 - 1) * bound)
        return x.clamp(0, 1) ** g


class RandomNoise(nn.Module):
    """Add Gaussian noise of a standard deviation uniform in [0, `std`], clamp to [0, 1]."""

    def __init__(self, std: float) -> None:
        super().__init__()
        if std < 0:
            raise ValueError(f"noise std must be >= 0, got {std}")
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sigma = torch.rand(()).item() * self.std
        return (x + sigma * torch.randn_like(x)).clamp(0, 1)


def intensity_steps(gamma: float = 0.0, blur: float = 0.0, noise: float = 0.0) -> list[nn.Module]:
    """Training-only steps on the [0, 1] float image, each left out when zero:
    random gamma (`RandomGamma(gamma)`), with probability `blur` a Gaussian blur of
    sigma 0.1-1.5 px, then Gaussian noise up to std `noise` (`RandomNoise`)."""
    if not 0 <= blur <= 1:
        raise ValueError(f"blur is a probability in [0, 1], got {blur}")
    steps: list[nn.Module] = []
    if gamma:
        steps.append(RandomGamma(gamma))
    if blur:
        steps.append(v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=blur))
    if noise:
        steps.append(RandomNoise(noise))
    return steps
