"""Tests for covidtl.export: safetensors + JSON card round trips, card checks, atomic writes.

Round trips are parametrized over ``list_models()`` with ``pretrained=False`` models and
64 px inputs. Pickled checkpoints are refused without ever being unpickled.
"""

import json
import os
import pickle
from pathlib import Path

import pytest
import safetensors
import torch

from covidtl import export
from covidtl.classes import CLASSES, POSITIVE
from covidtl.export import CardError, export_model, list_exported, load_model, read_card
from covidtl.models import create_model, get_spec, list_models

SIZE = 64


def _card(name: str, architecture: str) -> dict:
    spec = get_spec(architecture)
    return {
        "name": name,
        "architecture": architecture,
        "input_size": SIZE,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "threshold": 0.5,
        "metrics": {"auc": 0.9},
    }


def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))


def _trained_like(name: str) -> torch.nn.Module:
    """A random-init model whose BatchNorm statistics have moved off their defaults, so a
    round trip that dropped buffers would show; returned in eval mode."""
    model = create_model(name, pretrained=False)
    model.train()
    with torch.no_grad():
        model(_images(4))
    return model.eval()


def _squeezenet_export(weights_dir: Path, name: str = "sq") -> tuple[torch.nn.Module, Path]:
    model = create_model("squeezenet1_1", pretrained=False).eval()
    return model, export_model(model, _card(name, "squeezenet1_1"), weights_dir)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", list_models())
def test_fp32_round_trip_is_exact(name, tmp_path, seeded):
    model = _trained_like(name)
    path = export_model(model, _card(f"{name}-test", name), tmp_path)
    assert path == tmp_path / f"{name}-test.safetensors"
    loaded, card = load_model(path)
    assert not loaded.training
    assert card["architecture"] == name and card["classes"] == list(CLASSES)
    assert card["weights_dtype"] == "float32" and card["weights_file"] == path.name
    assert card["weights_sha256"] == export.sha256_file(path)
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    images = _images()
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


@pytest.mark.parametrize("name", list_models())
def test_fp16_export_keeps_probabilities(name, tmp_path, seeded):
    model = _trained_like(name)
    path = export_model(model, _card(f"{name}-half", name), tmp_path, dtype=torch.float16)
    stored = safetensors.torch.load_file(path)
    assert all(t.dtype in (torch.float16, torch.int64) for t in stored.values())
    loaded, card = load_model(path)
    assert card["weights_dtype"] == "float16"
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    images = _images()
    with torch.no_grad():
        p32 = torch.softmax(model(images), dim=1)[:, POSITIVE]
        p16 = torch.softmax(loaded(images), dim=1)[:, POSITIVE]
    assert torch.allclose(p16, p32, atol=1e-3, rtol=0), (p16 - p32).abs().max()


def test_load_model_accepts_the_card_path(tmp_path):
    _, path = _squeezenet_export(tmp_path)
    _, card = load_model(path.with_suffix(".json"))
    assert card["name"] == "sq"


def test_card_is_strict_json_with_the_given_fields(tmp_path):
    _, path = _squeezenet_export(tmp_path)
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["metrics"] == {"auc": 0.9} and card["threshold"] == 0.5
    assert card == read_card(path.with_suffix(".json"))
    with pytest.raises(ValueError):  # NaN metrics would make a card that strict parsers reject
        export_model(create_model("squeezenet1_1"), {**_card("nan", "squeezenet1_1"), "threshold": float("nan")}, tmp_path)


