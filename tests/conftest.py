"""Shared fixtures: tiny generated image sets and a tiny trained bundle.

The images are learnable by construction: every class has its own base colour, plus noise and a
random bright square, so a tiny randomly initialised backbone plus a linear probe separates them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("IMGCLF_OFFLINE", "1")  # never wait on the hub in tests
os.environ.setdefault("IMGCLF_PROGRESS", "0")
# Downloads and the feature cache go to a fresh folder, never the user's ~/.cache/imgclf.
os.environ.setdefault("IMGCLF_CACHE", tempfile.mkdtemp(prefix="imgclf-test-cache-"))

TINY_BACKBONE = "test_efficientnet"  # timm's tiny test model (~0.3M params)
CLASS_COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 220, 40), (200, 60, 210)]


def make_image(colour: tuple[int, int, int], rng: np.random.Generator, size: int = 40) -> Image.Image:
    array = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    x, y = rng.integers(0, size // 2, 2)
    array[y : y + size // 4, x : x + size // 4] = 255
    return Image.fromarray(array)


def make_image_folder(
    root: Path, *, classes: int = 3, per_class: int = 12, size: int = 40, seed: int = 0, fmt: str = "png"
) -> Path:
    """Write `root/<class>/<n>.<fmt>` images; returns root."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(CLASS_COLOURS[c], rng, size).save(folder / f"{i:03d}.{fmt}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A probe-trained bundle on 3 colour classes with the tiny backbone (random init)."""
    import imgclf

    root = tmp_path_factory.mktemp("bundle")
    data = make_image_folder(root / "data", per_class=16)
    out = root / "model"
    imgclf.train(
        data=str(data), out=str(out), backbone=TINY_BACKBONE, random_init=True, recipe="probe",
        image_size=32, batch_size=16,
    )
    return out
