"""Linear probe: frozen-backbone features, computed once, and a logistic-regression head on them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from imgclf import distributed
from imgclf.data.pipeline import ImageStore, normalize
from imgclf.progress import progress
from imgclf.runtime import FrozenForward


def run_frozen(
    forward: FrozenForward, store: ImageStore, *, batch_size: int, desc: str, shard: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a frozen network over every readable image of `store`.

    Returns (outputs N x D float32, labels N); unreadable images are left out (see store.failed).
    With `shard` under torchrun, each rank runs its block of the images and every rank gets all the
    outputs, gathered in order (a collective: every rank must call it).
    """
    outputs, labels = [], []
    positions = distributed.shard_range(len(store)) if shard else np.arange(len(store))
    bar = progress(total=len(positions), desc=desc)
    for indices, batch in store.batches(positions, batch_size):
        outputs.append(forward(normalize(batch, store.prep)))
        labels.append(store.labels[torch.from_numpy(indices)])
        bar.update(len(indices))
    bar.close()
    local = ((torch.cat(outputs), torch.cat(labels)) if outputs
             else (torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)))
    if shard:
        return distributed.gather_rows(local[0]), distributed.gather_rows(local[1])
    return local


@dataclass
class ProbeResult:
    head: nn.Linear
    l2: float  # the chosen L2 strength
    val_accuracy: float
    scores: dict[float, float]  # val accuracy of every L2 strength tried


def fit_logistic(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    l2: float,
    max_iter: int = 150,
    init: nn.Linear | None = None,
    class_weight: torch.Tensor | None = None,
) -> nn.Linear:
    """Multinomial logistic regression with L2 penalty, fitted by full-batch L-BFGS.

    Features are standardised for conditioning; the scaling is folded back into the returned
    layer, so it applies to raw features. `init` (a layer from this function) warm-starts the fit.
    `class_weight` (C values) weights each image's cross-entropy by its class, e.g.
    `balanced_class_weights` for skewed classes.
    """
    x = features.float()
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    y = labels.long()
    weight_per_class = None if class_weight is None else class_weight.float()
    weight = torch.zeros(num_classes, x.shape[1])
    bias = torch.zeros(num_classes)
    if init is not None:  # undo the folding: W_z = W * std, b_z = b + W @ mean
        weight = init.weight.detach() * std
        bias = init.bias.detach() + init.weight.detach() @ mean
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
        tolerance_change=1e-7, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(z @ weight.T + bias, y, weight=weight_per_class)
        loss = loss + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    layer = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        folded = weight / std
        layer.weight.copy_(folded)
        layer.bias.copy_(bias - folded @ mean)
    return layer


def fit_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    l2_grid: list[float],
    *,
    class_weight: torch.Tensor | None = None,
) -> ProbeResult:
    """Fit one head per L2 strength and keep the one with the best validation accuracy.

    Strengths are tried from strongest to weakest, each fit warm-started from the previous one.
    Ties go to the stronger penalty (the simpler model). With `class_weight` (balanced training)
    the loss is class-weighted and the L2 strength is chosen by balanced accuracy instead.
    """
    best: ProbeResult | None = None
    scores: dict[float, float] = {}
    head: nn.Linear | None = None
    for l2 in sorted(l2_grid, reverse=True):
        head = fit_logistic(train_x, train_y, num_classes, l2=l2, init=head, class_weight=class_weight)
        with torch.no_grad():
            correct = (head(val_x).argmax(1) == val_y).float() if len(val_y) else torch.zeros(0)
        if class_weight is not None and len(val_y):  # balanced accuracy: mean recall over classes
            acc = float(torch.stack([correct[val_y == c].mean() for c in val_y.unique()]).mean())
        else:
            acc = float(correct.mean()) if len(val_y) else 0.0
        scores[l2] = acc
        if best is None or acc > best.val_accuracy:
            best = ProbeResult(head=head, l2=l2, val_accuracy=acc, scores=scores)
    if best is None:
        raise ValueError("l2_grid must not be empty")
    best.scores = scores
    return best
