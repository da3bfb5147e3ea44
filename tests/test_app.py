"""The Gradio app: handlers called directly, and the launched app through gradio_client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
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
from covidtl.classes import DISPLAY_NAMES
from covidtl.decision import OUT_OF_SCOPE
from covidtl.inference import ModelStore, Prediction, load_upload
from covidtl.scope import ScopeGate

ROOT = Path(__file__).resolve().parents[1]
LABELS = set(DISPLAY_NAMES.values())
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
SITE_SUMMARY = ("siteA AUC 0.700, sensitivity 0.900, specificity 0.300 (other seeds: AUC 0.650); "
                "siteB specificity 0.420 (other seeds: specificity 0.400).")


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
    label, decision, original, heatmap, timing, state = app.classify(
        store, CHEAP, str(images["png"]), "always", "Grad-CAM", 0.5
    )
    confidences = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert set(confidences) == LABELS and sum(confidences.values()) == pytest.approx(1.0)
    assert label["label"] == "COVID-19"  # threshold 0: flagged whichever class is larger
    assert decision.startswith("**COVID-19** by `always`") and "threshold 0.000" in decision
    assert original.size == (160, 160)
    assert heatmap.shape == (224, 224, 3) and heatmap.dtype == np.uint8
    assert "ms" in timing and "Grad-CAM" in timing
    assert app.reblend(state, 0.0).tolist() == state["view"].tolist()
    assert app.reblend(None, 0.3) is None
    label, decision, *_ = app.classify(store, CHEAP, str(images["png"]), "never", "Eigen-CAM", 0.5)
    assert label["label"] == "Negative" and decision.startswith("**Negative** by `never`")
    label, *_ = app.classify(store, CHEAP, str(images["png"]), None, "Grad-CAM", 0.5)  # no model: the default
    assert label["label"] == "COVID-19"


def test_compare_handler(store, images):
    rows, gallery, ensemble = app.compare(store, CHEAP, str(images["dicom_mono1"]), "Grad-CAM++")
    assert [row[0] for row in rows] == store.names()
    assert [row[3] for row in rows] == ["COVID-19", "Negative"]
    assert [row[2] for row in rows] == [0.0, 1.01]  # each model's threshold beside its probability
    assert all(0.0 <= row[1] <= 1.0 and row[4] > 0 for row in rows)
    assert len(gallery) == 2 and gallery[0][0].shape == (224, 224, 3)
    assert "disagree" in ensemble and "1 of 2" in ensemble and "mean" in ensemble


def _pred(p: float, decision: bool) -> Prediction:
    return Prediction({"negative": 1 - p, "positive": p}, p, decision, 0.5, 1.0)


def test_agreement_sentences():
    assert "All 2 models" in app.agreement_markdown(["a", "b"], [_pred(0.9, True), _pred(0.7, True)])
    assert "None of the 2" in app.agreement_markdown(["a", "b"], [_pred(0.1, False), _pred(0.2, False)])
    assert "Only one model" in app.agreement_markdown(["a"], [_pred(0.1, False)])
    text = app.agreement_markdown(["a", "b", "c"], [_pred(0.9, True), _pred(0.2, False), _pred(0.1, False)])
    assert "1 of 3 flag COVID-19 (a)" in text and "0.400" in text


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
    on first use (and then does open the shipped weights: the check can see it)."""
    code = textwrap.dedent(
        """
        import sys
        opened = []
        sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
        import app
        weights = lambda: [p for p in opened if p.endswith(".safetensors")]
        assert "demo" not in vars(app) and weights() == [], weights()
        app.demo
        assert weights(), "building the demo opened no weights: the check above sees nothing"
        """
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)


def test_main_serves_the_demo_its_flags_configure(monkeypatch, tmp_path):
    """`python app.py --weights-dir ... --examples-dir ... --queue-size ... --port ...` builds the
    demo from those flags (not from the environment's `app.demo`) and launches it on that port."""
    import logging

    calls = {}

    class Served:
        def launch(self, **options):
            calls["launch"] = options

    def build_demo(weights_dir, examples_dir, queue_size):
        calls["build"] = (weights_dir, examples_dir, queue_size)
        return Served()

    monkeypatch.setenv("COVIDTL_WEIGHTS", str(tmp_path / "from-env"))
    monkeypatch.setattr(app, "build_demo", build_demo)
    logger = logging.getLogger("covidtl")
    level = logger.level
    try:
        app.main(["--weights-dir", str(tmp_path / "w"), "--examples-dir", str(tmp_path / "e"),
                  "--queue-size", "3", "--port", "7999", "--host", "127.0.0.1", "--no-share"])
    finally:
        logger.setLevel(level)  # main sets it for the served app
    assert calls["build"] == (tmp_path / "w", tmp_path / "e", 3)
    assert calls["launch"] == app.launch_options("127.0.0.1", 7999, False)


