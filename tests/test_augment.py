"""The fine-tuning augmentation that `--augment auto` (the default) picks from the images' size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_BACKBONE, make_image_folder

from imgclf.config import TrainConfig
from imgclf.training.run import _augmentation


@pytest.mark.parametrize(("median_side", "image_size", "expected"), [
    (32, 96, "light"),  # CIFAR-10 upsampled 3x
    (8, 96, "light"),  # the digits
    (96, 96, "standard"),  # as large as the input: crops zoom within real detail
    (400, 128, "standard"),  # photos
    (None, 96, "standard"),  # no size read: the general default
])
def test_auto_picks_light_crops_only_for_images_smaller_than_the_input(
        median_side: int | None, image_size: int, expected: str) -> None:
    cfg = _augmentation(TrainConfig(data="d", out="o"), median_side, image_size)
    assert cfg.augment == expected


@pytest.mark.parametrize("given", ["none", "light", "standard"])
def test_a_given_augmentation_is_kept_whatever_the_size(given: str) -> None:
    assert _augmentation(TrainConfig(data="d", out="o", augment=given), 8, 96).augment == given  # type: ignore[arg-type]
    assert _augmentation(TrainConfig(data="d", out="o", augment=given), 800, 96).augment == given  # type: ignore[arg-type]


@pytest.mark.parametrize(("image_size", "expected"), [(64, "light"), (32, "standard")])
def test_the_bundle_records_the_augmentation_the_run_used(tmp_path: Path, image_size: int, expected: str) -> None:
    import imgclf

    data = make_image_folder(tmp_path / "data", classes=3, per_class=8, size=40)
    out = tmp_path / "run"
    imgclf.train(data=str(data), out=str(out), backbone=TINY_BACKBONE, random_init=True, recipe="finetune",
                 image_size=image_size, batch_size=8, epochs=1, precision="fp32", test_time_size_search=False)
    meta = json.loads((out / "imgclf.json").read_text())
    assert meta["config"]["augment"] == expected
    assert ("augmentation: light random-resized crops" in (out / "train.log").read_text()) == (expected == "light")
