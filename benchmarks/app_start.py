"""Question 4: how long from starting the app to its page and to its first answer, and
how much memory does it hold with every model loaded?

Starts ``python app.py`` on a free port (COVIDTL_WEIGHTS set to the models) and times, from
the process start: the page (the first HTTP 200 of ``/``: the app loads no model before it
serves), then the first answer of ``/classify`` through gradio_client (the models load on
first use, or in the warm-up that starts once the server listens). Then ``/compare`` loads
every model, and the process's peak resident memory (VmHWM, Linux) is read. Repeated
``--repeats`` times with a fresh process each; medians. ``--busy`` runs one CPU-bound process
beside the app throughout, as another user of the machine would.

Ratios: first answer / 15 s and peak memory / 1.5 GB, printed last.

    python -m benchmarks.app_start                    # ~1 minute
    python -m benchmarks.app_start --busy             # beside one busy process
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from benchmarks import common

START_LIMIT_S = 15.0
MEMORY_LIMIT_GB = 1.5


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_gb(pid: int) -> float:
    """Peak resident set size of process `pid` (VmHWM), in GB; nan where /proc is absent."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return float("nan")


def one_start(folder: Path, image: Path, timeout: float, attempts: int = 5) -> tuple[float, float, float, int]:
    """(seconds to the page, seconds to the first /classify answer, peak GB after /compare,
    models). A start whose port another process took between `free_port` and the app's bind
    is made again."""
    for _ in range(attempts - 1):
        try:
            return _one_start(folder, image, timeout)
        except PortTaken:
            pass
    return _one_start(folder, image, timeout)


class PortTaken(RuntimeError):
    pass


def _page_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _one_start(folder: Path, image: Path, timeout: float) -> tuple[float, float, float, int]:
    from gradio_client import Client, handle_file

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "COVIDTL_WEIGHTS": str(folder), "GRADIO_ANALYTICS_ENABLED": "False"}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, str(common.REPO / "app.py"), "--port", str(port)],
        env=env,
        cwd=common.REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        while not _page_answers(url):
            if process.poll() is not None:
                stderr = process.stderr.read().decode()
                error = PortTaken if "Cannot find empty port" in stderr else RuntimeError
                raise error(f"the app exited with {process.returncode}: {stderr[-2000:]}")
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"the app did not serve its page within {timeout:.0f} s")
            time.sleep(0.05)
        page = time.perf_counter() - started
        client = Client(url, verbose=False, httpx_kwargs={"timeout": 120})
        names = _model_names(folder)
        client.predict(handle_file(str(image)), names[0], "Grad-CAM", 0.4, api_name="/classify")
        first_answer = time.perf_counter() - started
        client.predict(handle_file(str(image)), "Grad-CAM", api_name="/compare")
        return page, first_answer, peak_rss_gb(process.pid), len(names)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@contextlib.contextmanager
def busy_process(busy: bool) -> Iterator[None]:
    """With `busy`, one CPU-bound Python process runs beside the app until the block ends."""
    if not busy:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait(timeout=30)


def _model_names(folder: Path) -> list[str]:
    from covidtl.inference import ModelStore

    return ModelStore(folder).names()


def main(argv: list[str] | None = None) -> tuple[float, float]:
    p = common.parser(__doc__)
    p.add_argument("--timeout", type=float, default=600.0, help="give up on a start after this many seconds")
    p.add_argument("--busy", action=argparse.BooleanOptionalAction, default=False,
                   help="run one CPU-bound process beside the app")
    args = p.parse_args(argv)
    repeats, scratch = common.start(args, 3, threads=False)  # the app sets its own
    folder, note = common.model_folder(args, scratch)
    print(note)
    # A real example film, enlarged: the shipped input check refuses the synthetic film,
    # and a refused image is answered without running the model.
    image = scratch / "1024x1024x8.png"
    with Image.open(common.REPO / "assets" / "examples" / "cohen-covid19-5782ae15.jpg") as film:
        film.convert("L").resize((1024, 1024), Image.Resampling.BICUBIC).save(image)
    with busy_process(args.busy):
        runs = [one_start(folder, image, args.timeout) for _ in range(repeats)]
    page = statistics.median(r[0] for r in runs)
    start = statistics.median(r[1] for r in runs)
    memory = statistics.median(r[2] for r in runs)
    beside = ", beside one busy process" if args.busy else ""
    print(f"{repeats} fresh starts of python app.py, {runs[0][3]} models, 1024x1024 PNG{beside}")
    common.table(
        ["start", "page", "first answer", "peak memory, all models loaded"],
        [[str(i + 1), f"{r[0]:6.2f} s", f"{r[1]:6.2f} s", f"{r[2]:5.2f} GB"] for i, r in enumerate(runs)],
    )
    print(f"median page {page:.2f} s")
    print(
        f"ratio first answer / {START_LIMIT_S:g} s: {start / START_LIMIT_S:.2f} ({start:.2f} s); "
        f"peak memory / {MEMORY_LIMIT_GB:g} GB: {memory / MEMORY_LIMIT_GB:.2f} ({memory:.2f} GB)"
    )
    return start, memory


if __name__ == "__main__":
    main()
