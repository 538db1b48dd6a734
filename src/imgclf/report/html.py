"""Render the report dict (the content of metrics.json) as one self-contained HTML page.

Every image is embedded as a `data:` URI and the styles are inline, so the file can be mailed or
opened offline. Every number that comes from metrics.json carries `data-key`, its JSON path in
that file, so a test can check that the page shows what the file says.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from imgclf.report.figures import file_data_uri

SECTIONS = (
    ("run", "The run"),
    ("curves", "Training curves"),
    ("metrics", "Metrics"),
    ("confusion", "Confusion"),
    ("images", "Images"),
    ("calibration", "Calibration"),
    ("tta", "Test-time augmentation"),
)
MAX_CONFUSION_TABLE = 20  # classes; larger matrices are shown only as the heatmap

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0; color: #1d232a;
       background: #f5f6f8; line-height: 1.45; }
header { background: #1f3a5f; color: white; padding: 18px 32px 10px; }
header h1 { margin: 0 0 4px; font-size: 24px; }
header p { margin: 0 0 8px; opacity: 0.85; }
nav a { color: #cfe0f5; margin-right: 16px; text-decoration: none; font-size: 14px; }
main { max-width: 1240px; margin: 0 auto; padding: 8px 32px 40px; }
section { background: white; border-radius: 8px; padding: 8px 24px 18px; margin: 18px 0;
          box-shadow: 0 1px 3px rgba(0,0,0,0.08); }
h2 { border-bottom: 2px solid #e3e7ec; padding-bottom: 4px; }
h3 { margin-bottom: 6px; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 14px; }
th, td { padding: 3px 10px; border-bottom: 1px solid #e6e9ee; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f3f7; }
tr.total td { font-weight: 600; }
.kv td { text-align: left; vertical-align: top; }
.kv td:first-child { color: #5a6470; white-space: nowrap; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 14px 0; }
.card { background: white; border-radius: 8px; padding: 10px 16px; min-width: 130px;
        box-shadow: 0 1px 3px rgba(0,0,0,0.08); }
.card .value { font-size: 24px; font-weight: 600; color: #1f3a5f; }
.card .label { font-size: 12px; color: #5a6470; text-transform: uppercase; letter-spacing: 0.03em; }
.note { color: #5a6470; font-size: 14px; }
.warn { background: #fff6e0; border-left: 4px solid #e0a800; padding: 6px 12px; font-size: 14px; }
figure.plot img { max-width: 100%; height: auto; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; }
.tile { width: 124px; font-size: 12px; text-align: center; }
.tile img { width: 112px; height: 112px; object-fit: contain; background: #eef0f3; border: 3px solid #2e9d5b;
            border-radius: 4px; image-rendering: pixelated; }
.tile.wrong img { border-color: #d0433a; }
.tile .cap { word-break: break-word; }
.tile .true { color: #2e6b3f; }
.tile .pred { color: #a1322b; }
.tile.maps2 { width: 240px; }
.tile.maps3 { width: 356px; }
.tile .pics { display: flex; gap: 4px; justify-content: center; }
.tile .pic { display: flex; flex-direction: column; align-items: center; }
.tile img.heatmap { border-color: #8a96a3; }
.tile .for { color: #5a6470; font-size: 11px; }
.row { display: flex; align-items: center; gap: 12px; margin: 4px 0; }
.row .name { width: 160px; font-weight: 600; font-size: 14px; word-break: break-word; }
.bar { display: inline-block; height: 10px; background: #1f3a5f; vertical-align: middle; }
td.cm { text-align: center; min-width: 26px; }
details summary { cursor: pointer; color: #1f3a5f; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def number(value: Any, key: list[Any] | None = None, digits: int = 4) -> str:
    """A number as shown on the page (floats to `digits` places), tagged with its metrics.json path."""
    if value is None:
        text = "n/a"
    elif isinstance(value, bool):
        text = str(value)
    elif isinstance(value, int):
        text = str(value)
    else:
        text = f"{float(value):.{digits}f}"
    if key is None:
        return esc(text)
    return f'<span data-key="{esc(json.dumps(key))}" data-digits="{digits}">{esc(text)}</span>'


def _kv_table(rows: list[tuple[str, str]]) -> str:
    return '<table class="kv">' + "".join(f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _img(uri: str, alt: str, width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img src="{uri}" alt="{esc(alt)}"{size}>'


def render_report(report: dict[str, Any], *, figures: dict[str, Path], thumbnails: dict[int, str],
                  heatmaps: dict[tuple[int, str], str] | None = None) -> str:
    """The whole HTML page for `report` (a metrics.json dict), its PNG `figures`, image `thumbnails`
    and Grad-CAM `heatmaps` (by position and class explained)."""
    uris = {name: file_data_uri(path) for name, path in figures.items()}
    body = [
        _section_run(report),
        _section_curves(report, uris),
        _section_metrics(report),
        _section_confusion(report, uris),
        _section_images(report, thumbnails, heatmaps or {}),
        _section_calibration(report, uris),
        _section_tta(report),
    ]
    name = Path(report["bundle"]).name or report["bundle"]
    nav = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title in SECTIONS)
    skipped = report.get("skipped_files") or []
    footer = ""
    if skipped:
        items = "".join(f"<li>{esc(s['path'])}: {esc(s['reason'])}</li>" for s in skipped[:50])
        footer = f'<section id="skipped"><h2>Skipped files</h2><ul>{items}</ul></section>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>imgclf report: {esc(name)}</title>
<style>{CSS}</style></head>
<body>
<header><h1>imgclf report: {esc(name)}</h1>
<p>{esc(report['run'].get('backbone', {}).get('name', '?'))} · {esc(report['run'].get('recipe') or '?')} ·
scored on the <b>{esc(report['split'])}</b> split of {esc(report['data'])}
({number(report['metrics']['num_images'], ['metrics', 'num_images'])} images) · {esc(report['created'])}</p>
<nav>{nav}</nav></header>
<main>
{_headline(report)}
{''.join(body)}
{footer}
<p class="note">Written by imgclf report {esc(report['run'].get('versions', {}).get('imgclf', ''))} in
{number(report.get('report_seconds'), digits=1)} s. The numbers on this page are in metrics.json next to it.</p>
</main></body></html>
"""


