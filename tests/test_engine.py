"""Tests for the training plumbing: EpochSampler, train_one_epoch, predict_scores,
checkpoints and run configs. CPU only, on the synthetic ``tiny_covidx`` folder."""

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from covidtl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from covidtl.classes import POSITIVE
from covidtl.config import BALANCE, KEEP_EPOCH, LR_SCHEDULE, TrainConfig, config_from_dict, load_recipe
from covidtl.data import balanced_sampler_weights
from covidtl.engine import EpochSampler, mix_batch, predict_scores, train_one_epoch
from covidtl.labels import Record, parse_label_file, split_paths
from covidtl.loaders import eval_loader, train_loader
from covidtl.models import MODES, create_model, get_spec, list_models

SIZE = 64
CPU = torch.device("cpu")
RECIPES = Path(__file__).resolve().parents[1] / "train" / "recipes"


def _split(root: Path, split: str) -> tuple[list[Record], Path]:
    label_file, image_dir = split_paths(root, split)
    return parse_label_file(label_file), image_dir


def _config(**changes) -> TrainConfig:
    values = dict(name="t", backbone="squeezenet1_1", pretrained=False, num_workers=0, batch_size=4, lr=1e-3)
    return TrainConfig(**{**values, **changes})


# --------------------------------------------------------------------------- EpochSampler


def test_sampler_is_a_function_of_seed_and_epoch():
    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    assert list(a) == list(a)  # iterating again gives the same order
    b.set_epoch(3)
    assert list(a) != list(b)
    assert list(EpochSampler(50, seed=4)) != list(EpochSampler(50, seed=3))


def test_sampler_without_weights_is_a_permutation():
    sampler = EpochSampler(37, seed=1)
    order = list(sampler)
    assert len(order) == len(sampler) == 37
    assert sorted(order) == list(range(37))


@pytest.mark.parametrize("n", [20, 21])
def test_sampler_shards_are_disjoint_and_cover_everything(n):
    shards = []
    for rank in range(2):
        sampler = EpochSampler(n, seed=5, rank=rank, world_size=2)
        sampler.set_epoch(1)
        shards.append(list(sampler))
        assert len(shards[-1]) == len(sampler) == math.ceil(n / 2)
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    if n % 2 == 0:
        assert not set(shards[0]) & set(shards[1])
    else:  # padded with one repeated index so both ranks take the same number of steps
        assert len(set(shards[0]) & set(shards[1])) == 1


def test_weighted_sampler_balances_classes():
    records = [Record(f"p{i}", f"{i}.png", int(i < 10), "srcA") for i in range(100)]  # 10% positive
    sampler = EpochSampler(len(records), balanced_sampler_weights(records), seed=0)
    drawn = Counter(records[i].label for epoch in range(20) for i in _at_epoch(sampler, epoch))
    share = drawn[POSITIVE] / sum(drawn.values())
    assert 0.45 < share < 0.55
    assert len(sampler) == len(records)


def _at_epoch(sampler: EpochSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_rejects_wrong_weight_count():
    with pytest.raises(ValueError, match="3 weights for 4 samples"):
        EpochSampler(4, torch.ones(3))


# --------------------------------------------------------------------------- train / predict


@pytest.mark.parametrize("balance", ["none", "sampler"])
def test_train_one_epoch_returns_a_finite_loss(tiny_covidx, balance, seeded):
    records, image_dir = _split(tiny_covidx, "train")
    config = _config(balance=balance)
    spec = get_spec(config.backbone)
    loader, sampler = train_loader(records, image_dir, config, SIZE, spec.mean, spec.std)
    sampler.set_epoch(0)
    model = create_model(config.backbone, pretrained=config.pretrained, mode=config.mode)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    result = train_one_epoch(model, loader, optimizer, nn.CrossEntropyLoss(), CPU)
    assert set(result) == {"train_loss"}
    assert isinstance(result["train_loss"], float) and math.isfinite(result["train_loss"])
    assert result["train_loss"] > 0
    assert model.training
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_mix_batch_blends_each_image_with_its_partner_and_returns_the_partner_labels():
    torch.manual_seed(0)
    images = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 2, 2).clone()
    labels = torch.tensor([0, 1, 0, 1, 1])
    mixed, partners, lam = mix_batch(images, labels, 0.4)
    assert 0 <= lam <= 1 and mixed.shape == images.shape
    # each mixed image is lam * its own + (1 - lam) * one other image, whose label is returned
    own = images[:, 0, 0, 0]
    partner_value = (mixed[:, 0, 0, 0] - lam * own) / (1 - lam)
    partner_index = partner_value.round().long()
    assert sorted(partner_index.tolist()) == list(range(5))  # a permutation of the batch
    assert torch.equal(partners, labels[partner_index])
    with pytest.raises(ValueError, match="positive"):
        mix_batch(images, labels, 0.0)


