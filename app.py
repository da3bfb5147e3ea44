"""COVID-TL in the browser: classify a chest X-ray, see where each model looked, compare
models and read their cards.

    python app.py                                   # http://127.0.0.1:7860
    python app.py --weights-dir weights --examples-dir my_examples --port 7861

Every flag has an environment variable (COVIDTL_HOST, COVIDTL_PORT, COVIDTL_SHARE,
COVIDTL_WEIGHTS, COVIDTL_EXAMPLES, COVIDTL_QUEUE_SIZE); on a Hugging Face Space
(SPACE_ID is set) the default host is 0.0.0.0. A research demonstration, not a medical device.

Public-facing limits: uploads up to MAX_UPLOAD_BYTES (refused by gradio before the
handler runs, and again by `load_upload`), images up to MAX_PIXELS checked from the
header before decoding, CONCURRENCY_LIMIT requests at a time per endpoint and at most
`queue_size` waiting (more are refused with "queue full" instead of piling up in
memory), every request through that queue (`api_open=False`), model names only from
the weights folder's cards, and no file served beyond gradio's own cache.

Layout of this file: pure handler functions (they call covidtl and raise gr.Error for
anything the user can fix), then `build_demo` with the gr.Blocks layout, the
module-level `demo` (built on first use: importing app.py loads no model), and the launch
in `__main__`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import html
import inspect
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from covidtl.cards import HeldOut, card_markdown, card_plots, held_out_summary, lung_model_markdown, read_held_out
from covidtl.classes import CLASSES, POSITIVE_NAME
from covidtl.decision import (
    OUT_OF_SCOPE,
    decision_label,
    decision_markdown,
    is_baseline,
    is_default,
    label_data,
    rank_models,
)
from covidtl.explain import CAM_METHODS, DEFAULT_METHOD, overlay
from covidtl.export import list_exported
from covidtl.images import IMAGE_EXTENSIONS
from covidtl.inference import (
    MAX_UPLOAD_BYTES,
    BadInputError,
    ModelLoadError,
    ModelStore,
    Prediction,
    Predictor,
    load_upload,
)
from covidtl.lungs import LUNG_TASK, LungOutliner, draw_outline, lungs_in_view
from covidtl.scope import ScopeGate, ScopeResult, gate_for

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
- The label is the model's decision at its own operating threshold, chosen on validation
  data (see the Models tab for how, and for per-source results): {POSITIVE_NAME} when
  P({POSITIVE_NAME}) reaches the threshold, else Negative, whichever class is larger.
- Every image is checked first: the models learned from frontal chest X-rays only, so a
  colour photo, a near-uniform image or an image far from the training films is labelled
  **{OUT_OF_SCOPE}**, with the reason, and gets no decision and no confidences. The check
  can pass an unusual image or refuse an unusual film; it is a guard, not a guarantee.
- The heatmap covers the part of the image the model sees: the center crop of the film or, for
  a model trained on lung crops, the center crop of the box around the lungs (outlined), not the
  borders of the uploaded image.

### Use it from code
```python
from gradio_client import Client, handle_file
client = Client("http://127.0.0.1:7860/")
label, decision, image, heatmap, timing = client.predict(
    handle_file("xray.png"), "MODEL_NAME", "Grad-CAM", 0.4, api_name="/classify")
label["label"]  # "COVID-19" or "Negative" at the model's threshold, or "{OUT_OF_SCOPE}"
table, gallery, ensemble = client.predict(handle_file("xray.png"), "Grad-CAM", api_name="/compare")
```

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
"""


# --------------------------------------------------------------------------- text


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


def agreement_markdown(names: list[str], predictions: list[Prediction], left_out: list[str] | None = None) -> str:
    """Ensemble mean probability over `names` and whether they agree at their own thresholds;
    `left_out` names the baselines kept out of it."""
    n = len(predictions)
    flagged = [name for name, pred in zip(names, predictions) if pred.decision]
    mean = float(np.mean([pred.p_positive for pred in predictions]))
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


def _load(file: str | None, min_side: int | None = None) -> Image.Image:
    """The upload, 8-bit "L" or RGB; big films are decoded reduced, keeping at least `min_side` pixels
    on the shorter side (what the models resize to anyway)."""
    try:
        return load_upload(file, min_side=min_side)
    except BadInputError as err:
        raise _user_error(str(err), title="Cannot read this file") from err


