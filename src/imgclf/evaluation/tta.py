"""Raw logits for a whole store, optionally with test-time augmentation (TTA).

TTA here is the cheapest kind that reliably helps natural photos: every image is also run
mirrored left-right, and the two softmax outputs are averaged. It doubles inference cost. It is
wrong for classes that a mirror changes (digits, text, left/right), which is why it is an option.

Part of the evaluation layer (`imgclf.evaluation`), above the runtime that runs the network.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from imgclf.data.pipeline import ImageStore
from imgclf.evaluation.calibration import softmax
from imgclf.evaluation.metrics import classification_metrics
from imgclf.progress import progress
from imgclf.runtime import FrozenForward, StorePredictions, stream_outputs

TTA_METHOD = "mean of the softmax over the image and its left-right mirror"


def collect_predictions(
    forward: FrozenForward, store: ImageStore, *, batch_size: int = 64, tta: bool = False, desc: str = "predict"
) -> StorePredictions:
    """Run `forward` over every readable image of `store`; with `tta` also over their mirrors.

    Example:
        >>> preds = collect_predictions(model.forward_function(), store, tta=True)  # doctest: +SKIP
        >>> preds.logits.shape, preds.mirrored_logits.shape  # doctest: +SKIP
        ((200, 10), (200, 10))
    """
    logits: list[torch.Tensor] = []
    mirrored: list[torch.Tensor] = []
    positions: list[np.ndarray] = []
    bar = progress(total=len(store), desc=desc)
    pairs: Iterator[tuple[np.ndarray, torch.Tensor]] = store.batches(np.arange(len(store)), batch_size)
    if tta:  # each batch twice: as it is and mirrored (dim 3 is width)
        pairs = ((indices, torch.cat([batch, batch.flip(3)])) for indices, batch in pairs)
    for indices, out in stream_outputs(forward, pairs, store.prep):
        logits.append(out[: len(indices)])
        if tta:
            mirrored.append(out[len(indices):])
        positions.append(indices)
        bar.update(len(indices))
    bar.close()
    if not positions:
        empty = np.zeros((0, 0), dtype=np.float32)
        return StorePredictions(empty, np.zeros(0, np.int64), np.zeros(0, np.int64), empty if tta else None)
    where = np.concatenate(positions)
    return StorePredictions(
        logits=torch.cat(logits).numpy(),
        labels=store.labels[torch.from_numpy(where)].numpy(),
        positions=where,
        mirrored_logits=torch.cat(mirrored).numpy() if tta else None,
    )


def tta_probabilities(predictions: StorePredictions, temperature: float = 1.0) -> np.ndarray:
    """N x C probabilities averaged over each image and its mirror (needs `tta=True` predictions)."""
    if predictions.mirrored_logits is None:
        raise ValueError("these predictions were collected without tta=True")
    return (softmax(predictions.logits, temperature) + softmax(predictions.mirrored_logits, temperature)) / 2


def tta_summary(predictions: StorePredictions, classes: list[str], temperature: float = 1.0) -> dict[str, Any]:
    """Accuracy, top-5 accuracy and macro-F1 with and without TTA, on the same images.

    Example:
        >>> tta_summary(preds, model.classes)["accuracy"]  # doctest: +SKIP
        0.912
    """
    keys = ("accuracy", "top5_accuracy", "macro_f1")
    plain = classification_metrics(softmax(predictions.logits, temperature), predictions.labels, classes)
    with_tta = classification_metrics(tta_probabilities(predictions, temperature), predictions.labels, classes)
    summary: dict[str, Any] = {"method": TTA_METHOD, "num_images": plain["num_images"]}
    summary.update({k: with_tta[k] for k in keys})
    summary.update({f"{k}_without": plain[k] for k in keys})
    return summary
