"""Safety of the launched app: it runs nobody's code, reads no file it was not given, and
refuses overload cleanly.

- pickled weights (``.pt``, ``.pth``, ``.ckpt``, a pickle named ``.safetensors``) in the
  weights folder are never unpickled: unpickling any of them would create a marker file;
- a model name from the API is only ever looked up among the cards, so ``../`` and
  absolute paths are rejected and never reach the file system;
- gradio's file routes serve uploads and the app's outputs, never /etc/passwd, the
  repository's sources or the weights; a request cannot name a server path as its upload;
- the queue refuses requests beyond its size at once ("queue full"), and no request can
  skip the queue;
- an export killed at any moment (SIGKILL) leaves nothing the app would load wrongly.

Upload size limits are checked in test_bad_inputs.py; atomic writes and checksums in
test_export.py.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from urllib.parse import quote

import gradio as gr
import httpx
import pytest
import torch
from bad_inputs import good_xray
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError
from synthetic_inputs import export_tiny_model, launch, launched, offline_client

import app
from covidtl import inference
from covidtl.export import read_card, sha256_file
from covidtl.inference import ModelLoadError, ModelStore
from covidtl.scope import ScopeGate

ROOT = Path(__file__).resolve().parents[1]


class _Marker:
    """Unpickling this creates the file `path`: proof that something ran pickle code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def booby_trapped(tmp_path_factory) -> tuple[Path, Path]:
    """(weights folder, marker): one good model beside pickles that would create `marker`."""
    root = tmp_path_factory.mktemp("trapped")
    weights, marker = root / "weights", root / "UNPICKLED"
    weights.mkdir()
    export_tiny_model(weights, "good", input_size=64)
    bomb = pickle.dumps(_Marker(marker))
    for name in ("evil.pt", "evil.pth", "evil.ckpt", "state.bin", "model.pkl"):
        (weights / name).write_bytes(bomb)
    # A card beside a pickle, and a pickle under a safetensors name with a valid card.
    (weights / "evil.json").write_text((weights / "good.json").read_text().replace('"good"', '"evil"'))
    (weights / "disguised.safetensors").write_bytes(bomb)
    (weights / "disguised.json").write_text((weights / "good.json").read_text().replace('"good"', '"disguised"'))
    # A real model outside the weights folder, for the path-traversal attempts.
    export_tiny_model(root / "outside", "outside", input_size=64)
    return weights, marker


@pytest.fixture(scope="module")
def served(booby_trapped):
    weights, _ = booby_trapped
    with launched(app.build_demo(weights)) as url:
        yield url


@pytest.fixture(scope="module")
def client(served) -> Client:
    return offline_client(served)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return good_xray(tmp_path_factory.mktemp("good"))


# --------------------------------------------------------------------------- pickles


def test_pickles_in_the_weights_folder_are_never_unpickled(booby_trapped, client, good, monkeypatch):
    weights, marker = booby_trapped
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or pytest.fail("torch.load was called"))

    store = ModelStore(weights)
    assert store.names() == ["disguised", "good"]  # only .safetensors with a card are offered
    for name in ("evil.pt", "evil.pth", "evil.ckpt", "state.bin", "model.pkl"):
        assert "never loaded" in store.skipped[name], name
    with pytest.raises(ModelLoadError, match="disguised.*could not be loaded"):
        store.get("disguised")
    assert list(inference.load_predictors(weights)) == ["good"]

    # Through the launched app: the disguised pickle is refused with a message, "evil" is
    # no choice at all, and the good model still answers.
    with pytest.raises(AppError, match="could not be loaded") as info:
        client.predict(handle_file(str(good)), "disguised", "Grad-CAM", 0.4, api_name="/classify")
    assert "Traceback" not in str(info.value)
    with pytest.raises(AppError, match="not in the list of choices"):
        client.predict(handle_file(str(good)), "evil", "Grad-CAM", 0.4, api_name="/classify")
    answers, *_ = client.predict(handle_file(str(good)), "Grad-CAM", api_name="/compare")
    assert [answer["model"] for answer in answers] == ["good"]
    assert not marker.exists() and loads == []


def test_the_models_tab_says_why_pickles_are_not_offered(served):
    config = httpx.get(f"{served}config", timeout=120).text
    assert "evil.pt" in config and "pickled checkpoints are never loaded" in config


# --------------------------------------------------------------------------- model names