def _headline(report: dict[str, Any]) -> str:
    m = report["metrics"]
    cards = [
        ("accuracy", m["accuracy"], ["metrics", "accuracy"]),
        (f"top-{m['top_k']} accuracy", m["top5_accuracy"], ["metrics", "top5_accuracy"]),
        ("macro-F1", m["macro_f1"], ["metrics", "macro_f1"]),
        ("balanced accuracy", m["balanced_accuracy"], ["metrics", "balanced_accuracy"]),
        ("ECE after scaling", report["calibration"]["ece_after"], ["calibration", "ece_after"]),
    ]
    if report.get("tta"):
        cards.append(("accuracy with TTA", report["tta"]["accuracy"], ["tta", "accuracy"]))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="value">{number(v, key)}</div><div class="label">{esc(label)}</div></div>'
        for label, v, key in cards
    ) + "</div>"


def _open(sid: str) -> str:
    title = dict(SECTIONS)[sid]
    return f'<section id="{sid}" data-section="{sid}"><h2>{esc(title)}</h2>'


def _section_run(report: dict[str, Any]) -> str:
    run = report["run"]
    data = run.get("data") or {}
    counts: dict[str, dict[str, int]] = data.get("counts", {})
    splits = list(counts)
    classes = data.get("classes") or (list(next(iter(counts.values()))) if counts else [])
    parts = [_open("run"), "<h3>Data</h3>"]
    if counts:
        head = "".join(f"<th>{esc(s)}</th>" for s in splits)
        body = "".join(
            f"<tr><td>{esc(c)}</td>"
            + "".join(f"<td>{number(counts[s].get(c, 0), ['run', 'data', 'counts', s, c])}</td>" for s in splits)
            + "</tr>"
            for c in classes
        )
        total = "".join(f"<td>{sum(counts[s].values())}</td>" for s in splits)
        parts.append(f"<table><tr><th>class</th>{head}</tr>{body}<tr class='total'><td>total</td>{total}</tr></table>")
    source = esc(data.get("source", "?"))
    held = " Validation was held out from train (stratified)." if data.get("val_from_train") else ""
    parts.append(f'<p class="note">Source: {source}.{held}</p>')
    backbone = run.get("backbone") or {}
    hardware = run.get("hardware") or {}
    prep = run.get("preprocessing") or {}
    rows = [
        ("backbone", f"{esc(backbone.get('name', '?'))} (timm {esc(backbone.get('timm_name', '?'))}, "
                     f"{esc(backbone.get('num_features', '?'))} features)"),
        ("weights", esc(backbone.get("weights_source", "?"))),
        ("recipe", esc(run.get("recipe"))),
        ("input", f"{esc(prep.get('image_size', '?'))} px, {esc(prep.get('interpolation', '?'))}"),
        ("wall time", f"{number(run.get('wall_seconds'), ['run', 'wall_seconds'], 1)} s"),
        ("hardware", esc(", ".join(f"{k} {v}" for k, v in hardware.items()))),
        ("versions", esc(", ".join(f"{k} {v}" for k, v in (run.get("versions") or {}).items()))),
        ("trained", esc(run.get("created"))),
    ]
    probe = run.get("probe")
    if probe:
        rows.append(("linear probe", f"L2 {esc(probe.get('l2'))}, val accuracy "
                                     f"{number(probe.get('val_accuracy'), ['run', 'probe', 'val_accuracy'])} "
                                     f"on {esc(probe.get('images'))} images"))
    parts.append("<h3>Model</h3>" + _kv_table(rows))
    config = run.get("config") or {}
    parts.append("<details><summary>Resolved configuration</summary>"
                 + _kv_table([(k, esc(json.dumps(v))) for k, v in config.items()]) + "</details>")
    return "".join(parts) + "</section>"


