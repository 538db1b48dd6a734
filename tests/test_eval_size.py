"""The test-time input size search (training/eval_size.py): chosen on val, ties and failures keep the training size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from imgclf.data.dataset import ImageSet
from imgclf.data.pipeline import Preprocessing
from imgclf.models.classifier import ImageClassifier
from imgclf.training.eval_size import candidate_sizes, choose_eval_size, estimated_seconds

PREP = Preprocessing(image_size=96, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


class BrightnessAtSize(nn.Module):
    """Feature = +brightness at `good_size` px, -brightness at any other size (a size-sensitive net)."""

    def __init__(self, good_size: int) -> None:
        super().__init__()
        self.good_size = good_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sign = 1.0 if x.shape[-1] == self.good_size else -1.0
        return sign * x.mean(dim=(1, 2, 3)).unsqueeze(1)


class FixedSizeOnly(nn.Module):
    """Refuses any input but 96 px, as a ViT with fixed position embeddings does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 96:
            raise ValueError(f"Input height ({x.shape[-1]}) doesn't match model (96)")
        return x.mean(dim=(1, 2, 3)).unsqueeze(1)


def dark_and_bright(count: int = 16) -> ImageSet:
    """Class 0: dark images, class 1: bright ones."""
    labels = np.arange(count) % 2
    arrays = np.where(labels[:, None, None, None] == 1, 220, 30).astype(np.uint8) * np.ones((1, 40, 40, 3), np.uint8)
    return ImageSet(paths=[f"gen/{i}" for i in range(count)], labels=labels.astype(np.int64), arrays=arrays)


def brightness_classifier(backbone: nn.Module) -> ImageClassifier:
    head = nn.Linear(1, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        head.bias.zero_()
    return ImageClassifier(backbone, head).eval()


def choose(model: ImageClassifier, train_size_accuracy: float, **kwargs):  # type: ignore[no-untyped-def]
    return choose_eval_size(model, dark_and_bright(), PREP, train_size_accuracy=train_size_accuracy, batch_size=8,
                            device=torch.device("cpu"), precision="fp32", memory_budget=2**26, **kwargs)


def test_candidates_are_multiples_of_16_above_the_training_size() -> None:
    assert candidate_sizes(96) == [96, 112, 128]
    assert candidate_sizes(224) == [224, 256, 288]
    assert all(s % 16 == 0 for s in candidate_sizes(160)[1:])
    # cost grows with pixels: 112 and 128 px cost (112/96)^2 and (128/96)^2 val passes
    assert estimated_seconds(96, 1000, 1000.0) == pytest.approx((112 / 96) ** 2 + (128 / 96) ** 2)


def test_the_size_with_the_best_val_accuracy_wins() -> None:
    model = brightness_classifier(BrightnessAtSize(good_size=112))
    chosen, info = choose(model, train_size_accuracy=0.0)
    assert chosen.image_size == 112
    assert chosen.mean == PREP.mean and chosen.interpolation == PREP.interpolation
    assert info["val_accuracy"] == {"96": 0.0, "112": 1.0, "128": 0.0}
    assert info["chosen"] == 112 and info["train_size"] == 96


def test_a_tie_keeps_the_training_size() -> None:
    model = brightness_classifier(BrightnessAtSize(good_size=-1))  # the same score at every size
    chosen, info = choose(model, train_size_accuracy=0.0)
    assert chosen == PREP
    assert set(info["val_accuracy"]) == {"96", "112", "128"}


def test_a_network_that_refuses_other_sizes_keeps_the_training_size() -> None:
    chosen, info = choose(brightness_classifier(FixedSizeOnly()), train_size_accuracy=1.0)
    assert chosen == PREP
    assert info["val_accuracy"] == {"96": 1.0}


def test_no_candidate_starts_that_would_end_past_the_deadline() -> None:
    import time

    model = brightness_classifier(BrightnessAtSize(good_size=128))
    # The first candidate has no estimate and runs; the deadline has passed, so the second is skipped.
    chosen, info = choose(model, train_size_accuracy=0.5, deadline=time.perf_counter())
    assert set(info["val_accuracy"]) == {"96", "112"}
    assert chosen == PREP  # 112 px scored 0.0 < 0.5


def test_a_candidate_starts_only_if_scoring_val_and_test_at_its_size_also_fits() -> None:
    import time

    model = brightness_classifier(BrightnessAtSize(good_size=128))
    # Time to spare: every size is tried and the best (128 px) wins.
    chosen, info = choose(model, train_size_accuracy=0.5, deadline=time.perf_counter() + 600, after_images=100)
    assert set(info["val_accuracy"]) == {"96", "112", "128"} and chosen.image_size == 128
    # The same time, but a billion test images to score afterwards at the size chosen: 112 px runs (the
    # plan reserved it), 128 px would leave no time to score them, so it is skipped.
    chosen, info = choose(model, train_size_accuracy=0.5, deadline=time.perf_counter() + 600, after_images=10**9)
    assert set(info["val_accuracy"]) == {"96", "112"} and chosen == PREP
