"""Load test: many gradio_client users at once against the launched app.

    python benchmarks/load_test.py                          # 32 clients x 10 requests
    python benchmarks/load_test.py --clients 4 --requests 2 # a quick look
    python benchmarks/load_test.py --weights-dir weights    # the shipped models
    python benchmarks/load_test.py --random-models          # two untrained models
    python benchmarks/load_test.py --overload               # a tiny queue refuses the excess

The app runs as its own process (`python app.py`) on 127.0.0.1 and a free port. Without
`--weights-dir` (or when `weights/` holds no model) two untrained models with random
weights are exported to a temporary folder: their outputs differ from image to image,
which is all a test of "no answers mixed between users" needs.

Load mode: every (endpoint, image, model) is first asked once on its own; then N client
threads, each with its own `gradio_client.Client`, send M requests each, one after the
other, mixing /classify and /compare over a few images (the shipped example films at new
sizes and formats with real models, drawn X-ray-like patterns with untrained ones) and the models. Every
answer must equal the single-request answer: probabilities within 1e-6, decisions and
texts exactly, heatmaps within one gray level. Prints errors, mismatches, p50/p95
latency and the server's peak memory; exits 1 on any error or mismatch.

Overload mode: the app gets a queue of `--queue-size` (default 2) and a burst of
`--burst` requests at once. The excess must be refused at once with gradio's
"Queue is full" (not queued without bound), everything accepted must be answered
correctly, and a request afterwards must succeed; exits 1 otherwise.

Bounded: every request has a deadline (`--timeout`, whole run) and the server is
stopped at the end whatever happens.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "assets" / "examples"  # real chest X-rays, shipped with their credits

TOLERANCE = 1e-6  # probabilities
HEATMAP_TOLERANCE = 1  # gray levels, per pixel
METHOD = "Grad-CAM"


# --------------------------------------------------------------------------- fixtures


def synthetic_images(folder: Path, count: int, films: list[Path] | None = None) -> list[Path]:
    """`count` X-ray-like images of different sizes, formats and bit depths. With `films`
    (real chest X-rays), image i is film i (cycling) at a new size and format instead of a
    drawn pattern: the shipped models' input check refuses the drawn ones, and a load test
    should reach the models."""
    paths = []
    for i in range(count):
        size = 200 + 48 * i
        if films:
            with Image.open(films[i % len(films)]) as film:
                pixels = np.asarray(film.convert("L").resize((2 * size, 2 * size)), dtype=np.uint8)
            pixels = pixels if i < len(films) else np.ascontiguousarray(pixels[:, ::-1])  # another image
        else:
            rng = np.random.default_rng(100 + i)
            yy, xx = np.mgrid[0:size, 0:size] / size
            image = 150.0 + rng.normal(0.0, 15.0, (size, size))
            for cx in (0.3, 0.7):
                image -= 80.0 * (((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)
            image += (90.0 if i % 2 else 0.0) * (np.hypot(xx - 0.5 - 0.05 * i, yy - 0.5) < 0.12)
            pixels = np.clip(image, 0, 255).astype(np.uint8)
        kind = i % 4
        if kind == 0:
            path = folder / f"xray{i}.png"
            Image.fromarray(pixels).save(path)
        elif kind == 1:
            path = folder / f"xray{i}.jpg"
            Image.fromarray(pixels).convert("RGB").save(path, quality=92)
        elif kind == 2:
            path = folder / f"xray{i}_16bit.png"
            Image.fromarray(pixels.astype(np.uint16) * 257).save(path)
        else:
            path = folder / f"xray{i}.tif"
            Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def synthetic_models(folder: Path) -> None:
    """Two untrained models whose outputs vary with the image. Thresholds sit near the
    middle of their outputs on the synthetic images, so both decisions occur."""
    import torch

    from covidtl.export import export_model
    from covidtl.models import create_model

    for name, architecture, seed, threshold in (
        ("random_resnet18", "resnet18", 0, 0.37),
        ("random_lite0", "efficientnet_lite0", 1, 0.045),
    ):
        torch.manual_seed(seed)
        card = {
            "name": name,
            "architecture": architecture,
            "input_size": 224,
            "mean": [0.5] * 3,
            "std": [0.25] * 3,
            "threshold": threshold,
        }
        export_model(create_model(architecture, pretrained=False), card, folder)


def model_names(folder: Path) -> list[str]:
    """The classifiers the app serves from `folder` (card names; not the lung model)."""
    from covidtl.export import list_exported, read_card

    return [read_card(path.with_suffix(".json"))["name"] for path in list_exported(folder)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the server


class Server:
    """`python app.py` in its own process, stopped (SIGTERM, then SIGKILL) on exit."""

    PORT_ATTEMPTS = 5

    def __init__(self, weights_dir: Path, queue_size: int | None, log_path: Path) -> None:
        self.env = {
            **os.environ,
            "COVIDTL_HOST": "127.0.0.1",
            "COVIDTL_WEIGHTS": str(weights_dir),
            "GRADIO_ANALYTICS_ENABLED": "False",
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("COVIDTL_EXAMPLES", None)
        self.env.pop("COVIDTL_QUEUE_SIZE", None)
        if queue_size is not None:
            self.env["COVIDTL_QUEUE_SIZE"] = str(queue_size)
        self.log_path = log_path
        self.attempts = 0
        self._spawn()

    def _spawn(self) -> None:
        """Start the app on a port free right now (another process may take it before the app
        binds it: `wait_ready` then starts it again on another)."""
        self.attempts += 1
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - the server writes to it until stop()
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "app.py")], cwd=REPO, env={**self.env, "COVIDTL_PORT": str(self.port)},
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if "Cannot find empty port" in self.log_tail() and self.attempts < self.PORT_ATTEMPTS:
                    self._log.close()
                    self._spawn()
                    continue
                raise RuntimeError(f"the app exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}config", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the app did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def memory_mib(self) -> dict[str, int]:
        """Current and peak resident memory of the server (Linux /proc), in MiB."""
        try:
            fields = dict(
                line.split(":", 1) for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines()
            )
        except (OSError, ValueError):
            return {}
        return {key: round(int(fields[key].split()[0]) / 1024) for key in ("VmRSS", "VmHWM") if key in fields}

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self._log.close()


# --------------------------------------------------------------------------- answers


def offline_client(url: str, downloads: Path):
    from gradio_client import Client

    # gradio_client only skips its telemetry thread when this variable says so.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    # httpx_kwargs: gradio_client's 5 s default per HTTP call is too short on a busy machine.
    return Client(url, verbose=False, analytics_enabled=False, download_files=str(downloads),
                  httpx_kwargs={"timeout": 120})


def heatmap_pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def summarize(endpoint: str, result: tuple) -> dict[str, Any]:
    """The parts of an answer that must not depend on who else is using the app."""
    if endpoint == "/classify":
        answer, _scale, _decision, _held_out, _original, heatmap, _timing = result
        return {
            "p_covid": answer["p_covid"],  # None for a refused image
            "decision": (answer["model"], answer["decision"], answer["threshold"]),
            "heatmap": heatmap_pixels(heatmap) if heatmap else None,  # none for a refused image
        }
    answers, _scale, gallery, ensemble = result
    return {
        "rows": [(a["model"], a["p_covid"], a["decision"]) for a in answers],  # timings vary
        "captions": [item.get("caption") for item in gallery],
        "heatmaps": [heatmap_pixels(item["image"]) for item in gallery],
        "ensemble": ensemble,
    }


def _close(a: float | None, b: float | None) -> bool:
    return a == b if a is None or b is None else abs(a - b) <= TOLERANCE


def differences(got: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Why `got` is not the single-request answer `expected` (empty when equal)."""
    problems = []
    for key, want in expected.items():
        have = got.get(key)
        if key == "p_covid":
            if not _close(have, want):
                problems.append(f"P(COVID-19) {have} != {want}")
        elif key == "rows":
            names_ok = [r[0] for r in have] == [r[0] for r in want] and [r[2] for r in have] == [r[2] for r in want]
            if not names_ok or not all(_close(a[1], b[1]) for a, b in zip(have, want)):
                problems.append(f"answers {have} != {want}")
        elif key in ("heatmap", "heatmaps"):
            have, want = ([have], [want]) if key == "heatmap" else (have, want)
            if len(have) != len(want) or any(
                a.shape != b.shape or np.abs(a - b).max() > HEATMAP_TOLERANCE for a, b in zip(have, want)
            ):
                problems.append(f"{key} differ by more than {HEATMAP_TOLERANCE} gray level")
        elif have != want:
            problems.append(f"{key} {have!r} != {want!r}")
    return problems