def _history_row(index: int, record: dict[str, Any]) -> str:
    """One epoch's row; epoch 0 (the probe's head) has val scores only."""
    dash = "&ndash;"
    cells = [f"{record['epoch']}{' (probe)' if record['epoch'] == 0 else ''}"]
    cells += [number(record[k], ["run", "history", index, k]) if k in record else dash
              for k in ("train_loss", "val_loss", "train_accuracy", "val_accuracy")]
    cells += [format(record["lr"], ".2e") if "lr" in record else dash, "kept" if record.get("selected") else ""]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _full_size_probe_row(run: dict[str, Any]) -> str:
    """The probe at the backbone's input size that competed with fine-tuning, when one did."""
    probe = run.get("full_size_probe")
    if not probe:
        return ""
    dash, scores = "&ndash;", probe.get("selection") or {}
    cells = [f"probe at {esc(probe.get('image_size'))} px", dash,
             number(scores.get("val_loss"), ["run", "full_size_probe", "selection", "val_loss"]), dash,
             number(scores.get("val_accuracy"), ["run", "full_size_probe", "selection", "val_accuracy"]), dash,
             "kept" if probe.get("selected") else ""]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _section_curves(report: dict[str, Any], uris: dict[str, str]) -> str:
    parts = [_open("curves")]
    history = report["run"]["history"]
    if "training_curves" in uris:
        parts.append(f'<figure class="plot">{_img(uris["training_curves"], "training curves")}</figure>')
        rows = "".join(_history_row(i, r) for i, r in enumerate(history)) + _full_size_probe_row(report["run"])
        parts.append("<table><tr><th>epoch</th><th>train loss</th><th>val loss</th><th>train acc</th>"
                     f"<th>val acc</th><th>lr</th><th>bundle</th></tr>{rows}</table>")
        parts.append('<p class="note">Epoch 0 is the linear probe\'s head on the frozen pretrained backbone, where '
                     "fine-tuning starts. When fine-tuning ran below the backbone's input size, a probe at that "
                     "size on the pretrained backbone competes too (its own row). The bundle holds the candidate with "
                     "the best validation accuracy (then loss), the probes included, so it is never worse on "
                     "validation than the probe. Training loss "
                     "and accuracy are measured on augmented images with label smoothing, so they can sit below "
                     "validation.</p>")
    elif report["run"].get("recipe") == "probe":
        parts.append('<p class="note" data-empty="curves">The <b>probe</b> recipe has no epochs: the head is fitted '
                     "in one step (L-BFGS logistic regression on frozen features), so there are no curves. The "
                     "L2 strength was chosen on validation accuracy:</p>")
        scores = (report["run"].get("probe") or {}).get("scores", {})
        if scores:
            parts.append("<table><tr><th>L2</th><th>val accuracy</th></tr>" + "".join(
                f"<tr><td>{esc(k)}</td><td>{number(v, ['run', 'probe', 'scores', k])}</td></tr>"
                for k, v in scores.items()) + "</table>")
    else:
        parts.append('<p class="note" data-empty="curves">No epochs were recorded for this run '
                     "(fine-tuning with 0 epochs), so there are no curves.</p>")
    return "".join(parts) + _backbone_choice(report["run"]) + "</section>"


