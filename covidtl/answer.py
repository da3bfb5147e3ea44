"""One film in, one answer out: what the app, its API and `covidtl-predict` all say.

`answer_film(file, predictor, gate, ...)` runs the whole pipeline for one model:

1. decode the upload (`covidtl.inference.load_upload`: image files and DICOM);
2. the input check (`covidtl.scope.ScopeGate.check`): colour, near-uniform, far from the
   training films;
3. the lung fields: a lung-crop model cuts the film to its lungs, and with a lung model
   (`lungs`) every other model's film is searched for them too. A film without two lung
   fields (`covidtl.scope.lung_field_reason`) is out of scope, like a refusal of step 2;
4. P(COVID-19), calibrated with the card's temperature, and the decision at the model's
   threshold (`covidtl.decision`);
5. on request, a heatmap of where the model looked (`covidtl.explain`).

`compare_film` answers for several models at once, decoding, checking and locating the
lungs once, and preprocessing once per geometry. Each answer is an `Answer`: a frozen value
that the app renders and that `Answer.to_json()` turns into plain JSON.

`ModelFolder` is a weights folder as these functions need it: its classifiers, input
check, lung model and held-out results, each network loaded on first use (thread-safe),
so that an app starts serving before any model is loaded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from covidtl.cards import HeldOut, read_held_out
from covidtl.decision import OUT_OF_SCOPE, decision_label, rank_models
from covidtl.explain import DEFAULT_METHOD, check_method, overlay
from covidtl.inference import LoadOnce, ModelLoadError, ModelStore, Prediction, Predictor, load_upload
from covidtl.lungs import LungCrop, LungOutliner, draw_outline, locate_lungs, lungs_in_view, segment
from covidtl.scope import ScopeGate, gate_for, lung_field_reason, small_rgb

log = logging.getLogger(__name__)

LUNG_CHECK = "lungs"  # `Answer.refused_by` of a film without two lung fields


@dataclass(frozen=True)
class HeldOutRow:
    """One source left out of training in the recipe's leave-one-source-out run: how the
    retrained model did on all of that source's films (None where a figure is undefined,
    e.g. the AUC of a source with one class), and the same figure (`other_seeds_metric`,
    "auc" or "specificity") for the recipe's runs with other seeds."""

    source: str
    n: int
    n_positive: int
    auc: float | None
    sensitivity: float | None
    specificity: float | None
    other_seeds: tuple[float, ...]
    other_seeds_metric: str


def _value(overall: Mapping[str, Any], key: str) -> float | None:
    value = (overall.get(key) or {}).get("value")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def held_out_rows(held: HeldOut) -> tuple[HeldOutRow, ...]:
    """`held` (`covidtl.cards.read_held_out`) as one row per held-out source."""
    rows = []
    for fold in held.run["folds"]:
        overall = fold["overall"]
        metric = "auc" if _value(overall, "auc") is not None else "specificity"
        others = [
            _value(other["overall"], metric)
            for run in held.other_seeds
            for other in run["folds"]
            if other["held_out"] == fold["held_out"]
        ]
        rows.append(
            HeldOutRow(
                source=str(fold["held_out"]),
                n=int(fold["n"]),
                n_positive=int(fold["n_positive"]),
                auc=_value(overall, "auc"),
                sensitivity=_value(overall, "sensitivity"),
                specificity=_value(overall, "specificity"),
                other_seeds=tuple(v for v in others if v is not None),
                other_seeds_metric=metric,
            )
        )
    return tuple(rows)