@dataclass(frozen=True)
class Request:
    endpoint: str
    image: int
    model: str | None  # None for /compare

    def args(self, images: list[Path]) -> tuple:
        from gradio_client import handle_file

        upload = handle_file(str(images[self.image]))
        return (upload, self.model, METHOD, 0.4) if self.endpoint == "/classify" else (upload, METHOD)

    def __str__(self) -> str:
        return f"{self.endpoint} image {self.image}" + (f" model {self.model}" if self.model else "")


@dataclass
class Outcome:
    request: Request
    seconds: float
    error: str | None = None
    mismatch: list[str] = field(default_factory=list)


def ask(client, request: Request, images: list[Path], timeout: float) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    job = client.submit(*request.args(images), api_name=request.endpoint)
    result = job.result(timeout=max(1.0, timeout))
    return time.perf_counter() - started, summarize(request.endpoint, result)


def plan(clients: int, requests: int, n_images: int, models: list[str]) -> list[list[Request]]:
    """Requests per client: a third to /compare, the rest /classify, over images and models."""
    work = []
    for c in range(clients):
        mine = []
        for r in range(requests):
            image = (c * 7 + r * 3) % n_images
            if (c + r) % 3 == 0:
                mine.append(Request("/compare", image, None))
            else:
                mine.append(Request("/classify", image, models[(c + r) % len(models)]))
        work.append(mine)
    return work


