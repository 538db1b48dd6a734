"""The evaluation layer: metrics, calibration and test-time augmentation.

Above the bundle (which it scores) and the runtime (which runs the network); below training (which
scores and calibrates what it trains), the report and the API. Modules:

- `metrics`: accuracy, top-5, F1, per-class scores, the confusion matrix and its heatmap;
- `calibration`: the expected calibration error and temperature scaling;
- `tta`: logits for a whole store, optionally with the mirrored image.

The metric functions below are the layer's most used names.

Example:
    >>> classification_metrics(probs, labels, ["cat", "dog"])["accuracy"]  # doctest: +SKIP
    0.94
"""

from __future__ import annotations

from imgclf.evaluation.metrics import classification_metrics, is_imbalanced, plot_confusion

__all__ = ["classification_metrics", "is_imbalanced", "plot_confusion"]
