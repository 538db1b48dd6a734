"""Linear probe: frozen-backbone features, computed once, and a logistic-regression head on them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from imgclf.data.pipeline import ImageStore, normalize
from imgclf.progress import progress
from imgclf.runtime import FrozenForward


def run_frozen(
    forward: FrozenForward, store: ImageStore, *, batch_size: int, desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a frozen network over every readable image of `store`.

    Returns (outputs N x D float32, labels N); unreadable images are left out (see store.failed).
    """
    outputs, labels = [], []
    bar = progress(total=len(store), desc=desc)
    for indices, batch in store.batches(np.arange(len(store)), batch_size):
        outputs.append(forward(normalize(batch, store.prep)))
        labels.append(store.labels[torch.from_numpy(indices)])
        bar.update(len(indices))
    bar.close()
    if not outputs:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
    return torch.cat(outputs), torch.cat(labels)


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
) -> nn.Linear:
    """Multinomial logistic regression with L2 penalty, fitted by full-batch L-BFGS.

    Features are standardised for conditioning; the scaling is folded back into the returned
    layer, so it applies to raw features. `init` (a layer from this function) warm-starts the fit.
    """
    x = features.float()
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    y = labels.long()
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
        loss = nn.functional.cross_entropy(z @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
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
) -> ProbeResult:
    """Fit one head per L2 strength and keep the one with the best validation accuracy.

    Strengths are tried from strongest to weakest, each fit warm-started from the previous one.
    Ties go to the stronger penalty (the simpler model).
    """
    best: ProbeResult | None = None
    scores: dict[float, float] = {}
    head: nn.Linear | None = None
    for l2 in sorted(l2_grid, reverse=True):
        head = fit_logistic(train_x, train_y, num_classes, l2=l2, init=head)
        with torch.no_grad():
            acc = float((head(val_x).argmax(1) == val_y).float().mean()) if len(val_y) else 0.0
        scores[l2] = acc
        if best is None or acc > best.val_accuracy:
            best = ProbeResult(head=head, l2=l2, val_accuracy=acc, scores=scores)
    if best is None:
        raise ValueError("l2_grid must not be empty")
    best.scores = scores
    return best