def _check_method(cam_method: str) -> None:
    if cam_method not in CAM_METHODS:
        raise _user_error(f"Unknown heatmap method {cam_method!r}; choose one of {', '.join(CAM_METHODS)}.")


def _check_opacity(opacity: float) -> None:
    if not isinstance(opacity, (int, float)) or not 0.0 <= opacity <= 1.0:  # NaN fails too
        raise _user_error(f"Heatmap opacity must be a number from 0 to 1, not {opacity!r}.")


def _for_display(image: Image.Image) -> Image.Image:
    """`image` scaled down to DISPLAY_MAX_SIDE, without a full-size copy first (a 7000 x 7000
    upload would need another 150 MB for each request at once)."""
    scale = DISPLAY_MAX_SIDE / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _check_scope(gate: ScopeGate, image: Image.Image) -> tuple[ScopeResult, float]:
    """The input check's answer and its time in ms."""
    start = time.perf_counter()
    result = gate.check(image)
    return result, 1000.0 * (time.perf_counter() - start)


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
        The label {"label", "confidences"}: the decision at the model's threshold,
        "COVID-19" or "Negative", or "Out of scope" (no confidences) when the input check
        refuses the image; the decision (or the refusal's reason) in words, with what the
        model's recipe did on sources it never saw when `held_out` (model name ->
        `covidtl.cards.read_held_out` result) has it; the image; the
        heatmap over the part of the image the model sees (none when refused), with the
        lungs' outline when a lung model (`lungs`) finds plausible lungs; the timing.
    """
    start = time.perf_counter()
    predictor = _predictor(store, model_name)
    _check_method(cam_method)
    _check_opacity(opacity)
    image = _load(file, min_side=predictor.resize_side)
    scope, scope_ms = _check_scope(gate, image)
    if not scope.in_scope:
        timing = f"Input check {scope_ms:.0f} ms · total {1000.0 * (time.perf_counter() - start):.0f} ms."
        refusal = decision_markdown(predictor.name, None, scope.reason)
        return label_data(None), refusal, _for_display(image), None, timing, None
    lung_start = time.perf_counter()
    crop = predictor.lung_crop(image)  # a lung-crop model's one lung-model pass; None for others
    if lungs is None:
        in_view = None
    elif crop is not None:  # the outline of the very mask the crop was cut by
        in_view = lungs_in_view(crop, predictor.input_size, predictor.crop_fraction)
    else:
        in_view = lungs.in_view(image, predictor.input_size, predictor.crop_fraction)
    lung_ms = 1000.0 * (time.perf_counter() - lung_start)
    x = predictor.preprocess(image, crop)
    prediction = predictor.predict(x)
    cam_start = time.perf_counter()
    heatmap = predictor.explain(x, cam_method)
    cam_ms = 1000.0 * (time.perf_counter() - cam_start)
    view = predictor.view(image, crop)
    total_ms = 1000.0 * (time.perf_counter() - start)
    timing = (
        f"Input check {scope_ms:.0f} ms · prediction {prediction.latency_ms:.0f} ms · "
        f"{cam_method} {cam_ms:.0f} ms · "
        + (f"lung outline {lung_ms:.0f} ms · " if lungs else "")
        + f"total {total_ms:.0f} ms including decoding the file, on {predictor.device}."
    )
    state = {"view": view, "heatmap": heatmap, "lungs": in_view}
    decision = decision_markdown(predictor.name, prediction)
    if recipe_held_out := (held_out or {}).get(predictor.name):
        decision += f"\n\n{held_out_summary(recipe_held_out)}"
    return (
        label_data(prediction),
        decision,
        _for_display(image),
        reblend(state, opacity),
        timing,
        state,
    )


def reblend(state: dict | None, opacity: float):
    """Redraw the last heatmap at a new opacity (with the lungs' outline, if any), without
    running the models again."""
    if not state:
        return None
    blended = overlay(state["view"], state["heatmap"], opacity)
    return blended if state.get("lungs") is None else draw_outline(blended, state["lungs"])


COMPARE_HEADERS = ["model", f"P({POSITIVE_NAME})", "threshold", "decision", "latency (ms)"]


def compare(store: ModelStore, gate: ScopeGate, file: str | None, cam_method: str):
    """Run every installed model on the same chest X-ray.

    Args:
        file: the uploaded chest X-ray: PNG, JPEG, BMP or TIFF (8 or 16 bit) or DICOM.
        cam_method: heatmap method, e.g. "Grad-CAM" or "Grad-CAM++".

    Returns:
        A table (model, P(COVID-19), its threshold, the decision at it: "COVID-19",
        "Negative" or "Out of scope", latency in ms), the default model first, then by
        validation AUC, baselines marked; a gallery of each model's heatmap; the ensemble
        mean over the non-baseline models with whether they agree (or why the image was
        refused).
    """
    if not store.names():
        raise _user_error(f"No models are installed in {store.weights_dir}. Train one with: {TRAIN_COMMAND}")
    _check_method(cam_method)
    predictors = store.load_all()
    if not predictors:
        raise _user_error(f"None of the models in {store.weights_dir} could be loaded; see the Models tab.")
    order = [name for name in rank_models(store.cards) if name in predictors]
    image = _load(file, min_side=max(p.resize_side for p in predictors.values()))
    scope, _ = _check_scope(gate, image)
    shown = {name: name + (" (baseline)" if is_baseline(store.cards[name]) else "") for name in order}
    if not scope.in_scope:
        rows = [[shown[name], None, round(predictors[name].threshold, 4), OUT_OF_SCOPE, None] for name in order]
        return rows, [], decision_markdown("", None, scope.reason)
    # models with the same geometry share one preprocessing (and one lung crop)
    prepared: dict[tuple, tuple[Any, Any]] = {}
    rows, gallery, members, predictions, left_out = [], [], [], [], []
    for name in order:
        predictor = predictors[name]
        if predictor.geometry not in prepared:
            crop = predictor.lung_crop(image)
            prepared[predictor.geometry] = (predictor.preprocess(image, crop), crop)
        x, crop = prepared[predictor.geometry]
        prediction = predictor.predict(x)  # latency_ms: the forward pass alone, comparable across models
        heatmap = predictor.explain(x, cam_method)
        rows.append(
            [
                shown[name],
                round(prediction.p_positive, 4),
                round(prediction.threshold, 4),
                decision_label(prediction),
                round(prediction.latency_ms, 1),
            ]
        )
        gallery.append(
            (
                overlay(predictor.view(image, crop), heatmap, COMPARE_OPACITY),
                f"{shown[name]}: P({POSITIVE_NAME}) = {prediction.p_positive:.3f} "
                f"(threshold {prediction.threshold:.3f}): {decision_label(prediction)}",
            )
        )
        if is_baseline(store.cards[name]):
            left_out.append(name)
        else:
            members.append(name)
            predictions.append(prediction)
    if not members:
        return rows, gallery, "Every installed model is a baseline, so there is no ensemble to show."
    return rows, gallery, agreement_markdown(members, predictions, left_out)


class OutputFiles:
    """Outputs written as new, uniquely named files: PNG images and gr.Label JSON.

    Gradio writes an array or PIL output to a content-addressed cache path with a plain
    write, so two users who get the same image at the same moment can download a
    half-written file (the load test saw an empty one). File outputs are instead copied
    into the cache atomically. Our files are needed only until gradio has copied them (or,
    for a label, read it), so files older than `max_age_s` are removed on each write. The
    folder is made on first use.
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

    def label(self, payload: dict[str, Any]) -> str:
        """`payload` ({"label", "confidences"} from `covidtl.decision.label_data`) as a JSON
        file: gr.Label takes one as it is, while from a dict it would make the larger class
        the label instead of the decision."""
        fd, path = self._new(".json")
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f)
        return path


