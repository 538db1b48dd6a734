"""Stand-ins shared by the tests of the feature cache, the frozen runtime and the time budget."""

from __future__ import annotations

import torch

from imgclf.data.pipeline import Preprocessing

PREP = Preprocessing(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


class CountingForward:
    """A stand-in backbone: mean colour per channel, scaled; counts the images it sees."""

    def __init__(self) -> None:
        self.images = 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.images += len(batch)
        return batch.float().mean(dim=(2, 3)) * 2.0
