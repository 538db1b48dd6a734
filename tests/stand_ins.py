"""Stand-ins shared by the tests of the feature cache, the frozen runtime, the time budget and the
fine-tuning loop."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import TINY_BACKBONE
from torch import nn

from imgclf.data.pipeline import ImageStore, Preprocessing
from imgclf.data.sources import load_dataset
from imgclf.models.classifier import ImageClassifier

PREP = Preprocessing(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def tiny_fit_inputs(folder: Path) -> tuple[ImageClassifier, ImageStore, ImageStore]:
    """What `finetune.fit` takes, from seed 0: the tiny random backbone with a linear head over
    `folder`'s 3 classes, and its train and val (a quarter held out) decoded at `PREP`, in memory."""
    from imgclf.models.backbones import create_backbone

    torch.manual_seed(0)
    dataset = load_dataset(str(folder), val_fraction=0.25, seed=0)
    train = ImageStore.decode(dataset.train, PREP, memory_budget=2**30, workers=1)
    val = ImageStore.decode(dataset.val, PREP, memory_budget=2**30, workers=1)
    backbone = create_backbone(TINY_BACKBONE, random_init=True)
    return ImageClassifier(backbone.model, nn.Linear(backbone.num_features, 3)), train, val


class CountingForward:
    """A stand-in backbone: mean colour per channel, scaled; counts the images it sees."""

    def __init__(self) -> None:
        self.images = 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.images += len(batch)
        return batch.float().mean(dim=(2, 3)) * 2.0
