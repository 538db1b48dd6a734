"""An exponential moving average of the weights while fine-tuning (timm's `ModelEmaV3`).

Why: on a small validation set the epoch to keep is chosen on a few hundred images, where one image
is half a point, and the raw weights at the end of an epoch are one noisy point of a noisy path.
The average of the recent weights is smoother and usually better (Polyak averaging; timm trains its
ImageNet models with it). With `cfg.ema` every candidate scored on val is the averaged network,
not the raw one.

The decay warms up with the step count (`1 - (1 + step) ** -2/3`, timm's warm-up): after 46 steps
(digits, 2 epochs) it averages roughly the last 13 steps, after 1,400 (CIFAR-10, 2 epochs) the last
~125, so short runs are not dominated by their first steps.
"""

from __future__ import annotations

import torch
from timm.utils.model_ema import ModelEmaV3
from torch import nn

MAX_DECAY = 0.9998  # the warm-up's 2/3 power reaches it only after ~350,000 steps: in practice the warm-up decides


class WeightAverage:
    """The averaged copy of a network, updated after every optimizer step.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> average = WeightAverage(net)
        >>> average.update(net, step=1)
        >>> torch.equal(average.module.weight, net.weight)
        True
    """

    def __init__(self, model: nn.Module) -> None:
        self.ema = ModelEmaV3(model, decay=MAX_DECAY, use_warmup=True)

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def update(self, model: nn.Module, *, step: int) -> None:
        """Fold `model`'s weights in after optimizer step `step` (1-based: step 1 copies them)."""
        self.ema.update(model, step=step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.ema.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ema.module.load_state_dict(state)
