"""Screenshot every tab of the running app for the README: assets/screenshot-<tab>.png.

    python assets/make_screenshots.py                      # models from weights/
    python assets/make_screenshots.py --weights-dir DIR --image assets/examples/synthetic-phantom.png
    python assets/make_screenshots.py --write-phantom assets/examples/synthetic-phantom.png

Starts ``python app.py`` on a free local port, uploads `--image` (by default the synthetic
phantom, regenerated if absent), classifies and compares it in Debian's Chromium driven by
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

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
PHANTOM = ASSETS / "examples" / "synthetic-phantom.png"
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


def synthetic_phantom(size: int = 512) -> Image.Image:
    """A drawn chest-X-ray-like picture, labelled SYNTHETIC: not a radiograph of anyone."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = 170.0 - 60.0 * np.hypot(xx - 0.5, yy - 0.45)  # bright body, darker corners
    for cx in (0.32, 0.68):  # two dark "lungs"
        image -= 95.0 * np.clip(1.2 - (((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2), 0, 1)
    image += 60.0 * (np.abs(xx - 0.5) < 0.035) * (yy > 0.15)  # a bright "spine"
    picture = Image.fromarray(np.round(np.clip(image, 0, 255) / 4).astype(np.uint8) * 4)  # 64 levels: small PNG
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(12, size // 16))
    draw.text((size // 2, size - size // 12), "SYNTHETIC - not an X-ray", fill=255, font=font, anchor="ms")
    return picture


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
    p.add_argument("--image", type=Path, default=PHANTOM, help="redistributable image to upload")
    p.add_argument("--out-dir", type=Path, default=ASSETS)
    p.add_argument("--chromium", type=Path, default=Path("/usr/bin/chromium"))
    p.add_argument("--write-phantom", type=Path, help="only write the synthetic phantom PNG here and exit")
    args = p.parse_args(argv)

    if args.write_phantom:
        args.write_phantom.parent.mkdir(parents=True, exist_ok=True)
        synthetic_phantom().save(args.write_phantom)
        print(f"wrote {args.write_phantom}")
        return 0
    if not list(args.weights_dir.glob("*.safetensors")):
        print(f"error: no *.safetensors in {args.weights_dir}; train or copy models there first", file=sys.stderr)
        return 2
    if not args.chromium.is_file():
        print(f"error: no Chromium at {args.chromium}; apt-get install -y chromium", file=sys.stderr)
        return 2
    if args.image == PHANTOM and not PHANTOM.is_file():
        PHANTOM.parent.mkdir(parents=True, exist_ok=True)
        synthetic_phantom().save(PHANTOM)

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