def _backbone_choice(run: dict[str, Any]) -> str:
    """`--backbone auto`'s screening, when it ran: every candidate's probe and speed, and why one won."""
    choice = run.get("backbone_choice")
    if not choice:
        return ""
    rows = "".join(
        f"<tr><td>{esc(c['backbone'])}{' (chosen)' if c['backbone'] == choice.get('chosen') else ''}</td>"
        f"<td>{number(c.get('val_accuracy'), ['run', 'backbone_choice', 'candidates', i, 'val_accuracy'])}</td>"
        f"<td>{number(c.get('val_loss'), ['run', 'backbone_choice', 'candidates', i, 'val_loss'], 3)}</td>"
        f"<td>{number(c.get('train_images_per_second'), None, 0)}</td>"
        f"<td>{number(c.get('fine_tune_epochs'), None, 1)}</td></tr>"
        for i, c in enumerate(choice.get("candidates", [])))
    return (f"<h3>Backbone (auto)</h3><p class=\"note\">Linear probes at {esc(choice.get('image_size'))} px on "
            f"{esc(choice.get('train_images'))} train and {esc(choice.get('val_images'))} val images. Rule: "
            f"{esc(choice.get('rule'))}. {esc(choice.get('reason'))}.</p><table><tr><th>backbone</th>"
            "<th>probe val</th><th>val loss (temperature-scaled)</th><th>training img/s</th>"
            f"<th>epochs the budget leaves</th></tr>{rows}</table>")


def _section_metrics(report: dict[str, Any]) -> str:
    m = report["metrics"]
    names = [("accuracy", "accuracy"), ("top5_accuracy", f"top-{m['top_k']} accuracy"), ("macro_f1", "macro-F1"),
             ("weighted_f1", "weighted F1"), ("balanced_accuracy", "balanced accuracy (mean recall)")]
    parts = [_open("metrics"), f"<p>On {number(m['num_images'])} {esc(report['split'])} images.</p>"]
    if report["split"] == "val":
        parts.append('<p class="warn">This data has no test split, so these are validation scores. Validation '
                     "chose the regularisation and the best epoch, so they are a little optimistic.</p>")
    parts.append("<table>" + "".join(f"<tr><td>{esc(label)}</td><td>{number(m[k], ['metrics', k])}</td></tr>"
                                     for k, label in names) + "</table>")
    parts.append("<h3>Per class, worst first</h3><table><tr><th>class</th><th>precision</th><th>recall</th>"
                 "<th>F1</th><th>support</th><th></th></tr>")
    for c in report["worst_classes"]:
        row = m["per_class"][c]
        cells = "".join(f"<td>{number(row[k], ['metrics', 'per_class', c, k])}</td>"
                        for k in ("precision", "recall", "f1", "support"))
        bar = f'<span class="bar" style="width:{round(100 * row["f1"])}px"></span>'
        parts.append(f'<tr data-class="{esc(c)}"><td>{esc(c)}</td>{cells}<td style="text-align:left">{bar}</td></tr>')
    parts.append("</table>")
    return "".join(parts) + "</section>"