def test_export_needs_the_card_fields(tmp_path):
    card = _card("x", "squeezenet1_1")
    del card["threshold"]
    with pytest.raises(CardError, match="threshold"):
        export_model(create_model("squeezenet1_1"), card, tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- card validation


def _edit_card(path, **changes) -> None:
    card_path = path.with_suffix(".json")
    card_path.write_text(json.dumps({**json.loads(card_path.read_text()), **changes}))


def test_wrong_classes_are_refused(tmp_path):
    _, path = _squeezenet_export(tmp_path)
    _edit_card(path, classes=["positive", "negative"])
    with pytest.raises(CardError, match="classes"):
        load_model(path)


def test_unknown_architecture_is_refused(tmp_path):
    _, path = _squeezenet_export(tmp_path)
    _edit_card(path, architecture="resnet19")
    with pytest.raises(CardError, match="unknown backbone 'resnet19'"):
        load_model(path)


def test_weights_not_matching_the_architecture_are_refused(tmp_path):
    _, path = _squeezenet_export(tmp_path)
    _edit_card(path, architecture="resnet18")
    with pytest.raises(CardError, match="do not fit architecture 'resnet18'"):
        load_model(path)


def _forget_checksum(path):
    card_path = path.with_suffix(".json")
    card = json.loads(card_path.read_text())
    del card["weights_sha256"]
    card_path.write_text(json.dumps(card))


def test_same_keys_wrong_shapes_are_refused(tmp_path):
    _, path = _squeezenet_export(tmp_path)
    state = safetensors.torch.load_file(path)
    state["classifier.1.weight"] = torch.zeros(3, 512, 1, 1)
    safetensors.torch.save_file(state, path)
    _forget_checksum(path)  # reach the shape check behind the checksum check
    with pytest.raises(CardError, match="classifier.1.weight"):
        load_model(path)


@pytest.mark.parametrize("drop", ["card", "field"])
def test_missing_card_or_field_is_refused(tmp_path, drop):
    _, path = _squeezenet_export(tmp_path)
    card_path = path.with_suffix(".json")
    if drop == "card":
        card_path.unlink()
        match = "model card not found"
    else:
        card = json.loads(card_path.read_text())
        del card["mean"]
        card_path.write_text(json.dumps(card))
        match = "lacks"
    with pytest.raises(CardError, match=match):
        load_model(path)


def test_card_that_is_not_json_is_refused(tmp_path):
    _, path = _squeezenet_export(tmp_path)
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(CardError, match="not valid JSON"):
        read_card(path.with_suffix(".json"))


class _Booby:
    """Unpickling this creates `marker`: proof that a loader ran pickle code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_pickles_are_refused_and_never_unpickled(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps(_Booby(marker)))
    path.with_suffix(".json").write_text(json.dumps({**_card("model", "squeezenet1_1"), "classes": list(CLASSES)}))
    with pytest.raises(CardError, match="only .safetensors"):
        load_model(path)
    assert not marker.exists()


def test_pickle_named_safetensors_is_not_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    _, path = _squeezenet_export(tmp_path)
    path.write_bytes(pickle.dumps(_Booby(marker)))
    # Today safetensors' own error surfaces; a CardError naming the file would be kinder.
    with pytest.raises((CardError, safetensors.SafetensorError)):
        load_model(path)
    assert not marker.exists()


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_model(tmp_path / "absent.safetensors")


# --------------------------------------------------------------------------- listing


def test_list_exported_ignores_files_without_cards_and_non_safetensors(tmp_path):
    _, good = _squeezenet_export(tmp_path, "good")
    _, orphan = _squeezenet_export(tmp_path, "orphan")
    orphan.with_suffix(".json").unlink()
    (tmp_path / "legacy.pt").write_bytes(b"not loaded")
    (tmp_path / "legacy.json").write_text("{}")
    (tmp_path / "card_only.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("hello")
    assert list_exported(tmp_path) == [good]
    assert list_exported(tmp_path / "absent") == []


def test_list_exported_is_sorted(tmp_path):
    paths = [_squeezenet_export(tmp_path, name)[1] for name in ("b", "a", "c")]
    assert list_exported(tmp_path) == sorted(paths)


# --------------------------------------------------------------------------- atomic writes


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_interrupted_tensor_write_leaves_no_file(tmp_path, monkeypatch):
    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "save_file", half_written)
    with pytest.raises(KeyboardInterrupt):
        _squeezenet_export(tmp_path)
    assert not (tmp_path / "sq.safetensors").exists()
    assert not (tmp_path / "sq.json").exists()
    assert _leftovers(tmp_path) == []
    assert list_exported(tmp_path) == []


@pytest.mark.parametrize("failing", [".safetensors", ".json"])
def test_interrupted_rename_keeps_the_previous_export(tmp_path, monkeypatch, failing):
    _, path = _squeezenet_export(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(failing):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(export.os, "replace", replace)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        other = create_model("squeezenet1_1", pretrained=False)
    with pytest.raises(OSError, match="disk full"):
        export_model(other, _card("sq", "squeezenet1_1"), tmp_path)
    assert _leftovers(tmp_path) == []
    if failing == ".safetensors":
        # Nothing replaced: the old pair is intact and still loads.
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
        load_model(path)
    else:
        # New weights beside the old card: the card's checksum tells them apart.
        assert read_card(path.with_suffix(".json"))["weights_sha256"] != export.sha256_file(path)


def test_weights_not_matching_the_card_checksum_are_refused(tmp_path):
    _, path = _squeezenet_export(tmp_path)
    state = safetensors.torch.load_file(path)
    state["classifier.1.bias"] = state["classifier.1.bias"] + 1
    safetensors.torch.save_file(state, path)
    with pytest.raises(CardError):
        load_model(path)


def test_atomic_write_bytes_failure_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "card.json"
    monkeypatch.setattr(export.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        export.atomic_write_json(target, {"a": 1})
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_exported_files_are_readable_by_others(tmp_path):
    _, path = _squeezenet_export(tmp_path)
    for written in (path, path.with_suffix(".json")):
        assert written.stat().st_mode & 0o777 == 0o644
