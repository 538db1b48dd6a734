"""The evaluation report: calibration maths, TTA, the files it writes, and the page in real Chromium."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CLASS_COLOURS, TINY_BACKBONE, make_image

from imgclf.cli import main
from imgclf.evaluation.calibration import (
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    softmax,
)
from imgclf.report.build import most_confused, report_after_training, worst_first
from imgclf.report.html import SECTIONS

# --------------------------------------------------------------------------------------------
# Calibration maths


def _calibrated_case(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, size=(n, classes))
    probs = softmax(logits)
    labels = np.array([rng.choice(classes, p=p) for p in probs])
    return logits, labels


def test_ece_of_a_known_case() -> None:
    # Four images at confidence 0.9 of which two are right: one bin, |0.5 - 0.9| = 0.4.
    probs = np.array([[0.9, 0.1]] * 4)
    assert expected_calibration_error(probs, np.array([0, 0, 1, 1])) == pytest.approx(0.4)
    # Right as often as it says: ECE 0.
    probs = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.0)


def test_temperature_scaling_repairs_a_deliberately_overconfident_model() -> None:
    logits, labels = _calibrated_case(4000, 5, seed=1)
    overconfident = 5.0 * logits  # same predictions, far too sure of them
    val, test = slice(0, 2000), slice(2000, 4000)
    temperature = fit_temperature(overconfident[val], labels[val])
    assert temperature == pytest.approx(5.0, rel=0.15)
    before = expected_calibration_error(softmax(overconfident[test]), labels[test])
    after = expected_calibration_error(softmax(overconfident[test], temperature), labels[test])
    assert before > 0.15
    assert after < before / 3
    assert negative_log_likelihood(overconfident[test], labels[test], temperature) < negative_log_likelihood(
        overconfident[test], labels[test]
    )
    # Temperature never changes the predicted class.
    assert (softmax(overconfident, temperature).argmax(1) == overconfident.argmax(1)).all()


def test_underconfident_model_gets_temperature_below_one() -> None:
    logits, labels = _calibrated_case(3000, 4, seed=2)
    assert fit_temperature(logits / 3.0, labels) == pytest.approx(1 / 3.0, rel=0.15)


def test_confusion_helpers() -> None:
    pairs = most_confused([[5, 2, 0], [1, 4, 3], [0, 0, 6]], ["a", "b", "c"])
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [("b", "c", 3), ("a", "b", 2), ("b", "a", 1)]
    metrics = {"per_class": {"a": {"f1": 0.9, "recall": 0.9, "support": 4},
                             "b": {"f1": 0.2, "recall": 0.5, "support": 4},
                             "c": {"f1": 0.0, "recall": 0.0, "support": 0}}}
    assert worst_first(metrics) == ["b", "a", "c"]


# --------------------------------------------------------------------------------------------
# A tiny fine-tuned run with a test split that holds a few mislabelled images


def _split_folders(root: Path) -> Path:
    rng = np.random.default_rng(3)
    for split, per_class in (("train", 14), ("test", 6)):
        for c in range(3):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                make_image(CLASS_COLOURS[c], rng).save(folder / f"{i:03d}.png")
    # Two test images filed under the wrong class: guaranteed mistakes for the gallery.
    for i in range(2):
        make_image(CLASS_COLOURS[1], rng).save(root / "test" / "class_0" / f"wrong_{i}.png")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import imgclf

    root = tmp_path_factory.mktemp("report")
    data = _split_folders(root / "data")
    out = root / "model"
    imgclf.train(data=str(data), out=str(out), backbone=TINY_BACKBONE, random_init=True, recipe="finetune",
                 epochs=1, image_size=32, batch_size=16)
    auto_report = (out / "report" / "report.html").is_file()
    assert main(["report", str(out), "--tta", "--out", str(root / "report_tta"), "--runtime", "torch"]) == 0
    return {"root": root, "data": data, "bundle": out, "report": root / "report_tta", "auto_report": auto_report}


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.keyed: list[tuple[list, int, str]] = []
        self.sections: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self._open: tuple[list, int] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if "data-key" in a:
            self._open = (json.loads(a["data-key"] or "[]"), int(a.get("data-digits") or 4))
        if tag == "section" and a.get("data-section"):
            self.sections.append(a["data-section"] or "")
        if tag == "img":
            self.images.append(a.get("src") or "")
        if tag in ("a", "link", "script") and (a.get("href") or a.get("src")):
            self.links.append(a.get("href") or a.get("src") or "")

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self.keyed.append((self._open[0], self._open[1], data))
            self._open = None


def _lookup(document: dict, key: list) -> object:
    value: object = document
    for part in key:
        value = value[part]  # type: ignore[index]
    return value


def _shown(value: object, digits: int) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{float(value):.{digits}f}"  # type: ignore[arg-type]


def test_train_writes_the_report_itself(run: dict[str, Any]) -> None:
    assert run["auto_report"]


def test_report_files_and_self_contained_html(run: dict[str, Any]) -> None:
    folder = run["report"]
    for name in ("report.html", "metrics.json", "confusion_matrix.png", "reliability.png", "training_curves.png"):
        assert (folder / name).stat().st_size > 0, name
    page = _Collector()
    page.feed((folder / "report.html").read_text(encoding="utf-8"))
    assert page.sections == [sid for sid, _ in SECTIONS]
    assert page.images and all(src.startswith("data:image/") for src in page.images)
    assert all(link.startswith("#") for link in page.links), page.links  # nothing fetched from a network


def test_numbers_on_the_page_match_metrics_json(run: dict[str, Any]) -> None:
    metrics = json.loads((run["report"] / "metrics.json").read_text(encoding="utf-8"))
    page = _Collector()
    page.feed((run["report"] / "report.html").read_text(encoding="utf-8"))
    keys = {tuple(map(str, key)) for key, _, _ in page.keyed}
    for required in (("metrics", "accuracy"), ("metrics", "macro_f1"), ("metrics", "weighted_f1"),
                     ("metrics", "balanced_accuracy"), ("metrics", "top5_accuracy"),
                     ("calibration", "ece_before"), ("calibration", "ece_after"), ("tta", "accuracy"),
                     ("tta", "accuracy_without"), ("metrics", "confusion_matrix", "0", "0")):
        assert required in keys, required
    for key, digits, text in page.keyed:
        assert text == _shown(_lookup(metrics, key), digits), key
    # The figures themselves are what the metrics say: recompute from the confusion matrix.
    confusion = np.array(metrics["metrics"]["confusion_matrix"])
    assert metrics["split"] == "test"
    assert confusion.sum() == metrics["metrics"]["num_images"] == 20
    assert metrics["metrics"]["accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum())
    # The two mislabelled test images are misclassified, so they are in the gallery.
    losses = metrics["galleries"]["top_losses"]
    assert sum("wrong_" in item["path"] for item in losses) >= 1
    assert [i["loss"] for i in losses] == sorted((i["loss"] for i in losses), reverse=True)
    assert metrics["tta"]["accuracy_without"] == pytest.approx(metrics["metrics"]["accuracy"])
    assert metrics["worst_classes"] == worst_first(metrics["metrics"])


def test_temperature_is_stored_and_used_by_predict(run: dict[str, Any]) -> None:
    import imgclf

    metrics = json.loads((run["report"] / "metrics.json").read_text(encoding="utf-8"))
    bundle = json.loads((run["bundle"] / "imgclf.json").read_text(encoding="utf-8"))
    assert bundle["temperature"] == metrics["calibration"]["temperature"]
    model = imgclf.load(run["bundle"])
    image = next((run["data"] / "test" / "class_2").glob("*.png"))
    before = model.predict([str(image)], top_k=1, runtime="torch")[0].probability
    model.meta["temperature"] = 25.0  # much softer
    after = model.predict([str(image)], top_k=1, runtime="torch")[0].probability
    assert after is not None and before is not None and after < before


def test_evaluate_tta_reports_both(run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(run["bundle"]), str(run["data"]), "--tta", "--json", "--runtime", "torch"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    tta = metrics["tta"]
    assert tta["num_images"] == metrics["num_images"] == 20
    assert tta["accuracy_without"] == pytest.approx(metrics["accuracy"])
    assert 0.0 <= tta["accuracy"] <= 1.0 and "mirror" in tta["method"]


def test_probe_run_says_there_are_no_epochs(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = shutil.copytree(tiny_bundle, tmp_path / "model")
    assert main(["report", str(bundle), "--out", str(tmp_path / "r"), "--runtime", "torch"]) == 0
    html = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert 'data-empty="curves"' in html and "has no epochs" in html
    assert not (tmp_path / "r" / "training_curves.png").exists()
    assert 'data-empty="tta"' in html


def test_report_errors_are_user_errors(tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    other = tmp_path / "other"
    for name in ("x", "y"):
        (other / name).mkdir(parents=True)
        make_image(CLASS_COLOURS[0], np.random.default_rng(0)).save(other / name / "a.png")
        make_image(CLASS_COLOURS[0], np.random.default_rng(1)).save(other / name / "b.png")
    bundle = shutil.copytree(tiny_bundle, tmp_path / "model")
    assert main(["report", str(bundle), str(other)]) == 2
    assert "classes" in capsys.readouterr().err


def test_a_failing_report_does_not_lose_the_bundle(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import imgclf
    from imgclf.report import build

    def broken(*args: object, **kwargs: object) -> Path:
        raise RuntimeError("disk full")

    monkeypatch.setattr(build, "build_report", broken)
    model = imgclf.load(tiny_bundle)
    assert report_after_training(model, None, tiny_bundle, stores={}, batch_size=8, device="cpu") is None  # type: ignore[arg-type]
    assert "report failed (RuntimeError: disk full)" in capsys.readouterr().err
    assert imgclf.load(tiny_bundle).classes == model.classes


def _browser():  # type: ignore[no-untyped-def]
    from imgclf.report.screenshot import CHROMIUM_ARGS, chromium_executable

    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    executable = chromium_executable()
    if executable is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    return sync_api.sync_playwright, executable, CHROMIUM_ARGS


def test_report_renders_in_headless_chromium(run: dict[str, Any], tmp_path: Path) -> None:
    sync_playwright, executable, args = _browser()
    html = run["report"] / "report.html"
    metrics = json.loads((run["report"] / "metrics.json").read_text(encoding="utf-8"))
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=args)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(html.resolve().as_uri(), wait_until="load")
            sections = page.eval_on_selector_all("section[data-section]", "els => els.map(e => e.id)")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => ({w: e.naturalWidth, h: e.naturalHeight, done: e.complete}))"
            )
            visible_headings = page.eval_on_selector_all("section h2", "els => els.map(e => e.innerText)")
            accuracy = page.inner_text('[data-key=\'["metrics", "accuracy"]\']')
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert sections == [sid for sid, _ in SECTIONS]
    assert visible_headings == [title for _, title in SECTIONS]
    thumbnails = len({i["position"] for i in metrics["galleries"]["top_losses"]} | {
        i["position"] for items in metrics["galleries"]["confident_correct"].values() for i in items})
    assert len(images) >= 3 + thumbnails  # curves, confusion, reliability, and every gallery image
    assert all(i["done"] and i["w"] > 0 and i["h"] > 0 for i in images), images
    assert accuracy == f"{metrics['metrics']['accuracy']:.4f}"
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    from PIL import Image

    with Image.open(tmp_path / "report.png") as shot:
        assert shot.width == 1280 and shot.height > 2000  # the whole page, not just the first screen


def test_cli_screenshot(tiny_bundle: Path, tmp_path: Path) -> None:
    _browser()
    bundle = shutil.copytree(tiny_bundle, tmp_path / "model")
    png = tmp_path / "docs" / "report.png"
    assert main(["report", str(bundle), "--runtime", "torch", "--screenshot", str(png)]) == 0
    assert png.stat().st_size > 10_000


# --------------------------------------------------------------------------------------------
# Grad-CAM heatmaps in the galleries (issue 18)


def test_galleries_have_heatmaps_for_predicted_and_true_class(run: dict[str, Any]) -> None:
    from imgclf.report.heatmaps import MAX_IMAGES

    metrics = json.loads((run["report"] / "metrics.json").read_text(encoding="utf-8"))
    galleries = metrics["galleries"]
    wrong = galleries["top_losses"]
    right = [i for items in galleries["confident_correct"].values() for i in items]
    assert wrong, "the fixture's mislabelled test images must give misclassified ones"
    expected = min(len(wrong) + len(right), MAX_IMAGES)
    info = galleries["heatmaps"]
    assert info["method"] == "gradcam" and info["layer"] == "bn2" and info["images"] == expected
    assert info["maps"] == 2 * len(wrong) + (expected - len(wrong))  # two maps per mistake, one per correct
    page = (run["report"] / "report.html").read_text(encoding="utf-8")
    assert page.count('data-heatmap="true"') == len(wrong)
    assert page.count('data-heatmap="predicted"') == expected
    assert page.count('class="heatmap" src="data:image/jpeg;base64,') == info["maps"]
    # Size under control: the heatmaps are thumbnails like the images (~2-5 KB each here).
    assert len(page.encode()) < 400_000 + 8_000 * info["maps"]


def test_heatmaps_are_capped_misclassified_first() -> None:
    from imgclf.report.heatmaps import MAX_IMAGES, explained_items

    galleries = {"top_losses": [{"position": 1000 + i} for i in range(16)],
                 "confident_correct": {f"c{c}": [{"position": 10 * c + r} for r in range(3)] for c in range(100)}}
    items = explained_items(galleries)
    assert len(items) == MAX_IMAGES
    assert [i["position"] for i in items[:16]] == [1000 + i for i in range(16)]
    assert [i["position"] for i in items[16:19]] == [0, 10, 20]  # each class's most confident first


def test_report_without_a_known_layer_says_why(tiny_bundle: Path, tmp_path: Path) -> None:
    import timm
    import torch

    import imgclf
    from imgclf.models.classifier import ImageClassifier
    from imgclf.report.heatmaps import gallery_heatmaps

    model = imgclf.load(tiny_bundle)
    backbone = timm.create_model("test_byobnet", num_classes=0)
    model.module = ImageClassifier(backbone, torch.nn.Linear(backbone.num_features, 3))
    model.meta = {**model.meta, "backbone": {"name": "test_byobnet", "timm_name": "test_byobnet"}}
    report = {"galleries": {"top_losses": [{"position": 0, "predicted": "class_0", "true": "class_1"}],
                            "confident_correct": {}}}
    assert gallery_heatmaps(report, model, None) == {}  # type: ignore[arg-type]  # never reaches the store
    assert "Grad-CAM should use" in report["galleries"]["heatmaps"]["note"]


def test_report_heatmaps_render_in_headless_chromium(run: dict[str, Any]) -> None:
    sync_playwright, executable, args = _browser()
    html = run["report"] / "report.html"
    maps = json.loads((run["report"] / "metrics.json").read_text(encoding="utf-8"))["galleries"]["heatmaps"]["maps"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=args)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(html.resolve().as_uri(), wait_until="load")
            shown = page.eval_on_selector_all(
                "#images img.heatmap",
                "els => els.map(e => ({w: e.naturalWidth, h: e.naturalHeight, visible: e.offsetWidth > 0}))")
            wrong_tiles = page.eval_on_selector_all(
                "#images .tile.wrong", "els => els.map(e => e.querySelectorAll('img.heatmap').length)")
        finally:
            browser.close()
    assert len(shown) == maps > 0
    assert all(s["w"] > 0 and s["h"] > 0 and s["visible"] for s in shown), shown
    assert wrong_tiles and all(n == 2 for n in wrong_tiles)  # the predicted class's map and the true class's