class _Recorder(nn.Module):
    """A linear classifier that keeps every batch it is shown."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("mixup", [0.0, 0.4])
def test_train_one_epoch_mixes_batches_only_with_mixup(tiny_covidx, mixup):
    records, image_dir = _split(tiny_covidx, "train")
    config = _config(balance="none", hflip=False, rotation=0.0, color_jitter=0.0)
    spec = get_spec(config.backbone)
    loader, sampler = train_loader(records, image_dir, config, SIZE, spec.mean, spec.std)
    sampler.set_epoch(0)
    torch.manual_seed(1)
    shown = torch.cat([images for images, _ in loader])
    model = _Recorder()
    torch.manual_seed(1)
    result = train_one_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), CPU,
                             mixup=mixup)
    assert math.isfinite(result["train_loss"])
    seen = torch.cat(model.seen)
    assert torch.equal(seen, shown) == (mixup == 0)


def test_a_mixed_batch_is_scored_against_both_labels_in_proportion(tiny_covidx, monkeypatch):
    """loss = lam * CE(own labels) + (1 - lam) * CE(partner labels), measured with a fixed
    blend (lam 0.25, every partner of the other class) and a learning rate of 0."""
    from covidtl import engine

    records, image_dir = _split(tiny_covidx, "train")
    config = _config(balance="none", hflip=False, rotation=0.0, color_jitter=0.0, batch_size=len(records))
    spec = get_spec(config.backbone)
    loader, sampler = train_loader(records, image_dir, config, SIZE, spec.mean, spec.std)
    sampler.set_epoch(0)
    monkeypatch.setattr(engine, "mix_batch", lambda images, labels, alpha: (images, 1 - labels, 0.25))
    model = _Recorder()
    result = train_one_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.0), nn.CrossEntropyLoss(), CPU,
                             mixup=0.4)
    images, labels = next(iter(loader))
    with torch.no_grad():
        logits = model(images)
    expected = 0.25 * nn.functional.cross_entropy(logits, labels) + 0.75 * nn.functional.cross_entropy(logits, 1 - labels)
    assert result["train_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert result["train_loss"] != pytest.approx(float(nn.functional.cross_entropy(logits, labels)), rel=1e-3)


def test_predict_scores_in_loader_order(tiny_covidx, seeded):
    records, image_dir = _split(tiny_covidx, "test")
    spec = get_spec("squeezenet1_1")
    model = create_model("squeezenet1_1", pretrained=False)
    loader = eval_loader(records, image_dir, SIZE, spec.mean, spec.std, batch_size=4, num_workers=0)
    scores, labels, loss = predict_scores(model, loader, CPU, criterion=nn.CrossEntropyLoss())
    assert scores.shape == labels.shape == (len(records),)
    assert scores.dtype == np.float64 and labels.dtype == np.int64
    assert ((scores >= 0) & (scores <= 1)).all()
    assert labels.tolist() == [r.label for r in records]
    assert math.isfinite(loss)
    assert not model.training
    # Image by image, in record order, gives the same scores.
    with torch.no_grad():
        one_by_one = [torch.softmax(model(image[None]), dim=1)[0, POSITIVE].item() for image, _ in loader.dataset]
    np.testing.assert_allclose(scores, one_by_one, atol=1e-6)
    _, _, no_loss = predict_scores(model, loader, CPU)
    assert math.isnan(no_loss)


# --------------------------------------------------------------------------- checkpoints


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(4, 3, SIZE, SIZE, generator=g), torch.tensor([0, 1, 0, 1])
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()


def _trained_pair(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create_model("squeezenet1_1", pretrained=False).eval()  # eval: no dropout
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    return model, optimizer


def test_checkpoint_round_trip_restores_model_and_optimizer(tmp_path):
    model, optimizer = _trained_pair(0)
    for seed in range(2):
        _step(model, optimizer, seed)
    state = {"epoch": 2, "history": [{"val_auc": 0.5}], "best": float("-inf")}
    save_checkpoint(tmp_path / "last", model, optimizer, state)

    restored, restored_optimizer = _trained_pair(1)
    meta = load_checkpoint(tmp_path / "last", restored, restored_optimizer)
    assert meta["epoch"] == 2 and meta["history"] == state["history"] and meta["best"] == float("-inf")
    for key, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], tensor), key
    saved, loaded = optimizer.state_dict(), restored_optimizer.state_dict()
    assert saved["state"].keys() == loaded["state"].keys()
    for pid, param_state in saved["state"].items():
        for name, value in param_state.items():
            assert torch.equal(torch.as_tensor(loaded["state"][pid][name]), torch.as_tensor(value)), (pid, name)
    for group, loaded_group in zip(saved["param_groups"], loaded["param_groups"]):
        assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()} == loaded_group
    # The resumed run takes exactly the step the original would have.
    _step(model, optimizer, 9)
    _step(restored, restored_optimizer, 9)
    for a, b in zip(model.parameters(), restored.parameters()):
        assert torch.equal(a, b)


def test_tampered_checkpoint_is_detected(tmp_path):
    model, optimizer = _trained_pair(0)
    _step(model, optimizer, 0)
    save_checkpoint(tmp_path / "last", model, optimizer, {"epoch": 1})
    weights = tmp_path / "last.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tmp_path / "last", *_trained_pair(1))


def test_missing_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="--resume"):
        load_checkpoint(tmp_path / "absent", *_trained_pair(0))


def test_checkpoint_for_another_model_is_refused(tmp_path):
    model, optimizer = _trained_pair(0)
    save_checkpoint(tmp_path / "last", model, optimizer, {"epoch": 0})
    other = create_model("resnet18", pretrained=False)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(tmp_path / "last", other, torch.optim.Adam(other.parameters()))


# --------------------------------------------------------------------------- config


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


BASE = 'name = "r"\nbackbone = "resnet18"\nmode = "frozen"\nepochs = 5\nlr = 3e-4\n'


def test_recipe_loads_and_overrides_apply(tmp_path):
    config = load_recipe(_recipe(tmp_path, BASE), overrides={"epochs": 2, "lr": None, "seed": 7})
    assert (config.name, config.backbone, config.mode) == ("r", "resnet18", "frozen")
    assert config.epochs == 2  # overridden
    assert config.lr == 3e-4  # None overrides are ignored
    assert config.seed == 7
    assert config.to_dict()["epochs"] == 2


def test_unknown_recipe_key_is_rejected_by_name(tmp_path):
    with pytest.raises(ValueError, match="learning_rate") as err:
        load_recipe(_recipe(tmp_path, BASE + "learning_rate = 0.1\n"))
    assert "recipe.toml" in str(err.value) and "'lr'" in str(err.value)  # names the file and the real keys


def test_unknown_override_key_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="epoch_count"):
        load_recipe(_recipe(tmp_path, BASE), overrides={"epoch_count": 3})


@pytest.mark.parametrize(
    "field, value, choices",
    [("mode", "partial", MODES), ("backbone", "resnet19", None), ("balance", "oversample", BALANCE),
     ("keep_epoch", "best", KEEP_EPOCH), ("lr_schedule", "onecycle", LR_SCHEDULE)],
)
def test_bad_choices_are_rejected_with_the_choices(field, value, choices):
    with pytest.raises(ValueError, match=f"unknown {field} {value!r}") as err:
        config_from_dict({"name": "r", "backbone": "resnet18", field: value})
    for choice in choices or list_models():
        assert choice in str(err.value)


@pytest.mark.parametrize("given", ["mean", "std"])
def test_mean_without_std_is_rejected(given):
    with pytest.raises(ValueError, match="both mean and std"):
        config_from_dict({"name": "r", "backbone": "resnet18", given: [0.5, 0.5, 0.5]})


@pytest.mark.parametrize("field, value, message", [("mixup", -0.2, "mixup is the Beta"),
                                                   ("input_size", 16, "input_size must be 32 px")])
def test_out_of_range_mixup_and_input_size_are_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict({"name": "r", "backbone": "resnet18", field: value})


def test_image_size_is_the_recipe_input_size_else_the_backbone_one():
    assert config_from_dict({"name": "r", "backbone": "resnet18"}).image_size() == get_spec("resnet18").input_size
    assert config_from_dict({"name": "r", "backbone": "resnet18", "input_size": 320}).image_size() == 320


def test_mean_and_std_become_tuples(tmp_path):
    config = load_recipe(_recipe(tmp_path, BASE + "mean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]\n"))
    assert config.mean == (0.5, 0.5, 0.5) and config.std == (0.25, 0.25, 0.25)


def test_invalid_toml_and_missing_recipe(tmp_path):
    with pytest.raises(ValueError, match="invalid TOML"):
        load_recipe(_recipe(tmp_path, "name = \n"))
    with pytest.raises(FileNotFoundError, match="train/recipes"):
        load_recipe(tmp_path / "absent.toml")


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_recipes_load(recipe):
    config = load_recipe(recipe)
    assert config.backbone in list_models()
