"""Multi-label metrics and the per-label thresholds, all from scikit-learn.

A multi-label model gives each label its own probability (a sigmoid); a label is predicted when
its probability reaches the label's threshold. The thresholds are chosen on the validation split,
one per label, each maximising that label's F1 (`choose_thresholds`); training stores them in the
bundle, and `predict`, `evaluate` and `serve` use them unless `--threshold` overrides them all.

Metrics (`multilabel_metrics`): mAP (the mean over labels of average precision; threshold-free),
micro and macro F1, subset accuracy (the whole label set right), Hamming loss (the share of wrong
image-label decisions), and per label precision, recall, F1, AP and support.

Part of the evaluation layer; pure functions of probabilities and 0/1 target matrices.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

TASK = "multi-label"
DEFAULT_THRESHOLD = 0.5  # for a label without a positive val image: no F1 to maximise


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Element-wise logistic function, stable for large |logits|.

    Example:
        >>> sigmoid(np.array([0.0, 100.0, -100.0])).round(3).tolist()
        [0.5, 1.0, 0.0]
    """
    x = np.asarray(logits, dtype=np.float64)
    return np.where(x >= 0, 1 / (1 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1 + np.exp(-np.abs(x))))


def choose_thresholds(probs: np.ndarray, targets: np.ndarray) -> list[float]:
    """One threshold per label: the probability at which that label's F1 on (`probs`, `targets`) peaks.

    The candidates are the label's own scores (scikit-learn's `precision_recall_curve`); a label is
    predicted when its probability is >= its threshold. Of equal F1s the highest cut wins (fewer
    false positives for the same F1). The threshold is then placed halfway between that cut and the
    next lower val score, which gives the same val predictions but does not sit on a val image's
    score: on a small val split (tens of images) the cut itself is the lowest positive seen, and new
    positives just below it were missed (tiny generated colour set, 9 val images: recall of one
    label over all 90 images 0.83 -> 1.00). Labels without a positive image keep `DEFAULT_THRESHOLD` (0.5).

    Example:
        >>> probs = np.array([[0.9, 0.2], [0.6, 0.7], [0.4, 0.1], [0.1, 0.8]])
        >>> [round(t, 3) for t in choose_thresholds(probs, np.array([[1, 0], [1, 1], [0, 0], [0, 1]]))]
        [0.5, 0.45]
    """
    from sklearn.metrics import precision_recall_curve

    probs = np.asarray(probs, dtype=np.float64)
    truth = np.asarray(targets) > 0.5
    thresholds: list[float] = []
    for j in range(probs.shape[1]):
        if not truth[:, j].any():
            thresholds.append(DEFAULT_THRESHOLD)
            continue
        precision, recall, cuts = precision_recall_curve(truth[:, j], probs[:, j])
        precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
        best = np.flatnonzero(f1 >= f1.max() - 1e-12)[-1]  # cuts ascend: the last of the ties is the highest
        below = probs[:, j][probs[:, j] < cuts[best]]
        thresholds.append(float((cuts[best] + below.max()) / 2 if len(below) else cuts[best]))
    return thresholds


def multilabel_metrics(
    probs: np.ndarray, targets: np.ndarray, classes: Sequence[str], thresholds: Sequence[float] | np.ndarray
) -> dict[str, Any]:
    """mAP, micro/macro F1, subset accuracy, Hamming loss and per-label scores (scikit-learn's).

    `probs` and `targets` are N x C (probabilities; 0/1); predictions are `probs >= thresholds`.
    mAP and macro AP average over the labels with a positive image (AP is undefined without one);
    macro F1 averages over every label. `micro_f1_at_0.5` is micro F1 at a flat 0.5, for comparison
    with models without tuned thresholds.

    Example:
        >>> m = multilabel_metrics(np.array([[0.9, 0.2], [0.6, 0.7]]), np.array([[1, 0], [1, 1]]),
        ...                        ["a", "b"], [0.5, 0.5])
        >>> m["subset_accuracy"], m["micro_f1"], m["per_label"]["b"]["support"]
        (1.0, 1.0, 1)
    """
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        f1_score,
        hamming_loss,
        precision_recall_fscore_support,
    )

    probs = np.asarray(probs, dtype=np.float64).reshape(-1, len(classes))
    truth = (np.asarray(targets) > 0.5).reshape(-1, len(classes)).astype(np.int64)
    cuts = np.asarray(thresholds, dtype=np.float64)
    pred = (probs >= cuts).astype(np.int64)
    n = len(truth)
    with warnings.catch_warnings():  # labels without positives or predictions: scikit-learn scores 0 and warns
        warnings.simplefilter("ignore")
        precision, recall, f1, support = precision_recall_fscore_support(truth, pred, average=None, zero_division=0)
        present = truth.sum(axis=0) > 0
        ap = np.full(len(classes), np.nan)
        if n and present.any():
            ap[present] = average_precision_score(truth[:, present], probs[:, present], average=None)
        micro = float(f1_score(truth, pred, average="micro", zero_division=0)) if n else 0.0
        at_half = (probs >= 0.5).astype(np.int64)
        micro_half = float(f1_score(truth, at_half, average="micro", zero_division=0)) if n else 0.0
        macro = float(f1_score(truth, pred, average="macro", zero_division=0)) if n else 0.0
    return {
        "task": TASK,
        "num_images": int(n),
        "mAP": float(np.nanmean(ap)) if present.any() else 0.0,
        "micro_f1": micro,
        "macro_f1": macro,
        "micro_f1_at_0.5": micro_half,
        "subset_accuracy": float(accuracy_score(truth, pred)) if n else 0.0,
        "hamming_loss": float(hamming_loss(truth, pred)) if n else 0.0,
        "images_without_label": int((truth.sum(axis=1) == 0).sum()),
        "labels_per_image": float(truth.sum(axis=1).mean()) if n else 0.0,
        "predicted_labels_per_image": float(pred.sum(axis=1).mean()) if n else 0.0,
        "thresholds": dict(zip(classes, (float(c) for c in cuts), strict=True)),
        "per_label": {
            name: {"precision": float(precision[j]), "recall": float(recall[j]), "f1": float(f1[j]),
                   "ap": None if np.isnan(ap[j]) else float(ap[j]), "support": int(support[j]),
                   "threshold": float(cuts[j])}
            for j, name in enumerate(classes)
        },
        "classes": list(classes),
    }


def worst_labels(metrics: dict[str, Any], key: str = "ap") -> list[str]:
    """Label names ordered worst first by `key` (labels without a value last).

    Example:
        >>> worst_labels({"per_label": {"a": {"ap": 0.9}, "b": {"ap": 0.4}, "c": {"ap": None}}})
        ['b', 'a', 'c']
    """
    rows = metrics["per_label"]
    return sorted(rows, key=lambda name: (rows[name][key] is None, rows[name][key] or 0.0))
