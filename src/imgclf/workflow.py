"""`train`: a training run, scored, calibrated and saved as a bundle, then the report.

The API layer: it ties together training (`training.run`), the bundle (`bundle`), evaluation
(metrics, the temperature) and the report. The order is the point: everything the bundle holds,
the temperature included, is decided before it is saved; the report then only reads it, and a
failed report is logged as a failure without touching the bundle.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from imgclf import distributed
from imgclf.bundle import Model
from imgclf.config import TrainConfig
from imgclf.evaluation.calibration import calibrate, softmax
from imgclf.evaluation.metrics import classification_metrics
from imgclf.evaluation.multilabel import TASK, choose_thresholds, multilabel_metrics, sigmoid
from imgclf.progress import log, log_to_file
from imgclf.report.build import report_after_training
from imgclf.runtime import pick_device
from imgclf.training.run import TrainingRun, resolve_run_config, run_training


def train(config: TrainConfig | None = None, **overrides: Any) -> Model:
    """Train a classifier and write its bundle to `config.out`.

    Args:
        config: a full configuration; or pass its fields as keyword arguments.
        **overrides: fields of `TrainConfig` that replace those of `config`.

    Returns:
        The trained `Model`, already saved.

    Example:
        >>> model = imgclf.train(data="photos/", out="runs/photos", recipe="probe")  # doctest: +SKIP
        >>> model.info.metrics["val"]["accuracy"]  # doctest: +SKIP
        0.93
    """
    cfg = resolve_run_config(config, **overrides)
    out = Path(cfg.out)
    # Under torchrun (imgclf.distributed) every rank trains; only rank 0 writes, and logs.
    with distributed.session(pick_device(cfg.device)):
        if not distributed.is_main():
            return _train(cfg, out)
        out.mkdir(parents=True, exist_ok=True)
        with log_to_file(out / "train.log"):
            return _train(cfg, out)


def _train(cfg: TrainConfig, out: Path) -> Model:
    run = run_training(cfg, out)
    trained = Model(run.model, run.classes, run.prep, bundle_meta(run))
    if not distributed.is_main():  # the other ranks' work ends here: rank 0 writes everything
        return trained
    trained.save(out)
    run.checkpointer.finish(keep=cfg.keep_checkpoints)
    _write_run_files(run, out)
    report_after_training(trained, run.dataset, out, stores=run.stores, predictions=run.predictions,
                          batch_size=cfg.batch_size, device=cfg.device)
    summary = ", ".join(f"{k} mAP {v['mAP']:.4f}" if "mAP" in v else f"{k} accuracy {v['accuracy']:.4f}"
                        for k, v in trained.info.metrics.items())
    log(f"done in {time.perf_counter() - run.started:.0f} s: {summary}; bundle in {out}")
    return trained


def bundle_meta(run: TrainingRun) -> dict[str, Any]:
    """The run's description plus its scores on val and test and the temperature fitted on val
    (multi-label: the per-label thresholds chosen on val instead)."""
    if run.dataset.multilabel:
        return _multilabel_meta(run)
    metrics = {split: classification_metrics(softmax(scored.logits), scored.labels, run.classes)
               for split, scored in run.predictions.items()}
    val = run.predictions["val"]  # every run scores val (an empty split gives T = 1)
    calibration = calibrate(val.logits, val.labels)
    log(f"temperature {calibration['temperature']:.3f} fitted on {calibration['images']} val images"
        + ("" if calibration["usable"] else f" (fit at a bound, {calibration['fitted_temperature']:.3g}: kept 1)"))
    return {**run.meta, "metrics": metrics, "temperature": calibration["temperature"], "calibration": calibration,
            "wall_seconds": round(time.perf_counter() - run.started, 1)}


def _multilabel_meta(run: TrainingRun) -> dict[str, Any]:
    """A multi-label run's bundle description: per-label thresholds chosen on val (best F1 each),
    and val and test scored with them. No temperature: it is a softmax's; the sigmoids keep T = 1
    (their calibration per label is in the report)."""
    val = run.predictions["val"]
    thresholds = choose_thresholds(sigmoid(val.logits), val.labels)
    metrics = {split: multilabel_metrics(sigmoid(scored.logits), scored.labels, run.classes, thresholds)
               for split, scored in run.predictions.items()}
    log("thresholds chosen on val (best F1 per label): "
        + ", ".join(f"{c} {t:.2f}" for c, t in zip(run.classes[:12], thresholds, strict=False))
        + (" ..." if len(run.classes) > 12 else ""))
    return {**run.meta, "task": TASK, "thresholds": thresholds, "metrics": metrics, "temperature": 1.0,
            "wall_seconds": round(time.perf_counter() - run.started, 1)}


def _write_run_files(run: TrainingRun, out: Path) -> None:
    """history.json and, when files were skipped, skipped_files.txt beside the bundle."""
    (out / "history.json").write_text(json.dumps(run.meta["history"], indent=2), encoding="utf-8")
    skipped = run.meta["skipped_files"]
    if skipped:
        (out / "skipped_files.txt").write_text(
            # surrogateescape: a file name that is not valid UTF-8 is written back as its own bytes
            "".join(f"{s['path']}\t{s['reason']}\n" for s in skipped), encoding="utf-8", errors="surrogateescape"
        )
        log(f"warning: skipped {len(skipped)} unreadable file(s); list in {out / 'skipped_files.txt'}")
