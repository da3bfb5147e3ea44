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
module-level `demo`, and the launch in `__main__`.
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

from covidtl.cards import card_markdown, card_plots, lung_model_markdown
from covidtl.classes import CLASSES, DISPLAY_NAMES, POSITIVE_NAME
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
from covidtl.lungs import LUNG_TASK

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
- Each model flags {POSITIVE_NAME} when P({POSITIVE_NAME}) reaches its own operating threshold,
  chosen on validation data (see the Models tab for how, and for per-source results).
- The heatmap covers the center crop the model sees, not the borders of the uploaded image.

### Use it from code
```python
from gradio_client import Client, handle_file
client = Client("http://127.0.0.1:7860/")
label, decision, image, heatmap, timing = client.predict(
    handle_file("xray.png"), "MODEL_NAME", "Grad-CAM", 0.4, api_name="/classify")
table, gallery, ensemble = client.predict(handle_file("xray.png"), "Grad-CAM", api_name="/compare")
```

### Get models
`{TRAIN_COMMAND}` exports `weights/<name>.safetensors` and its card `weights/<name>.json`.
Uploads are limited to {MAX_UPLOAD_BYTES // 2**20} MiB. Uploads are kept only as temporary
files, deleted after an hour; no run history is saved, and the app sends no telemetry.
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


def decision_markdown(model_name: str, prediction: Prediction) -> str:
    """The decision at the model's operating threshold, in words."""
    p, t = prediction.p_positive, prediction.threshold
    if prediction.decision:
        verdict = f"**{POSITIVE_NAME} flagged** by `{model_name}`: P({POSITIVE_NAME}) = {p:.3f} is at or above"
    else:
        verdict = f"**Not flagged** by `{model_name}`: P({POSITIVE_NAME}) = {p:.3f} is below"
    return f"{verdict} the model's operating threshold {t:.3f}. A research model's output, not a diagnosis."


def agreement_markdown(names: list[str], predictions: list[Prediction]) -> str:
    """Ensemble mean probability and whether the models agree at their own thresholds."""
    n = len(predictions)
    flagged = [name for name, pred in zip(names, predictions) if pred.decision]
    mean = float(np.mean([pred.p_positive for pred in predictions]))
    if n == 1:
        agreement = "Only one model is installed, so there is nothing to compare it with."
    elif len(flagged) == n:
        agreement = f"All {n} models flag {POSITIVE_NAME} at their own thresholds."
    elif not flagged:
        agreement = f"None of the {n} models flags {POSITIVE_NAME} at its own threshold."
    else:
        agreement = (
            f"The models disagree: {len(flagged)} of {n} flag {POSITIVE_NAME} ({', '.join(flagged)}). "
            "Treat this image as uncertain."
        )
    return (
        f"**Ensemble (unweighted mean) P({POSITIVE_NAME}) = {mean:.3f}.** {agreement} "
        "The mean has no validated threshold of its own; it is shown for orientation only."
    )


# --------------------------------------------------------------------------- handlers


def _user_error(message: str, title: str = "Error") -> gr.Error:
    """An error the user can act on: shown in the page, not logged as a traceback.
    Escaped because the page renders it as HTML and it may quote an uploaded file's name."""
    return gr.Error(html.escape(message, quote=False), title=title, print_exception=False)


def _predictor(store: ModelStore, model_name: str | None) -> Predictor:
    if not store.names():
        raise _user_error(f"No models are installed in {store.weights_dir}. Train one with: {TRAIN_COMMAND}")
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


def classify(store: ModelStore, file: str | None, model_name: str, cam_method: str, opacity: float):
    """Classify one chest X-ray with one model and show where the model looked.

    Args:
        file: the uploaded chest X-ray: PNG, JPEG, BMP or TIFF (8 or 16 bit) or DICOM.
        model_name: a model from the weights folder (see the Models tab).
        cam_method: heatmap method, e.g. "Grad-CAM" or "Grad-CAM++".
        opacity: heatmap opacity over the image, from 0 to 1.

    Returns:
        Confidence per class; the decision at the model's threshold in words; the image;
        the heatmap over the part of the image the model sees; the timing.
    """
    start = time.perf_counter()
    predictor = _predictor(store, model_name)
    _check_method(cam_method)
    _check_opacity(opacity)
    image = _load(file, min_side=predictor.resize_side)
    x = predictor.preprocess(image)
    prediction = predictor.predict(x)
    cam_start = time.perf_counter()
    heatmap = predictor.explain(x, cam_method)
    cam_ms = 1000.0 * (time.perf_counter() - cam_start)
    view = predictor.view(image)
    confidences = {DISPLAY_NAMES[name]: p for name, p in prediction.probabilities.items()}
    total_ms = 1000.0 * (time.perf_counter() - start)
    timing = (
        f"Prediction {prediction.latency_ms:.0f} ms · {cam_method} {cam_ms:.0f} ms · "
        f"total {total_ms:.0f} ms including decoding the file, on {predictor.device}."
    )
    return (
        confidences,
        decision_markdown(model_name, prediction),
        _for_display(image),
        overlay(view, heatmap, opacity),
        timing,
        {"view": view, "heatmap": heatmap},
    )


def reblend(state: dict | None, opacity: float):
    """Redraw the last heatmap at a new opacity, without running the model again."""
    if not state:
        return None
    return overlay(state["view"], state["heatmap"], opacity)


def compare(store: ModelStore, file: str | None, cam_method: str):
    """Run every installed model on the same chest X-ray.

    Args:
        file: the uploaded chest X-ray: PNG, JPEG, BMP or TIFF (8 or 16 bit) or DICOM.
        cam_method: heatmap method, e.g. "Grad-CAM" or "Grad-CAM++".

    Returns:
        A table (model, P(COVID-19), decision at its threshold, latency in ms), a gallery
        of each model's heatmap, and the ensemble mean with whether the models agree.
    """
    if not store.names():
        raise _user_error(f"No models are installed in {store.weights_dir}. Train one with: {TRAIN_COMMAND}")
    _check_method(cam_method)
    predictors = store.load_all()
    if not predictors:
        raise _user_error(f"None of the models in {store.weights_dir} could be loaded; see the Models tab.")
    image = _load(file, min_side=max(p.resize_side for p in predictors.values()))
    tensors: dict[tuple, Any] = {}  # models with the same geometry share one preprocessing
    rows, gallery, names, predictions = [], [], [], []
    for name, predictor in predictors.items():
        if predictor.geometry not in tensors:
            tensors[predictor.geometry] = predictor.preprocess(image)
        x = tensors[predictor.geometry]
        prediction = predictor.predict(x)  # latency_ms: the forward pass alone, comparable across models
        heatmap = predictor.explain(x, cam_method)
        verdict = f"{POSITIVE_NAME} flagged" if prediction.decision else "not flagged"
        rows.append(
            [
                name,
                round(prediction.p_positive, 4),
                f"{verdict} (threshold {prediction.threshold:.3f})",
                round(prediction.latency_ms, 1),
            ]
        )
        gallery.append(
            (
                overlay(predictor.view(image), heatmap, COMPARE_OPACITY),
                f"{name}: P({POSITIVE_NAME}) = {prediction.p_positive:.3f}",
            )
        )
        names.append(name)
        predictions.append(prediction)
    return rows, gallery, agreement_markdown(names, predictions)


class OutputFiles:
    """Image outputs written as new, uniquely named PNG files.

    Gradio writes an array or PIL output to a content-addressed cache path with a plain
    write, so two users who get the same image at the same moment can download a
    half-written file (the load test saw an empty one). File outputs are instead copied
    into the cache atomically. Our files are needed only until gradio has copied them, so
    files older than `max_age_s` are removed on each write. The folder is made on first use.
    """

    def __init__(self, max_age_s: float = 600.0) -> None:
        self.max_age_s = max_age_s
        self.folder: Path | None = None

    def png(self, image: Image.Image | np.ndarray) -> str:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="covidtl-outputs-"))
        cutoff = time.time() - self.max_age_s
        for old in self.folder.glob("*.png"):
            with contextlib.suppress(FileNotFoundError):  # another request swept it first
                if old.stat().st_mtime < cutoff:
                    old.unlink()
        fd, path = tempfile.mkstemp(dir=self.folder, suffix=".png")
        with os.fdopen(fd, "wb") as f:
            (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(f, format="PNG")
        return path


def _bind(handler: Callable, store: ModelStore, to_files: Callable[[Any], Any]) -> Callable:
    """`handler` with its store filled in and its images turned into files by `to_files`;
    name, docstring and signature kept for the API page. Tests call the handlers directly."""
    partial = functools.partial(handler, store)

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
) -> gr.Blocks:
    """The whole app for the models in `weights_dir` (weights loaded on first use, then
    reused) and the example images in `examples_dir` plus `assets/examples/`. Pass `store`
    to share an existing `ModelStore` of `weights_dir`. At most `queue_size` requests wait
    for a turn; the next ones are refused with "queue full"."""
    weights_dir = Path(weights_dir)
    store = store if store is not None else ModelStore(weights_dir)
    files = OutputFiles()
    names = store.names()
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
                        model = gr.Dropdown(names, value=names[0] if names else None, label="Model", elem_id="model")
                        method = gr.Radio(list(CAM_METHODS), value=DEFAULT_METHOD, label="Heatmap method")
                        opacity = gr.Slider(0.0, 1.0, value=0.4, step=0.05, label="Heatmap opacity")
                        classify_button = gr.Button("Classify", variant="primary", elem_id="classify-button")
                        if examples:
                            gr.Examples([[path] for path in examples], inputs=[upload], label="Examples")
                    with gr.Column(scale=2):
                        confidences = gr.Label(
                            label="Confidence per class", num_top_classes=len(CLASSES), elem_id="confidences"
                        )
                        decision = gr.Markdown(label="decision", elem_id="decision")
                        with gr.Row():
                            original = gr.Image(label="Uploaded image", type="pil", interactive=False, format="png")
                            heatmap = gr.Image(
                                label="Heatmap (center crop the model sees)",
                                interactive=False,
                                format="png",
                                elem_id="heatmap",
                            )
                        timing = gr.Markdown(label="timing", elem_id="timing")
                cam_state = gr.State()

            with gr.Tab("Compare", id="compare"):
                gr.Markdown(
                    "Runs every installed model on the same image, each at its own operating threshold. "
                    "Latency is one forward pass on this machine."
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
                            headers=["model", f"P({POSITIVE_NAME})", "decision", "latency (ms)"],
                            datatype=["str", "number", "str", "number"],
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
                for i, name in enumerate(names):
                    card = store.cards[name]
                    with gr.Accordion(name, open=i == 0):
                        gr.Markdown(card_markdown(card))
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
                gr.Markdown(ABOUT)

        # One image for both tabs. `.change` also follows example clicks; the reverse uses
        # `.upload` (user uploads only), so the two never trigger each other in a loop.
        upload.change(lambda f: f, upload, compare_upload, api_visibility="private")
        compare_upload.upload(lambda f: f, compare_upload, upload, api_visibility="private")
        classify_button.click(
            _bind(classify, store, lambda out: (*out[:2], files.png(out[2]), files.png(out[3]), *out[4:])),
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
            _bind(compare, store, lambda out: (out[0], [(files.png(im), cap) for im, cap in out[1]], out[2])),
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


demo = build_demo(env_weights_dir(), env_examples_dir(), queue_size=env_queue_size())

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("covidtl").setLevel(logging.INFO)
    args = parse_args()
    chosen = (args.weights_dir, args.examples_dir, args.queue_size)
    if chosen != (env_weights_dir(), env_examples_dir(), env_queue_size()):
        demo = build_demo(args.weights_dir, args.examples_dir, queue_size=args.queue_size)
    demo.launch(**launch_options(args.host, args.port, args.share))
