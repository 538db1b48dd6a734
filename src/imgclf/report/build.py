"""Build the evaluation report of a bundle: predictions -> numbers (metrics.json) -> figures -> HTML.

Everything a person needs to judge the model is computed once here into one JSON-able dict, which
is written as `metrics.json`; the HTML page is rendered from that same dict, so the page and the
file cannot disagree.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.bundle import Model, read_bundle_json
from imgclf.data.dataset import Dataset, ImageSet
from imgclf.data.decisions import apply_decisions
from imgclf.data.pipeline import ImageStore
from imgclf.data.sources import load_dataset
from imgclf.errors import BundleError, ConfigError
from imgclf.evaluation.calibration import (
    ECE_BINS,
    calibrate,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
    softmax,
)
from imgclf.evaluation.metrics import classification_metrics, plot_confusion
from imgclf.evaluation.tta import collect_predictions, tta_summary
from imgclf.progress import log
from imgclf.report import figures
from imgclf.report.heatmaps import gallery_heatmaps
from imgclf.report.html import render_report
from imgclf.report.multilabel import write_multilabel_report
from imgclf.runtime import FrozenForward, StorePredictions, pick_device

REPORT_FOLDER = "report"  # inside the bundle folder, unless `out` is given
REPORT_VERSION = 1
TOP_LOSSES = 16  # misclassified images shown, highest loss first
MOST_CONFUSED = 10  # class pairs listed


def write_report(
    model_dir: str | Path,
    data: str | None = None,
    *,
    tta: bool = False,
    out: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    runtime: str = "auto",
) -> Path:
    """Write `report.html`, its PNG figures and `metrics.json` for the bundle in `model_dir`.

    The split is rebuilt from DATA (default: the data the bundle was trained on) with the bundle's
    val_fraction and seed, so validation is exactly the training run's. The report scores the test
    split when there is one, else validation. It reads the bundle and never writes it: the
    temperature shown is the one training fitted on validation and stored.

    Args:
        model_dir: a bundle folder written by `imgclf train`.
        data: the data the bundle was trained on; None reads it from the bundle's config.
        tta: also score with test-time augmentation (image + mirror), at twice the cost.
        out: the report folder; default `model_dir/report`.
        batch_size: images per inference batch.
        device: auto, cpu, cuda or cuda:N.
        runtime: auto, torch or openvino (CPU only).

    Returns:
        The path of `report.html`.

    Example:
        >>> write_report("runs/pets", tta=True)  # doctest: +SKIP
        PosixPath('runs/pets/report/report.html')
    """
    model = Model.load(model_dir)
    info = model.info
    config = info.config
    data = data or info.data_source
    if not data:
        raise ConfigError(
            f"the bundle {str(model_dir)!r} does not record its training data",
            fix="pass DATA: imgclf report DIR DATA",
        )
    dataset = load_dataset(str(data), val_fraction=float(config.get("val_fraction", 0.1)),
                           seed=int(config.get("seed", 0)))
    if str(data) == info.data_source:  # the training data: with the review decisions training applied
        dataset = _with_recorded_decisions(dataset, config)
    if dataset.classes != model.classes:
        raise BundleError(
            f"the data {str(data)!r} has classes {', '.join(dataset.classes[:10])} but the model was trained "
            f"on {', '.join(model.classes[:10])}",
            expected="the data the bundle was trained on",
            fix="pass the training DATA folder, CSV or name",
        )
    return build_report(model, dataset, bundle_dir=Path(model_dir), data=str(data), out=out, tta=tta,
                        batch_size=batch_size, device=device, runtime=runtime)


def _with_recorded_decisions(dataset: Dataset, config: dict[str, Any]) -> Dataset:
    """`dataset` with the `--exclude`/`--relabel` files the run was trained with applied again, so the
    report scores the same splits; a file that is gone is said, and the data is used as it is."""
    files = {name: config.get(name) for name in ("exclude", "relabel")}
    missing = [f"--{name} {path}" for name, path in files.items() if path and not Path(path).is_file()]
    if missing:
        log(f"warning: the run was trained with {', '.join(missing)}, which no longer exist(s); the report "
            "scores the data without those decisions")
        return dataset
    return apply_decisions(dataset, exclude=files["exclude"], relabel=files["relabel"])


def report_after_training(
    model: Model, dataset: Dataset, bundle_dir: Path, *, stores: dict[str, ImageStore],
    predictions: dict[str, StorePredictions] | None = None, batch_size: int, device: str,
) -> Path | None:
    """The report at the end of `train`, reusing its decoded images and its predictions on val and
    test (so the network does not run over them again); a failure only logs a warning.

    The bundle is already saved when this runs, so nothing a report does can lose a trained model.
    """
    try:
        path = build_report(
            model, dataset, bundle_dir=bundle_dir, data=model.info.data_source,
            stores=stores, predictions=predictions, batch_size=batch_size, device=device,
        )
    except Exception as exc:  # the report only reads the bundle: a bug in it must not fail the saved run
        log(f"error: the evaluation report failed ({type(exc).__name__}: {exc}); the bundle was saved before "
            f"and is unchanged; retry with: imgclf report {bundle_dir}")
        return None
    log(f"report: {path}")
    return path


def build_report(
    model: Model,
    dataset: Dataset,
    *,
    bundle_dir: Path,
    data: str,
    out: str | Path | None = None,
    tta: bool = False,
    stores: dict[str, ImageStore] | None = None,
    predictions: dict[str, StorePredictions] | None = None,
    batch_size: int = 64,
    device: str = "auto",
    runtime: str = "auto",
) -> Path:
    """Predict, compute every number, draw every figure, write the files (the bundle is only read).

    `predictions` (the model's logits on val and test, positions in `stores`) replace the
    prediction pass when they cover the splits the report needs and `tta` is off.
    """
    started = time.perf_counter()
    folder = Path(out) if out is not None else bundle_dir / REPORT_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    stores = dict(stores or {})
    split = "test" if dataset.test is not None else "val"
    for name, images in (("val", dataset.val), (split, dataset.test if split == "test" else dataset.val)):
        if name not in stores and images is not None:
            stores[name] = ImageStore.decode(images, model.preprocessing, memory_budget=0, description=f"decode {name}")
    given = predictions or {}
    if not tta and "val" in given and split in given:
        val, scored = given["val"], given[split]
    else:
        forward = FrozenForward(model.module, image_size=model.preprocessing.image_size,
                                device=pick_device(device), runtime=runtime, keep_converted=True)
        try:
            val = collect_predictions(forward, stores["val"], batch_size=batch_size, tta=tta and split == "val",
                                      desc="report val")
            scored = val if split == "val" else collect_predictions(
                forward, stores[split], batch_size=batch_size, tta=tta, desc=f"report {split}")
        finally:
            model.module.cpu()  # Model's own forward path expects the module on the CPU
    if model.multilabel:  # sigmoids and per-label thresholds, no temperature: its own report
        return write_multilabel_report(model, scored, stores[split].images, folder=folder, split=split, data=data,
                                       bundle_dir=bundle_dir, val_from_train=dataset.val_from_train,
                                       skipped=list(model.info.skipped_files))
    # Training fitted the temperature on val and stored it in the bundle; the report only reads it.
    # A bundle from before that (no "calibration" record) is shown what fitting would give, unstored.
    info = model.info
    calibration = info.calibration or {**calibrate(val.logits, val.labels), "stored": False}
    temperature = info.temperature if info.calibration else float(calibration["temperature"])
    fitted, usable = float(calibration["fitted_temperature"]), bool(calibration["usable"])

    report = analyse(model, scored, temperature=temperature, split=split, data=data, bundle_dir=bundle_dir,
                     val_from_train=dataset.val_from_train)
    report["calibration"].update(fitted_temperature=fitted, temperature_usable=usable,
                                 temperature_stored=calibration.get("stored", True))
    report["tta"] = tta_summary(scored, model.classes, temperature) if tta else None
    # Files the pre-flight scan dropped before training are in the bundle; add any the report's own
    # decoding could not read.
    skipped = list(info.skipped_files)
    known = {item["path"] for item in skipped}
    skipped += [{"path": p, "reason": r} for s in stores.values() for p, r in s.failed if p not in known]
    report["skipped_files"] = skipped
    files = _figures(report, model, folder)
    thumbnails = _gallery_images(report, stores[split].images)
    heatmaps = gallery_heatmaps(report, model, stores[split])  # Grad-CAM beside each gallery image
    report["report_seconds"] = round(time.perf_counter() - started, 1)
    (folder / "metrics.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    html = folder / "report.html"
    html.write_text(render_report(report, figures=files, thumbnails=thumbnails, heatmaps=heatmaps), encoding="utf-8")
    return html


def analyse(
    model: Model,
    predictions: StorePredictions,
    *,
    temperature: float,
    split: str,
    data: str,
    bundle_dir: Path,
    val_from_train: bool,
) -> dict[str, Any]:
    """Every number of the report, as a JSON-able dict (the content of metrics.json)."""
    classes = model.classes
    meta = {**model.meta, **read_bundle_json(bundle_dir)}  # the saved file adds created, preprocessing
    labels = predictions.labels
    raw = softmax(predictions.logits) if len(labels) else np.zeros((0, len(classes)))
    calibrated = softmax(predictions.logits, temperature) if len(labels) else raw
    metrics = classification_metrics(raw, labels, classes)
    ece_before = expected_calibration_error(raw, labels)
    ece_after = expected_calibration_error(calibrated, labels)
    return {
        "report_version": REPORT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "bundle": str(bundle_dir),
        "data": data,
        "split": split,
        "run": {
            "backbone": meta.get("backbone", {}),
            "recipe": meta.get("recipe"),
            "config": meta.get("config", {}),
            "data": meta.get("data", {}),
            "preprocessing": meta.get("preprocessing", {}),
            "probe": meta.get("probe"),
            "wall_seconds": meta.get("wall_seconds"),
            "hardware": meta.get("hardware", {}),
            "versions": meta.get("versions", {}),
            "created": meta.get("created"),
            "history": meta.get("history", []),
            "full_size_probe": meta.get("full_size_probe"),  # a probe that competed with fine-tuning
            "backbone_choice": meta.get("backbone_choice"),  # `--backbone auto`'s screening, when it ran
        },
        "metrics": metrics,
        "worst_classes": worst_first(metrics),
        "most_confused": most_confused(metrics["confusion_matrix"], classes),
        "calibration": {
            "temperature": temperature,
            "fitted_on": "val",
            "evaluated_on": split,
            "in_sample": split == "val",  # no test split: the temperature is scored where it was fitted
            "bins": ECE_BINS,
            "ece_before": ece_before,
            "ece_after": ece_after,
            "nll_before": negative_log_likelihood(predictions.logits, labels),
            "nll_after": negative_log_likelihood(predictions.logits, labels, temperature),
            "reliability_before": reliability_bins(raw, labels),
            "reliability_after": reliability_bins(calibrated, labels),
        },
        "val_from_train": val_from_train,
        "galleries": galleries(calibrated, labels, predictions.positions, classes),
    }


def worst_first(metrics: dict[str, Any]) -> list[str]:
    """Class names by F1, then recall, lowest first; classes absent from the split go last.

    Example:
        >>> worst_first({"per_class": {"a": {"f1": 0.9, "recall": 1, "support": 3},
        ...                            "b": {"f1": 0.5, "recall": 1, "support": 3}}})
        ['b', 'a']
    """
    rows = metrics["per_class"]
    return sorted(rows, key=lambda c: (rows[c]["support"] == 0, rows[c]["f1"], rows[c]["recall"], c))


def most_confused(confusion: list[list[int]], classes: list[str], limit: int = MOST_CONFUSED) -> list[dict[str, Any]]:
    """The (true, predicted) class pairs with the most mistakes, most first.

    Example:
        >>> most_confused([[5, 2], [1, 4]], ["cat", "dog"])[0]
        {'true': 'cat', 'predicted': 'dog', 'count': 2, 'share_of_true': 0.2857142857142857}
    """
    counts = np.asarray(confusion, dtype=np.int64)
    pairs = [
        (int(counts[i, j]), i, j)
        for i in range(len(classes)) for j in range(len(classes))
        if i != j and counts[i, j] > 0
    ]
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    return [
        {"true": classes[i], "predicted": classes[j], "count": n, "share_of_true": float(n / counts[i].sum())}
        for n, i, j in pairs[:limit]
    ]


def galleries(probs: np.ndarray, labels: np.ndarray, positions: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """The misclassified images with the highest loss, and the most confident correct ones per class.

    `probs` are the calibrated probabilities (what `predict` reports); loss is -log p(true class).
    """
    if len(labels) == 0:
        return {"top_losses": [], "confident_correct": {}, "per_class": 0}
    predicted = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    loss = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))

    def item(k: int) -> dict[str, Any]:
        return {
            "position": int(positions[k]),
            "true": classes[int(labels[k])],
            "predicted": classes[int(predicted[k])],
            "confidence": float(confidence[k]),
            "loss": float(loss[k]),
        }

    wrong = np.flatnonzero(predicted != labels)
    top_losses = [item(k) for k in wrong[np.argsort(-loss[wrong], kind="stable")][:TOP_LOSSES]]
    per_class = 3 if len(classes) <= 20 else 1  # keeps a 100-class page to one image per class
    confident: dict[str, list[dict[str, Any]]] = {}
    for c, name in enumerate(classes):
        right = np.flatnonzero((labels == c) & (predicted == c))
        confident[name] = [item(k) for k in right[np.argsort(-confidence[right], kind="stable")][:per_class]]
    return {"top_losses": top_losses, "confident_correct": confident, "per_class": per_class}


def _figures(report: dict[str, Any], model: Model, folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    metrics = report["metrics"]
    history = report["run"]["history"]
    if history:
        files["training_curves"] = figures.plot_training_curves(history, folder / "training_curves.png")
    files["confusion_matrix"] = plot_confusion(
        metrics["confusion_matrix"], model.classes, folder / "confusion_matrix.png",
        f"{report['split']}: accuracy {metrics['accuracy']:.4f} ({metrics['num_images']} images)",
    )
    calibration = report["calibration"]
    files["reliability"] = figures.plot_reliability(
        calibration["reliability_before"], calibration["reliability_after"], folder / "reliability.png",
        ece_before=calibration["ece_before"], ece_after=calibration["ece_after"],
        temperature=calibration["temperature"],
    )
    report["files"] = {name: path.name for name, path in files.items()}
    return files


def _gallery_images(report: dict[str, Any], images: ImageSet) -> dict[int, str]:
    """Thumbnail data URIs of every image in the galleries, by position; paths go into the report."""
    shown = report["galleries"]["top_losses"] + [
        item for items in report["galleries"]["confident_correct"].values() for item in items
    ]
    uris: dict[int, str] = {}
    for item in shown:
        position = item["position"]
        item["path"] = images.paths[position]
        if position not in uris:
            try:
                uris[position] = figures.data_uri(figures.thumbnail(images.load(position)))
            except Exception:  # unreadable since prediction (deleted, changed): show the caption only
                uris[position] = ""
    return uris
