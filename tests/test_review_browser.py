"""The review page in headless Chromium: it loads, a person's marks export as a CSV, and train accepts it.

Needs Debian's chromium and Playwright for Python, as tests/test_serve_browser.py. The page is
opened from disk (file://): it must work with nothing but the browser.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from conftest import TINY_BACKBONE, make_image_folder
from test_serve_browser import CHROMIUM, CHROMIUM_ARGS

import imgclf
from imgclf.data.decisions import read_decisions
from imgclf.review import ReviewSettings, review_data


def test_review_page_exports_decisions_that_train_accepts(tiny_bundle: Path, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).is_file():
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    data = make_image_folder(tmp_path / "data", classes=3, per_class=12, seed=5)
    shutil.move(data / "class_0" / "000.png", data / "class_2" / "moved.png")  # a wrong label
    shutil.copy(data / "class_1" / "004.png", data / "class_1" / "copy.png")  # a duplicate
    result = review_data(str(data), out=tmp_path / "review", settings=ReviewSettings(bundle=str(tiny_bundle), folds=3))
    assert len(result.rows) >= 2

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(accept_downloads=True)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(result.html.resolve().as_uri())
            sync_api.expect(page.locator("#status")).to_have_text("ready")
            rows = page.locator("#issues tbody tr")
            assert rows.count() == len(result.rows)
            assert page.locator("#issues tbody img").first.evaluate("img => img.naturalWidth") > 0  # thumbnails show
            rows.nth(0).locator("select.decision").select_option("relabel")
            rows.nth(0).locator("select.label").select_option("class_1")
            rows.nth(1).locator("select.decision").select_option("remove")
            sync_api.expect(page.locator("#counts")).to_contain_text("1 relabel, 1 remove")
            with page.expect_download() as download:
                page.click("#export")
            exported = tmp_path / "decisions.csv"
            download.value.save_as(exported)
            assert download.value.suggested_filename == "decisions.csv"
            assert not errors, errors
        finally:
            browser.close()

    with exported.open() as f:
        lines = list(csv.DictReader(f))
    assert [r["decision"] for r in lines[:2]] == ["relabel", "remove"] and lines[0]["label"] == "class_1"
    assert {r["decision"] for r in lines[2:]} <= {"keep"}
    decisions = read_decisions(exported)
    assert decisions.removals() == {str(Path(result.rows[1].path).resolve())}
    model = imgclf.train(data=str(data), out=str(tmp_path / "model"), backbone=TINY_BACKBONE, random_init=True,
                         recipe="probe", image_size=32, batch_size=16, exclude=str(exported), relabel=str(exported))
    counts = model.info.data["counts"]
    assert sum(sum(split.values()) for split in counts.values()) == len(result.paths) - 1  # one removed
