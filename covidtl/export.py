"""Exported weights: a safetensors `state_dict` plus a JSON model card, side by side.

    weights/<name>.safetensors   tensors only (fp32 or fp16), never a pickle
    weights/<name>.json          the card: architecture, classes, input size, mean/std,
                                 threshold, metrics, data provenance, training config

Writes are atomic (temporary file, then rename), so an interrupted export never leaves
a half-written file that a loader would pick up.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from covidtl.classes import CLASSES
from covidtl.models import create_model, get_spec

CARD_VERSION = 1
WEIGHTS_SUFFIX = ".safetensors"
CARD_SUFFIX = ".json"
REQUIRED_CARD_KEYS = ("name", "architecture", "classes", "input_size", "mean", "std", "threshold")


class CardError(ValueError):
    """A model card is missing, malformed, or does not match its weights."""


def _staging_file(path: Path) -> str:
    """A temporary file beside `path`, readable by all like a plainly written file
    (mkstemp's 0600 would otherwise survive the rename). A fixed 0644 rather than the
    umask: reading the umask means setting it, which races with other threads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and a rename."""
    tmp = _staging_file(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any, allow_nan: bool = False) -> None:
    """Cards are strict JSON (`allow_nan=False`); internal checkpoint state may hold inf."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=allow_nan) + "\n").encode())


def atomic_save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors `save_file`, made atomic."""
    tmp = _staging_file(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # save_file recreates the file with mode 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_model(model: nn.Module, card: dict[str, Any], weights_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Save `model`'s state_dict as `weights_dir/<card['name']>.safetensors` and the card.

    Floating-point tensors are stored as `dtype` (fp16 halves the file); integer buffers
    (BatchNorm's counters) keep theirs. Returns the safetensors path.
    """
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card and k != "classes"]
    if missing:
        raise CardError(f"card lacks {missing}; it needs {list(REQUIRED_CARD_KEYS)}")
    json.dumps(card, allow_nan=False)  # a card that cannot be written must fail before the weights are replaced
    name = card["name"]
    weights_path = Path(weights_dir) / f"{name}{WEIGHTS_SUFFIX}"
    state = {
        k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu())
        for k, v in unwrap(model).state_dict().items()
    }
    atomic_save_tensors(state, weights_path, metadata={"architecture": card["architecture"], "name": name})
    card = {
        **card,
        "card_version": CARD_VERSION,
        "classes": list(CLASSES),
        "weights_file": weights_path.name,
        "weights_dtype": str(dtype).removeprefix("torch."),
        "weights_sha256": sha256_file(weights_path),
    }
    atomic_write_json(weights_path.with_suffix(CARD_SUFFIX), card)
    return weights_path


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel or torch.compile wrappers."""
    from torch._dynamo.eval_frame import OptimizedModule

    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, OptimizedModule):
            model = model._orig_mod
        else:
            return model


def card_temperature(card: dict[str, Any]) -> float:
    """The card's calibration temperature T: shown and thresholded probabilities are
    softmax(logits / T). A card without one (exported before calibration existed) means
    T = 1: its threshold was chosen on plain softmax scores, so T = 1 keeps the threshold
    and the scores it applies to consistent. Raises CardError for a T that is not a
    finite number > 0."""
    value = card.get("temperature", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CardError(f"card {card.get('name')!r}: temperature must be a finite number > 0, not {value!r}; "
                        "re-export the model")
    return float(value)


def read_card(path: Path) -> dict[str, Any]:
    """Read and validate a card; raises CardError naming the file and the problem."""
    path = Path(path)
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise CardError(f"{path}: model card not found; every .safetensors needs a .json card beside it") from None
    except json.JSONDecodeError as err:
        raise CardError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(card, dict):
        raise CardError(f"{path}: a card is a JSON object")
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise CardError(f"{path}: card lacks {missing}")
    if tuple(card["classes"]) != CLASSES:
        raise CardError(f"{path}: card classes {card['classes']} do not match this version's {list(CLASSES)}")
    try:
        get_spec(card["architecture"])
    except ValueError as err:
        raise CardError(f"{path}: {err}") from None
    try:
        card_temperature(card)
    except CardError as err:
        raise CardError(f"{path}: {err}") from None
    return card


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load `<name>.safetensors` and its card into an fp32 model in eval mode.

    Only safetensors files are accepted: pickled `.pt`/`.pth`/`.bin` files are refused,
    because unpickling runs arbitrary code.
    """
    path = Path(path)
    if path.suffix == CARD_SUFFIX:
        path = path.with_suffix(WEIGHTS_SUFFIX)
    if path.suffix != WEIGHTS_SUFFIX:
        raise CardError(f"{path}: only {WEIGHTS_SUFFIX} weights are loaded (pickled checkpoints can run code); export with covidtl")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    card = read_card(path.with_suffix(CARD_SUFFIX))
    if "weights_sha256" in card and sha256_file(path) != card["weights_sha256"]:
        # e.g. an export interrupted between writing the weights and writing the card
        raise CardError(f"{path}: weights do not match the checksum in their card; re-export the model")
    try:
        state = load_file(path, device="cpu")
    except SafetensorError as err:
        raise CardError(f"{path}: not a valid safetensors file ({err}); re-export the model") from None
    model = create_model(card["architecture"], pretrained=False)
    expected = model.state_dict()
    if set(state) != set(expected):
        extra, lacking = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        raise CardError(
            f"{path}: weights do not fit architecture {card['architecture']!r} "
            f"(unexpected {extra[:3]}, missing {lacking[:3]}); is the card's architecture right?"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CardError(f"{path}: {key} has shape {tuple(tensor.shape)}, {card['architecture']} needs {tuple(expected[key].shape)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model.to(device).eval(), card


def card_task(card_path: Path) -> str:
    """A card's ``task``: "classification" unless it says otherwise (the lung model's says
    "lung_segmentation"). An unreadable card counts as a classifier's, so that loaders
    report it."""
    try:
        card = json.loads(Path(card_path).read_text())
    except (OSError, ValueError):
        return "classification"
    task = card.get("task", "classification") if isinstance(card, dict) else "classification"
    return task if isinstance(task, str) else "classification"


def list_exported(weights_dir: str | Path, task: str = "classification") -> list[Path]:
    """Safetensors files in `weights_dir` that have a card beside them for `task`, sorted
    by name (classifiers by default: the lung model is listed with task="lung_segmentation")."""
    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        return []
    return sorted(
        p for p in weights_dir.glob(f"*{WEIGHTS_SUFFIX}")
        if p.with_suffix(CARD_SUFFIX).is_file() and card_task(p.with_suffix(CARD_SUFFIX)) == task
    )


def select_exported(weights_dir: str | Path, names: Sequence[str] | None) -> list[Path]:
    """The classifiers of `weights_dir` (`list_exported`), only those in `names` unless None.
    Raises ValueError naming the names that are not there, and what is."""
    paths = list_exported(weights_dir)
    if not names:
        return paths
    unknown = sorted(set(names) - {p.stem for p in paths})
    if unknown:
        raise ValueError(f"no classifier {unknown} in {weights_dir}; it has {sorted(p.stem for p in paths)}")
    return [p for p in paths if p.stem in names]


def set_card_entry(weights_path: str | Path, key: str, value: Any) -> None:
    """Replace one entry of the card beside `weights_path` (atomically; the weights are untouched),
    e.g. an audit computed after export."""
    card_path = Path(weights_path).with_suffix(CARD_SUFFIX)
    card = json.loads(card_path.read_text())
    card[key] = value
    atomic_write_json(card_path, card)
