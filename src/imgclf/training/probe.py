"""Linear probe: frozen-backbone features, computed once, and a logistic-regression head on them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn


@dataclass
class ProbeResult:
    head: nn.Linear
    l2: float  # the chosen L2 strength
    val_accuracy: float
    scores: dict[float, float]  # val accuracy of every L2 strength tried


# Along the path from strong to weak penalties, stop once a weaker one scores this much below the
# best so far: over-fitting has set in, and weaker penalties also take the most L-BFGS steps to fit.
# Measured on CIFAR-10 features (lite0, 160 px, 45,000 images): the 7-value path took 68 s, of which
# the two weakest (1e-3: 0.796, 1e-4: 0.785, best 1e-2: 0.807) took 35 s.
PATH_STOP_DROP = 0.01


# Per-dimension standard deviations are floored at this share of their median before dividing by
# them. Without the floor a feature that barely varies (116 of lite0's 1,280 on the 8 px digits
# upscaled to 96 px had std < 1e-3) is blown up to unit variance, its L2-penalised weight is folded
# back as weight / std, and the head's raw weights reached 187: logits then swing with the tiny
# differences between runtimes, precisions and augmentations (bf16 CE on lightly augmented digits
# 0.150 against 0.021 with the floor). Measured (2026-11-30): digits val 0.923 -> 0.937, largest raw
# weight 187 -> 5.9; CIFAR-10 (8,000 images, 96 px) val 0.7465 -> 0.7470, unchanged within noise.
STD_FLOOR = 0.1


@dataclass
class _Standardized:
    """Features scaled to zero mean and unit variance per dimension (std floored), for conditioning."""

    z: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def of(cls, features: torch.Tensor) -> _Standardized:
        x = features.float()
        mean = x.mean(0)
        if len(x) > 1:
            std = x.std(0)
            std = std.clamp_min(max(STD_FLOOR * float(std.median()), 1e-6))
        else:
            std = torch.ones(x.shape[1])
        return cls((x - mean) / std, mean, std)

    def fold(self, weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
        """The layer that applies `weight`, `bias` (fitted on z) to raw features."""
        layer = nn.Linear(len(self.mean), len(bias))
        with torch.no_grad():
            folded = weight / self.std
            layer.weight.copy_(folded)
            layer.bias.copy_(bias - folded @ self.mean)
        return layer

    def unfold(self, layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """`fold`'s inverse: W_z = W * std, b_z = b + W @ mean."""
        weight = layer.weight.detach()
        return weight * self.std, layer.bias.detach() + weight @ self.mean


