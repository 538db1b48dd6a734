"""The web page, driven by a real browser: upload an image, see the expected label at the top.

Needs Debian's chromium and Playwright for Python (the browser is Debian's, so `playwright install`
is not needed):

    apt-get install -y chromium
    pip install playwright
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _server import running_server
from conftest import CLASS_COLOURS, make_image

import imgclf
from imgclf.serve import ServeSettings, create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


@contextlib.contextmanager
def served_page(bundle: Path) -> Iterator[tuple[Any, Any, list[str]]]:
    """(playwright's sync API, a headless Chromium page on the served bundle's page, its JS errors);
    skips when Playwright or Chromium is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).is_file():
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    app = create_app(imgclf.load(bundle), settings=ServeSettings(runtime="torch"))
    with running_server(app) as url, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.goto(url + "/")
            yield sync_api, page, errors
        finally:
            browser.close()


def test_upload_on_page_shows_expected_label(tiny_bundle: Path, tmp_path: Path) -> None:
    image = tmp_path / "green.png"
    make_image(CLASS_COLOURS[1], np.random.default_rng(5), size=64).save(image)

    with served_page(tiny_bundle) as (sync_api, page, errors):
        sync_api.expect(page.locator("#status")).to_contain_text("ready", timeout=30_000)
        sync_api.expect(page.locator("#model-info")).to_contain_text("3 classes")

        page.set_input_files("#file", str(image))
        first = page.locator("#results li").first.locator(".label")
        sync_api.expect(first).to_have_text("class_1", timeout=30_000)
        assert page.locator("#results li").count() == 3  # top-5, capped at the 3 classes
        sync_api.expect(page.locator("#latency")).to_contain_text("ms in the model")
        assert page.locator("#preview").is_visible()
        assert not errors, errors


def test_why_toggle_shows_the_heatmap_after_a_prediction(tiny_bundle: Path, tmp_path: Path) -> None:
    """Issue 18: after a prediction, "why?" fetches POST /explain and shows the image beside its heatmap."""
    image = tmp_path / "blue.png"
    make_image(CLASS_COLOURS[2], np.random.default_rng(6), size=64).save(image)

    with served_page(tiny_bundle) as (sync_api, page, errors):
        sync_api.expect(page.locator("#status")).to_contain_text("ready", timeout=30_000)
        assert not page.locator("#why-toggle").is_visible()  # nothing to explain before a prediction
        page.set_input_files("#file", str(image))
        sync_api.expect(page.locator("#results li").first.locator(".label")).to_have_text("class_2", timeout=30_000)
        page.click("#why-toggle")
        heatmap = page.locator("#why-image")
        sync_api.expect(heatmap).to_be_visible(timeout=30_000)
        page.wait_for_function("document.getElementById('why-image').naturalWidth > 0")
        size = heatmap.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert size[0] == 512 and size[1] > 256  # the image and its heatmap side by side, with a caption
        sync_api.expect(page.locator("#why-caption")).to_contain_text("heatmap for class_2")
        assert page.locator("#why-toggle").get_attribute("aria-pressed") == "true"
        page.click("#why-toggle")
        sync_api.expect(heatmap).to_be_hidden()
        assert not errors, errors
