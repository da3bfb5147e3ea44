"""An export stopped at each of its steps leaves exactly one outcome, named per step.

`export_model` writes the weights to a hidden temporary file and renames it, then does the
same for the card. Here a second export (model B over model A) is stopped at each rename,
before or after it, the way a kill there would stop it (tests/test_safety.py kills real
processes at random moments; this test pins what each moment must give):

    before the weights' rename   A still loads, with A's weights
    after the weights' rename    refused: B's weights do not match A's card checksum
    before the card's rename     refused, the same way
    after the card's rename      B loads
"""

from __future__ import annotations

import os

import pytest
import torch

import covidtl.export
from covidtl.export import export_model, sha256_file
from covidtl.inference import ModelLoadError, ModelStore
from covidtl.models import create_model


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the export may catch it as an error."""


CARD = {"name": "m", "architecture": "squeezenet1_1", "input_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3}
STEPS = [  # (rename number, stop before or after it, outcome)
    (1, "before", "A"),
    (1, "after", "refused"),
    (2, "before", "refused"),
    (2, "after", "B"),
]


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("squeezenet1_1", pretrained=False)


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {"A": _model(0), "B": _model(1)}


@pytest.mark.parametrize("rename, when, outcome", STEPS, ids=[f"{r}-{w}-{o}" for r, w, o in STEPS])
def test_an_export_stopped_at_each_step_gives_its_one_outcome(models, rename, when, outcome, tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    export_model(models["A"], CARD | {"threshold": 0.25}, weights)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == rename and when == "before":
            raise Killed
        real_replace(src, dst)
        if len(calls) == rename and when == "after":
            raise Killed

    monkeypatch.setattr(covidtl.export.os, "replace", replace)
    with pytest.raises(Killed):
        export_model(models["B"], CARD | {"threshold": 0.75}, weights)
    monkeypatch.setattr(covidtl.export.os, "replace", real_replace)
    assert [os.path.basename(p) for p in calls][:rename] == ["m.safetensors", "m.json"][:rename]

    store = ModelStore(weights)
    assert store.names() == ["m"]
    if outcome == "refused":
        with pytest.raises(ModelLoadError, match="checksum"):
            store.get("m")
        return
    predictor = store.get("m")
    assert predictor.threshold == {"A": 0.25, "B": 0.75}[outcome]
    assert sha256_file(weights / "m.safetensors") == predictor.card["weights_sha256"]
    want = models[outcome].state_dict()
    assert all(torch.equal(v, want[k]) for k, v in predictor.model.state_dict().items())
