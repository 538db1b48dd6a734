"""Class weights for skewed data (`--balance`): each class contributes equally to the loss."""

from __future__ import annotations

import torch


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Weight of class c = n / (k * n_c): n images, k classes present, n_c images of class c.

    Every present class then carries the same total weight, and the weights average 1 per image,
    so the loss keeps its scale and the learning rate needs no change. Absent classes get 0.

    Example:
        >>> balanced_class_weights(torch.tensor([0, 0, 0, 1]), 3).tolist()
        [0.6666666865348816, 2.0, 0.0]
    """
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes).float()
    present = counts > 0
    weights = torch.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights
