"""A bundle written by an earlier imgclf still loads and predicts what it predicted then.

`fixtures/bundle-82c994e/` was written by the code at commit 82c994e (before the layering of issue
16): `--recipe probe` with the tiny `test_efficientnet` backbone (random init) at 32 px, trained on
conftest's `make_image_folder(per_class=16, size=32)`. `expected.json` holds what that code's
`Model.predict(images, top_k=3)` returned for the PNGs in `images/` (six class images and one blend
of two class colours, whose answer is less clear-cut). Only the weights and `imgclf.json` are kept;
the report, checkpoints and logs were deleted to keep the fixture small (about 450 KB).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import imgclf

FIXTURE = Path(__file__).parent / "fixtures" / "bundle-82c994e"
# bf16 on a CPU and OpenVINO vs. torch move probabilities in the third decimal, never the labels.
PROBABILITY_TOLERANCE = 0.01


@pytest.mark.parametrize("runtime", ["auto", "torch"])
def test_bundle_from_82c994e_predicts_the_recorded_labels(runtime: str) -> None:
    expected = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))["predictions"]
    model = imgclf.load(FIXTURE)
    assert model.classes == ["class_0", "class_1", "class_2"]
    predictions = model.predict([str(FIXTURE / "images" / row["image"]) for row in expected], top_k=3,
                                runtime=runtime)
    assert [p.label for p in predictions] == [row["label"] for row in expected]
    for prediction, row in zip(predictions, expected, strict=True):
        got = prediction.to_dict()["top_k"]
        assert [k["label"] for k in got] == [k["label"] for k in row["top_k"]], row["image"]
        for k_got, k_expected in zip(got, row["top_k"], strict=True):
            assert k_got["probability"] == pytest.approx(k_expected["probability"], abs=PROBABILITY_TOLERANCE)
