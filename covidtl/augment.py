"""Training-only augmentation of a film's look: another copy's resampling and JPEG
(`RandomRecode`, on the 8-bit image), gamma, blur and noise (on the [0, 1] float image).

Chest films from different hospitals differ in exposure, contrast curve, sharpness and
noise more than in geometry; a model that has seen only one site's look learns it as a
cue. These transforms vary the look at training time only (evaluation and the Predictor
never use them). The intensity steps act on the float tensor ``[C, H, W]`` in [0, 1], after
``ToDtype`` and before ``Normalize``; `RandomRecode` on the 8-bit image before the framing
(see `covidtl.transforms.build_transform`). All draw from torch's global generator, which the
training loop seeds per epoch.
"""

from __future__ import annotations

import io
import math

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

# Filters a copy of a film may have been resized with, down and back up (PIL's).
RECODE_FILTERS = (
    Image.Resampling.NEAREST,
    Image.Resampling.BOX,
    Image.Resampling.BILINEAR,
    Image.Resampling.BICUBIC,
    Image.Resampling.LANCZOS,
)
RECODE_SCALE = (0.5, 1.0)  # the copy's side, as a share of the image's
RECODE_QUALITY = (40, 95)  # JPEG quality of the copy


class RandomRecode(nn.Module):
    """With probability `p`, the image as another copy of the film would show it: shrunk to
    a share of its side uniform in `RECODE_SCALE` with a random filter of `RECODE_FILTERS`,
    saved as JPEG at a quality uniform in `RECODE_QUALITY`, and resized back with another
    random filter. ``PIL.Image`` in, ``PIL.Image`` of the same size and mode out.

    Why: in covidx-large every film of the public 224 x 224 copy (bimcv, rsna) carries that
    copy's resampling and JPEG blocks, and every such film of one class comes from one
    source; a model can learn the copy's texture as the label. Recoding every source's
    films at random makes that texture a property of no class.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"recode is a probability in [0, 1], got {p}")
        self.p = p

    def forward(self, image: Image.Image) -> Image.Image:
        if torch.rand(()).item() >= self.p:
            return image
        low, high = RECODE_SCALE
        scale = low + (high - low) * torch.rand(()).item()
        quality = int(torch.randint(RECODE_QUALITY[0], RECODE_QUALITY[1] + 1, ()).item())
        down, up = (RECODE_FILTERS[int(i)] for i in torch.randint(len(RECODE_FILTERS), (2,)))
        small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), down)
        buffer = io.BytesIO()
        small.save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as copy:
            return copy.convert(image.mode).resize(image.size, up)


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
