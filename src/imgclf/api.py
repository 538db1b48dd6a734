"""The library's verbs beyond `train`: load a bundle, evaluate it, predict with it.

The API layer: above everything it ties together (bundle, evaluation, data), below the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imgclf.bundle import Model
from imgclf.data.pipeline import ImageStore
from imgclf.data.sources import collect_images, load_eval_split
from imgclf.errors import ImgclfError
from imgclf.evaluation.calibration import softmax
from imgclf.evaluation.metrics import classification_metrics, plot_confusion
from imgclf.evaluation.multilabel import multilabel_metrics
from imgclf.evaluation.tta import collect_predictions, tta_summary
from imgclf.explain import Explanation, explain
from imgclf.files import atomic_write_text

__all__ = ["collect_images", "evaluate", "explain_images", "load"]  # collect_images: the data layer's, for the CLI


def load(folder: str | Path) -> Model:
    """Load a model bundle written by `imgclf train`.

    Example:
        >>> model = imgclf.load("runs/pets")  # doctest: +SKIP
        >>> model.classes
        ['cat', 'dog']
    """
    return Model.load(folder)


def evaluate(
    model_dir: str | Path,
    data: str,
    *,
    batch_size: int = 64,
    runtime: str = "auto",
    write: bool = True,
    tta: bool = False,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Score a bundle on DATA: the test split when DATA has one, else all of its images.

    With `tta`, metrics["tta"] also holds accuracy, top-5 and macro-F1 with and without test-time
    augmentation (the image and its mirror averaged; see imgclf.evaluation.tta). Writes `evaluation.json` and
    `confusion_matrix.png` into the bundle folder unless `write` is False.

    A multi-label bundle needs a `path,labels` CSV and is scored by `evaluation.multilabel`
    (mAP, micro/macro F1, subset accuracy, Hamming loss, per-label scores) at its stored
    per-label thresholds, or at `threshold` for every label; it writes `evaluation.json` only.

    Example:
        >>> imgclf.evaluate("runs/pets", "pets/")["accuracy"]  # doctest: +SKIP
        0.94
    """
    model = Model.load(model_dir)
    if model.multilabel:
        if tta:
            raise ImgclfError("--tta is not available for multi-label models yet", fix="evaluate without --tta")
        return _evaluate_multilabel(model, Path(model_dir), data, batch_size=batch_size, runtime=runtime,
                                    write=write, threshold=threshold)
    images, split = load_eval_split(data, model.classes)
    store = ImageStore.decode(images, model.preprocessing, memory_budget=0, description="decode")
    tta_metrics = None
    if tta:
        predictions = collect_predictions(model.forward_function(runtime), store, batch_size=batch_size, tta=True,
                                          desc="evaluate")
        probs, labels = softmax(predictions.logits, model.temperature), predictions.labels
        tta_metrics = tta_summary(predictions, model.classes, model.temperature)
    else:
        probs, labels = model.predict_store(store, batch_size=batch_size, runtime=runtime, desc="evaluate")
    metrics = classification_metrics(probs, labels, model.classes)
    if tta_metrics is not None:
        metrics["tta"] = tta_metrics
    metrics.update(
        data=str(data),
        split=split,
        skipped_files=[{"path": p, "reason": r} for p, r in store.failed],
    )
    if write:
        folder = Path(model_dir)
        (folder / "evaluation.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        png = plot_confusion(
            metrics["confusion_matrix"], model.classes, folder / "confusion_matrix.png",
            f"{data} ({split}): accuracy {metrics['accuracy']:.3f}",
        )
        metrics["confusion_matrix_png"] = str(png)
    return metrics


def _evaluate_multilabel(
    model: Model, folder: Path, data: str, *, batch_size: int, runtime: str, write: bool, threshold: float | None
) -> dict[str, Any]:
    images, split = load_eval_split(data, model.classes, multilabel=True)
    store = ImageStore.decode(images, model.preprocessing, memory_budget=0, description="decode")
    probs, targets = model.predict_store(store, batch_size=batch_size, runtime=runtime, desc="evaluate")
    metrics = multilabel_metrics(probs, targets, model.classes, model.thresholds(threshold))
    metrics.update(data=str(data), split=split, threshold_source="--threshold" if threshold is not None else "bundle",
                   skipped_files=[{"path": p, "reason": r} for p, r in store.failed])
    if write:
        atomic_write_text(folder / "evaluation.json", json.dumps(metrics, indent=2))
    return metrics


def explain_images(
    model: Model | str | Path,
    images: list[str | Path] | list[Any],
    *,
    method: str = "gradcam",
    class_name: str | None = None,
    layer: str | None = None,
) -> list[Explanation]:
    """Grad-CAM heatmaps and overlays of where a bundle looks in each image (see `imgclf.explain`).

    The issue's `Model.explain`: it lives here because the bundle sits below the explain layer (a
    bundle knows nothing of Grad-CAM; the explain package reads bundles). Each result holds the
    model's input `image`, the `heatmap` (0..1) and the `overlay`, with the predicted class.

    Example:
        >>> e = imgclf.explain_images("runs/pets", ["cat.jpg"], method="gradcam++")[0]  # doctest: +SKIP
        >>> e.predicted, e.heatmap.shape, e.overlay.shape  # doctest: +SKIP
        ('cat', (224, 224), (224, 224, 3))
    """
    loaded = model if isinstance(model, Model) else Model.load(model)
    return explain(loaded, images, method=method, class_name=class_name, layer=layer)