def minimise_l2(
    z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    data_loss: Callable[[torch.Tensor], torch.Tensor], *, l2: float, max_iter: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise `data_loss(logits)` + l2/2 |W|^2 over a linear layer on standardised features `z`
    (full batch, L-BFGS with a strong-Wolfe line search), from (`weight`, `bias`).

    The single-label probe's loss is cross-entropy, the multi-label one's binary cross-entropy
    (`training.multilabel`); both warm-start along the L2 path from the previous strength's fit.
    """
    weight = weight.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
        tolerance_change=1e-7, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = data_loss(torch.addmm(bias, z, weight.T)) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def _cross_entropy(
    labels: torch.Tensor, class_weight: torch.Tensor | None, label_smoothing: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The single-label probes' data loss for `minimise_l2`: mean cross-entropy against `labels`,
    weighted per class and label-smoothed as asked."""
    per_class = None if class_weight is None else class_weight.float()
    return partial(nn.functional.cross_entropy, target=labels.long(), weight=per_class,
                   label_smoothing=label_smoothing)


def fit_logistic(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    l2: float,
    max_iter: int = 150,
    init: nn.Linear | None = None,
    class_weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> nn.Linear:
    """Multinomial logistic regression with L2 penalty, fitted by full-batch L-BFGS.

    Features are standardised for conditioning; the scaling is folded back into the returned
    layer, so it applies to raw features. `init` (a layer from this function) warm-starts the fit.
    `class_weight` (C values) weights each image's cross-entropy by its class, e.g.
    `balanced_class_weights` for skewed classes.

    Example:
        >>> head = fit_logistic(torch.randn(100, 8), torch.randint(0, 3, (100,)), 3, l2=1e-3)
        >>> tuple(head.weight.shape)
        (3, 8)
    """
    scaled = _Standardized.of(features)
    if init is not None:
        weight, bias = scaled.unfold(init)
    else:
        weight, bias = torch.zeros(num_classes, features.shape[1]), torch.zeros(num_classes)
    weight, bias = minimise_l2(scaled.z, weight, bias, _cross_entropy(labels, class_weight, label_smoothing),
                               l2=l2, max_iter=max_iter)
    return scaled.fold(weight, bias)


def fit_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    l2_grid: list[float],
    *,
    class_weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> ProbeResult:
    """Fit one head per L2 strength and keep the one with the best validation accuracy.

    Strengths are tried from strongest to weakest, each fit warm-started from the previous one, on
    features standardised once. The path stops early once a strength scores `PATH_STOP_DROP` below
    the best. Ties go to the stronger penalty (the simpler model). With `class_weight` (balanced
    training) the loss is class-weighted and the L2 strength is chosen by balanced accuracy instead.
    `label_smoothing` fits the head to the loss that fine-tuning will go on minimising (LP-FT: a head
    fitted without it starts fine-tuning far from its own optimum, with a loss of 0.85-1.1 instead
    of 0.52-0.56 on digits, and its first gradients are spent shrinking its confidence).

    Example:
        >>> x, y = torch.randn(200, 8), torch.randint(0, 3, (200,))
        >>> result = fit_probe(x[:150], y[:150], x[150:], y[150:], 3, [1e-2, 1e-1])
        >>> sorted(result.scores) == [1e-2, 1e-1]
        True
    """
    if not l2_grid:
        raise ValueError("l2_grid must not be empty")
    scaled = _Standardized.of(train_x)
    start = torch.zeros(num_classes, train_x.shape[1]), torch.zeros(num_classes)
    balanced = class_weight is not None
    return l2_path(scaled, start, l2_grid, _cross_entropy(train_y, class_weight, label_smoothing),
                   partial(_accuracy, val_x=val_x, val_y=val_y, balanced=balanced), max_iter=150)


def _accuracy(head: nn.Linear, *, val_x: torch.Tensor, val_y: torch.Tensor, balanced: bool) -> float:
    """`head`'s accuracy on (`val_x`, `val_y`), or with `balanced` its mean recall over classes; 0 without images."""
    if not len(val_y):
        return 0.0
    correct = (head(val_x).argmax(1) == val_y).float()
    if balanced:
        return float(torch.stack([correct[val_y == c].mean() for c in val_y.unique()]).mean())
    return float(correct.mean())


def l2_path(
    scaled: _Standardized, start: tuple[torch.Tensor, torch.Tensor], l2_grid: list[float],
    data_loss: Callable[[torch.Tensor], torch.Tensor], score: Callable[[nn.Linear], float], *, max_iter: int,
) -> ProbeResult:
    """Fit one head per L2 strength, strongest to weakest, each warm-started from the previous (from
    `start`, the weight and bias of the first); keep the best `score`. The path stops once a strength
    scores `PATH_STOP_DROP` below the best; ties go to the stronger penalty (the simpler model).

    Shared by the single-label probe (cross-entropy, accuracy) and the multi-label one (binary
    cross-entropy, mAP: `training.multilabel`).
    """
    weight, bias = start
    best: ProbeResult | None = None
    scores: dict[float, float] = {}
    for l2 in sorted(l2_grid, reverse=True):
        weight, bias = minimise_l2(scaled.z, weight, bias, data_loss, l2=l2, max_iter=max_iter)
        head = scaled.fold(weight, bias)
        with torch.no_grad():
            value = score(head)
        scores[l2] = value
        if best is None or value > best.val_accuracy:
            best = ProbeResult(head=head, l2=l2, val_accuracy=value, scores=scores)
        elif value < best.val_accuracy - PATH_STOP_DROP:
            break
    if best is None:  # unreachable: the callers refuse an empty grid
        raise RuntimeError("no L2 strength was fitted")
    best.scores = scores
    return best