TRAVERSALS = [
    "../outside/outside",
    "../../etc/passwd",
    "/etc/passwd",
    "..\\outside",
    "good/../good",
    "good.safetensors",
]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_model_names_with_paths_are_rejected_by_the_handler(booby_trapped, good, name, monkeypatch):
    weights, _ = booby_trapped
    opened = []
    monkeypatch.setattr(inference.Predictor, "from_file", classmethod(lambda cls, path, *a: opened.append(path)))
    store = ModelStore(weights)
    with pytest.raises(gr.Error, match=r"Unknown model .*; choose one of disguised, good\."):
        app.classify(store, ScopeGate(), str(good), name, "Grad-CAM", 0.4)
    with pytest.raises(ValueError, match="unknown model"):
        store.get(name)
    assert opened == []  # no path was ever built from the name


def test_model_names_with_paths_are_rejected_through_the_api(client, good, booby_trapped):
    outside = booby_trapped[0].parent / "outside" / "outside.safetensors"
    for name in [*TRAVERSALS, str(outside), str(outside.with_suffix(""))]:
        with pytest.raises(AppError, match="not in the list of choices"):
            client.predict(handle_file(str(good)), name, "Grad-CAM", 0.4, api_name="/classify")


# --------------------------------------------------------------------------- files served


def test_file_routes_serve_uploads_but_nothing_outside_the_app(served, booby_trapped):
    weights, _ = booby_trapped
    upload = httpx.post(f"{served}gradio_api/upload", files={"files": ("probe.png", b"\x89PNG probe")}, timeout=120)
    uploaded = upload.json()[0]
    assert httpx.get(f"{served}gradio_api/file={uploaded}", timeout=120).content == b"\x89PNG probe"  # route works

    secrets = {
        "/etc/passwd": b"root:",
        str(ROOT / "app.py"): b"gr.Blocks",
        str(ROOT / "covidtl" / "inference.py"): b"class Predictor",
        str(ROOT / "assets" / "examples" / "cohen-covid19-5782ae15.jpg"): b"\xff\xd8\xff",
        str(weights / "good.safetensors"): b"",
        str(weights / "good.json"): b'"architecture"',
    }
    for target, content in secrets.items():
        relative = os.path.relpath(target, ROOT)
        # Percent-encoded dots: httpx would resolve literal "../" before sending.
        escaped = f"{Path(uploaded).parent}/" + "/".join(["%2E%2E"] * 6) + target
        for route in (
            f"gradio_api/file={target}",
            f"gradio_api/file/{target}",
            f"file={target}",
            f"gradio_api/file={relative}",
            f"gradio_api/file={escaped}",
            f"gradio_api/file={quote(target, safe='')}",
            f"static/{relative}",
            f"assets/{relative}",
        ):
            response = httpx.get(f"{served}{route}", timeout=120)
            assert response.status_code in (403, 404), (route, response.status_code)
            assert not (content and content in response.content), route


def test_a_request_cannot_name_a_server_file_as_its_upload(served, booby_trapped):
    weights, _ = booby_trapped
    for path in ("/etc/passwd", str(ROOT / "app.py"), str(weights / "good.safetensors")):
        file_data = {"path": path, "meta": {"_type": "gradio.FileData"}}
        joined = httpx.post(
            f"{served}gradio_api/call/classify", json={"data": [file_data, "good", "Grad-CAM", 0.4]}, timeout=120
        )
        events = httpx.get(f"{served}gradio_api/call/classify/{joined.json()['event_id']}", timeout=120).text
        assert events.startswith("event: error") and "root:" not in events and "COVID-19" not in events, events


def test_no_request_skips_the_queue(served):
    response = httpx.post(f"{served}gradio_api/run/classify", json={"data": [None, "good", "Grad-CAM", 0.4]})
    assert response.status_code == 404 and "join the queue" in response.text


def test_an_unexpected_error_shows_no_trace_or_detail(tmp_path, good):
    class BrokenStore(ModelStore):
        def get(self, name):
            raise RuntimeError(f"internal detail {ROOT}/covidtl/secret.py line 42")

    weights = tmp_path / "weights"
    export_tiny_model(weights, "good", input_size=64)
    demo = app.build_demo(weights, store=BrokenStore(weights))
    url = launch(demo)
    try:
        with pytest.raises(AppError) as info:
            offline_client(url).predict(handle_file(str(good)), "good", "Grad-CAM", 0.4, api_name="/classify")
    finally:
        demo.close()
    message = str(info.value)
    assert "internal detail" not in message and "secret.py" not in message and "Traceback" not in message, message


# --------------------------------------------------------------------------- overload


class _GatedStore(ModelStore):
    """A store whose `get` waits for `gate`: requests stay in flight until the test opens it."""

    def __init__(self, weights_dir: Path) -> None:
        super().__init__(weights_dir)
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)

    def get(self, name):
        self.entered.release()
        self.gate.wait(600)  # opened by the test; the timeout only keeps a failing test from hanging
        return super().get(name)