def _section_confusion(report: dict[str, Any], uris: dict[str, str]) -> str:
    m = report["metrics"]
    classes = m["classes"]
    parts = [_open("confusion"), "<h3>Most confused pairs</h3>"]
    pairs = report["most_confused"]
    if pairs:
        parts.append("<table><tr><th>true</th><th>predicted as</th><th>images</th><th>share of the true class</th></tr>"
                     + "".join(f"<tr><td>{esc(p['true'])}</td><td>{esc(p['predicted'])}</td>"
                               f"<td>{number(p['count'], ['most_confused', i, 'count'])}</td>"
                               f"<td>{number(p['share_of_true'], ['most_confused', i, 'share_of_true'])}</td></tr>"
                               for i, p in enumerate(pairs)) + "</table>")
    else:
        parts.append('<p class="note">No mistakes: every image was classified correctly.</p>')
    parts.append(f'<h3>Row-normalised heatmap</h3><figure class="plot">'
                 f'{_img(uris["confusion_matrix"], "confusion matrix heatmap")}'
                 '<figcaption class="note">Rows are the true class, columns the prediction; colour is the share of '
                 "the row, numbers are image counts.</figcaption></figure>")
    if len(classes) <= MAX_CONFUSION_TABLE:
        head = "".join(f"<th>{esc(c)}</th>" for c in classes)
        rows = "".join(
            f"<tr><td>{esc(classes[i])}</td>"
            + "".join(f'<td class="cm">{number(n, ["metrics", "confusion_matrix", i, j])}</td>'
                      for j, n in enumerate(row))
            + "</tr>"
            for i, row in enumerate(m["confusion_matrix"])
        )
        parts.append(f"<h3>Counts</h3><table><tr><th>true \\ predicted</th>{head}</tr>{rows}</table>")
    return "".join(parts) + "</section>"


def _tile(item: dict[str, Any], uri: str, *, wrong: bool, heatmaps: dict[tuple[int, str], str]) -> str:
    picture = _img(uri, item.get("path", "")) if uri else '<div class="note">(image unreadable)</div>'
    pics = [f'<div class="pic">{picture}<span class="for">image</span></div>']
    for name, role in dict.fromkeys([(item["predicted"], "predicted"), (item["true"], "true")]):
        if (item["position"], name) in heatmaps and (role == "predicted" or wrong):
            label = f"{role}: {name}" if wrong else "where it looked"
            pics.append(f'<div class="pic" data-heatmap="{role}">'
                        f'<img class="heatmap" src="{heatmaps[(item["position"], name)]}" '
                        f'alt="Grad-CAM heatmap for {esc(name)}"><span class="for">{esc(label)}</span></div>')
    width = f" maps{len(pics)}" if len(pics) > 1 else ""
    name = Path(str(item.get("path", ""))).name
    return (f'<div class="tile{" wrong" if wrong else ""}{width}" title="{esc(item.get("path", ""))}">'
            f'<div class="pics">{"".join(pics)}</div>'
            f'<div class="cap"><span class="true">true: {esc(item["true"])}</span><br>'
            + (f'<span class="pred">predicted: {esc(item["predicted"])}</span><br>' if wrong else "")
            + f'confidence {item["confidence"]:.3f}<br>loss {max(item["loss"], 0.0):.2f}'
            f'<br><span class="note">{esc(name)}</span></div></div>')


def _heatmap_note(g: dict[str, Any]) -> str:
    info = g.get("heatmaps") or {}
    if info.get("maps"):
        return (f'<p class="note" data-heatmaps="{info["maps"]}">Beside each image: where the model looked '
                f"(Grad-CAM on layer <code>{esc(info.get('layer'))}</code>; red is where the class score rises "
                "most), for the predicted class and, when it is wrong, for the true class. At most "
                f"{esc(info['cap'])} images are explained, the misclassified first, on the bundle's PyTorch network "
                "(OpenVINO and ONNX cannot backpropagate); <code>imgclf explain BUNDLE IMAGE</code> explains any "
                "image.</p>")
    if info.get("note"):
        return f'<p class="note" data-heatmaps="0">No heatmaps: {esc(info["note"])}.</p>'
    return ""