def reference_answers(
    client, requests: set[Request], images: list[Path], deadline: float
) -> dict[Request, dict[str, Any]]:
    """Each distinct request asked alone, one after the other."""
    return {r: ask(client, r, images, deadline - time.monotonic())[1] for r in sorted(requests, key=str)}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# --------------------------------------------------------------------------- modes


def run_load(url: str, work_dir: Path, images: list[Path], models: list[str], args, log: Callable) -> int:
    deadline = time.monotonic() + args.timeout
    work = plan(args.clients, args.requests, len(images), models)
    distinct = {r for mine in work for r in mine}
    reference_client = offline_client(url, work_dir / "downloads" / "reference")
    started = time.perf_counter()
    expected = reference_answers(reference_client, distinct, images, deadline)
    single = time.perf_counter() - started
    log(f"reference: {len(distinct)} distinct requests asked one at a time in {single:.1f} s")

    outcomes: list[Outcome] = []
    lock = threading.Lock()
    barrier = threading.Barrier(args.clients)

    def user(index: int) -> None:
        mine: list[Outcome] = []
        client, failure = None, None
        try:
            client = offline_client(url, work_dir / "downloads" / f"client{index}")
        except Exception as err:  # noqa: BLE001 - a benchmark reports every failure and goes on
            failure = f"client failed to connect: {type(err).__name__}: {err}"
        try:  # all clients start sending together
            barrier.wait(timeout=max(1.0, deadline - time.monotonic()))
        except threading.BrokenBarrierError:
            pass
        for request in work[index]:
            remaining = deadline - time.monotonic()
            if client is None or remaining <= 0:
                mine.append(Outcome(request, 0.0, failure or "not sent: the run's time limit was reached"))
                continue
            t0 = time.perf_counter()
            try:
                seconds, answer = ask(client, request, images, remaining)
            except Exception as err:  # noqa: BLE001 - reported below; TimeoutError included
                mine.append(Outcome(request, time.perf_counter() - t0, f"{type(err).__name__}: {err}"))
                continue
            mine.append(Outcome(request, seconds, mismatch=differences(answer, expected[request])))
        with lock:
            outcomes.extend(mine)

    log(f"load: {args.clients} clients x {args.requests} requests, at most {args.timeout:.0f} s in all")
    started = time.perf_counter()
    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()) + 30)
    wall = time.perf_counter() - started
    missing = args.clients * args.requests - len(outcomes)

    errors = [o for o in outcomes if o.error]
    mismatches = [o for o in outcomes if o.mismatch]
    for o in errors[:20]:
        log(f"ERROR    {o.request}: {o.error[:300]}")
    for o in mismatches[:20]:
        log(f"MISMATCH {o.request}: {'; '.join(o.mismatch)[:300]}")
    answered = [o for o in outcomes if not o.error]
    log(f"requests: {len(outcomes)} finished, {missing} unfinished, {len(errors)} errors, {len(mismatches)} mismatches")
    for endpoint in ("/classify", "/compare", None):
        seconds = [o.seconds for o in answered if endpoint in (None, o.request.endpoint)]
        name = endpoint or "all"
        if seconds:
            log(
                f"latency {name:9s} n={len(seconds):4d}  p50 {percentile(seconds, 50):6.2f} s  "
                f"p95 {percentile(seconds, 95):6.2f} s  max {max(seconds):6.2f} s  mean {statistics.mean(seconds):6.2f} s"
            )
    log(f"wall {wall:.1f} s, {len(answered) / wall:.2f} answers/s")
    return 1 if errors or mismatches or missing else 0


