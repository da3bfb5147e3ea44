"""Screenshot the running app for the README: assets/screenshot-<name>.png.

    python assets/make_screenshots.py                      # models from weights/
    python assets/make_screenshots.py --weights-dir DIR

Starts ``python app.py`` on a free local port and, in Debian's Chromium driven by
playwright (``apt-get install -y chromium``, ``pip install playwright``; never
``playwright install``), saves full-page screenshots of:

- ``classify``: Classify on a film the default model flags (`--flagged`);
- ``classify-not-flagged``: Classify on a film it does not flag (`--not-flagged`);
- ``classify-out-of-scope``: Classify on a colour photo (scikit-image's astronaut, a NASA
  photo in the public domain), refused by the input check;
- ``compare``, ``models``, ``about``: the other tabs, Compare run on the flagged film.

The films are real examples from assets/examples (credited in assets/examples/CREDITS.md).
Only images that may be redistributed belong in the screenshots: see assets/README.md.
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
FLAGGED_FILM = ASSETS / "examples" / "cohen-covid19-5782ae15.jpg"
NOT_FLAGGED_FILM = ASSETS / "examples" / "nih-no-finding-00002371_010.jpg"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 120_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: float = 180.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with code {process.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1.0)
    raise TimeoutError(f"app.py did not serve {url} within {seconds:.0f} s")


def colour_photo(folder: Path) -> Path:
    """scikit-image's astronaut photo (NASA, public domain) as a PNG in `folder`."""
    from PIL import Image
    from skimage import data

    path = folder / "astronaut-photo.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


def classify(page, url: str, image: Path) -> None:
    """Open the page afresh, upload `image` in Classify, classify it and wait for the answer."""
    from playwright.sync_api import expect

    page.goto(url)
    page.locator("#upload input[type=file]").set_input_files(str(image))
    expect(page.locator("#upload")).to_contain_text(image.stem)
    expect(page.locator("#upload td.download a")).to_be_visible(timeout=TIMEOUT_MS)  # uploaded, not only named
    page.locator("#classify-button").click()
    expect(page.locator("#timing")).to_contain_text("total", timeout=TIMEOUT_MS)
    expect(page.locator("#decision")).to_contain_text(re.compile("Flagged for|Not flagged|Out of scope"))


def shoot(url: str, films: dict[str, Path], out_dir: Path, chromium: Path) -> list[Path]:
    """Screenshots of Classify on each of `films` (name -> image), then of the other tabs
    with Compare run on the last film named "classify"."""
    from playwright.sync_api import expect, sync_playwright

    shots = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            for name, image in films.items():
                classify(page, url, image)
                if name != "classify-out-of-scope":
                    expect(page.locator("#heatmap img")).to_be_visible(timeout=TIMEOUT_MS)
                page.wait_for_timeout(500)  # let images settle
                shots.append(out_dir / f"screenshot-{name}.png")
                page.screenshot(path=str(shots[-1]), full_page=True)
            classify(page, url, films["classify"])  # Compare takes the Classify tab's file
            for tab in ("compare", "models", "about"):
                page.get_by_role("tab", name=tab.capitalize()).click()
                if tab == "compare":
                    page.locator("#compare-button").click()
                    expect(page.locator("#ensemble")).to_contain_text("Ensemble", timeout=TIMEOUT_MS)
                    expect(page.locator("#compare-gallery img").first).to_be_visible(timeout=TIMEOUT_MS)
                page.wait_for_timeout(500)  # let images and tab transitions settle
                shots.append(out_dir / f"screenshot-{tab}.png")
                page.screenshot(path=str(shots[-1]), full_page=True)
        finally:
            browser.close()
    return shots


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights-dir", type=Path, default=ROOT / "weights")
    p.add_argument("--flagged", type=Path, default=FLAGGED_FILM, help="a redistributable film the default model flags")
    p.add_argument("--not-flagged", type=Path, default=NOT_FLAGGED_FILM, help="one it does not flag")
    p.add_argument("--out-dir", type=Path, default=ASSETS)
    p.add_argument("--chromium", type=Path, default=Path("/usr/bin/chromium"))
    args = p.parse_args(argv)

    if not list(args.weights_dir.glob("*.safetensors")):
        print(f"error: no *.safetensors in {args.weights_dir}; train or copy models there first", file=sys.stderr)
        return 2
    if not args.chromium.is_file():
        print(f"error: no Chromium at {args.chromium}; apt-get install -y chromium", file=sys.stderr)
        return 2

    port = free_port()
    command = [
        sys.executable,
        "app.py",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--weights-dir",
        str(args.weights_dir),
    ]
    process = subprocess.Popen(command, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for(url, process)
        with tempfile.TemporaryDirectory() as scratch:
            films = {
                "classify": args.flagged.resolve(),
                "classify-not-flagged": args.not_flagged.resolve(),
                "classify-out-of-scope": colour_photo(Path(scratch)),
            }
            for path in shoot(url, films, args.out_dir, args.chromium):
                print(f"wrote {path}")
    finally:
        process.terminate()
        process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