@dataclass(frozen=True)
class Answer:
    """Everything one model says about one film.

    `decision` is one of `covidtl.decision.OUTCOMES`. For an out-of-scope film `p_covid` is
    None and `reason` says why in words; `refused_by` names the check ("colour", "uniform",
    "distance" from the input check, or `LUNG_CHECK`). `lung_box` is the (left, top, right,
    bottom) box a lung-crop model classified, in pixels of the decoded film (`film_size`,
    width x height; large images are decoded reduced); None when it saw the whole film.
    `held_out` is the recipe's leave-one-source-out estimate (empty when not run).
    `timings_ms` has one entry per step that ran ("decode", "input check", "lungs",
    "preprocess", "prediction", "heatmap") and their "total".

    Only with a heatmap (`answer_film(..., heatmap=METHOD)`): `view`, the part of the film
    the model sees (uint8 [S, S, 3]); `heatmap`, float32 [S, S] in [0, 1] over it; and
    `lungs_in_view`, bool [S, S], where a lung model found the lungs (None without one).
    `film` is the decoded upload. These arrays are left out of `to_json()`.
    """

    model: str
    decision: str
    p_covid: float | None
    threshold: float
    threshold_rule: str
    min_sensitivity: float | None
    calibrated: bool
    in_scope: bool
    reason: str = ""
    refused_by: str = ""
    lung_crop: bool = False
    lung_box: tuple[int, int, int, int] | None = None
    film_size: tuple[int, int] = (0, 0)
    held_out: tuple[HeldOutRow, ...] = ()
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    device: str = "cpu"
    heatmap_method: str | None = None
    film: Image.Image | None = field(default=None, repr=False, compare=False)
    view: np.ndarray | None = field(default=None, repr=False, compare=False)
    heatmap: np.ndarray | None = field(default=None, repr=False, compare=False)
    lungs_in_view: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def flagged(self) -> bool:
        return self.p_covid is not None and self.p_covid >= self.threshold

    def to_json(self) -> dict[str, Any]:
        """The answer as plain JSON types (no arrays, no images): what the API returns and
        `covidtl-predict --json` prints. `reason` is None for a film in scope."""
        return {
            "model": self.model,
            "decision": self.decision,
            "p_covid": self.p_covid,
            "threshold": self.threshold,
            "threshold_rule": self.threshold_rule,
            "min_sensitivity": self.min_sensitivity,
            "calibrated": self.calibrated,
            "in_scope": self.in_scope,
            "reason": self.reason or None,
            "refused_by": self.refused_by or None,
            "lung_crop": self.lung_crop,
            "lung_box": list(self.lung_box) if self.lung_box is not None else None,
            "film_size": list(self.film_size),
            "held_out": [
                {**vars(row), "other_seeds": list(row.other_seeds)} for row in self.held_out
            ],
            "heatmap_method": self.heatmap_method,
            "timings_ms": {step: round(ms, 1) for step, ms in self.timings_ms.items()},
            "device": self.device,
        }


def heatmap_overlay(view: np.ndarray, heatmap: np.ndarray, lungs: np.ndarray | None, opacity: float) -> np.ndarray:
    """uint8 [S, S, 3]: `heatmap` ([S, S] in [0, 1]) blended over `view` (uint8 [S, S, 3]) at
    `opacity`, with the outline of `lungs` (bool [S, S]) when given: an answer's heatmap
    as the app and `covidtl-predict --explain-dir` show it."""
    blended = overlay(view, heatmap, opacity)
    return blended if lungs is None else draw_outline(blended, lungs)


# --------------------------------------------------------------------------- the pipeline


def _ms_since(start: float) -> float:
    return 1000.0 * (time.perf_counter() - start)


def _base(predictor: Predictor, film: Image.Image, held_out: HeldOut | None) -> dict[str, Any]:
    """The fields of an answer that come from the model's card and the film alone."""
    card = predictor.card
    min_sensitivity = (card.get("config") or {}).get("min_sensitivity")
    return {
        "model": predictor.name,
        "threshold": predictor.threshold,
        "threshold_rule": str(card.get("threshold_rule", "")),
        "min_sensitivity": float(min_sensitivity) if isinstance(min_sensitivity, (int, float)) else None,
        "calibrated": "temperature" in card,
        "lung_crop": predictor.lungs is not None,
        "film_size": film.size,
        "held_out": held_out_rows(held_out) if held_out is not None else (),
        "device": str(predictor.device),
        "film": film,
    }


def _refused(base: dict[str, Any], reason: str, check: str, timings: dict[str, float]) -> Answer:
    return Answer(
        decision=OUT_OF_SCOPE, p_covid=None, in_scope=False, reason=reason, refused_by=check, timings_ms=timings, **base
    )


