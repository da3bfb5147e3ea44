"""Question 4: how long from starting the app to its first answer, and how much memory
does it hold with every model loaded?

Starts ``python app.py`` on a free port (COVIDTL_WEIGHTS set to the models), then asks
``/classify`` through gradio_client until it answers: the time from the process start to
that answer is the start-up time users wait for. Then ``/compare`` loads every model, and
the process's peak resident memory (VmHWM, Linux) is read. Repeated ``--repeats`` times
with a fresh process each; medians.

Ratios: first answer / 15 s and peak memory / 1.5 GB, printed last.

    python -m benchmarks.app_start                    # ~1 minute
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
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


def one_start(folder: Path, image: Path, timeout: float, attempts: int = 5) -> tuple[float, float, int]:
    """(seconds to the first /classify answer, peak GB after /compare, models). A start whose
    port another process took between `free_port` and the app's bind is made again."""
    for _ in range(attempts - 1):
        try:
            return _one_start(folder, image, timeout)
        except PortTaken:
            pass
    return _one_start(folder, image, timeout)


class PortTaken(RuntimeError):
    pass


def _one_start(folder: Path, image: Path, timeout: float) -> tuple[float, float, int]:
    from gradio_client import Client, handle_file

    port = free_port()
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
        client = None
        while client is None:
            if process.poll() is not None:
                stderr = process.stderr.read().decode()
                error = PortTaken if "Cannot find empty port" in stderr else RuntimeError
                raise error(f"the app exited with {process.returncode}: {stderr[-2000:]}")
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"the app did not answer within {timeout:.0f} s")
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False, httpx_kwargs={"timeout": 120})
            except Exception:  # noqa: BLE001 - not listening yet: any connection error means "wait"
                time.sleep(0.05)
        names = _model_names(folder)
        client.predict(handle_file(str(image)), names[0], "Grad-CAM", 0.4, api_name="/classify")
        first_answer = time.perf_counter() - started
        client.predict(handle_file(str(image)), "Grad-CAM", api_name="/compare")
        return first_answer, peak_rss_gb(process.pid), len(names)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def _model_names(folder: Path) -> list[str]:
    from covidtl.inference import ModelStore

    return ModelStore(folder).names()


def main(argv: list[str] | None = None) -> tuple[float, float]:
    p = common.parser(__doc__)
    p.add_argument("--timeout", type=float, default=600.0, help="give up on a start after this many seconds")
    args = p.parse_args(argv)
    repeats, scratch = common.start(args, 3, threads=False)  # the app sets its own
    folder, note = common.model_folder(args, scratch)
    print(note)
    # A real example film, enlarged: the shipped input check refuses the synthetic film,
    # and a refused image is answered without running the model.
    image = scratch / "1024x1024x8.png"
    with Image.open(common.REPO / "assets" / "examples" / "cohen-covid19-5782ae15.jpg") as film:
        film.convert("L").resize((1024, 1024), Image.Resampling.BICUBIC).save(image)
    runs = [one_start(folder, image, args.timeout) for _ in range(repeats)]
    start = statistics.median(r[0] for r in runs)
    memory = statistics.median(r[1] for r in runs)
    print(f"{repeats} fresh starts of python app.py, {runs[0][2]} models, 1024x1024 PNG")
    common.table(
        ["start", "first answer", "peak memory, all models loaded"],
        [[str(i + 1), f"{r[0]:6.2f} s", f"{r[1]:5.2f} GB"] for i, r in enumerate(runs)],
    )
    print(
        f"ratio first answer / {START_LIMIT_S:g} s: {start / START_LIMIT_S:.2f} ({start:.2f} s); "
        f"peak memory / {MEMORY_LIMIT_GB:g} GB: {memory / MEMORY_LIMIT_GB:.2f} ({memory:.2f} GB)"
    )
    return start, memory


if __name__ == "__main__":
    main()
