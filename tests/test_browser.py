"""The page in a real headless Chromium: upload, classify, read the answer (the decision
beside P(COVID-19) on its scale, which must agree with the threshold shown) and the heatmap,
switch to Compare and compare every model; a screenshot is saved to tmp_path.

Needs the `playwright` Python package and Debian's `chromium` at /usr/bin/chromium (never
`playwright install`, which downloads a browser); skipped when either is missing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from synthetic_inputs import export_tiny_model, launch, not_xrays, save_png, xray_like

import app
from assets.make_screenshots import CHROMIUM_ARGS  # the screenshot script's browser, flags and all
from covidtl.decision import FLAGGED, NOT_FLAGGED, OUT_OF_SCOPE

CHROMIUM = Path(os.environ.get("COVIDTL_CHROMIUM", "/usr/bin/chromium"))
TIMEOUT_MS = 180_000  # 3x the slowest answer seen on a loaded machine; only a failure waits this long

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
if not CHROMIUM.is_file():
    pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium", allow_module_level=True)


def upload(page, path: Path) -> None:
    """Choose `path` in the Classify upload and wait until the server holds it: the file's
    name shows at once, its size link only once the upload is done ("Uploading..." before)."""
    page.locator("#upload input[type=file]").set_input_files(str(path))
    sync_api.expect(page.locator("#upload")).to_contain_text(path.stem)
    sync_api.expect(page.locator("#upload td.download a")).to_be_visible(timeout=TIMEOUT_MS)


def read_scale(text: str) -> list[tuple[str, float, float]]:
    """(decision, P, threshold) of each row of a scale as the page shows it."""
    rows = []
    for row, decision in re.findall(rf"(.*?)({FLAGGED}|{NOT_FLAGGED})", text, re.S):  # a row ends with its decision
        p, threshold = re.search(r"P\(COVID-19\) = ([0-9.]+)", row), re.search(r"threshold ([0-9.]+)", row)
        rows.append((decision, float(p.group(1)), float(threshold.group(1))))
    return rows


def assert_decisions_agree(rows: list[tuple[str, float, float]]) -> None:
    """Each decision shown is the one its P and threshold (as shown) call for."""
    assert rows
    for decision, p, threshold in rows:
        assert decision == (FLAGGED if p >= threshold else NOT_FLAGGED), (decision, p, threshold)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    weights = tmp_path_factory.mktemp("weights")
    export_tiny_model(weights, "always", threshold=0.0, seed=0)
    export_tiny_model(weights, "never", threshold=1.01, seed=1)
    demo = app.build_demo(weights)
    local_url = launch(demo)
    yield local_url
    demo.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    yield page
    page.close()


def test_upload_classify_and_compare_in_chromium(page, tmp_path):
    expect = sync_api.expect
    expect(page.locator("#disclaimer")).to_contain_text("not a medical device")
    image = save_png(xray_like(200, seed=7), tmp_path / "synthetic-xray.png")

    upload(page, image)
    page.locator("#classify-button").click()
    expect(page.locator("#answer")).to_contain_text(FLAGGED, timeout=TIMEOUT_MS)
    expect(page.locator("#decision")).to_contain_text("at or above the model's operating threshold")
    (shown,) = read_scale(page.locator("#answer").inner_text())
    assert_decisions_agree([shown])
    assert f"P(COVID-19) = {shown[1]:.3f}" in page.locator("#decision").inner_text()  # the words say the same P
    expect(page.locator("#answer")).not_to_contain_text("Negative")  # no per-class confidences beside it
    expect(page.locator("#heatmap img")).to_be_visible()
    expect(page.locator("#timing")).to_contain_text("ms")
    page.screenshot(path=str(tmp_path / "classify.png"), full_page=True)

    page.get_by_role("tab", name="Compare").click()
    expect(page.locator("#compare-upload")).to_contain_text("synthetic-xray")
    page.locator("#compare-button").click()
    expect(page.locator("#compare-scale")).to_contain_text("never", timeout=TIMEOUT_MS)
    rows = read_scale(page.locator("#compare-scale").inner_text())
    assert [decision for decision, *_ in rows] == [FLAGGED, NOT_FLAGGED]  # "always", then "never"
    assert_decisions_agree(rows)
    expect(page.locator("#ensemble")).to_contain_text("disagree")
    expect(page.locator("#compare-gallery img")).to_have_count(2)
    shot = tmp_path / "compare.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_bad_file_shows_a_message_in_the_page(page, tmp_path):
    expect = sync_api.expect
    bad = tmp_path / "notes.png"
    bad.write_text("plain text renamed to .png\n" * 10)
    upload(page, bad)
    page.locator("#classify-button").click()
    expect(page.get_by_text("not an image this app can read").first).to_be_visible(timeout=TIMEOUT_MS)


def test_shipped_example_can_be_classified(page):
    expect = sync_api.expect
    page.get_by_text("nih-no-finding-00002371_010.jpg").first.click()
    expect(page.locator("#upload")).to_contain_text("nih-no-finding")
    expect(page.locator("#upload td.download a")).to_be_visible()  # the example is loaded, not only named
    model = page.locator("#model input")  # the model with threshold 1.01: the label is its decision, Negative
    model.click()
    model.fill("never")
    model.press("Enter")
    page.locator("#classify-button").click()
    expect(page.locator("#decision")).to_contain_text("by never", timeout=TIMEOUT_MS)
    expect(page.locator("#answer")).to_contain_text(NOT_FLAGGED)
    assert_decisions_agree(read_scale(page.locator("#answer").inner_text()))
    page.get_by_role("tab", name="Compare").click()
    expect(page.locator("#compare-upload")).to_contain_text("nih-no-finding")


def test_an_image_that_is_not_a_chest_xray_is_out_of_scope_in_the_page(page, tmp_path):
    expect = sync_api.expect
    image = save_png(not_xrays()["colour"], tmp_path / "colour-picture.png")
    upload(page, image)
    page.locator("#classify-button").click()
    expect(page.locator("#answer")).to_contain_text(OUT_OF_SCOPE, timeout=TIMEOUT_MS)
    expect(page.locator("#decision")).to_contain_text("a colour photo, not a radiograph")
    expect(page.locator("#answer")).not_to_contain_text("P(COVID-19) =")  # no probability for a refused image