def _wait_for(condition, seconds: float = 600) -> None:
    """Poll `condition` until it holds; the deadline is far beyond what a loaded machine needs."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_full_queue_refuses_at_once_and_then_serves_again(tmp_path, good):
    weights = tmp_path / "weights"
    export_tiny_model(weights, "good", input_size=64)
    store = _GatedStore(weights)
    demo = app.build_demo(weights, store=store, queue_size=1)
    url = launch(demo)
    try:
        client = offline_client(url)
        args = (handle_file(str(good)), "good", "Grad-CAM", 0.4)
        running = []
        for _ in range(app.CONCURRENCY_LIMIT):
            # One at a time: with a queue of one, a second request sent before the first has
            # left the queue for a worker (slow on a busy machine) would be refused as full.
            running.append(client.submit(*args, api_name="/classify"))
            assert store.entered.acquire(timeout=600)  # inside the handler, held at the gate
        waiting = client.submit(*args, api_name="/classify")
        _wait_for(lambda: len(demo._queue) == 1)
        for _ in range(5):
            with pytest.raises(QueueError, match="Queue is full"):
                client.predict(*args, api_name="/classify")
        # Refused at once, not after waiting: with the gate still shut no queued request could
        # have been answered, so each refusal came while nothing had moved.
        assert not store.gate.is_set() and len(demo._queue) == 1 and not any(job.done() for job in running)
        store.gate.set()
        answers = [job.result(timeout=600)[0]["decision"] for job in [*running, waiting]]
        assert len(answers) == 3
        assert client.predict(*args, api_name="/classify")[0]["decision"] == answers[0]
    finally:
        store.gate.set()
        demo.close()


# --------------------------------------------------------------------------- killed exports

EXPORT_LOOP = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from covidtl.export import export_model
    from covidtl.models import create_model
    card = {"name": "m", "architecture": "squeezenet1_1", "input_size": 64, "mean": [0.5] * 3,
            "std": [0.25] * 3, "threshold": 0.5}
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(create_model("squeezenet1_1", pretrained=False))
    print("ready", flush=True)
    i = 0
    while True:  # until killed
        export_model(models[i % 2], card, Path(sys.argv[1]))
        i += 1
    """
)


def test_an_export_killed_at_any_moment_leaves_nothing_the_app_loads_wrongly(tmp_path):
    weights = tmp_path / "weights"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for delay in (0.05, 0.23, 0.41):
        proc = subprocess.Popen(
            [sys.executable, "-c", EXPORT_LOOP, str(weights)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout.readline().strip() == "ready"
            _wait_for(lambda: (weights / "m.json").is_file())
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=300)
            proc.stdout.close()

        store = ModelStore(weights)
        assert store.names() == ["m"]  # temporary files (.m.safetensors.*.tmp) are never offered
        card = read_card(weights / "m.json")
        try:
            predictor = store.get("m")
        except ModelLoadError as err:  # killed between the weights' rename and the card's
            assert "checksum" in str(err)
            assert sha256_file(weights / "m.safetensors") != card["weights_sha256"]
        else:
            assert sha256_file(weights / "m.safetensors") == card["weights_sha256"]
            assert predictor.name == "m"
    leftovers = sorted(p.name for p in weights.iterdir() if p.name.endswith(".tmp"))
    assert all(name.startswith(".m.") for name in leftovers), leftovers  # hidden, and never listed
    assert json.loads((weights / "m.json").read_text())["name"] == "m"


# --------------------------------------------------------------------------- many users


def test_the_load_test_asks_for_the_shipped_classifiers_not_the_lung_model():
    """benchmarks/load_test.py on the shipped weights (the run in docs/speed.md) names each classifier
    the app serves; the lung model's card beside them is not a classifier's."""
    from benchmarks import load_test

    weights = ROOT / "weights"
    names = load_test.model_names(weights)
    assert (weights / "lungs_lite0_unet.json").is_file() and "lungs_lite0_unet" not in names
    cards = [json.loads(p.with_suffix(".json").read_text()) for p in sorted(weights.glob("*.safetensors"))]
    assert names == [card["name"] for card in cards if card.get("task", "classification") == "classification"]
    assert len(names) == len(cards) - 1 >= 1


def test_the_load_test_passes_at_small_scale():
    """benchmarks/load_test.py at 3 clients x 2 requests, so the benchmark keeps working;
    the full 32 x 10 run is in docs/speed.md."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "load_test.py"), "--clients", "3", "--requests", "2",
         "--images", "2", "--random-models", "--timeout", "600"],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=1200,  # the script's own --timeout ends it first; 3x a loaded machine's slowest run
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "6 finished, 0 unfinished, 0 errors, 0 mismatches" in proc.stdout
    assert "p95" in proc.stdout
