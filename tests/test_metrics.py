from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from imgclf.evaluation import classification_metrics, plot_confusion


def test_metrics_agree_with_scikit_learn(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 300)
    logits = rng.normal(size=(300, 6)) + 2.0 * np.eye(6)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = probs.argmax(1)
    classes = [f"c{i}" for i in range(6)]
    m = classification_metrics(probs, labels, classes)
    assert np.isclose(m["accuracy"], (pred == labels).mean())
    assert np.isclose(m["macro_f1"], f1_score(labels, pred, average="macro"))
    assert np.isclose(m["weighted_f1"], f1_score(labels, pred, average="weighted"))
    assert np.isclose(m["balanced_accuracy"], balanced_accuracy_score(labels, pred))
    p, r, f, s = precision_recall_fscore_support(labels, pred, zero_division=0)
    assert np.allclose([m["per_class"][c]["precision"] for c in classes], p)
    assert np.allclose([m["per_class"][c]["recall"] for c in classes], r)
    assert [m["per_class"][c]["support"] for c in classes] == s.tolist()
    assert m["confusion_matrix"] == confusion_matrix(labels, pred).tolist()
    top5 = np.argsort(-probs, 1)[:, :5]
    assert np.isclose(m["top5_accuracy"], (top5 == labels[:, None]).any(1).mean())
    png = plot_confusion(m["confusion_matrix"], classes, tmp_path / "cm.png", "t")
    assert png.stat().st_size > 1000
