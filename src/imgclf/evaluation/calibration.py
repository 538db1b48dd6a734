"""Calibration: can the model's confidence be trusted, and temperature scaling to fix it.

A model is calibrated when, of the images it labels with confidence 0.8, about 80% are right.
The expected calibration error (ECE) measures the gap: images are binned by confidence (the top
probability) and the |accuracy - confidence| of every bin is averaged, weighted by its share of
images. Temperature scaling (Guo et al., 2017) divides the logits by one number T fitted on the
validation split; it changes the confidences but never the predicted class.

Part of the evaluation layer (`imgclf.evaluation`): pure functions of logits and labels. The bundle's
temperature is fitted here (`calibrate`) by `workflow.train`, before the bundle is saved.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

ECE_BINS = 15  # equal-width confidence bins, as in Guo et al. (2017)
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0  # search range; a fit at a bound means the val split is too easy


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of `logits / temperature`, computed stably in float64.

    Example:
        >>> softmax(np.array([[0.0, 0.0]])).tolist()
        [[0.5, 0.5]]
    """
    z = np.asarray(logits, dtype=np.float64) / temperature
    if z.size == 0:
        return z
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean cross-entropy (nats per image) of `logits / temperature` against `labels`."""
    if len(labels) == 0:
        return 0.0
    z = np.asarray(logits, dtype=np.float64) / temperature
    top = z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z - top).sum(axis=1)) + top[:, 0]
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, *, bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Per confidence bin: its range, image count, mean confidence and accuracy.

    Example:
        >>> rows = reliability_bins(np.array([[0.9, 0.1], [0.6, 0.4]]), np.array([0, 1]), bins=2)
        >>> [(r["count"], r["accuracy"]) for r in rows]
        [(0, None), (2, 0.5)]
    """
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(axis=1) == labels) if len(probs) else np.zeros(0, dtype=bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds confidences in (edge_i, edge_i+1]; a confidence of exactly 0 goes to the first bin.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for i in range(bins):
        mask = which == i
        count = int(mask.sum())
        rows.append({
            "lower": float(edges[i]),
            "upper": float(edges[i + 1]),
            "count": count,
            "confidence": float(confidence[mask].mean()) if count else None,
            "accuracy": float(correct[mask].mean()) if count else None,
        })
    return rows


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, *, bins: int = ECE_BINS) -> float:
    """ECE: the image-weighted mean of |accuracy - confidence| over equal-width confidence bins.

    Example:
        >>> expected_calibration_error(np.array([[0.9, 0.1], [0.9, 0.1]]), np.array([0, 1]))
        0.4
    """
    total = len(labels)
    if total == 0:
        return 0.0
    gap = sum(
        row["count"] * abs(row["accuracy"] - row["confidence"])
        for row in reliability_bins(probs, labels, bins=bins)
        if row["count"]
    )
    return float(round(gap / total, 12))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T that minimises the NLL of `logits / T` on (validation) `labels`.

    The NLL is convex in 1/T, so a golden-section search over log T in
    [MIN_TEMPERATURE, MAX_TEMPERATURE] finds the optimum; with no images T is 1.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> z = rng.normal(size=(2000, 4)) * 2
        >>> y = np.array([rng.choice(4, p=p) for p in softmax(z)])
        >>> 2.7 < fit_temperature(3 * z, y) < 3.3  # logits made 3x too confident
        True
    """
    if len(labels) == 0:
        return 1.0
    labels = np.asarray(labels, dtype=np.int64)
    low, high = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    ratio = (math.sqrt(5) - 1) / 2

    def loss(log_t: float) -> float:
        return negative_log_likelihood(logits, labels, math.exp(log_t))

    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = loss(a), loss(b)
    for _ in range(80):  # each step shrinks the interval by 0.618; 80 steps reach ~1e-16
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(b)
    return float(math.exp((low + high) / 2))


def calibrate(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The temperature a bundle stores, fitted on validation (`fit_temperature`), and how it was found.

    Returns `{"temperature", "fitted_temperature", "usable", "images"}`. When the fit stops at a bound
    of the search, the NLL was still falling (validation nearly separable) and T is not identifiable:
    storing T = 0.05 would make every later prediction near-certain, so the bundle keeps T = 1.

    Example:
        >>> calibrate(np.array([[10.0, 0.0], [0.0, 10.0]]), np.array([0, 1]))["temperature"]
        1.0
    """
    fitted = fit_temperature(logits, labels)
    usable = MIN_TEMPERATURE * 1.01 < fitted < MAX_TEMPERATURE / 1.01 and len(labels) > 0
    return {"temperature": fitted if usable else 1.0, "fitted_temperature": fitted, "usable": bool(usable),
            "images": int(len(labels)), "split": "val"}