def _section_images(report: dict[str, Any], thumbnails: dict[int, str], heatmaps: dict[tuple[int, str], str]) -> str:
    g = report["galleries"]
    parts = [_open("images"), _heatmap_note(g), "<h3>Misclassified, highest loss first</h3>"]
    if g["top_losses"]:
        parts.append('<p class="note">Confidence is the probability of the predicted class after temperature '
                     "scaling, as <code>predict</code> reports it; loss is −log p(true class).</p>")
        parts.append('<div class="gallery">' + "".join(
            _tile(item, thumbnails.get(item["position"], ""), wrong=True, heatmaps=heatmaps)
            for item in g["top_losses"]) + "</div>")
    else:
        parts.append('<p class="note">No misclassified images.</p>')
    parts.append(f"<h3>Most confident correct, per class (up to {g.get('per_class', 0)})</h3>")
    for name, items in g["confident_correct"].items():
        tiles = "".join(_tile(item, thumbnails.get(item["position"], ""), wrong=False, heatmaps=heatmaps)
                        for item in items)
        parts.append(f'<div class="row"><div class="name">{esc(name)}</div>'
                     f'<div class="gallery">{tiles or "<span class=note>none correct</span>"}</div></div>')
    return "".join(parts) + "</section>"


def _section_calibration(report: dict[str, Any], uris: dict[str, str]) -> str:
    c = report["calibration"]
    parts = [_open("calibration"), f'<figure class="plot">{_img(uris["reliability"], "reliability diagram")}</figure>']
    rows = [
        ("temperature T (stored in the bundle)", number(c["temperature"], ["calibration", "temperature"])),
        ("T fitted on val", number(c["fitted_temperature"], ["calibration", "fitted_temperature"])),
        (f"ECE before ({c['bins']} bins)", number(c["ece_before"], ["calibration", "ece_before"])),
        ("ECE after", number(c["ece_after"], ["calibration", "ece_after"])),
        ("NLL before (nats/image)", number(c["nll_before"], ["calibration", "nll_before"])),
        ("NLL after", number(c["nll_after"], ["calibration", "nll_after"])),
    ]
    parts.append(_kv_table(rows))
    if not c["temperature_usable"]:
        parts.append('<p class="warn">The fitted T hit the edge of its search range: validation has (almost) no '
                     "mistakes, so no temperature can be fitted from it. The bundle keeps T = 1; a larger or harder "
                     "validation split is needed to calibrate.</p>")
        advice = ""
    elif c["temperature"] > 1:
        advice = "Before scaling the model was over-confident (T > 1 softens it). "
    else:
        advice = "Before scaling the model was under-confident (T < 1 sharpens it). "
    parts.append(f'<p class="note">{advice}ECE is the image-weighted mean gap '
                 "between confidence and accuracy over equal-width confidence bins. T is stored in the bundle's "
                 "imgclf.json and <code>predict</code> divides the logits by it; the predicted class never "
                 "changes.</p>")
    if c.get("in_sample"):
        parts.append('<p class="warn">No test split: T was fitted and scored on the same validation images, so '
                     "'after' is optimistic.</p>")
    return "".join(parts) + "</section>"


def _section_tta(report: dict[str, Any]) -> str:
    parts = [_open("tta")]
    t = report.get("tta")
    if not t:
        parts.append('<p class="note" data-empty="tta">Not measured. Run <code>imgclf report DIR --tta</code> to '
                     "score the image and its mirror averaged.</p>")
        return "".join(parts) + "</section>"
    parts.append(f"<p>{esc(t['method'])}, on the same {number(t['num_images'])} images.</p>")
    parts.append("<table><tr><th></th><th>without TTA</th><th>with TTA</th></tr>" + "".join(
        f"<tr><td>{esc(label)}</td><td>{number(t[k + '_without'], ['tta', k + '_without'])}</td>"
        f"<td>{number(t[k], ['tta', k])}</td></tr>"
        for k, label in (("accuracy", "accuracy"), ("top5_accuracy", "top-5 accuracy"), ("macro_f1", "macro-F1"))
    ) + "</table>")
    if not (report["run"].get("config") or {}).get("flip", True):
        parts.append('<p class="warn">This model was trained without flips (--no-flip): mirrored images may not '
                     "mean the same class, so TTA is likely to hurt.</p>")
    return "".join(parts) + "</section>"