def answer_film(
    file: str | Path | None,
    predictor: Predictor,
    gate: ScopeGate,
    *,
    lungs: LungOutliner | None = None,
    held_out: HeldOut | None = None,
    heatmap: str | None = None,
) -> Answer:
    """The answer of `predictor` for the uploaded film `file` (see the module docstring).

    Args:
        file: an image file (PNG, JPEG, BMP, TIFF, 8 or 16 bit) or a DICOM file.
        gate: the input check (`covidtl.scope.gate_for`).
        lungs: the lung model; with it every film is checked for two lung fields and the
            heatmap carries the lungs' outline. A lung-crop model checks its own crop.
        held_out: the recipe's leave-one-source-out result (`covidtl.cards.read_held_out`).
        heatmap: a `covidtl.explain.CAM_METHODS` name, or None for no heatmap (faster).

    Raises:
        BadInputError: the file cannot be read (the message is for the user).
        ValueError: an unknown heatmap method.
    """
    held = {predictor.name: held_out} if held_out is not None else None
    return compare_film(file, [predictor], gate, lungs=lungs, held_out=held, heatmap=heatmap)[0]


def compare_film(
    file: str | Path | None,
    predictors: Sequence[Predictor],
    gate: ScopeGate,
    *,
    lungs: LungOutliner | None = None,
    held_out: Mapping[str, HeldOut] | None = None,
    heatmap: str | None = None,
) -> list[Answer]:
    """The answers of every model in `predictors` for the film `file`, in that order, as
    `answer_film` gives them, with the film decoded and checked once, its lungs located
    once (one pass of `lungs`, which also gives the crop of a lung-crop model trained with
    it: `Predictor.uses_lung_model`), and one input tensor (and lung crop) per geometry.
    `held_out`: model name -> leave-one-source-out result. Each answer's timings count the
    shared steps and its own."""
    if not predictors:
        raise ValueError("compare_film needs at least one model")
    if heatmap is not None:
        check_method(heatmap)
    start = time.perf_counter()
    film = load_upload(file, min_side=max(p.resize_side for p in predictors))
    shared = {"decode": _ms_since(start)}
    step = time.perf_counter()
    scope = gate.check(film)
    shared["input check"] = _ms_since(step)
    held_out = held_out or {}
    bases = [_base(p, film, held_out.get(p.name)) for p in predictors]
    if not scope.in_scope:
        return [_refused(base, scope.reason, scope.check, {**shared, "total": _ms_since(start)}) for base in bases]

    # The whole film's lungs, found once by the lung model `lungs`: for the models that do not
    # crop, and cropped for those trained with the same lung model (no second pass).
    located: LungCrop | None = None
    prepared: dict[tuple, tuple[LungCrop | None, torch.Tensor | None]] = {}  # geometry -> (crop, tensor)
    answers = []
    for predictor, base in zip(predictors, bases):
        timings = dict(shared)
        step = time.perf_counter()
        shares_lungs = lungs is not None and (predictor.lungs is None or predictor.uses_lung_model(lungs.sha256))
        if shares_lungs and located is None:
            with lungs.lock:  # the lung model is shared between requests
                located = locate_lungs(film, lungs.model)
        if predictor.geometry not in prepared:  # None for a whole-film model
            prepared[predictor.geometry] = (predictor.lung_crop(film, located if shares_lungs else None), None)
        crop, x = prepared[predictor.geometry]
        found = crop if crop is not None else located
        reason = lung_field_reason(found) if found is not None else None
        if found is not None:
            timings["lungs"] = _ms_since(step)
        if reason is not None:
            answers.append(_refused(base, reason, LUNG_CHECK, {**timings, "total": sum(timings.values())}))
            continue
        if x is None:
            step = time.perf_counter()
            x = predictor.preprocess(film, crop)
            prepared[predictor.geometry] = (crop, x)
            timings["preprocess"] = _ms_since(step)
        prediction: Prediction = predictor.predict(x)
        timings["prediction"] = prediction.latency_ms  # the forward pass, comparable across models
        extras: dict[str, Any] = {}
        if heatmap is not None:
            step = time.perf_counter()
            extras["heatmap"] = predictor.explain(x, heatmap)
            extras["view"] = predictor.view(film, crop)
            if found is not None and lungs is not None:
                extras["lungs_in_view"] = lungs_in_view(found, predictor.input_size, predictor.crop_fraction)
            timings["heatmap"] = _ms_since(step)
        timings["total"] = _ms_since(start) if len(predictors) == 1 else sum(timings.values())
        answers.append(
            Answer(
                decision=decision_label(prediction),
                p_covid=float(prediction.p_positive),
                in_scope=True,
                lung_box=crop.box if crop is not None else None,
                heatmap_method=heatmap,
                timings_ms=timings,
                **base,
                **extras,
            )
        )
    return answers