def run_overload(url: str, work_dir: Path, images: list[Path], models: list[str], args, memory, log) -> int:
    deadline = time.monotonic() + args.timeout
    requests = [Request("/classify", i % len(images), models[i % len(models)]) for i in range(args.burst)]
    client = offline_client(url, work_dir / "downloads" / "overload")
    expected = reference_answers(client, set(requests), images, deadline)
    before = memory()
    log(f"overload: a burst of {args.burst} requests at a queue of {args.queue_size}; server memory {before}")

    from gradio_client.utils import QueueError

    started = time.perf_counter()
    jobs = [(r, client.submit(*r.args(images), api_name=r.endpoint)) for r in requests]
    finished: dict[int, float] = {}  # job index -> seconds from the burst to its answer or refusal
    for index, (_, job) in enumerate(jobs):
        job.future.add_done_callback(lambda _, i=index: finished.setdefault(i, time.perf_counter() - started))
    counts: Counter[str] = Counter()
    refusal_seconds, problems = [], []
    for index, (request, job) in enumerate(jobs):
        try:
            result = job.result(timeout=max(1.0, deadline - time.monotonic()))
        except QueueError as err:
            counts["refused (queue full)"] += 1
            refusal_seconds.append(finished.get(index, float("nan")))
            if "Queue is full" not in str(err):
                problems.append(f"unexpected refusal text: {err}")
        except Exception as err:  # noqa: BLE001 - reported below; TimeoutError included
            counts["other error"] += 1
            problems.append(f"{request}: {type(err).__name__}: {err}"[:300])
        else:
            counts["answered"] += 1
            problems += [f"{request}: {d}" for d in differences(summarize(request.endpoint, result), expected[request])]
    after = memory()
    seconds, answer = ask(client, requests[0], images, deadline - time.monotonic())
    problems += [f"after the burst: {d}" for d in differences(answer, expected[requests[0]])]

    log(f"burst: {dict(counts)} in {time.perf_counter() - started:.1f} s; server memory after {after}")
    if refusal_seconds:
        log(
            f"refusals came back {min(refusal_seconds):.2f} to {max(refusal_seconds):.2f} s after the burst was sent "
            f"(median {statistics.median(refusal_seconds):.2f} s)"
        )
    log(f"a request after the burst was answered in {seconds:.2f} s")
    for problem in problems[:20]:
        log(f"PROBLEM  {problem}")
    ok = counts["refused (queue full)"] > 0 and counts["answered"] > 0 and not problems
    log("overload refused cleanly" if ok else "overload NOT handled cleanly")
    return 0 if ok else 1


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=32, help="concurrent gradio_client users (default 32)")
    p.add_argument("--requests", type=int, default=10, help="requests per client, one after the other (default 10)")
    p.add_argument("--images", type=int, default=4, help="distinct synthetic images (default 4)")
    p.add_argument("--weights-dir", type=Path, help="exported models (default: weights/ if it has any, else random)")
    p.add_argument("--random-models", action="store_true", help="two untrained models, whatever weights/ holds")
    p.add_argument("--timeout", type=float, default=900, help="limit for the whole run in seconds (default 900)")
    p.add_argument("--overload", action="store_true", help="show the queue limit refusing a burst instead")
    p.add_argument("--queue-size", type=int, help="the app's queue size (default: the app's own; 2 with --overload)")
    p.add_argument("--burst", type=int, default=24, help="requests sent at once with --overload (default 24)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (images, models, server log)")
    return p.parse_args(argv)


