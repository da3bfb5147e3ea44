"""Resumable training checkpoints without pickles.

A checkpoint is two files written atomically: `<stem>.safetensors` holds every tensor
(model weights, optimizer moments) and `<stem>.json` everything else (epoch, history,
scheduler, optimizer hyper-parameters) plus the tensor file's SHA-256, written last, so
a run killed between the two writes is detected instead of resumed from a mix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from covidtl.export import atomic_save_tensors, atomic_write_json, sha256_file, unwrap


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the run."""


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{param_id}.{key}"] = value.detach().cpu()
            else:
                scalars[f"{param_id}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(
    stem: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> None:
    """Write `stem.safetensors` + `stem.json`. `state` must be JSON-serializable
    (epoch, history, scheduler.state_dict(), scaler.state_dict(), best score...)."""
    tensors = {f"model.{k}": v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    optim_tensors, optim_meta = _optimizer_tensors(optimizer)
    tensors.update(optim_tensors)
    weights = stem.with_suffix(".safetensors")
    atomic_save_tensors(tensors, weights)
    atomic_write_json(stem.with_suffix(".json"), {**state, "optimizer": optim_meta, "tensors_sha256": sha256_file(weights)}, allow_nan=True)


def load_checkpoint(stem: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer in place; return the JSON state."""
    weights, meta_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not (weights.is_file() and meta_path.is_file()):
        raise CheckpointError(f"no checkpoint at {stem}.{{safetensors,json}}; run without --resume to start fresh")
    meta = json.loads(meta_path.read_text())
    if sha256_file(weights) != meta.get("tensors_sha256"):
        raise CheckpointError(f"{weights} does not match {meta_path} (interrupted write?); delete both to start fresh")
    tensors = load_file(weights, device="cpu")
    model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    try:
        unwrap(model).load_state_dict(model_state)
    except RuntimeError as err:
        raise CheckpointError(f"{weights} does not fit this model ({err}); was it made with another recipe?") from None
    optim_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, param_id, name = key.split(".", 2)
            optim_state.setdefault(int(param_id), {})[name] = value
    for key, value in meta["optimizer"]["scalars"].items():
        param_id, name = key.split(".", 1)
        optim_state.setdefault(int(param_id), {})[name] = value
    optimizer.load_state_dict({"state": optim_state, "param_groups": meta["optimizer"]["param_groups"]})
    return meta
