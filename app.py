"""COVID-TL in the browser: classify a chest X-ray, see where each model looked, compare
models and read their cards.

    python app.py                                   # http://127.0.0.1:7860
    python app.py --weights-dir weights --examples-dir my_examples --port 7861

Every flag has an environment variable (COVIDTL_HOST, COVIDTL_PORT, COVIDTL_SHARE,
COVIDTL_WEIGHTS, COVIDTL_EXAMPLES, COVIDTL_QUEUE_SIZE); on a Hugging Face Space
(SPACE_ID is set) the default host is 0.0.0.0. A research demonstration, not a medical device.

The answer to a film is computed by `covidtl.answer` (input check, lung fields, P(COVID-19),
decision, heatmap, held-out estimate, timings), the same value the API returns as JSON and
`covidtl-predict` prints; this file only renders it.

Public-facing limits: uploads up to MAX_UPLOAD_BYTES (refused by gradio before the
handler runs, and again by `load_upload`), images up to MAX_PIXELS checked from the
header before decoding, CONCURRENCY_LIMIT requests at a time per endpoint and at most
`queue_size` waiting (more are refused with "queue full" instead of piling up in
memory), every request through that queue (`api_open=False`), model names only from
the weights folder's cards, and no file served beyond gradio's own cache.

Layout of this file: renderers of an answer, pure handler functions (they call covidtl
and raise gr.Error for anything the user can fix), then `build_demo` with the gr.Blocks
layout, the module-level `demo` (built on first use), and the launch in `__main__`.
Importing or building the app loads no model: each network is loaded on first use, and
`main` warms the default one up once the server listens.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import inspect
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from covidtl.answer import LUNG_CHECK, Answer, ModelFolder, answer_film, compare_film, heatmap_overlay
from covidtl.cards import HeldOut, card_markdown, card_plots, lung_model_markdown
from covidtl.classes import POSITIVE_NAME
from covidtl.decision import (
    FLAGGED,
    NOT_FLAGGED,
    OUT_OF_SCOPE,
    is_baseline,
    is_default,
    rank_models,
    shown_digits,
    threshold_note,
)
from covidtl.explain import CAM_METHODS, DEFAULT_METHOD
from covidtl.export import list_exported
from covidtl.images import IMAGE_EXTENSIONS
from covidtl.inference import MAX_UPLOAD_BYTES, BadInputError, ModelLoadError, ModelStore, Predictor
from covidtl.lungs import LUNG_TASK, LungOutliner
from covidtl.scope import ScopeGate

HERE = Path(__file__).resolve().parent
DEFAULT_WEIGHTS_DIR = HERE / "weights"
UPLOAD_TYPES = sorted(IMAGE_EXTENSIONS | {".dcm", ".dicom"})
QUEUE_MAX_SIZE = 32  # requests waiting at once, all endpoints together; more are refused
CONCURRENCY_LIMIT = 2  # simultaneous requests per event; each one uses every CPU core
DISPLAY_MAX_SIDE = 1024  # the original is shown downscaled to this
COMPARE_OPACITY = 0.4

DISCLAIMER = (
    "**Research demonstration only.** COVID-TL is not a medical device and must not be used "
    "for diagnosis, triage or any clinical decision. Its models were trained on small public "
    "datasets with known shortcuts and have not been validated on any hospital's images."
)
TRAIN_COMMAND = "python -m train --recipe train/recipes/<name>.toml --data DIR"
API_EXAMPLE = """from gradio_client import Client, handle_file
client = Client("http://127.0.0.1:7860/")
answer, *_ = client.predict(handle_file("assets/examples/cohen-covid19-5782ae15.jpg"), api_name="/classify")"""
ABOUT = f"""
### What this is
COVID-TL fine-tunes ImageNet CNNs (ResNet, DenseNet, EfficientNet, MobileNet, SqueezeNet) to
tell COVID-19 positive from negative chest X-rays, and shows class activation maps
(Grad-CAM and related methods from the `grad-cam` package) of where a model looked.

### Read the results with care
- {DISCLAIMER}
- Published COVID-19 X-ray classifiers learned shortcuts: the hospital, the scanner, text
  markers, the patient's age (DeGrave et al., *Nature Machine Intelligence* 2021). In the
  COVIDx data most negatives are children's X-rays and every positive is an adult's. A heatmap
  on the shoulders, the edges or a text label instead of the lungs is a warning sign.
- Every answer is one of three: **{FLAGGED}** when P({POSITIVE_NAME}) reaches the model's
  operating threshold, **{NOT_FLAGGED}** below it, or **{OUT_OF_SCOPE}**. The threshold was
  chosen on validation films for high sensitivity, so it is low for most models: a film at
  P = 0.10 can be flagged. P is calibrated on validation films (temperature scaling). The scale
  shows P, the threshold (dashed) and the flagged region (shaded).
- Every image is checked first: the models learned from frontal chest X-rays only, so a
  colour photo, a near-uniform image, an image far from the training films or a film in
  which the lung model finds no two lung fields (a lateral view, another body part) is
  **{OUT_OF_SCOPE}**, with the reason, and gets no probability. The check can pass an unusual
  image or refuse an unusual film; it is a guard, not a guarantee.
