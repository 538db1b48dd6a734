"""A PNG screenshot of a report page in headless Chromium, driven by Playwright.

Neither is a dependency of imgclf: `pip install playwright` and a Chromium (Debian:
`apt-get install chromium`, or `playwright install chromium`) are needed only for screenshots.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from imgclf.errors import ImgclfError

# Headless, and nothing that phones home: the page is a local file and needs no network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # root in containers and CI
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_executable() -> str | None:
    """The system Chromium: $IMGCLF_CHROMIUM, else chromium / chromium-browser / google-chrome on PATH.

    None means Playwright's own downloaded browser is used, if it has one.
    """
    configured = os.environ.get("IMGCLF_CHROMIUM")
    if configured:
        return configured
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def take_screenshot(html: str | Path, png: str | Path, *, width: int = 1280, full_page: bool = True) -> Path:
    """Open `html` in headless Chromium and save the page as `png`.

    Example:
        >>> take_screenshot("runs/pets/report/report.html", "docs/report.png")  # doctest: +SKIP
        PosixPath('docs/report.png')
    """
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise ImgclfError(
            "a screenshot needs Playwright, which is not installed",
            fix="pip install playwright; and apt-get install chromium (or: playwright install chromium)",
        ) from None
    html = Path(html)
    if not html.is_file():
        raise ImgclfError(f"no report page at {str(html)!r}", fix="write it first: imgclf report DIR")
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_executable(), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": width, "height": 900})
                page.goto(Path(html).resolve().as_uri(), wait_until="load")
                page.screenshot(path=str(png), full_page=full_page)
            finally:
                browser.close()
    except PlaywrightError as exc:
        raise ImgclfError(
            f"headless Chromium could not take the screenshot: {str(exc).splitlines()[0]}",
            fix="if Chromium is missing: apt-get install chromium, or set IMGCLF_CHROMIUM to a Chromium binary",
        ) from None
    return png
