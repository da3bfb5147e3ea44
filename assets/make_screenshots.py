"""Screenshot every tab of the running app for the README: assets/screenshot-<tab>.png.

    python assets/make_screenshots.py                      # models from weights/
    python assets/make_screenshots.py --weights-dir DIR --image assets/examples/nih-no-finding-00002371_010.jpg

Starts ``python app.py`` on a free local port, uploads `--image` (by default one of the
real example films in assets/examples, credited in assets/examples/CREDITS.md), classifies and compares it in Debian's Chromium driven by
playwright (``apt-get install -y chromium``, ``pip install playwright``; never
``playwright install``), and saves one full-page screenshot per tab. Only images that may
be redistributed belong in the screenshots: see assets/README.md.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
DEFAULT_IMAGE = ASSETS / "examples" / "cohen-covid19-5782ae15.jpg"
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


def shoot(url: str, image: Path, out_dir: Path, chromium: Path) -> list[Path]:
    from playwright.sync_api import expect, sync_playwright

    shots = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.locator("#upload input[type=file]").set_input_files(str(image))
            expect(page.locator("#upload")).to_contain_text(image.stem)
            page.locator("#classify-button").click()
            expect(page.locator("#heatmap img")).to_be_visible(timeout=TIMEOUT_MS)
            expect(page.locator("#timing")).to_contain_text("ms")
            for tab in ("classify", "compare", "models", "about"):
                page.get_by_role("tab", name=tab.capitalize()).click()
                if tab == "compare":
                    page.locator("#compare-button").click()
                    expect(page.locator("#ensemble")).to_contain_text("Ensemble")
                    expect(page.locator("#compare-gallery img").first).to_be_visible(timeout=TIMEOUT_MS)
                page.wait_for_timeout(500)  # let images and tab transitions settle
                path = out_dir / f"screenshot-{tab}.png"
                page.screenshot(path=str(path), full_page=True)
                shots.append(path)
        finally:
            browser.close()
    return shots


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights-dir", type=Path, default=ROOT / "weights")
    p.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="redistributable image to upload")
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
        for path in shoot(url, args.image.resolve(), args.out_dir, args.chromium):
            print(f"wrote {path}")
    finally:
        process.terminate()
        process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