# --------------------------------------------------------------------------- a folder of models


class ModelFolder:
    """A weights folder as `answer_film` needs it.

    `store`: the classifiers (`ModelStore`: cards read now, weights on first use); `gate`:
    the input check of `weights_dir/scope/` (`covidtl.scope.gate_for`; its fitted statistics
    are read now, its encoder network on first use); `lungs`: the lung model beside the
    classifiers (`LungOutliner.from_folder`), loaded on first `lungs.get()`, None when
    there is none; `held_out`: model name -> its recipe's leave-one-source-out result.
    Pass `store` or `gate` to use ones made elsewhere (tests do).
    """

    def __init__(self, weights_dir: str | Path, store: ModelStore | None = None, gate: ScopeGate | None = None) -> None:
        self.weights_dir = Path(weights_dir)
        self.store = store if store is not None else ModelStore(self.weights_dir)
        self.gate = gate if gate is not None else gate_for(self.weights_dir)
        self.lungs: LoadOnce[LungOutliner | None] = LoadOnce(lambda: LungOutliner.from_folder(self.weights_dir))
        self.held_out = {
            name: result for name, card in self.store.cards.items() if (result := read_held_out(self.weights_dir, card))
        }

    def default_name(self) -> str:
        """The model that answers when none is named: the first of `rank_models`."""
        if not self.store.names():
            raise ModelLoadError(f"no models in {self.weights_dir}; train one with `python -m train --recipe ...`")
        return rank_models(self.store.cards)[0]

    def predictor(self, name: str | None = None) -> Predictor:
        """Model `name` (None: the default), loaded on first use. Raises ValueError for a
        name that is not in the folder, ModelLoadError for one that cannot be loaded."""
        return self.store.get(name or self.default_name())

    def answer(self, file: str | Path, name: str | None = None, heatmap: str | None = None) -> Answer:
        """`answer_film` of model `name` (None: the default), with the folder's input check,
        lung model and held-out result."""
        predictor = self.predictor(name)
        return answer_film(
            file, predictor, self.gate, lungs=self.lungs.get(), held_out=self.held_out.get(predictor.name),
            heatmap=heatmap,
        )  # fmt: skip

    def warm_up(self, name: str | None = None) -> None:
        """Load model `name` (None: the default), the lung model and the input check's
        encoder, and run each once on a blank film, so that the first request finds them
        ready (a request that comes meanwhile waits for the same loads). A model that fails
        to load is logged here and reported to the request that asks for it."""
        start = time.perf_counter()
        try:
            predictor = self.predictor(name)
        except (ModelLoadError, ValueError) as err:
            log.warning("warm-up: %s", err)
            return
        side = predictor.resize_side
        film = Image.new("L", (side, side), 0)
        x = predictor.preprocess(film)
        predictor.predict(x)
        predictor.explain(x, DEFAULT_METHOD)
        if self.gate.fitted:
            self.gate.distances([small_rgb(film)])
        lungs = self.lungs.get()
        if lungs is not None:
            with lungs.lock:
                segment(lungs.model, film)
        log.info("warm-up: %s, the input check and the lung model ready in %.1f s", predictor.name,
                 time.perf_counter() - start)  # fmt: skip