- The heatmap covers the part of the image the model sees: the center crop of the film or, for
  a model trained on lung crops, the center crop of the box around the lungs (outlined), not the
  borders of the uploaded image.

### Use it from code
```python
{API_EXAMPLE}
answer["decision"], answer["p_covid"], answer["threshold"], answer["model"]  # "reason" when refused
answers, *_ = client.predict(handle_file("xray.png"), api_name="/compare")  # one answer per model
```
`answer` is the JSON of `covidtl.answer.Answer`; `covidtl-predict FILES... --json` prints the same.

### Get models
`{TRAIN_COMMAND}` exports `weights/<name>.safetensors` and its card `weights/<name>.json`.
Uploads are limited to {MAX_UPLOAD_BYTES // 2**20} MiB. Uploads are kept only as temporary
files, deleted after an hour; no run history is saved, and the app sends no telemetry.
"""

EXAMPLES_CREDITS = """
### Example images
The four examples are real chest X-rays, converted to 8-bit grey and resized to 512 px
(`assets/examples/CREDITS.md` gives each file's origin):
- `nih-no-finding-00002371_010.jpg`, `nih-pneumonia-00005638_000.jpg` (both labelled negative):
  NIH ChestX-ray14, courtesy of the NIH Clinical Center (https://nihcc.app.box.com/v/ChestXray-NIHCC).
  Wang X, Peng Y, Lu L, Lu Z, Bagheri M, Summers RM. ChestX-ray8: Hospital-scale Chest X-ray Database
  and Benchmarks on Weakly-Supervised Classification and Localization of Common Thorax Diseases.
  IEEE CVPR 2017, pp. 2097-2106.
- `cohen-covid19-5782ae15.jpg`, `cohen-covid19-ec083e35.jpg` (both COVID-19): COVID-19 Image
  Repository, Institute for Diagnostic and Interventional Radiology, Hannover Medical School,
  Hannover, Germany, DOI 10.6084/m9.figshare.12275009
  (https://github.com/ml-workgroup/covid-19-image-repository), licensed CC BY 3.0; via the
  COVID-19 image data collection, Cohen JP et al., arXiv:2006.11988, 2020.
"""

CSS = """
#disclaimer { border-left: 4px solid #d97706; padding: 0.4em 0.8em; background: rgba(217, 119, 6, 0.08); }
#no-models { border-left: 4px solid #dc2626; padding: 0.4em 0.8em; }
.pscale { color: var(--body-text-color); padding: 0.2em 0.4em; }
.ps-row { display: grid; grid-template-columns: 1.2em minmax(12em, 1fr) 1.2em 17.5em; align-items: center;
  column-gap: 0.5em; padding: 1.9em 0 1.7em 0; }
.ps-row.ps-named { grid-template-columns: minmax(10em, 15em) 1.2em minmax(12em, 1fr) 1.2em 17.5em; }
.ps-name { font-weight: 600; overflow-wrap: break-word; }
.ps-name small { display: block; font-weight: 400; opacity: 0.75; }
.ps-end { font-size: 0.8em; opacity: 0.7; text-align: center; }
.ps-track { position: relative; height: 1.7em; border-radius: 4px; background: rgba(100, 116, 139, 0.16); }
.ps-tick { position: absolute; top: 0; bottom: 0; border-left: 1px solid rgba(100, 116, 139, 0.35); }
.ps-region { position: absolute; top: 0; bottom: 0; display: flex; align-items: center; font-size: 0.8em;
  white-space: nowrap; overflow: hidden; }
.ps-flagged { right: 0; justify-content: flex-end; padding-right: 0.5em; border-radius: 0 4px 4px 0;
  background: repeating-linear-gradient(135deg, rgba(220, 38, 38, 0.30) 0 6px, rgba(220, 38, 38, 0.18) 6px 12px); }
.ps-unflagged { left: 0; padding-left: 0.5em; }
.ps-threshold { position: absolute; top: -0.35em; bottom: -0.35em; border-left: 2px dashed var(--body-text-color); }
.ps-p { position: absolute; top: -0.55em; bottom: -0.55em; border-left: 4px solid #1d4ed8; margin-left: -2px; }
.ps-threshold span, .ps-p span { position: absolute; left: 0; transform: translateX(-50%); white-space: nowrap;
  font-size: 0.85em; }
.ps-threshold span { top: 100%; margin-top: 0.2em; }
.ps-p span { bottom: 100%; margin-bottom: 0.15em; font-weight: 700; font-size: 0.95em; }
.ps-start span { transform: none; }
.ps-end-label span { transform: translateX(-100%); }
.ps-off { background: repeating-linear-gradient(135deg, rgba(100, 116, 139, 0.20) 0 6px, rgba(100, 116, 139, 0.08) 6px 12px);
  display: flex; align-items: center; justify-content: center; font-size: 0.85em; }
.ps-decision { border: 2px solid; border-radius: 6px; padding: 0.35em 0.6em; font-weight: 700; text-align: center; }
.ps-decision.ps-is-flagged { border-color: #dc2626; background: rgba(220, 38, 38, 0.12); }
.ps-decision.ps-is-not-flagged { border-color: #0284c7; background: rgba(2, 132, 199, 0.10); }
.ps-decision.ps-is-out { border-color: #d97706; background: rgba(217, 119, 6, 0.12); }
.ps-note { font-size: 0.85em; opacity: 0.85; margin-top: 0.2em; }
"""


# --------------------------------------------------------------------------- rendering an answer


def no_models_markdown(weights_dir: Path, skipped: dict[str, str]) -> str:
    """What to do when the weights folder offers no model."""
    lines = [
        f"### No models found in `{weights_dir}`",
        "The app needs exported models: a `<name>.safetensors` file and its `<name>.json` card. Make one with",
        f"\n    {TRAIN_COMMAND}\n",
        (
            "(recipes are in `train/recipes/`; `DIR` is a folder in the COVIDx layout), or point the app "
            "at a folder of exported models with `--weights-dir DIR` / `COVIDTL_WEIGHTS=DIR`."
        ),
    ]
    if skipped:
        lines.append("\nFiles that were found but cannot be used:")
        lines += [f"- `{name}`: {reason}" for name, reason in skipped.items()]
    return "\n".join(lines)


def _sentence(text: str) -> str:
    """`text` with a capital first letter and a closing full stop (refusal reasons vary)."""
    text = text.strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


_DECISION_CLASS = {FLAGGED: "ps-is-flagged", NOT_FLAGGED: "ps-is-not-flagged", OUT_OF_SCOPE: "ps-is-out"}


def _marker(kind: str, value: float, label: str) -> str:
    """A vertical mark at `value` (0..1, clipped) on a scale, labelled `label`; labels near an
    end are aligned inward so that they stay on the page."""
    at = 100.0 * min(max(value, 0.0), 1.0)
    room = len(label) / 2.5  # percent of the scale half the label takes, about
    side = " ps-start" if at < room else " ps-end-label" if at > 100 - room else ""
    return f'<div class="ps-{kind}{side}" style="left:{at:.2f}%"><span>{html.escape(label)}</span></div>'


def _scale_row(answer: Answer, named: bool, baseline: bool) -> str:
    """One model's answer as a row: [its name,] 0, the scale, 1, the decision."""
    t = answer.threshold
    cells = []
    if named:
        notes = ["(baseline)"] if baseline else []
        if "prediction" in answer.timings_ms:
            notes.append(f"forward pass {answer.timings_ms['prediction']:.0f} ms")
        small = f"<small>{html.escape(' · '.join(notes))}</small>" if notes else ""
        cells.append(f'<div class="ps-name">{html.escape(answer.model)}{small}</div>')
    if answer.p_covid is None:
        track = '<div class="ps-track ps-off">not classified: no P</div>'
        tooltip = f"{OUT_OF_SCOPE}: {answer.reason}"
    else:
        split = 100.0 * min(max(t, 0.0), 1.0)
        ticks = "".join(f'<div class="ps-tick" style="left:{q}%"></div>' for q in (25, 50, 75))
        flagged = f'<div class="ps-region ps-flagged" style="left:{split:.2f}%">{"flagged" if split < 88 else ""}</div>'
        unflagged = (
            f'<div class="ps-region ps-unflagged" style="width:{split:.2f}%">not flagged</div>' if split > 22 else ""
        )
        p, digits = answer.p_covid, shown_digits(answer.p_covid, t)
        track = (
            f'<div class="ps-track">{ticks}{unflagged}{flagged}'
            + _marker("threshold", t, f"threshold {t:.{digits}f}")
            + _marker("p", p, f"P({POSITIVE_NAME}) = {p:.{digits}f}")
            + "</div>"
        )
        tooltip = (
            f"P({POSITIVE_NAME}) = {p:.{digits}f} on a 0 to 1 scale; the model flags a film when P ≥ {t:.{digits}f} "
            f"(the shaded part). {threshold_note(answer.min_sensitivity, answer.calibrated)}"
        )
    cells += ['<div class="ps-end">0</div>', track, '<div class="ps-end">1</div>']
    cells.append(f'<div class="ps-decision {_DECISION_CLASS[answer.decision]}">{html.escape(answer.decision)}</div>')
    row = "ps-row ps-named" if named else "ps-row"
    return f'<div class="{row}" title="{html.escape(tooltip)}">{"".join(cells)}</div>'


def scale_html(answers: Sequence[Answer], baselines: Collection[str] | None = None) -> str:
    """P(COVID-19) of each answer on a 0 to 1 scale, with the model's threshold (dashed), the
    region above it shaded "flagged" and the decision beside it; one row per answer. With
    `baselines` (Compare: the names of the baseline models) each row is headed by its model's
    name, its forward pass time, and whether it is a baseline. Ends with what the threshold is."""
    named = baselines is not None
    rows = [_scale_row(answer, named, named and answer.model in baselines) for answer in answers]
    notes = sorted({threshold_note(a.min_sensitivity, a.calibrated) for a in answers if a.in_scope})
    legend = "The dashed line is the model's threshold; the shaded part of the scale is where it flags a film. "
    note = f'<div class="ps-note">{html.escape(legend + " ".join(notes))}</div>' if notes else ""
    return f'<div class="pscale">{"".join(rows)}{note}</div>'


def decision_markdown(answer: Answer) -> str:
    """The decision in words; for an out-of-scope film, why it was refused."""
    if answer.p_covid is None:
        return (
            f"**{OUT_OF_SCOPE}: no decision.** {_sentence(answer.reason)} The models were trained on frontal chest "
            "X-rays only, so their output on this image would mean nothing; it was not classified."
        )
    relation = "at or above" if answer.flagged else "below"
    digits = shown_digits(answer.p_covid, answer.threshold)
    return (
        f"**{answer.decision}** by `{answer.model}`: P({POSITIVE_NAME}) = {answer.p_covid:.{digits}f} is {relation} "
        f"the model's operating threshold {answer.threshold:.{digits}f}. A research model's output, not a diagnosis."
    )


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def held_out_markdown(answer: Answer) -> str:
    """The recipe's leave-one-source-out estimate as a table (empty for a refused film)."""
    if not answer.in_scope:
        return ""
    if not answer.held_out:
        return (
            f"`{answer.model}`'s recipe has no leave-one-source-out run (`python -m train.loso`): how it does at "
            "a hospital it never saw is unknown."
        )
    lines = [
        f"`{answer.model}`'s recipe retrained without one source at a time, then scored on every film of that "
        "source at that run's own threshold. Expect a new hospital to look like these rows, not like the test split.",
        "",
        "| held-out source | films (COVID-19) | AUC | sensitivity | specificity | other seeds |",
        "|---|---|---|---|---|---|",
    ]
    for row in answer.held_out:
        metric = "AUC" if row.other_seeds_metric == "auc" else row.other_seeds_metric
        others = f"{metric} {', '.join(f'{v:.3f}' for v in row.other_seeds)}" if row.other_seeds else "not run"
        lines.append(
            f"| {row.source} | {row.n} ({row.n_positive}) | {_figure(row.auc)} | {_figure(row.sensitivity)} | "
            f"{_figure(row.specificity)} | {others} |"
        )
    return "\n".join(lines)


def timing_markdown(answer: Answer) -> str:
    """Each step's time, e.g. "Input check 80 ms · lung outline 74 ms · prediction 93 ms · ..."."""
    steps = answer.timings_ms
    lungs = (
        "lung outline" if answer.lungs_in_view is not None
        else "lung check" if answer.refused_by == LUNG_CHECK or not answer.lung_crop
        else "lung crop"
    )  # fmt: skip
    names = {"input check": "Input check", "lungs": lungs, "preprocess": "preprocessing", "prediction": "prediction",
             "heatmap": answer.heatmap_method or "heatmap"}  # fmt: skip
    parts = [f"{names[key]} {steps[key]:.0f} ms" for key in names if key in steps]
    total = steps.get("total", 0.0)
    return " · ".join(parts + [f"total {total:.0f} ms including decoding the file, on {answer.device}."])


def agreement_markdown(answers: Sequence[Answer], left_out: Sequence[str] = ()) -> str:
    """Ensemble mean P(COVID-19) over `answers` (all in scope) and whether they agree at their
    own thresholds; `left_out` names the baselines kept out of it."""
    n = len(answers)
    flagged = [answer.model for answer in answers if answer.flagged]
    mean = float(np.mean([answer.p_covid for answer in answers]))
    if n == 1:
        agreement = "Only one model takes part, so there is nothing to compare it with."
    elif len(flagged) == n:
        agreement = f"All {n} models flag {POSITIVE_NAME} at their own thresholds."
    elif not flagged:
        agreement = f"None of the {n} models flags {POSITIVE_NAME} at its own threshold."
    else:
        agreement = (
            f"The models disagree: {len(flagged)} of {n} flag {POSITIVE_NAME} ({', '.join(flagged)}). "
            "Treat this image as uncertain."
        )
    baselines = f" Baselines left out: {', '.join(left_out)}." if left_out else ""
    return (
        f"**Ensemble (unweighted mean) P({POSITIVE_NAME}) = {mean:.3f}.** {agreement}{baselines} "
        "The mean has no validated threshold of its own; it is shown for orientation only."
    )


def model_choices(store: ModelStore) -> list[tuple[str, str]]:
    """(shown name, model name) for the dropdown, in `rank_models` order; the default and
    baselines are marked."""
    choices = []
    for name in rank_models(store.cards):
        card = store.cards[name]
        mark = " (default)" if is_default(card) else " (baseline)" if is_baseline(card) else ""
        choices.append((name + mark, name))
    return choices


def reblend(state: dict | None, opacity: float):
    """Redraw the last heatmap at a new opacity (with the lungs' outline, if any), without
    running the models again."""
    if not state:
        return None
    return heatmap_overlay(state["view"], state["heatmap"], state.get("lungs"), opacity)


# --------------------------------------------------------------------------- handlers


def _user_error(message: str, title: str = "Error") -> gr.Error:
    """An error the user can act on: shown in the page, not logged as a traceback.
    Escaped because the page renders it as HTML and it may quote an uploaded file's name."""
    return gr.Error(html.escape(message, quote=False), title=title, print_exception=False)


def _predictor(store: ModelStore, model_name: str | None) -> Predictor:
    if not store.names():
        raise _user_error(f"No models are installed in {store.weights_dir}. Train one with: {TRAIN_COMMAND}")
    if not model_name:  # the API may leave the model out: the default answers
        model_name = rank_models(store.cards)[0]
    if model_name not in store.cards:
        raise _user_error(f"Unknown model {model_name!r}; choose one of {', '.join(store.names())}.")
    try:
        return store.get(model_name)
    except ModelLoadError as err:
        raise _user_error(str(err)) from err


def _check_method(cam_method: str) -> None:
    if cam_method not in CAM_METHODS:
        raise _user_error(f"Unknown heatmap method {cam_method!r}; choose one of {', '.join(CAM_METHODS)}.")


def _check_opacity(opacity: float) -> None:
    if not isinstance(opacity, (int, float)) or not 0.0 <= opacity <= 1.0:  # NaN fails too
        raise _user_error(f"Heatmap opacity must be a number from 0 to 1, not {opacity!r}.")


@contextlib.contextmanager
def _readable_upload():
    """Turn a file the library cannot read into a message for the user."""
    try:
        yield
    except BadInputError as err:
        raise _user_error(str(err), title="Cannot read this file") from err


def _for_display(image: Image.Image) -> Image.Image:
    """`image` scaled down to DISPLAY_MAX_SIDE, without a full-size copy first (a 7000 x 7000
    upload would need another 150 MB for each request at once)."""
    scale = DISPLAY_MAX_SIDE / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def classify(
    store: ModelStore,
    gate: ScopeGate,
    file: str | None,
    model_name: str | None,
    cam_method: str,
    opacity: float,
    *,
    lungs: LungOutliner | None = None,
    held_out: dict[str, HeldOut] | None = None,
):
    """Classify one chest X-ray with one model and show where the model looked.

    Args:
        file: the uploaded chest X-ray: PNG, JPEG, BMP or TIFF (8 or 16 bit) or DICOM.
        model_name: a model from the weights folder (see the Models tab); empty: the default.
        cam_method: heatmap method, e.g. "Grad-CAM" or "Grad-CAM++".
        opacity: heatmap opacity over the image, from 0 to 1.

    Returns:
        The answer as JSON: "decision" ("Flagged for COVID-19 review", "Not flagged" or
        "Out of scope"), "p_covid" (calibrated P(COVID-19); null when out of scope),
        "threshold", "model", "reason" (why a film is out of scope), the held-out estimate
        and timings; the same answer on a 0 to 1 scale (HTML); the decision in words; the
        held-out estimate as a table; the image; the heatmap over the part of the image the
        model sees, with the lungs' outline when a lung model (`lungs`) finds them (none
        when out of scope); the timing.
    """
    predictor = _predictor(store, model_name)
    _check_method(cam_method)
    _check_opacity(opacity)
    recipe_held_out = (held_out or {}).get(predictor.name)
    with _readable_upload():
        answer = answer_film(file, predictor, gate, lungs=lungs, held_out=recipe_held_out, heatmap=cam_method)
    state = None
    if answer.heatmap is not None:
        state = {"view": answer.view, "heatmap": answer.heatmap, "lungs": answer.lungs_in_view}
    return (
        answer.to_json(),
        scale_html([answer]),
        decision_markdown(answer),
        held_out_markdown(answer),
        _for_display(answer.film),
        reblend(state, opacity),
        timing_markdown(answer),
        state,
    )


def compare(
    store: ModelStore,
    gate: ScopeGate,
    file: str | None,
    cam_method: str,
    *,
    lungs: LungOutliner | None = None,
    held_out: dict[str, HeldOut] | None = None,
):
    """Run every installed model on the same chest X-ray.

    Args:
        file: the uploaded chest X-ray: PNG, JPEG, BMP or TIFF (8 or 16 bit) or DICOM.
        cam_method: heatmap method, e.g. "Grad-CAM" or "Grad-CAM++".

    Returns:
        A list with each model's answer as JSON (as /classify gives it), the default model
        first, then by validation AUC; the same answers on one 0 to 1 scale per model (HTML),
        baselines marked; a gallery of each model's heatmap; the ensemble mean over the
        non-baseline models with whether they agree (or why the image was refused).
    """
    if not store.names():
        raise _user_error(f"No models are installed in {store.weights_dir}. Train one with: {TRAIN_COMMAND}")
    _check_method(cam_method)
    predictors = store.load_all()
    if not predictors:
        raise _user_error(f"None of the models in {store.weights_dir} could be loaded; see the Models tab.")
    order = [predictors[name] for name in rank_models(store.cards) if name in predictors]
    with _readable_upload():
        answers = compare_film(file, order, gate, lungs=lungs, held_out=held_out, heatmap=cam_method)
    baselines = {a.model for a in answers if is_baseline(store.cards[a.model])}
    shown = [a.model + (" (baseline)" if a.model in baselines else "") for a in answers]
    gallery = []
    for answer, name in zip(answers, shown):
        if answer.heatmap is None:
            continue
        blended = heatmap_overlay(answer.view, answer.heatmap, answer.lungs_in_view, COMPARE_OPACITY)
        digits = shown_digits(answer.p_covid, answer.threshold)
        caption = f"{name}: {answer.decision} (P = {answer.p_covid:.{digits}f}, threshold {answer.threshold:.{digits}f})"
        gallery.append((blended, caption))
    members = [a for a in answers if a.in_scope and a.model not in baselines]
    left_out = [a.model for a in answers if a.in_scope and a.model in baselines]
    if members:
        ensemble = agreement_markdown(members, left_out)
    elif not any(a.in_scope for a in answers):
        ensemble = decision_markdown(answers[0])
    else:
        ensemble = "Every model that classified this film is a baseline, so there is no ensemble to show."
    return [a.to_json() for a in answers], scale_html(answers, baselines), gallery, ensemble


class OutputFiles:
    """Output images written as new, uniquely named PNG files.

    Gradio writes an array or PIL output to a content-addressed cache path with a plain
    write, so two users who get the same image at the same moment can download a
    half-written file (the load test saw an empty one). File outputs are instead copied
    into the cache atomically. Our files are needed only until gradio has copied them, so
    files older than `max_age_s` are removed on each write. The folder is made on first use.
    """

    def __init__(self, max_age_s: float = 600.0) -> None:
        self.max_age_s = max_age_s
        self.folder: Path | None = None

    def _new(self, suffix: str) -> tuple[int, str]:
        """A new file (descriptor, path) ending in `suffix`, after sweeping old files."""
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="covidtl-outputs-"))
        cutoff = time.time() - self.max_age_s
        for old in self.folder.iterdir():
            with contextlib.suppress(FileNotFoundError):  # another request swept it first
                if old.stat().st_mtime < cutoff:
                    old.unlink()
        return tempfile.mkstemp(dir=self.folder, suffix=suffix)

    def png(self, image: Image.Image | np.ndarray) -> str:
        fd, path = self._new(".png")
        with os.fdopen(fd, "wb") as f:
            (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(f, format="PNG")
        return path

    def png_or_none(self, image: Image.Image | np.ndarray | None) -> str | None:
        return None if image is None else self.png(image)


def _bind(handler: Callable, folder: ModelFolder, to_files: Callable[[Any], Any]) -> Callable:
    """`handler` with the folder's store, input check, lung model (loaded on the first call:
    the page opens before it is) and held-out results filled in, and its images turned into
    files by `to_files`; name, docstring and the signature of its inputs kept for the API
    page. Tests call the handlers directly."""

    def bound(*args):
        out = handler(folder.store, folder.gate, *args, lungs=folder.lungs.get(), held_out=folder.held_out)
        return to_files(out)

    signature = inspect.signature(handler)
    inputs = [p for p in list(signature.parameters.values())[2:] if p.kind is p.POSITIONAL_OR_KEYWORD]
    bound.__name__, bound.__doc__ = handler.__name__, handler.__doc__
    bound.__signature__ = signature.replace(parameters=inputs)
    return bound


def example_files(*folders: Path | None) -> list[str]:
    """Image and DICOM files directly inside the given folders, sorted by name."""
    files = []
    for folder in folders:
        if folder is not None and Path(folder).is_dir():
            files += sorted(str(p) for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in UPLOAD_TYPES)
    return files


# --------------------------------------------------------------------------- layout


def build_demo(
    weights_dir: Path,
    examples_dir: Path | None = None,
    store: ModelStore | None = None,
    queue_size: int = QUEUE_MAX_SIZE,
    gate: ScopeGate | None = None,
    folder: ModelFolder | None = None,
) -> gr.Blocks:
    """The whole app for the models in `weights_dir` and the example images in
    `examples_dir` plus `assets/examples/`. Nothing is loaded here but cards and the input
    check's statistics: each network is loaded on first use, then reused. Pass `folder` (a
    `covidtl.answer.ModelFolder` of `weights_dir`) to share one, e.g. to warm it up; or
    `store` (a `ModelStore` of `weights_dir`) and `gate` (an input check other than
    `weights_dir/scope/`) for the folder to use. At most `queue_size` requests wait for a
    turn; the next ones are refused with "queue full"."""
    weights_dir = Path(weights_dir)
    if folder is None:
        folder = ModelFolder(weights_dir, store=store, gate=gate)
    elif store is not None or gate is not None:
        raise ValueError("pass either `folder` or `store`/`gate` to build_demo, not both")
    store = folder.store
    files = OutputFiles()
    names = rank_models(store.cards)
    examples = example_files(HERE / "assets" / "examples", examples_dir)

    # analytics_enabled=False: no telemetry and no version check, whatever the environment says.
    # delete_cache: uploads and outputs older than an hour are removed every half hour.
    with gr.Blocks(
        title="COVID-TL: chest X-ray research demo", analytics_enabled=False, delete_cache=(1800, 3600)
    ) as demo:
        gr.Markdown(
            "# COVID-TL\nTransfer-learning CNNs that flag COVID-19 on chest X-rays, with heatmaps of "
            "where each model looked."
        )
        gr.Markdown(DISCLAIMER, elem_id="disclaimer")
        if not names:
            gr.Markdown(no_models_markdown(weights_dir, store.skipped), elem_id="no-models")

        with gr.Tabs():
            with gr.Tab("Classify", id="classify"):
                with gr.Row():
                    with gr.Column(scale=1):
                        upload = gr.File(
                            label="Chest X-ray (PNG, JPEG, BMP, TIFF or DICOM)",
                            file_types=UPLOAD_TYPES,
                            type="filepath",
                            elem_id="upload",
                        )
                        model = gr.Dropdown(
                            model_choices(store), value=names[0] if names else None, label="Model", elem_id="model"
                        )
                        method = gr.Radio(list(CAM_METHODS), value=DEFAULT_METHOD, label="Heatmap method")
                        opacity = gr.Slider(0.0, 1.0, value=0.4, step=0.05, label="Heatmap opacity")
                        classify_button = gr.Button("Classify", variant="primary", elem_id="classify-button")
                        if examples:
                            gr.Examples([[path] for path in examples], inputs=[upload], label="Examples")
                    with gr.Column(scale=2):
                        scale = gr.HTML(elem_id="answer", min_height=40)
                        decision = gr.Markdown(label="decision", elem_id="decision")
                        with gr.Accordion("How far to trust this at a new hospital (held-out sources)", open=False):
                            held_out_table = gr.Markdown(elem_id="held-out")
                        with gr.Row():
                            original = gr.Image(label="Uploaded image", type="pil", interactive=False, format="png")
                            heatmap = gr.Image(
                                label="Heatmap (the part of the image the model sees)",
                                interactive=False,
                                format="png",
                                elem_id="heatmap",
                            )
                        timing = gr.Markdown(label="timing", elem_id="timing")
                        with gr.Accordion("The answer as the API returns it (JSON)", open=False):
                            answer_json = gr.JSON(label="answer", elem_id="answer-json")
                cam_state = gr.State()

            with gr.Tab("Compare", id="compare"):
                gr.Markdown(
                    "Runs every installed model on the same image, each at its own operating threshold "
                    "(the default model first, then by validation AUC). Baselines are marked and left out "
                    "of the ensemble. The time under each name is one forward pass on this machine."
                )
                with gr.Row():
                    with gr.Column(scale=1):
                        compare_upload = gr.File(
                            label="Chest X-ray (PNG, JPEG, BMP, TIFF or DICOM)",
                            file_types=UPLOAD_TYPES,
                            type="filepath",
                            elem_id="compare-upload",
                        )
                        compare_method = gr.Radio(list(CAM_METHODS), value=DEFAULT_METHOD, label="Heatmap method")
                        compare_button = gr.Button("Compare all models", variant="primary", elem_id="compare-button")
                    with gr.Column(scale=2):
                        compare_scale = gr.HTML(elem_id="compare-scale", min_height=40)
                        ensemble = gr.Markdown(label="ensemble", elem_id="ensemble")
                        gallery = gr.Gallery(
                            label="Heatmaps", columns=3, height="auto", elem_id="compare-gallery", format="png"
                        )
                        with gr.Accordion("The answers as the API returns them (JSON)", open=False):
                            compare_json = gr.JSON(label="answers", elem_id="compare-json")

            with gr.Tab("Models", id="models"):
                if not names:
                    gr.Markdown(no_models_markdown(weights_dir, store.skipped))
                for i, (shown, name) in enumerate(model_choices(store)):
                    card = store.cards[name]
                    with gr.Accordion(shown, open=i == 0):
                        gr.Markdown(card_markdown(card, folder.held_out.get(name)))
                        plots = card_plots(card, weights_dir)
                        if plots:
                            gr.Gallery(
                                plots,
                                label="Evaluation plots",
                                columns=3,
                                height=360,
                                object_fit="contain",
                                format="png",
                            )
                for path in list_exported(weights_dir, task=LUNG_TASK):  # not a classifier: listed apart
                    with gr.Accordion(f"Lung segmentation: {path.stem}", open=False):
                        gr.Markdown(lung_model_markdown(json.loads(path.with_suffix(".json").read_text())))
                if names and store.skipped:
                    gr.Markdown("**Not offered:**\n" + "\n".join(f"- `{f}`: {r}" for f, r in store.skipped.items()))

            with gr.Tab("About", id="about"):
                gr.Markdown(ABOUT + "\n" + folder.gate.summary() + "\n" + EXAMPLES_CREDITS)

        # One image for both tabs. `.change` also follows example clicks; the reverse uses
        # `.upload` (user uploads only), so the two never trigger each other in a loop.
        upload.change(lambda f: f, upload, compare_upload, api_visibility="private")
        compare_upload.upload(lambda f: f, compare_upload, upload, api_visibility="private")
        classify_button.click(
            _bind(classify, folder, lambda out: (*out[:4], files.png(out[4]), files.png_or_none(out[5]), *out[6:])),
            inputs=[upload, model, method, opacity],
            outputs=[answer_json, scale, decision, held_out_table, original, heatmap, timing, cam_state],
            api_name="classify",
        )
        opacity.release(
            lambda state, alpha: None if (image := reblend(state, alpha)) is None else files.png(image),
            inputs=[cam_state, opacity],
            outputs=heatmap,
            api_visibility="private",
        )
        compare_button.click(
            _bind(compare, folder, lambda out: (out[0], out[1], [(files.png(im), cap) for im, cap in out[2]], out[3])),
            inputs=[compare_upload, compare_method],
            outputs=[compare_json, compare_scale, gallery, ensemble],
            api_name="compare",
        )
    # api_open=False: gradio would otherwise (anywhere but on a Space) let a plain POST to
    # /gradio_api/run/<name> skip the queue, its size limit and its concurrency limit.
    demo.queue(max_size=queue_size, default_concurrency_limit=CONCURRENCY_LIMIT, api_open=False)
    return demo


# --------------------------------------------------------------------------- launch


def env_weights_dir() -> Path:
    """COVIDTL_WEIGHTS, else `weights/` next to this file."""
    return Path(os.environ.get("COVIDTL_WEIGHTS") or DEFAULT_WEIGHTS_DIR)


def env_examples_dir() -> Path | None:
    """COVIDTL_EXAMPLES, else None (only the shipped `assets/examples/`)."""
    return Path(os.environ["COVIDTL_EXAMPLES"]) if os.environ.get("COVIDTL_EXAMPLES") else None


def env_queue_size() -> int:
    """COVIDTL_QUEUE_SIZE, else QUEUE_MAX_SIZE."""
    return int(os.environ.get("COVIDTL_QUEUE_SIZE") or QUEUE_MAX_SIZE)


def default_host() -> str:
    """COVIDTL_HOST, else 0.0.0.0 on a Hugging Face Space (SPACE_ID set), else 127.0.0.1."""
    return os.environ.get("COVIDTL_HOST") or ("0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="COVID-TL Gradio app (research demonstration, not a medical device).")
    p.add_argument("--host", default=default_host(), help="interface to listen on (COVIDTL_HOST)")
    p.add_argument("--port", type=int, default=int(os.environ.get("COVIDTL_PORT", "7860")), help="port (COVIDTL_PORT)")
    p.add_argument(
        "--share",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("COVIDTL_SHARE", "") in ("1", "true", "True"),
        help="also open a public gradio.live link (COVIDTL_SHARE=1)",
    )
    p.add_argument("--weights-dir", type=Path, default=env_weights_dir(), help="exported models (COVIDTL_WEIGHTS)")
    p.add_argument(
        "--examples-dir", type=Path, default=env_examples_dir(), help="extra example images (COVIDTL_EXAMPLES)"
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=env_queue_size(),
        help=f"requests that may wait at once; more are refused (COVIDTL_QUEUE_SIZE, default {QUEUE_MAX_SIZE})",
    )
    return p.parse_args(argv)


def launch_options(host: str = "127.0.0.1", port: int | None = None, share: bool = False) -> dict[str, Any]:
    """Keyword arguments for `demo.launch`, shared by `__main__` and the tests."""
    return {
        "server_name": host,
        "server_port": port,
        "share": share,
        "max_file_size": MAX_UPLOAD_BYTES,
        "show_error": False,  # unexpected errors show a generic message, never a traceback
        "run_history": False,  # gradio 6 would keep every upload (patient images) in the browser
        "footer_links": ["api", "settings"],
        "css": CSS,
    }


def __getattr__(name: str) -> Any:
    """`app.demo`, the app as the environment configures it, for `gradio app.py` (reload mode) and
    anything else that looks for a module-level `demo`. It is built on first use, so importing
    this module builds nothing; building it loads no model either."""
    if name == "demo":
        global demo
        demo = build_demo(env_weights_dir(), env_examples_dir(), queue_size=env_queue_size())
        return demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    """`python app.py` and the `covidtl-app` command: parse the flags, start serving (the page
    answers at once), load and warm up the default model, the input check and the lung model
    (requests that come meanwhile wait for them), then serve until stopped."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("covidtl").setLevel(logging.INFO)
    args = parse_args(argv)
    folder = ModelFolder(args.weights_dir)
    served = build_demo(args.weights_dir, args.examples_dir, queue_size=args.queue_size, folder=folder)
    served.launch(**launch_options(args.host, args.port, args.share), prevent_thread_lock=True)
    folder.warm_up()
    served.block_thread()


if __name__ == "__main__":
    main()
