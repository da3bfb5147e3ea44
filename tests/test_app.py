"""The Gradio app: handlers called directly, and the launched app through gradio_client."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from synthetic_inputs import (
    export_tiny_model,
    hook_count,
    launch,
    launched,
    make_dicom,
    not_xrays,
    offline_client,
    save_png,
    synthetic_gate,
    xray_like,
)

import app
from covidtl import cards
from covidtl.answer import Answer, ModelFolder
from covidtl.decision import FLAGGED, NOT_FLAGGED, OUT_OF_SCOPE, decision_label, shown_digits
from covidtl.inference import ModelStore, Prediction, load_upload
from covidtl.scope import ScopeGate

ROOT = Path(__file__).resolve().parents[1]
CHEAP = ScopeGate()  # the input check without a fitted distance: colour and near-uniform images only

FULL_REPORT = {
    "threshold": 0.42,
    "n": 59,
    "n_positive": 16,
    "overall": {
        "auc": {"value": 0.91, "ci_low": 0.83, "ci_high": 0.97},
        "sensitivity": {"value": 0.81, "ci_low": 0.6, "ci_high": 0.95},
        "specificity": {"value": 0.88, "ci_low": None, "ci_high": None},
    },
    "confusion": {"tp": 13, "fp": 5, "tn": 38, "fn": 3},
    "per_source": {
        "kermany": {
            "n": 30,
            "n_positive": 0,
            "metrics": {
                "specificity": {"value": 0.97, "ci_low": 0.9, "ci_high": 1.0},
                "sensitivity": {"value": None, "ci_low": None, "ci_high": None},
            },
        },
        "cohen": {
            "n": 29,
            "n_positive": 16,
            "metrics": {"sensitivity": {"value": 0.81, "ci_low": 0.6, "ci_high": 0.95}},
        },
    },
}


# What `python -m train.loso` writes (the parts the app reads), for the "always" model's recipe.
HELD_OUT = {
    "recipe": "always",
    "epochs": 3,
    "seed": 0,
    "command": "python -m train.loso --recipe always.toml --data d",
    "folds": [
        {"held_out": "siteA", "n": 40, "n_positive": 10, "overall": {
            "auc": {"value": 0.7, "ci_low": 0.55, "ci_high": 0.82},
            "sensitivity": {"value": 0.9, "ci_low": 0.6, "ci_high": 1.0},
            "specificity": {"value": 0.3, "ci_low": 0.15, "ci_high": 0.45}}},
        {"held_out": "siteB", "n": 50, "n_positive": 0, "overall": {
            "auc": {"value": None, "ci_low": None, "ci_high": None},
            "sensitivity": {"value": None, "ci_low": None, "ci_high": None},
            "specificity": {"value": 0.42, "ci_low": 0.3, "ci_high": 0.55}}},
    ],
}
# The same recipe with seed 1 (weights/ablation/), and with other epochs (not shown). Where a
# source has one class, the other seeds' specificity stands for their AUC.
SEED_1 = {**HELD_OUT, "seed": 1, "command": "python -m train.loso --seed 1", "folds": [
    {**HELD_OUT["folds"][0], "overall": {"auc": {"value": 0.65, "ci_low": 0.5, "ci_high": 0.8}}},
    {**HELD_OUT["folds"][1], "overall": {"specificity": {"value": 0.4, "ci_low": 0.3, "ci_high": 0.5}}}]}
EPOCHS_9 = {**SEED_1, "epochs": 9, "folds": [
    {**HELD_OUT["folds"][0], "overall": {"auc": {"value": 0.99, "ci_low": 0.9, "ci_high": 1.0}}}]}
HELD_OUT_ROWS = ("| siteA | 40 (10) | 0.700 | 0.900 | 0.300 | AUC 0.650 |",
                 "| siteB | 50 (0) | n/a | n/a | 0.420 | specificity 0.400 |")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("weights")
    export_tiny_model(
        folder,
        "always",
        threshold=0.0,
        seed=0,
        metrics={"test": FULL_REPORT, "val": FULL_REPORT},
        threshold_rule="highest validation specificity with sensitivity >= 0.90",
        limitations=["Every negative is pediatric."],
        intended_use="Research demonstration.",
        data={
            "name": "covidx-mini",
            "splits": {"test": {"n": 59, "n_positive": 16, "per_source": {"cohen": {"positive": 16}}}},
            "sources": {"cohen": {"license": "mixed", "population": "adult"}},
        },
        plots={"test_roc": "always.test.roc.png", "evil": "../outside.png"},
        config={"epochs": 3, "seed": 0},
    )
    save_png(xray_like(64), folder / "always.test.roc.png")
    cards.held_out_path(folder, "always").write_text(json.dumps(HELD_OUT))
    (folder / "ablation").mkdir()
    (folder / "ablation" / "always.seed1.loso.json").write_text(json.dumps(SEED_1))
    (folder / "ablation" / "always.epochs9.loso.json").write_text(json.dumps(EPOCHS_9))
    export_tiny_model(folder, "never", threshold=1.01, seed=1)
    return folder


@pytest.fixture(scope="module")
def store(weights) -> ModelStore:
    return ModelStore(weights)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    out = {"png": save_png(xray_like(160, seed=1), folder / "xray.png")}
    out["png16"] = folder / "xray16.png"
    Image.fromarray(xray_like(150, seed=2).astype(np.uint16) * 250).save(out["png16"])
    frame = xray_like(128, seed=3).astype(np.uint16) * 16
    out["dicom_mono1"] = folder / "mono1.dcm"
    out["dicom_mono1"].write_bytes(make_dicom(frame, "MONOCHROME1", 12, RescaleSlope=1, RescaleIntercept=0))
    out["dicom_frames"] = folder / "frames.dcm"
    out["dicom_frames"].write_bytes(make_dicom(np.stack([frame, 4095 - frame]), "MONOCHROME2", 12))
    out["empty"] = folder / "empty.png"
    out["empty"].write_bytes(b"")
    out["text"] = folder / "notes.png"
    out["text"].write_text("plain text renamed to .png\n" * 10)
    out["truncated"] = folder / "truncated.png"
    out["truncated"].write_bytes(out["png"].read_bytes()[:300])
    return out


@pytest.fixture(scope="module")
def gate() -> ScopeGate:
    """Fitted on `xray_like` films: those are in scope, `not_xrays` are not."""
    return synthetic_gate()


@pytest.fixture(scope="module")
def served(weights, store, gate, tmp_path_factory):
    examples = tmp_path_factory.mktemp("examples")
    save_png(xray_like(64, seed=9), examples / "synthetic-example.png")
    with launched(app.build_demo(weights, examples, store=store, gate=gate)) as url:
        yield url


@pytest.fixture(scope="module")
def client(served) -> Client:
    return offline_client(served)


# --------------------------------------------------------------------------- handlers


def test_classify_handler(store, images):
    answer, scale, decision, held_out, original, heatmap, timing, state = app.classify(
        store, CHEAP, str(images["png"]), "always", "Grad-CAM", 0.5
    )
    expected = store.get("always").predict(load_upload(images["png"])).p_positive
    assert answer["decision"] == FLAGGED  # threshold 0: flagged whichever class is larger
    assert answer["p_covid"] == pytest.approx(expected, abs=1e-6) and answer["threshold"] == 0.0
    assert answer["model"] == "always" and answer["reason"] is None and answer["in_scope"]
    assert decision.startswith(f"**{FLAGGED}** by `always`") and "threshold 0.000" in decision
    assert FLAGGED in scale and "threshold 0.000" in scale and "ps-is-flagged" in scale
    assert "no leave-one-source-out run" in held_out
    assert original.size == (160, 160)
    assert heatmap.shape == (224, 224, 3) and heatmap.dtype == np.uint8
    assert "ms" in timing and "Grad-CAM" in timing
    assert app.reblend(state, 0.0).tolist() == state["view"].tolist()
    assert app.reblend(None, 0.3) is None
    answer, scale, decision, *_ = app.classify(store, CHEAP, str(images["png"]), "never", "Eigen-CAM", 0.5)
    assert answer["decision"] == NOT_FLAGGED and decision.startswith(f"**{NOT_FLAGGED}** by `never`")
    assert NOT_FLAGGED in scale and FLAGGED not in scale
    answer, *_ = app.classify(store, CHEAP, str(images["png"]), None, "Grad-CAM", 0.5)  # no model: the default
    assert answer["decision"] == FLAGGED and answer["model"] == "always"


def test_compare_handler(store, images):
    answers, scale, gallery, ensemble = app.compare(store, CHEAP, str(images["dicom_mono1"]), "Grad-CAM++")
    assert [a["model"] for a in answers] == store.names()
    assert [a["decision"] for a in answers] == [FLAGGED, NOT_FLAGGED]
    assert [a["threshold"] for a in answers] == [0.0, 1.01]  # each model's threshold beside its probability
    assert all(0.0 <= a["p_covid"] <= 1.0 and a["timings_ms"]["prediction"] > 0 for a in answers)
    assert scale.count('class="ps-row ps-named"') == 2 and scale.index("always") < scale.index("never")
    assert scale.count("forward pass") == 2  # each model's own time, comparable across models
    assert len(gallery) == 2 and gallery[0][0].shape == (224, 224, 3)
    assert [caption.split(":")[0] for _, caption in gallery] == ["always", "never"]
    assert "disagree" in ensemble and "1 of 2" in ensemble and "mean" in ensemble


def _answer(p: float | None, threshold: float = 0.5, model: str = "m", reason: str = "") -> Answer:
    decision = OUT_OF_SCOPE if p is None else FLAGGED if p >= threshold else NOT_FLAGGED
    return Answer(model=model, decision=decision, p_covid=p, threshold=threshold, threshold_rule="", min_sensitivity=0.9,
                  calibrated=True, in_scope=p is not None, reason=reason)


def test_agreement_sentences():
    assert "All 2 models" in app.agreement_markdown([_answer(0.9), _answer(0.7)])
    assert "None of the 2" in app.agreement_markdown([_answer(0.1), _answer(0.2)])
    assert "Only one model" in app.agreement_markdown([_answer(0.1)])
    text = app.agreement_markdown([_answer(0.9, model="a"), _answer(0.2, model="b"), _answer(0.1, model="c")])
    assert "1 of 3 flag COVID-19 (a)" in text and "0.400" in text


def test_the_decision_is_taken_at_the_threshold_not_the_larger_class():
    def prediction(p: float, threshold: float) -> Prediction:
        return Prediction({"negative": 1 - p, "positive": p}, p, p >= threshold, threshold, 1.0)

    assert decision_label(prediction(0.104, 0.075)) == FLAGGED  # the smaller class, flagged
    assert decision_label(prediction(0.9, 0.95)) == NOT_FLAGGED  # the larger class, not flagged
    assert decision_label(None) == OUT_OF_SCOPE


def test_nothing_on_the_scale_disagrees_with_the_decision():
    """The example of the issue: P = 0.104 under a threshold of 0.075 is flagged; the scale
    puts P right of the threshold, inside the shaded region, beside the words of the
    decision, and shows no per-class confidence (no "Negative 90 %")."""
    flagged = app.scale_html([_answer(0.104, 0.075)])
    assert FLAGGED in flagged and NOT_FLAGGED not in flagged and "Negative" not in flagged
    assert re.search(r'class="ps-threshold[a-z -]*" style="left:7.50%"><span>threshold 0.075<', flagged)
    assert re.search(r'class="ps-p[a-z -]*" style="left:10.40%"><span>P\(COVID-19\) = 0.104<', flagged)
    assert 'class="ps-region ps-flagged" style="left:7.50%"' in flagged
    assert "sensitivity ≥ 0.90" in flagged and "calibrated" in flagged
    below = app.scale_html([_answer(0.015, 0.075)])
    assert NOT_FLAGGED in below and FLAGGED not in below and 'class="ps-p ps-start" style="left:1.50%"' in below  # label kept on the page
    refused = app.scale_html([_answer(None, reason="a colour photo")])
    assert OUT_OF_SCOPE in refused and "ps-p" not in refused and "not classified" in refused
    # P and threshold that round alike are shown with the digits that tell them apart
    close = _answer(0.50155, 0.50210)
    assert shown_digits(0.50155, 0.50210) == 4 and "P(COVID-19) = 0.5016" in app.scale_html([close])
    assert "0.5016 is below the model's operating threshold 0.5021" in app.decision_markdown(close)


def test_answers_are_plain_json(store, images):
    answer, *_ = app.classify(store, CHEAP, str(images["png"]), "always", "Grad-CAM", 0.5)
    assert json.loads(json.dumps(answer)) == answer  # plain types only: no arrays, no images
    assert {"model", "decision", "p_covid", "threshold", "reason", "in_scope", "held_out", "timings_ms"} <= set(answer)
    assert answer["heatmap_method"] == "Grad-CAM" and answer["timings_ms"]["total"] > 0


@pytest.mark.parametrize("key, words", [("empty", "empty"), ("text", "not an image"), ("truncated", "truncated")])
def test_bad_input_raises_a_readable_gr_error(store, images, key, words):
    with pytest.raises(gr.Error, match=words):
        app.classify(store, CHEAP, str(images[key]), "always", "Grad-CAM", 0.4)
    with pytest.raises(gr.Error, match=words):
        app.compare(store, CHEAP, str(images[key]), "Grad-CAM")


def test_bad_choices_raise_gr_error(store, images):
    with pytest.raises(gr.Error, match="no file"):
        app.classify(store, CHEAP, None, "always", "Grad-CAM", 0.4)
    with pytest.raises(gr.Error, match="Unknown model"):
        app.classify(store, CHEAP, str(images["png"]), "nope", "Grad-CAM", 0.4)
    with pytest.raises(gr.Error, match="heatmap method"):
        app.classify(store, CHEAP, str(images["png"]), "always", "Magic", 0.4)


def test_card_markdown_renders_metrics_sources_and_provenance(store):
    text = cards.card_markdown(store.cards["always"])
    for expected in (
        "0.910 (0.830 to 0.970)",  # value and 95 % interval
        "| Specificity | 0.880 |",  # no interval: value alone
        "TP 13, FP 5, TN 38, FN 3",
        "| kermany | 30 | 0 |",
        "highest validation specificity",
        "Every negative is pediatric.",
        "Research demonstration.",
        "covidx-mini",
        "#### test split",
        "#### val split",
    ):
        assert expected in text, expected
    assert text.index("#### test split") < text.index("#### val split")
    minimal = cards.card_markdown(store.cards["never"])
    assert "no evaluation results" in minimal and "1.010" in minimal


def test_held_out_results_are_read_only_for_the_card_s_own_recipe_run(store, weights, tmp_path):
    """`<name>.loso.json` beside a card is shown only when it is of the card's recipe, epochs
    and seed; another run's, a broken one or none at all is not. Runs of the same recipe and
    epochs with another seed, in ablation/, come with it."""
    card = store.cards["always"]
    assert cards.read_held_out(weights, card) == cards.HeldOut(HELD_OUT, [SEED_1])
    assert cards.read_held_out(weights, store.cards["never"]) is None  # no file
    for change in ({"epochs": 4}, {"seed": 1}, {"recipe": "other"}, {"folds": []}):
        cards.held_out_path(tmp_path, "always").write_text(json.dumps({**HELD_OUT, **change}))
        assert cards.read_held_out(tmp_path, card) is None, change
    cards.held_out_path(tmp_path, "always").write_text('{"recipe": "always", "folds": [')
    assert cards.read_held_out(tmp_path, card) is None


def test_card_markdown_shows_the_held_out_folds(store):
    text = cards.card_markdown(store.cards["always"], cards.HeldOut(HELD_OUT, [SEED_1]))
    for expected in (
        "#### At a site it never saw",
        "| siteA | 40 (10) | 0.700 (0.550 to 0.820) | 0.900 (0.600 to 1.000) | 0.300 (0.150 to 0.450) | AUC 0.650 |",
        "| siteB | 50 (0) | n/a | n/a | 0.420 (0.300 to 0.550) | specificity 0.400 |",
        "`python -m train.loso --recipe always.toml --data d`; `python -m train.loso --seed 1`",
    ):
        assert expected in text, expected
    assert "never saw" not in cards.card_markdown(store.cards["always"])


def test_the_models_tab_shows_the_held_out_folds_beside_a_card(weights, store, gate):
    demo = app.build_demo(weights, store=store, gate=gate)
    texts = [block.value or "" for block in demo.blocks.values() if isinstance(block, gr.Markdown)]
    shown = [text for text in texts if "#### At a site it never saw" in text]
    assert len(shown) == 1 and "### always" in shown[0] and "| siteA | 40 (10) |" in shown[0]


def test_card_plots_stay_inside_the_weights_folder(store, weights):
    (weights.parent / "outside.png").write_bytes((weights / "always.test.roc.png").read_bytes())
    plots = cards.card_plots(store.cards["always"], weights)
    assert [caption for _, caption in plots] == ["test roc"]
    assert cards.card_plots(store.cards["never"], weights) == []


def test_empty_weights_folder_explains_how_to_get_models(tmp_path, images):
    demo = app.build_demo(tmp_path / "weights")
    texts = " ".join(str(block.value) for block in demo.blocks.values() if isinstance(block, gr.Markdown))
    assert app.TRAIN_COMMAND in texts and "No models found" in texts
    with pytest.raises(gr.Error, match="python -m train"):
        app.classify(ModelStore(tmp_path / "weights"), CHEAP, str(images["png"]), None, "Grad-CAM", 0.4)
    url = launch(demo)
    try:
        config = httpx.get(f"{url}config", timeout=120).text
        assert "python -m train --recipe train/recipes/" in config
    finally:
        demo.close()


def test_example_files_lists_images_and_dicoms(tmp_path):
    for name in ("a.png", "b.dcm", "c.txt", "d.JPG"):
        (tmp_path / name).write_bytes(b"x")
    assert [Path(p).name for p in app.example_files(tmp_path, None, tmp_path / "absent")] == ["a.png", "b.dcm", "d.JPG"]


def test_flags_and_environment(monkeypatch, tmp_path):
    for var in ("COVIDTL_HOST", "COVIDTL_PORT", "COVIDTL_WEIGHTS", "COVIDTL_EXAMPLES", "COVIDTL_SHARE", "SPACE_ID"):
        monkeypatch.delenv(var, raising=False)
    args = app.parse_args([])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)
    assert args.weights_dir == ROOT / "weights" and args.examples_dir is None
    monkeypatch.setenv("SPACE_ID", "someone/covid-tl")
    assert app.parse_args([]).host == "0.0.0.0"
    monkeypatch.setenv("COVIDTL_HOST", "10.0.0.5")
    monkeypatch.setenv("COVIDTL_PORT", "9000")
    monkeypatch.setenv("COVIDTL_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("COVIDTL_SHARE", "1")
    args = app.parse_args([])
    assert (args.host, args.port, args.weights_dir, args.share) == ("10.0.0.5", 9000, tmp_path, True)
    args = app.parse_args(["--host", "127.0.0.2", "--port", "1234", "--no-share", "--examples-dir", "ex"])
    assert (args.host, args.port, args.share, args.examples_dir) == ("127.0.0.2", 1234, False, Path("ex"))
    options = app.launch_options("127.0.0.1", 1234)
    assert options["max_file_size"] == app.MAX_UPLOAD_BYTES and options["show_error"] is False


def test_module_level_demo_and_no_telemetry():
    assert isinstance(app.demo, gr.Blocks)
    assert app.demo.analytics_enabled is False


def test_import_builds_nothing():
    """STYLE 7: importing app.py opens no weights file and builds no demo; `app.demo` is built
    on first use and loads no network either (only the input check's fitted statistics); the
    first request does (and the check sees it)."""
    code = textwrap.dedent(
        """
        import sys
        opened = []
        sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
        import app
        weights = lambda: [p for p in opened if p.endswith(".safetensors") and not p.endswith("scope.safetensors")]
        assert "demo" not in vars(app) and weights() == [], weights()
        app.demo
        assert weights() == [], weights()
        app.ModelFolder(app.env_weights_dir()).predictor()
        assert weights(), "loading a model opened no weights: the checks above see nothing"
        """
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)


def test_main_serves_the_demo_its_flags_configure(monkeypatch, tmp_path):
    """`python app.py --weights-dir ... --examples-dir ... --queue-size ... --port ...` builds the
    demo from those flags (not from the environment's `app.demo`), launches it on that port,
    and only then warms the models up, while the server already answers."""
    import logging

    calls = []

    class Folder:
        def __init__(self, weights_dir):
            calls.append(("folder", weights_dir))

        def warm_up(self):
            calls.append(("warm up",))

    class Served:
        def launch(self, **options):
            calls.append(("launch", options))

        def block_thread(self):
            calls.append(("serve",))

    def build_demo(weights_dir, examples_dir, queue_size, folder):
        calls.append(("build", weights_dir, examples_dir, queue_size, type(folder)))
        return Served()

    monkeypatch.setenv("COVIDTL_WEIGHTS", str(tmp_path / "from-env"))
    monkeypatch.setattr(app, "build_demo", build_demo)
    monkeypatch.setattr(app, "ModelFolder", Folder)
    logger = logging.getLogger("covidtl")
    level = logger.level
    try:
        app.main(["--weights-dir", str(tmp_path / "w"), "--examples-dir", str(tmp_path / "e"),
                  "--queue-size", "3", "--port", "7999", "--host", "127.0.0.1", "--no-share"])
    finally:
        logger.setLevel(level)  # main sets it for the served app
    assert calls == [
        ("folder", tmp_path / "w"),
        ("build", tmp_path / "w", tmp_path / "e", 3, Folder),
        ("launch", {**app.launch_options("127.0.0.1", 7999, False), "prevent_thread_lock": True}),
        ("warm up",),
        ("serve",),
    ]


def test_the_page_answers_before_any_model_is_loaded(weights, gate, images):
    """Start-up as `main` does it: the server listens, then the warm-up loads the models. With
    the warm-up held inside its first load, the page and its config are served, a request waits
    for the same load instead of starting its own, and both go on once the load is done."""
    folder = ModelFolder(weights, gate=gate)
    loading, release, loads = threading.Event(), threading.Event(), []
    load = folder.store.get

    def held(name):
        loads.append(name)
        loading.set()
        release.wait(600)  # the timeout only keeps a failing test from hanging
        return load(name)

    folder.store.get = held
    demo = app.build_demo(weights, folder=folder)
    url = launch(demo)
    try:
        assert not folder.lungs.loaded and not folder.store._predictors  # building loaded nothing
        warm_up = threading.Thread(target=folder.warm_up)
        warm_up.start()
        assert loading.wait(600)
        page = httpx.get(url, timeout=120)
        assert page.status_code == 200 and "COVID-TL" in page.text
        assert httpx.get(f"{url}config", timeout=120).status_code == 200
        assert not folder.store._predictors  # still loading
        job = offline_client(url).submit(handle_file(str(images["png"])), "always", "Grad-CAM", 0.4,
                                         api_name="/classify")  # fmt: skip
        release.set()
        warm_up.join(600)
        assert not warm_up.is_alive() and job.result(timeout=600)[0]["decision"] == FLAGGED
        assert folder.lungs.loaded and list(folder.store._predictors) == ["always"]
    finally:
        release.set()
        demo.close()


# --------------------------------------------------------------------------- launched app


@pytest.mark.parametrize("key", ["png", "png16", "dicom_mono1", "dicom_frames"])
def test_classify_through_the_client(client, store, images, key):
    answer, scale, decision, held_out, original, heatmap, timing = client.predict(
        handle_file(str(images[key])), "always", "Grad-CAM", 0.4, api_name="/classify"
    )
    expected = store.get("always").predict(load_upload(images[key])).p_positive
    assert answer["p_covid"] == pytest.approx(expected, abs=1e-5) and answer["threshold"] == 0.0
    assert answer["decision"] == FLAGGED and f"**{FLAGGED}**" in decision and FLAGGED in scale and "ms" in timing
    assert np.asarray(Image.open(heatmap)).shape[:2] == (224, 224)
    assert Path(original).is_file()


def test_compare_through_the_client(client, images):
    answers, scale, gallery, ensemble = client.predict(handle_file(str(images["png"])), "Grad-CAM", api_name="/compare")
    assert [a["model"] for a in answers] == ["always", "never"]
    assert [a["decision"] for a in answers] == [FLAGGED, NOT_FLAGGED]
    assert all(0.0 <= a["p_covid"] <= 1.0 for a in answers) and [a["threshold"] for a in answers] == [0.0, 1.01]
    assert FLAGGED in scale and NOT_FLAGGED in scale
    assert len(gallery) == 2 and all(Path(item["image"]).is_file() for item in gallery)
    assert "Ensemble" in ensemble


@pytest.mark.parametrize("key, words", [("empty", "empty"), ("text", "not an image"), ("truncated", "truncated")])
def test_bad_input_through_the_client_then_the_app_keeps_serving(client, images, key, words):
    with pytest.raises(AppError, match=words):
        client.predict(handle_file(str(images[key])), "always", "Grad-CAM", 0.4, api_name="/classify")
    answer, *_ = client.predict(handle_file(str(images["png"])), "always", "Grad-CAM", 0.4, api_name="/classify")
    assert answer["decision"] == FLAGGED


def test_concurrent_requests_get_their_own_answers(client, store, tmp_path):
    paths = [
        save_png(xray_like(90 + 20 * i, seed=20 + i, bright_disk=i % 2 == 1), tmp_path / f"img{i}.png")
        for i in range(6)
    ]
    models = ["always", "never"]
    expected = [store.get(models[i % 2]).predict(load_upload(p)).p_positive for i, p in enumerate(paths)]
    jobs = [
        client.submit(handle_file(str(p)), models[i % 2], "Grad-CAM", 0.4, api_name="/classify")
        for i, p in enumerate(paths)
    ]
    for i, job in enumerate(jobs):
        answer, _, decision, *_ = job.result(timeout=600)
        assert answer["p_covid"] == pytest.approx(expected[i], abs=1e-5)
        assert answer["model"] == models[i % 2] and f"`{models[i % 2]}`" in decision
    for name in models:
        assert hook_count(store.get(name).model) == 0


@pytest.mark.parametrize("kind", list(not_xrays()))
def test_images_that_are_not_chest_xrays_are_out_of_scope_through_the_client(client, tmp_path, kind):
    path = save_png(not_xrays()[kind], tmp_path / f"{kind}.png")
    answer, scale, decision, held_out, original, heatmap, timing = client.predict(
        handle_file(str(path)), "always", "Grad-CAM", 0.4, api_name="/classify"
    )
    assert answer["decision"] == OUT_OF_SCOPE and answer["p_covid"] is None and not answer["in_scope"]
    assert decision.startswith(f"**{OUT_OF_SCOPE}: no decision.**") and heatmap is None and held_out == ""
    assert OUT_OF_SCOPE in scale and "P(COVID-19) =" not in scale  # no probability anywhere
    words = {"colour": "colour photo, not a radiograph", "uniform": "nearly uniform"}
    assert words.get(kind, "far from the chest X-rays these models learned from") in decision
    assert words.get(kind, "far from the chest X-rays") in answer["reason"]
    answers, scale, gallery, ensemble = client.predict(handle_file(str(path)), "Grad-CAM", api_name="/compare")
    assert [a["decision"] for a in answers] == [OUT_OF_SCOPE] * 2 and not gallery and OUT_OF_SCOPE in ensemble
    assert all(a["p_covid"] is None and a["reason"] for a in answers)


def test_an_answer_says_what_its_recipe_did_at_sites_it_never_saw(client, weights, store, images):
    """A model with a leave-one-source-out result beside its card answers with it, as a table
    and in the JSON, handler and API alike; a model without one says it has none."""
    held_out = {"always": cards.read_held_out(weights, store.cards["always"])}
    answer, _, _, table, *_ = app.classify(
        store, CHEAP, str(images["png"]), "always", "Grad-CAM", 0.5, held_out=held_out
    )
    assert all(row in table for row in HELD_OUT_ROWS) and "leave-one-source-out" not in table.split("|")[0][-5:]
    assert [row["source"] for row in answer["held_out"]] == ["siteA", "siteB"]
    assert answer["held_out"][1] == {"source": "siteB", "n": 50, "n_positive": 0, "auc": None, "sensitivity": None,
                                     "specificity": 0.42, "other_seeds": [0.4], "other_seeds_metric": "specificity"}
    _, _, _, table, *_ = app.classify(store, CHEAP, str(images["png"]), "never", "Grad-CAM", 0.5, held_out=held_out)
    assert "no leave-one-source-out run" in table and "siteA" not in table
    answer, _, _, table, *_ = client.predict(
        handle_file(str(images["png"])), "always", "Grad-CAM", 0.4, api_name="/classify"
    )
    assert all(row in table for row in HELD_OUT_ROWS) and answer["held_out"][0]["other_seeds"] == [0.65]
    answer, _, _, table, *_ = client.predict(
        handle_file(str(images["png"])), "never", "Grad-CAM", 0.4, api_name="/classify"
    )
    assert "siteA" not in table and answer["held_out"] == []


def test_classify_without_a_model_uses_the_default(client):
    info = client.view_api(return_format="dict", print_info=False)
    model = next(p for p in info["named_endpoints"]["/classify"]["parameters"] if p["parameter_name"] == "model_name")
    assert model["parameter_has_default"] and model["parameter_default"] == "always"


def test_named_endpoints_have_docstrings(client):
    info = client.view_api(return_format="dict", print_info=False)
    endpoints = info["named_endpoints"]
    assert set(endpoints) == {"/classify", "/compare"}
    assert "chest X-ray" in endpoints["/classify"]["description"]
    assert [p["parameter_name"] for p in endpoints["/classify"]["parameters"]] == [
        "file",
        "model_name",
        "cam_method",
        "opacity",
    ]


# --------------------------------------------------------------------------- no network at start

AUDIT = textwrap.dedent(
    """
    import json, sys
    seen = []
    LOCAL = ("127.0.0.1", "::1", "localhost", None)

    def audit(event, args):
        if event == "socket.getaddrinfo" and args[0] not in LOCAL:
            seen.append(f"lookup {args[0]}")
        elif event == "socket.connect" and isinstance(args[1], tuple) and args[1][0] not in LOCAL:
            seen.append(f"connect {args[1]}")

    sys.addaudithook(audit)
    import threading
    before = set(threading.enumerate())
    import app
    from synthetic_inputs import launch
    launch(app.demo)
    started = set(threading.enumerate()) - before
    app.demo.close()
    # gradio's version check and analytics would run in threads: wait for every thread that
    # import and launch started to end, instead of sleeping and hoping they are done.
    for thread in started | (set(threading.enumerate()) - before):
        thread.join(timeout=600)
        assert not thread.is_alive(), f"thread {thread.name} still runs"
    print(json.dumps(seen))
    """
)


def test_import_and_launch_make_no_outside_connection(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADIO_", "HF_")) or k == "GRADIO_TEMP_DIR"}
    env.update(COVIDTL_WEIGHTS=str(tmp_path), PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    result = subprocess.run(
        [sys.executable, "-c", AUDIT],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # a thread that never ends fails inside (join 600 s), not here
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_output_files_are_unique_and_old_ones_are_swept(tmp_path):
    files = app.OutputFiles(max_age_s=3600)  # "young" files must stay young through a stall of the machine
    image = xray_like(32)
    first, second = files.png(np.stack([image] * 3, axis=-1)), files.png(Image.fromarray(image))
    assert first != second and Image.open(first).size == (32, 32)
    os.utime(first, (0, 0))  # make it look an hour old: the next write removes it
    third = files.png(np.stack([image] * 3, axis=-1))
    assert not Path(first).exists() and Path(second).exists() and Path(third).exists()

