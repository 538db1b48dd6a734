"""Multi-label training: the sigmoid head's loss, its validation score (mAP) and the linear probe.

A multi-label head is the same `nn.Linear` as a single-label one; only the loss and the output
function differ: one sigmoid per label, and binary cross-entropy summed over labels (so each
label's logistic regression has the same weight whatever the label count) and averaged over
images. The probe fits all labels at once, one multi-output logistic regression by full-batch
L-BFGS on the same standardised features as the single-label probe (`training.probe`), with the
L2 strength chosen on val by mean average precision (mAP, macro over labels), the threshold-free
score that the fine-tuning epochs are also selected by.

Asymmetric loss (Ridnik et al., 2021) was not adopted: BCE is what the issue asks for by default,
and no measurement here showed it worse (see BENCHMARKS.md, issue 19).
"""

from __future__ import annotations

import warnings
from functools import partial

import numpy as np
import torch
from torch import nn

from imgclf.training.probe import ProbeResult, _Standardized, l2_path


def multilabel_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy summed over labels, averaged over images (nats per image).

    Example:
        >>> round(float(multilabel_loss(torch.zeros(2, 3), torch.ones(2, 3))), 4)  # 3 x ln 2
        2.0794
    """
    if not len(targets):
        return logits.sum() * 0.0
    per_label = nn.functional.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum")
    return per_label / len(targets)


def mean_average_precision(scores: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor) -> float:
    """mAP: scikit-learn's average precision of each label, averaged over the labels with a positive.

    A label without any positive image has no defined AP; it is left out of the mean (rather than
    counted as 0 as scikit-learn's `average="macro"` would, with a warning), so a val split that
    happens to lack a rare label is not scored as if the model had failed on it. 0.0 when no label
    has a positive.

    Example:
        >>> mean_average_precision(np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.3]]),
        ...                        np.array([[1, 0], [0, 1], [0, 0]]))
        1.0
    """
    from sklearn.metrics import average_precision_score

    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(targets) > 0.5
    present = t.any(axis=0) if len(t) else np.zeros(s.shape[1] if s.ndim == 2 else 0, dtype=bool)
    if not present.any():
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(average_precision_score(t[:, present], s[:, present], average="macro"))


def fit_multilabel_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    l2_grid: list[float],
    *,
    max_iter: int = 150,
) -> ProbeResult:
    """One multi-output logistic regression (a sigmoid per label) per L2 strength; keep the best val mAP.

    The same path as `training.probe.fit_probe`: strengths from strongest to weakest, each fit
    warm-started from the previous, stopping once a strength scores `PATH_STOP_DROP` below the best;
    ties go to the stronger penalty. The result's `val_accuracy` and `scores` hold val **mAP** (the
    multi-label selection score), not accuracy. The initial bias is each label's log-odds in train,
    so rare labels start from their prior instead of 0.5.

    Example:
        >>> x, y = torch.randn(200, 8), (torch.rand(200, 3) < 0.3).float()
        >>> result = fit_multilabel_probe(x[:150], y[:150], x[150:], y[150:], [1e-2, 1e-1])
        >>> tuple(result.head.weight.shape), sorted(result.scores)
        ((3, 8), [0.01, 0.1])
    """
    if not l2_grid:
        raise ValueError("l2_grid must not be empty")
    scaled = _Standardized.of(train_x)
    y = train_y.float()
    num_labels = y.shape[1]
    prior = y.mean(0).clamp(1e-3, 1 - 1e-3) if len(y) else torch.full((num_labels,), 0.5)
    start = torch.zeros(num_labels, train_x.shape[1]), torch.log(prior / (1 - prior))
    return l2_path(scaled, start, l2_grid, partial(multilabel_loss, targets=y),
                   partial(_val_map, val_x=val_x, val_y=val_y), max_iter=max_iter)


def _val_map(head: nn.Linear, *, val_x: torch.Tensor, val_y: torch.Tensor) -> float:
    """`head`'s mAP on (`val_x`, `val_y`); 0 without images."""
    return mean_average_precision(head(val_x), val_y) if len(val_y) else 0.0


class MultilabelLoss(nn.Module):
    """`multilabel_loss` as a criterion for the fine-tuning loop (`finetune.LPFT.criterion`).

    `reduction="mean"` divides the summed binary cross-entropy by the image count (nats per image);
    `"sum"` leaves it summed, for torchrun, where each rank sums its slice and the loop divides by
    the global batch's image count (`finetune.global_normaliser`: no `weight`, so the image count).

    Example:
        >>> round(float(MultilabelLoss()(torch.zeros(2, 3), torch.ones(2, 3))), 4)
        2.0794
    """

    weight = None  # no class weights: `global_normaliser` then divides by the image count

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = nn.functional.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum")
        return total / max(len(targets), 1) if self.reduction == "mean" else total


def exact_matches(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Images whose whole label set is right at probability 0.5 (logit 0): the training "accuracy".

    Example:
        >>> int(exact_matches(torch.tensor([[2.0, -1.0], [2.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])))
        1
    """
    return ((logits > 0) == (targets > 0.5)).all(dim=1).sum()