def serving_set(weights_dir: Path, models: list[str], random_models: bool, work_dir: Path,
                count: int) -> tuple[Path, list[str], list[Path]]:
    """(weights folder to serve, its classifiers, `count` images to send). The classifiers
    `models` of `weights_dir` get the shipped example films at new sizes and formats, which
    their input check lets through; with `random_models`, or no `models`, two untrained
    models are written under `work_dir` and get drawn patterns."""
    films = sorted(EXAMPLES.glob("*.jpg"))
    if random_models or not models:
        weights_dir, films = work_dir / "weights", None
        synthetic_models(weights_dir)
        models = model_names(weights_dir)
    return weights_dir, models, synthetic_images(work_dir, count, films)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))  # covidtl, when run as `python benchmarks/load_test.py`
    if args.overload and args.queue_size is None:
        args.queue_size = 2
    work_dir = Path(tempfile.mkdtemp(prefix="covidtl-load-"))

    def log(message: str) -> None:
        print(message, flush=True)

    server = None
    try:
        shipped = args.weights_dir or REPO / "weights"
        models = model_names(shipped)
        if args.weights_dir and not models:
            log(f"no exported models (.safetensors with a .json card) in {shipped}")
            return 2
        weights_dir, models, images = serving_set(shipped, models, args.random_models, work_dir, args.images)
        if weights_dir != shipped:
            log(f"using two untrained models with random weights, in {weights_dir}")
        log(f"models: {', '.join(models)}; images: {', '.join(p.name for p in images)}")

        server = Server(weights_dir, args.queue_size, work_dir / "server.log")
        server.wait_ready(timeout=600)
        queue = args.queue_size or "the app's default"
        log(f"app at {server.url} (pid {server.process.pid}, queue size {queue}), memory {server.memory_mib()}")
        if args.overload:
            code = run_overload(server.url, work_dir, images, models, args, server.memory_mib, log)
        else:
            code = run_load(server.url, work_dir, images, models, args, log)
        if server.process.poll() is not None:
            log(f"the app died during the run:\n{server.log_tail()}")
            code = 1
        memory = server.memory_mib()
        if memory:
            log(f"server memory: now {memory.get('VmRSS', 0):.0f} MiB, peak {memory.get('VmHWM', 0):.0f} MiB")
        return code
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            print(f"kept {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