def _bind(handler: Callable, store: ModelStore, gate: ScopeGate, to_files: Callable[[Any], Any], **fixed) -> Callable:
    """`handler` with its store and input check (and the keyword arguments `fixed`) filled
    in and its images turned into files by `to_files`; name, docstring and signature kept
    for the API page. Tests call the handlers directly."""
    partial = functools.partial(handler, store, gate, **fixed)

    def bound(*args):
        return to_files(partial(*args))

    bound.__name__, bound.__doc__ = handler.__name__, handler.__doc__
    bound.__signature__ = inspect.signature(partial)
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
) -> gr.Blocks:
    """The whole app for the models in `weights_dir` (weights loaded on first use, then
    reused) and the example images in `examples_dir` plus `assets/examples/`. Pass `store`
    to share an existing `ModelStore` of `weights_dir`, `gate` for an input check other
    than `weights_dir/scope/` (`covidtl.scope.gate_for`). At most `queue_size` requests
    wait for a turn; the next ones are refused with "queue full"."""
    weights_dir = Path(weights_dir)
    store = store if store is not None else ModelStore(weights_dir)
    gate = gate if gate is not None else gate_for(weights_dir)
    lungs = LungOutliner.from_folder(weights_dir)
    held_out = {name: result for name, card in store.cards.items() if (result := read_held_out(weights_dir, card))}
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
                        confidences = gr.Label(
                            label="Decision at the model's threshold, and confidence per class",
                            num_top_classes=len(CLASSES),
                            elem_id="confidences",
                        )
                        decision = gr.Markdown(label="decision", elem_id="decision")
                        with gr.Row():
                            original = gr.Image(label="Uploaded image", type="pil", interactive=False, format="png")
                            heatmap = gr.Image(
                                label="Heatmap (the part of the image the model sees)",
                                interactive=False,
                                format="png",
                                elem_id="heatmap",
                            )
                        timing = gr.Markdown(label="timing", elem_id="timing")
                cam_state = gr.State()

            with gr.Tab("Compare", id="compare"):
                gr.Markdown(
                    "Runs every installed model on the same image, each at its own operating threshold "
                    "(the default model first, then by validation AUC). Baselines are marked and left out "
                    "of the ensemble. Latency is one forward pass on this machine."
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
                        table = gr.Dataframe(
                            headers=COMPARE_HEADERS,
                            datatype=["str", "number", "number", "str", "number"],
                            interactive=False,
                            label="Every model on this image",
                            elem_id="compare-table",
                        )
                        ensemble = gr.Markdown(label="ensemble", elem_id="ensemble")
                        gallery = gr.Gallery(
                            label="Heatmaps", columns=3, height="auto", elem_id="compare-gallery", format="png"
                        )

            with gr.Tab("Models", id="models"):
                if not names:
                    gr.Markdown(no_models_markdown(weights_dir, store.skipped))
                for i, (shown, name) in enumerate(model_choices(store)):
                    card = store.cards[name]
                    with gr.Accordion(shown, open=i == 0):
                        gr.Markdown(card_markdown(card, held_out.get(name)))
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
                gr.Markdown(ABOUT + "\n" + gate.summary() + "\n" + EXAMPLES_CREDITS)

        # One image for both tabs. `.change` also follows example clicks; the reverse uses
        # `.upload` (user uploads only), so the two never trigger each other in a loop.
        upload.change(lambda f: f, upload, compare_upload, api_visibility="private")
        compare_upload.upload(lambda f: f, compare_upload, upload, api_visibility="private")
        classify_button.click(
            _bind(
                classify,
                store,
                gate,
                lambda out: (files.label(out[0]), out[1], files.png(out[2]), files.png_or_none(out[3]), *out[4:]),
                lungs=lungs,
                held_out=held_out,
            ),
            inputs=[upload, model, method, opacity],
            outputs=[confidences, decision, original, heatmap, timing, cam_state],
            api_name="classify",
        )
        opacity.release(
            lambda state, alpha: None if (image := reblend(state, alpha)) is None else files.png(image),
            inputs=[cam_state, opacity],
            outputs=heatmap,
            api_visibility="private",
        )
        compare_button.click(
            _bind(compare, store, gate, lambda out: (out[0], [(files.png(im), cap) for im, cap in out[1]], out[2])),
            inputs=[compare_upload, compare_method],
            outputs=[table, gallery, ensemble],
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
    this module loads no model."""
    if name == "demo":
        global demo
        demo = build_demo(env_weights_dir(), env_examples_dir(), queue_size=env_queue_size())
        return demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    """`python app.py` and the `covidtl-app` command: parse the flags, serve until stopped."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("covidtl").setLevel(logging.INFO)
    args = parse_args(argv)
    served = build_demo(args.weights_dir, args.examples_dir, queue_size=args.queue_size)
    served.launch(**launch_options(args.host, args.port, args.share))


if __name__ == "__main__":
    main()
