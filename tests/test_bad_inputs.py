"""Every kind of bad upload in `bad_inputs.CASES` gets exactly the outcome its entry
states (a result, or a message naming what is wrong and what is accepted), from the
handlers and from the launched app; a good request succeeds after each one; no message
carries a stack trace; oversized inputs are refused before decoding, in bounded memory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
from bad_inputs import BY_NAME, CASES, NAMES, REFUSED, RESULT, good_xray, write_corpus
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from synthetic_inputs import export_tiny_model, launched, offline_client, xray_like

import app
from covidtl.decision import FLAGGED, NOT_FLAGGED
from covidtl.inference import MAX_UPLOAD_BYTES, ModelStore, load_upload
from covidtl.scope import ScopeGate

ROOT = Path(__file__).resolve().parents[1]
CHEAP = ScopeGate()  # the input check of an app without a fitted one: colour and near-uniform only
TRACE_SIGNS = re.compile(r"Traceback|File \"|site-packages|line \d+, in|\.py\b")


def assert_no_trace(message: str) -> None:
    assert not TRACE_SIGNS.search(message), message


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("weights")
    # 64 px inputs keep each request to tens of milliseconds on one CPU thread.
    export_tiny_model(folder, "alpha", input_size=64, threshold=0.5, seed=0)
    export_tiny_model(folder, "beta", architecture="resnet18", input_size=64, threshold=0.5, seed=1)
    return folder


@pytest.fixture(scope="module")
def store(weights) -> ModelStore:
    return ModelStore(weights)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return good_xray(tmp_path_factory.mktemp("good"))


@pytest.fixture(scope="module")
def served(weights, store):
    with launched(app.build_demo(weights, store=store)) as url:
        yield url


@pytest.fixture(scope="module")
def client(served) -> Client:
    return offline_client(served)


def test_the_corpus_has_as_many_kinds_as_the_readme_says():
    stated = re.search(r"`tests/bad_inputs\.py` generates (\d+) kinds", (ROOT / "docs" / "hardening.md").read_text())
    assert stated, "docs/hardening.md no longer says how many kinds tests/bad_inputs.py generates"
    assert len(CASES) == int(stated.group(1)) and len(set(NAMES)) == len(NAMES)


def test_the_corpus_covers_at_least_30_kinds_with_stated_outcomes():
    assert len(CASES) >= 30 and len(set(NAMES)) == len(NAMES)
    assert {case.outcome for case in CASES} == {RESULT, REFUSED}
    for case in CASES:
        assert (case.outcome == REFUSED) == bool(case.words), case.name
        assert (case.outcome == RESULT) == (case.size is not None), case.name
    for required in (
        "zero_bytes", "truncated_png", "truncated_jpeg", "text_as_png", "html_as_png", "png_bomb_30000",
        "one_pixel", "strip_5x100000", "png_16_bit", "tiff_16_bit", "tiff_float_with_nan", "cmyk_jpeg",
        "palette_png_transparency", "animated_gif", "multipage_tiff", "exif_rotated_jpeg", "all_black",
        "all_white", "dicom_no_pixel_data", "dicom_compressed_no_decoder", "dicom_renamed_png", "over_upload_limit",
    ):  # fmt: skip
        assert required in BY_NAME, required


@pytest.mark.parametrize("name", ["dicom_monochrome1", "dicom_renamed_png", "dicom_multiframe"])
def test_dicom_cases_show_the_film_the_right_way_round(corpus, name):
    """The corpus stores `xray_like(96, seed=0, bright_disk=True)` in these DICOMs (the first
    frame of the multi-frame one). MONOCHROME2 shows the stored values as they are;
    MONOCHROME1 means 0 is white, so the same values must show as their negative."""
    image = np.asarray(load_upload(corpus[name]).convert("L"), dtype=float)
    stored = xray_like(96, seed=0, bright_disk=True).astype(float)
    shown = 255 - stored if name == "dicom_monochrome1" else stored
    assert image.shape == stored.shape
    assert np.corrcoef(image.ravel(), shown.ravel())[0, 1] > 0.95, "the film is shown the wrong way round"


# --------------------------------------------------------------------------- handlers


def _check_answer(answer: dict) -> None:
    """An answer in scope: a finite P(COVID-19) in [0, 1] and the decision at the threshold."""
    assert answer["in_scope"] and np.isfinite(answer["p_covid"]) and 0.0 <= answer["p_covid"] <= 1.0
    assert answer["decision"] == (FLAGGED if answer["p_covid"] >= answer["threshold"] else NOT_FLAGGED)


def _check_classify_result(outputs, size: tuple[int, int]) -> None:
    answer, scale, decision, _, original, heatmap, timing, _ = outputs
    _check_answer(answer)
    assert answer["decision"] in scale and "threshold" in decision and "ms" in timing
    assert original.size == size
    assert heatmap.shape == (64, 64, 3) and heatmap.dtype == np.uint8


@pytest.mark.parametrize("name", NAMES)
def test_handlers_give_the_stated_outcome_then_serve_a_good_request(store, corpus, good, name):
    case, path = BY_NAME[name], str(corpus[name])
    if case.outcome == RESULT:
        _check_classify_result(app.classify(store, CHEAP, path, "alpha", "Grad-CAM", 0.4), case.size)
        answers, _, gallery, ensemble = app.compare(store, CHEAP, path, "Grad-CAM")
        assert [a["model"] for a in answers] == ["alpha", "beta"] and len(gallery) == 2 and "Ensemble" in ensemble
    else:
        with pytest.raises(gr.Error) as classified:
            app.classify(store, CHEAP, path, "alpha", "Grad-CAM", 0.4)
        with pytest.raises(gr.Error) as compared:
            app.compare(store, CHEAP, path, "Grad-CAM")
        message = classified.value.message
        assert re.search(case.words, message), message
        assert compared.value.message == message
        assert_no_trace(message)
    _check_classify_result(app.classify(store, CHEAP, str(good), "beta", "Grad-CAM", 0.4), (128, 128))


def test_opacity_outside_0_to_1_is_refused_by_the_handler(store, good):
    for opacity in (1.5, -0.1, float("nan")):
        with pytest.raises(gr.Error, match="opacity must be a number from 0 to 1"):
            app.classify(store, CHEAP, str(good), "alpha", "Grad-CAM", opacity)


# --------------------------------------------------------------------------- launched app

CLIENT_CASES = [
    "zero_bytes",
    "html_file_name",
    "truncated_jpeg",
    "png_bomb_30000",
    "strip_5x100000",
    "all_black",
    "dicom_compressed_no_decoder",
    "text_named_dcm",
    "cmyk_jpeg",
    "exif_rotated_jpeg",
    "dicom_renamed_png",
]


@pytest.mark.parametrize("name", CLIENT_CASES)
def test_through_the_client_then_the_app_keeps_serving(client, corpus, good, name):
    case = BY_NAME[name]
    upload = handle_file(str(corpus[name]))
    if case.outcome == RESULT:
        answer, _, decision, _, original, *_ = client.predict(upload, "alpha", "Grad-CAM", 0.4, api_name="/classify")
        _check_answer(answer)
        assert "threshold" in decision
        assert Image.open(original).size == case.size
    else:
        with pytest.raises(AppError) as info:
            client.predict(upload, "alpha", "Grad-CAM", 0.4, api_name="/classify")
        message = str(info.value)
        assert_no_trace(message)
        if name == "html_file_name":
            # gradio strips the markup from uploaded names; nothing HTML reaches the page.
            assert "not an image this app can read" in message and "<" not in message
        else:
            assert re.search(case.words, message), message
    answer, *_ = client.predict(handle_file(str(good)), "beta", "Grad-CAM", 0.4, api_name="/classify")
    _check_answer(answer)


def test_compare_through_the_client_refuses_a_bomb_then_serves(client, corpus, good):
    with pytest.raises(AppError, match="decompression bomb"):
        client.predict(handle_file(str(corpus["png_bomb_30000"])), "Grad-CAM", api_name="/compare")
    answers, _, gallery, _ = client.predict(handle_file(str(good)), "Grad-CAM", api_name="/compare")
    assert [a["model"] for a in answers] == ["alpha", "beta"] and len(gallery) == 2


def test_upload_over_the_limit_is_refused_by_the_server_and_the_client(served, client, corpus, good):
    path = corpus["over_upload_limit"]
    assert path.stat().st_size == MAX_UPLOAD_BYTES + 1
    with open(path, "rb") as f:  # straight to the upload route, as a browser or script would
        response = httpx.post(f"{served}gradio_api/upload", files={"files": (path.name, f)}, timeout=120)
    assert response.status_code == 413 and f"maximum allowed size of {MAX_UPLOAD_BYTES} bytes" in response.text
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # gradio_client checks first
        client.predict(handle_file(str(path)), "alpha", "Grad-CAM", 0.4, api_name="/classify")
    answer, *_ = client.predict(handle_file(str(good)), "alpha", "Grad-CAM", 0.4, api_name="/classify")
    _check_answer(answer)


# --------------------------------------------------------------------------- memory

MEASURE = textwrap.dedent(
    """
    import json, sys
    from covidtl.inference import BadInputError, load_upload

    def status(key):  # KiB
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

    load_upload(sys.argv[1])  # warm up: imports, decoder plugins
    growth = {}
    for path in sys.argv[2:]:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current resident size
        before = status("VmRSS")
        try:
            load_upload(path)
            refused = False
        except BadInputError:
            refused = True
        growth[path] = {"refused": refused, "peak_growth_mib": (status("VmHWM") - before) / 1024}
    print(json.dumps(growth))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset peak memory")
def test_oversized_inputs_are_refused_before_decoding_in_bounded_memory(corpus, good):
    oversized = [str(corpus[case.name]) for case in CASES if case.oversized]
    assert len(oversized) >= 8
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(good), *oversized],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,  # a deadline only; the test measures memory, never time
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for path, seen in report.items():
        # Decoding any of these would take gigabytes (30,000 x 30,000 x 3 bytes is 2.5 GiB).
        assert seen["refused"] and seen["peak_growth_mib"] < 16, (Path(path).name, seen)
