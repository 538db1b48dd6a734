"""Metrics from predicted probabilities, and the confusion-matrix heatmap.

Part of the evaluation layer (`imgclf.evaluation`), with calibration and TTA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def classification_metrics(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, top-5 accuracy, macro/weighted F1, balanced accuracy, per-class scores, confusion.

    `probs` is N x C (rows sum to 1), `labels` N integers. Top-5 uses min(5, C) guesses.

    Example:
        >>> m = classification_metrics(np.eye(2)[[0, 1, 1]], np.array([0, 1, 0]), ["a", "b"])
        >>> round(m["accuracy"], 3), m["confusion_matrix"]
        (0.667, [[1, 1], [0, 1]])
    """
    num_classes = len(classes)
    labels = np.asarray(labels, dtype=np.int64)
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    k = min(5, num_classes)
    topk = np.argsort(-probs, axis=1)[:, :k] if len(probs) else np.zeros((0, k), dtype=np.int64)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    true_pos = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    precision = np.divide(true_pos, predicted, out=np.zeros(num_classes), where=predicted > 0)
    recall = np.divide(true_pos, support, out=np.zeros(num_classes), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(num_classes), where=denom > 0)
    present = support > 0
    n = max(len(labels), 1)
    return {
        "num_images": int(len(labels)),
        "accuracy": float(true_pos.sum() / n),
        "top5_accuracy": float((topk == labels[:, None]).any(axis=1).mean()) if len(labels) else 0.0,
        "top_k": k,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "weighted_f1": float((f1 * support).sum() / n),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "classes": list(classes),
        "confusion_matrix": confusion.tolist(),
    }


def is_imbalanced(metrics: dict[str, Any], ratio: float = 3.0) -> bool:
    """True when the largest class has `ratio` times the support of the smallest present one."""
    supports = [v["support"] for v in metrics["per_class"].values() if v["support"] > 0]
    return bool(supports) and max(supports) >= ratio * min(supports)


def plot_confusion(confusion: list[list[int]], classes: list[str], path: str | Path, title: str) -> Path:
    """Write a row-normalised confusion-matrix heatmap (counts in the cells) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(confusion, dtype=np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    normalized = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    n = len(classes)
    side = min(4 + 0.45 * n, 30)
    fig, ax = plt.subplots(figsize=(side, side * 0.85), dpi=100)
    image = ax.imshow(normalized, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), labels=classes, rotation=60, ha="right", fontsize=max(5, 10 - n // 10))
    ax.set_yticks(range(n), labels=classes, fontsize=max(5, 10 - n // 10))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    color = "white" if normalized[i, j] > 0.5 else "black"
                    ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", color=color, fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
