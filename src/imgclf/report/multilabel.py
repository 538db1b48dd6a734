"""The report of a multi-label bundle: per-label scores, PR curves, error co-occurrence, galleries, calibration.

`report.build.build_report` hands a multi-label bundle's predictions here. Like the single-label
report, every number is computed once into one JSON-able dict (`metrics.json`) and the page is
rendered from it; the bundle is only read. Sections:

- the summary (mAP, micro/macro F1, subset accuracy, Hamming loss) and the per-label table, worst
  average precision first;
- precision-recall curves of the worst labels, each with its threshold's operating point;
- co-occurrence of errors: how often label a is predicted where b is missing (a false positive of
  a on the same image as a false negative of b: "b taken for a"), and its heatmap;
- galleries per label: the most confident false positives (highest probability without the
  label) and false negatives (lowest probability with it);
- calibration per label: reliability bins of each label's sigmoid and its expected calibration
  error (ECE), with curves for the worst-calibrated labels.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.bundle import Model
from imgclf.data.dataset import ImageSet
from imgclf.evaluation.multilabel import multilabel_metrics, sigmoid, worst_labels
from imgclf.files import atomic_write_text
from imgclf.report import figures
from imgclf.report.html import CSS, esc, number
from imgclf.runtime import StorePredictions

WORST_CURVES = 6  # labels with PR and reliability curves
GALLERY_PER_LABEL = 3  # false positives and false negatives shown per label
GALLERY_LABELS = 20  # labels with galleries (the worst first)
CO_ERRORS_LISTED = 10
CALIBRATION_BINS = 10  # equal-width bins of predicted probability, as the single-label report's ECE


def label_calibration(probs: np.ndarray, truth: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """One label's reliability bins (mean predicted probability vs share positive) and its ECE.

    Written here because scikit-learn's `calibration_curve` returns the bins without their counts,
    which the ECE (the count-weighted mean gap) needs.

    Example:
        >>> label_calibration(np.array([0.1, 0.9, 0.8, 0.2]), np.array([0, 1, 1, 0]))["ece"]
        0.15
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
    rows, gap = [], 0.0
    for b in range(bins):
        inside = which == b
        if not inside.any():
            continue
        confidence, observed = float(probs[inside].mean()), float(truth[inside].mean())
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(inside.sum()),
                     "mean_probability": confidence, "share_positive": observed})
        gap += inside.sum() * abs(confidence - observed)
    return {"ece": round(float(gap / max(len(probs), 1)), 6), "bins": rows}


def error_co_occurrence(probs: np.ndarray, truth: np.ndarray, thresholds: np.ndarray,
                        classes: list[str]) -> dict[str, Any]:
    """`taken_for[a][b]`: images where a was predicted without being there and b was there but missed.

    Example:
        >>> co = error_co_occurrence(np.array([[0.9, 0.1]]), np.array([[0, 1]]), np.array([0.5, 0.5]), ["a", "b"])
        >>> co["taken_for"]["a"]["b"], co["pairs"][0]
        (1, {'predicted': 'a', 'missed': 'b', 'images': 1})
    """
    pred = probs >= thresholds
    false_pos = (pred & ~truth).astype(np.int64)
    false_neg = (~pred & truth).astype(np.int64)
    table = false_pos.T @ false_neg  # [a, b]: FP of a and FN of b on the same image
    np.fill_diagonal(table, 0)
    pairs = sorted(((int(table[a, b]), a, b) for a in range(len(classes)) for b in range(len(classes))
                    if table[a, b] > 0), key=lambda p: (-p[0], p[1], p[2]))
    return {"taken_for": {classes[a]: {classes[b]: int(table[a, b]) for b in range(len(classes))}
                          for a in range(len(classes))},
            "pairs": [{"predicted": classes[a], "missed": classes[b], "images": n} for n, a, b in
                      pairs[:CO_ERRORS_LISTED]],
            "false_positives": dict(zip(classes, false_pos.sum(0).tolist(), strict=True)),
            "false_negatives": dict(zip(classes, false_neg.sum(0).tolist(), strict=True))}