# --------------------------------------------------------------------------- launched app


def _p_covid(label: dict) -> float:
    return next(c["confidence"] for c in label["confidences"] if c["label"] == "COVID-19")


@pytest.mark.parametrize("key", ["png", "png16", "dicom_mono1", "dicom_frames"])
def test_classify_through_the_client(client, store, images, key):
    label, decision, original, heatmap, timing = client.predict(
        handle_file(str(images[key])), "always", "Grad-CAM", 0.4, api_name="/classify"
    )
    assert {c["label"] for c in label["confidences"]} == LABELS
    expected = store.get("always").predict(load_upload(images[key])).p_positive
    assert _p_covid(label) == pytest.approx(expected, abs=1e-5)
    assert label["label"] == "COVID-19" and "**COVID-19**" in decision and "ms" in timing
    assert np.asarray(Image.open(heatmap)).shape[:2] == (224, 224)
    assert Path(original).is_file()


def test_compare_through_the_client(client, images):
    table, gallery, ensemble = client.predict(handle_file(str(images["png"])), "Grad-CAM", api_name="/compare")
    assert table["headers"] == ["model", "P(COVID-19)", "threshold", "decision", "latency (ms)"]
    assert [row[0] for row in table["data"]] == ["always", "never"]
    assert [row[3] for row in table["data"]] == ["COVID-19", "Negative"]
    assert len(gallery) == 2 and all(Path(item["image"]).is_file() for item in gallery)
    assert "Ensemble" in ensemble


@pytest.mark.parametrize("key, words", [("empty", "empty"), ("text", "not an image"), ("truncated", "truncated")])
def test_bad_input_through_the_client_then_the_app_keeps_serving(client, images, key, words):
    with pytest.raises(AppError, match=words):
        client.predict(handle_file(str(images[key])), "always", "Grad-CAM", 0.4, api_name="/classify")
    label, *_ = client.predict(handle_file(str(images["png"])), "always", "Grad-CAM", 0.4, api_name="/classify")
    assert {c["label"] for c in label["confidences"]} == LABELS


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
        label, decision, *_ = job.result(timeout=600)
        assert _p_covid(label) == pytest.approx(expected[i], abs=1e-5)
        assert f"`{models[i % 2]}`" in decision
    for name in models:
        assert hook_count(store.get(name).model) == 0


@pytest.mark.parametrize("kind", list(not_xrays()))
def test_images_that_are_not_chest_xrays_are_out_of_scope_through_the_client(client, tmp_path, kind):
    path = save_png(not_xrays()[kind], tmp_path / f"{kind}.png")
    label, decision, original, heatmap, timing = client.predict(
        handle_file(str(path)), "always", "Grad-CAM", 0.4, api_name="/classify"
    )
    assert label["label"] == OUT_OF_SCOPE and not label["confidences"]  # no decision, no confidences
    assert decision.startswith(f"**{OUT_OF_SCOPE}: no decision.**") and heatmap is None
    words = {"colour": "colour photo, not a radiograph", "uniform": "nearly uniform"}
    assert words.get(kind, "far from the chest X-rays these models learned from") in decision
    table, gallery, ensemble = client.predict(handle_file(str(path)), "Grad-CAM", api_name="/compare")
    assert [row[3] for row in table["data"]] == [OUT_OF_SCOPE] * 2 and not gallery and OUT_OF_SCOPE in ensemble


def test_an_answer_says_what_its_recipe_did_at_sites_it_never_saw(client, weights, store, images):
    """The decision of a model with a leave-one-source-out result beside its card ends with it,
    handler and API alike; a model without one says nothing of the kind."""
    held_out = {"always": cards.read_held_out(weights, store.cards["always"])}
    _, decision, *_ = app.classify(store, CHEAP, str(images["png"]), "always", "Grad-CAM", 0.5, held_out=held_out)
    assert decision.endswith(SITE_SUMMARY) and "leave-one-source-out" in decision
    _, decision, *_ = app.classify(store, CHEAP, str(images["png"]), "never", "Grad-CAM", 0.5, held_out=held_out)
    assert "leave-one-source-out" not in decision
    _, decision, *_ = client.predict(handle_file(str(images["png"])), "always", "Grad-CAM", 0.4, api_name="/classify")
    assert decision.endswith(SITE_SUMMARY)
    _, decision, *_ = client.predict(handle_file(str(images["png"])), "never", "Grad-CAM", 0.4, api_name="/classify")
    assert "leave-one-source-out" not in decision


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
    label = files.label({"label": "Negative", "confidences": []})
    assert json.loads(Path(label).read_text())["label"] == "Negative"
    os.utime(label, (0, 0))  # old labels are swept too
    files.png(Image.fromarray(image))
    assert not Path(label).exists()