def label_galleries(probs: np.ndarray, truth: np.ndarray, thresholds: np.ndarray, positions: np.ndarray,
                    classes: list[str], order: list[str]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Per label (in `order`, at most GALLERY_LABELS): the most confident false positives and false negatives."""
    def item(k: int, j: int) -> dict[str, Any]:
        return {"position": int(positions[k]), "probability": float(probs[k, j]),
                "labels": [classes[i] for i in np.flatnonzero(truth[k])],
                "predicted": [classes[i] for i in np.flatnonzero(probs[k] >= thresholds)]}

    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name in order[:GALLERY_LABELS]:
        j = classes.index(name)
        column = probs[:, j]
        fp = np.flatnonzero((column >= thresholds[j]) & ~truth[:, j])
        fn = np.flatnonzero((column < thresholds[j]) & truth[:, j])
        fp = fp[np.argsort(-column[fp], kind="stable")][:GALLERY_PER_LABEL]  # most confident first
        fn = fn[np.argsort(column[fn], kind="stable")][:GALLERY_PER_LABEL]
        out[name] = {"false_positives": [item(int(k), j) for k in fp],
                     "false_negatives": [item(int(k), j) for k in fn]}
    return out


def analyse_multilabel(model: Model, scored: StorePredictions, *, split: str, data: str,
                       bundle_dir: Path, val_from_train: bool) -> dict[str, Any]:
    """Every number of the multi-label report (the content of metrics.json)."""
    classes = model.classes
    probs = sigmoid(scored.logits).reshape(-1, len(classes))
    truth = np.asarray(scored.labels).reshape(-1, len(classes)) > 0.5
    thresholds = model.thresholds()
    metrics = multilabel_metrics(probs, truth, classes, thresholds)
    order = worst_labels(metrics)
    calibration = {name: label_calibration(probs[:, j], truth[:, j].astype(np.float64))
                   for j, name in enumerate(classes)}
    info = model.info
    return {
        "report_version": 1, "task": "multi-label", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "bundle": str(bundle_dir), "data": data, "split": split, "val_from_train": val_from_train,
        "run": {"backbone": {"name": info.backbone.name}, "recipe": info.recipe, "config": info.config,
                "history": info.history, "selection": info.selection, "wall_seconds": info.wall_seconds},
        "metrics": metrics,
        "worst_labels": order,
        "error_co_occurrence": error_co_occurrence(probs, truth, thresholds, classes),
        "galleries": label_galleries(probs, truth, thresholds, scored.positions, classes, order),
        "calibration": {"per_label": calibration, "bins": CALIBRATION_BINS,
                        "worst": sorted(classes, key=lambda c: -calibration[c]["ece"])[:WORST_CURVES]},
    }


def _plot_pr_curves(report: dict[str, Any], probs: np.ndarray, truth: np.ndarray, classes: list[str],
                    path: Path) -> Path:
    """Precision-recall curves of the worst labels, each with its threshold's operating point."""
    from sklearn.metrics import precision_recall_curve

    plt = figures._pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    for name in report["worst_labels"][:WORST_CURVES]:
        j, row = classes.index(name), report["metrics"]["per_label"][name]
        if not truth[:, j].any():
            continue
        precision, recall, _ = precision_recall_curve(truth[:, j], probs[:, j])
        line = ax.plot(recall, precision, label=f"{name} (AP {row['ap']:.3f})")[0]
        ax.plot([row["recall"]], [row["precision"]], "o", color=line.get_color())
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"worst labels by AP ({report['split']}); dots: the stored thresholds")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_reliability(report: dict[str, Any], path: Path) -> Path:
    """Reliability curves (mean predicted probability vs share positive) of the worst-calibrated labels."""
    plt = figures._pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    ax.plot([0, 1], [0, 1], color="#999", linestyle="--", linewidth=1)
    for name in report["calibration"]["worst"]:
        cal = report["calibration"]["per_label"][name]
        xs = [b["mean_probability"] for b in cal["bins"]]
        ys = [b["share_positive"] for b in cal["bins"]]
        ax.plot(xs, ys, marker="o", label=f"{name} (ECE {cal['ece']:.3f})")
    ax.set_xlabel("predicted probability (sigmoid)")
    ax.set_ylabel("share of images with the label")
    ax.set_title("calibration of the worst-calibrated labels")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_co_errors(report: dict[str, Any], classes: list[str], path: Path) -> Path:
    plt = figures._pyplot()
    table = np.array([[report["error_co_occurrence"]["taken_for"][a][b] for b in classes] for a in classes])
    side = min(4 + 0.45 * len(classes), 30)
    fig, ax = plt.subplots(figsize=(side, side * 0.85), dpi=100)
    image = ax.imshow(table, cmap="Reds", vmin=0, vmax=max(1, int(table.max())))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="images")
    ax.set_xticks(range(len(classes)), labels=classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), labels=classes, fontsize=8)
    ax.set_xlabel("missed (false negative)")
    ax.set_ylabel("predicted instead (false positive)")
    ax.set_title("co-occurrence of errors")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_multilabel_report(model: Model, scored: StorePredictions, images: ImageSet, *, folder: Path, split: str,
                            data: str, bundle_dir: Path, val_from_train: bool,
                            skipped: list[dict[str, str]]) -> Path:
    """Compute, draw and write `metrics.json`, the figures and `report.html` into `folder`; returns the page.

    Example:
        >>> write_multilabel_report(model, predictions["test"], dataset.test, folder=Path("runs/m/report"),
        ...                         split="test", data="labels.csv", bundle_dir=Path("runs/m"),
        ...                         val_from_train=True, skipped=[])  # doctest: +SKIP
        PosixPath('runs/m/report/report.html')
    """
    started = time.perf_counter()
    report = analyse_multilabel(model, scored, split=split, data=data, bundle_dir=bundle_dir,
                                val_from_train=val_from_train)
    report["skipped_files"] = skipped
    classes = model.classes
    probs = sigmoid(scored.logits).reshape(-1, len(classes))
    truth = np.asarray(scored.labels).reshape(-1, len(classes)) > 0.5
    files = {"pr_curves": _plot_pr_curves(report, probs, truth, classes, folder / "pr_curves.png"),
             "reliability": _plot_reliability(report, folder / "reliability.png"),
             "error_co_occurrence": _plot_co_errors(report, classes, folder / "error_co_occurrence.png")}
    history = report["run"]["history"]
    if history:
        files["training_curves"] = figures.plot_training_curves(history, folder / "training_curves.png")
    report["files"] = {name: p.name for name, p in files.items()}
    thumbnails = _thumbnails(report, images)
    report["report_seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_text(folder / "metrics.json", json.dumps(report, indent=2))
    page = folder / "report.html"
    atomic_write_text(page, render_multilabel(report, {k: figures.file_data_uri(p) for k, p in files.items()},
                                              thumbnails))
    return page


def _thumbnails(report: dict[str, Any], images: ImageSet) -> dict[int, str]:
    uris: dict[int, str] = {}
    for kinds in report["galleries"].values():
        for item in kinds["false_positives"] + kinds["false_negatives"]:
            item["path"] = images.paths[item["position"]]
            if item["position"] not in uris:
                try:
                    uris[item["position"]] = figures.data_uri(figures.thumbnail(images.load(item["position"])))
                except Exception:  # unreadable since prediction: the caption alone
                    uris[item["position"]] = ""
    return uris


def render_multilabel(report: dict[str, Any], uris: dict[str, str], thumbnails: dict[int, str]) -> str:
    """The HTML page of a multi-label report (self-contained: inline styles, embedded images)."""
    m = report["metrics"]
    summary = "".join(f"<tr><td>{esc(label)}</td><td>{number(m[key], ['metrics', key])}</td></tr>" for key, label in (
        ("mAP", "mAP (mean average precision)"), ("micro_f1", "micro F1"), ("macro_f1", "macro F1"),
        ("subset_accuracy", "subset accuracy (whole label set right)"), ("hamming_loss", "Hamming loss"),
        ("num_images", "images"), ("images_without_label", "images without any label")))
    rows = "".join(
        f"<tr><td>{esc(name)}</td>" + "".join(
            f"<td>{number(m['per_label'][name][k], ['metrics', 'per_label', name, k], 3)}</td>"
            for k in ("ap", "f1", "precision", "recall", "threshold", "support"))
        + f"<td>{report['calibration']['per_label'][name]['ece']:.3f}</td></tr>"
        for name in report["worst_labels"])
    pairs = "".join(f"<li>{esc(p['missed'])} missed while {esc(p['predicted'])} was predicted: {p['images']} "
                    "image(s)</li>" for p in report["error_co_occurrence"]["pairs"]) or "<li>none</li>"
    figure = "".join(f'<img src="{uris[k]}" alt="{esc(k)}"> ' for k in ("pr_curves", "reliability") if k in uris)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>imgclf multi-label report</title><style>{CSS}</style></head>
<body><header><h1>imgclf report (multi-label): {esc(Path(report['bundle']).name)}</h1>
<p>{esc(report['run']['backbone']['name'])} · {esc(report['run']['recipe'])} · scored on the
<b>{esc(report['split'])}</b> split of {esc(report['data'])} at the thresholds stored in the bundle</p></header>
<main><section id="metrics"><h2>Metrics</h2><table class="kv">{summary}</table>
<h3>Per label, worst average precision first</h3><table><tr><th>label</th><th>AP</th><th>F1</th>
<th>precision</th><th>recall</th><th>threshold</th><th>support</th><th>ECE</th></tr>{rows}</table></section>
<section id="curves"><h2>Precision-recall and calibration of the worst labels</h2>{figure}</section>
<section id="errors"><h2>Co-occurrence of errors</h2><ul>{pairs}</ul>
<img src="{uris['error_co_occurrence']}" alt="co-occurrence of errors"></section>
<section id="images"><h2>Most confident mistakes, per label</h2>{_galleries_html(report, thumbnails)}</section>
{_curves_html(uris)}</main></body></html>"""


def _galleries_html(report: dict[str, Any], thumbnails: dict[int, str]) -> str:
    parts = ['<p class="note">False positives: the highest probabilities of the label on images without it. '
             "False negatives: the lowest on images with it.</p>"]
    for name, kinds in report["galleries"].items():
        for kind, title in (("false_positives", "false positives"), ("false_negatives", "false negatives")):
            tiles = "".join(
                f'<div class="tile wrong" title="{esc(item["path"])}">'
                + (f'<img src="{thumbnails.get(item["position"], "")}" alt="{esc(item["path"])}">'
                   if thumbnails.get(item["position"]) else "")
                + f'<div class="cap">p({esc(name)}) {item["probability"]:.3f}<br>'
                f'<span class="true">true: {esc(";".join(item["labels"]) or "none")}</span><br>'
                f'<span class="pred">predicted: {esc(";".join(item["predicted"]) or "none")}</span></div></div>'
                for item in kinds[kind])
            parts.append(f'<div class="row"><div class="name">{esc(name)}: {title}</div>'
                         f'<div class="gallery">{tiles or "<span class=note>none</span>"}</div></div>')
    return "".join(parts)


def _curves_html(uris: dict[str, str]) -> str:
    if "training_curves" not in uris:
        return ""
    return (f'<section id="training"><h2>Training curves</h2><img src="{uris["training_curves"]}" alt="curves">'
            "</section>")
