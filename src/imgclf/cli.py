"""The `imgclf` command: a thin shell over the library.

Each subcommand parses its flags, calls one library function and prints the result. Every
`ImgclfError` is printed without a traceback and exits with code 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from imgclf.cli_explain import add_explain
from imgclf.cli_review import add_embed, add_rank, add_review, add_similar
from imgclf.cli_ship import add_export, add_serve
from imgclf.config import RECIPE_ALIASES, RECIPES
from imgclf.errors import ImgclfError

EXIT_USAGE = 2
RECIPE_CHOICES = RECIPES  # shown in --help; the old names in RECIPE_ALIASES are accepted too


def _add_train(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("train", help="train a classifier on DATA and write a bundle to --out")
    p.add_argument("data", metavar="DATA", nargs="?", help="class folders, split folders, a CSV, or cifar10/cifar100")
    p.add_argument("--out", help="bundle folder to write")
    p.add_argument("--config", help="YAML file of options; flags override it")
    p.add_argument("--backbone", help="timm model name; default auto: tf_efficientnet_lite0, or lite1/lite2 when a "
                   "budget run's screening finds their probe clearly better and the budget leaves them 3 epochs")
    p.add_argument("--recipe", choices=[*RECIPE_CHOICES, *RECIPE_ALIASES], metavar="{" + ",".join(RECIPE_CHOICES) + "}",
                   help="probe: frozen backbone; finetune (default); article: the article's VGG19 system "
                   "(formerly 'seed', still accepted)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs after the head fit (default 5)")
    p.add_argument("--image-size", type=int, help="input side in px (default: from the backbone and data)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--weights", help="local weights file (.safetensors or state-dict .pth)")
    p.add_argument("--random-init", action="store_true", default=None, help="train from random weights")
    p.add_argument("--val-fraction", type=float, help="share of train held out for validation (default 0.1)")
    p.add_argument("--lr", type=float, help="peak learning rate of the head (default 3e-4)")
    p.add_argument("--augment", choices=["auto", "none", "light", "standard"],
                   help="random-resized crops: light 80-100%% of the area, standard 35-100%%; "
                        "auto (default): light for images smaller than the input size, else standard")
    p.add_argument("--no-flip", dest="flip", action="store_false", default=None, help="no horizontal flips")
    p.add_argument("--patience", type=int, help="epochs without improvement before stopping")
    p.add_argument("--freeze-stages", type=int, metavar="N",
                   help="fine-tune with the stem and the first N stages of the backbone frozen (0: none; default "
                   "on a CPU: the stages at output stride <= 4, 2 for lite0; on a GPU: 0)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"])
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, help="decode threads (default: one per core)")
    p.add_argument("--max-bad-fraction", type=float,
                   help="stop when more than this share of files is unreadable (default 0.05)")
    p.add_argument("--balance", action="store_true", default=None,
                   help="class-weighted loss (probe and fine-tuning) for skewed classes")
    p.add_argument("--max-minutes", type=float,
                   help="wall-time limit in minutes: after the first epoch, none starts that would end past it")
    p.add_argument("--resume", action="store_true", default=None, help="continue from --out's newest checkpoint")
    p.add_argument("--checkpoint-minutes", type=float, help="minutes between checkpoints within an epoch (10)")
    p.add_argument("--keep-checkpoints", action="store_true", default=None,
                   help="keep OUT/checkpoints after the run ends well (by default they are deleted)")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="bit-identical results for the same seed (deterministic kernels, fixed threads)")
    p.add_argument("--tensorboard", action="store_true", default=None, help="also write TensorBoard logs")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the network for fine-tuning (costs minutes to compile; for long GPU runs)")
    p.add_argument("--time-budget", "--time-budget-minutes", dest="time_budget_minutes", type=float, metavar="MINUTES",
                   help="finish the whole run within MINUTES (wall clock): picks recipe, input size and epochs")
    p.add_argument("--no-feature-cache", dest="feature_cache", action="store_false", default=None,
                   help="do not read or write frozen features in $IMGCLF_CACHE/features")
    p.add_argument("--no-scan-cache", dest="scan_cache", action="store_false", default=None,
                   help="decode every file in the pre-flight check, even those unchanged since an earlier run")
    p.add_argument("--no-test-time-size-search", dest="test_time_size_search", action="store_false", default=None,
                   help="keep the training input size for the bundle instead of choosing it on val")
    p.add_argument("--no-full-size-probe", dest="full_size_probe", action="store_false", default=None,
                   help="when fine-tuning below the backbone's input size, do not also fit a probe at that size "
                   "as a candidate for the bundle")
    p.add_argument("--exclude", metavar="CSV", help="leave out the images imgclf review's decisions remove "
                   "(the review page's export, or label_issues.csv: all its rows); files are not touched")
    p.add_argument("--relabel", metavar="CSV", help="apply the relabel decisions of imgclf review's page "
                   "(or label_issues.csv's suggested labels); files are not touched")
    p.set_defaults(handler=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from imgclf.config import load_yaml, resolve_config
    from imgclf.distributed import is_main
    from imgclf.workflow import train

    file_values = load_yaml(args.config) if args.config else {}
    flags = {
        k: getattr(args, k)
        for k in (
            "data", "out", "backbone", "recipe", "epochs", "image_size", "batch_size", "seed",
            "weights", "random_init", "val_fraction", "lr", "augment", "flip", "patience", "freeze_stages",
            "precision", "device", "workers", "max_bad_fraction", "balance", "max_minutes",
            "resume", "checkpoint_minutes", "deterministic", "tensorboard", "time_budget_minutes", "feature_cache",
            "scan_cache", "test_time_size_search", "full_size_probe", "compile", "keep_checkpoints", "exclude",
            "relabel",
        )
    }
    cfg = resolve_config(file_values, **flags)
    model = train(cfg)
    if not is_main():  # under torchrun, rank 0 prints the results once
        return 0
    for split, values in model.info.metrics.items():
        if values.get("task") == "multi-label":
            print(f"{split}: {_multilabel_line(values)}")
            continue
        # Skewed classes: lead with the metrics that the majority class cannot inflate.
        lead = (f"balanced accuracy {values['balanced_accuracy']:.4f}, macro-F1 {values['macro_f1']:.4f} "
                "(skewed classes); " if _imbalanced(values) else "")
        print(f"{split}: {lead}accuracy {values['accuracy']:.4f}, top-5 {values['top5_accuracy']:.4f}, "
              f"macro-F1 {values['macro_f1']:.4f} ({values['num_images']} images)")
    print(f"bundle: {cfg.out}")
    return 0


def _add_check(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("check", help="scan DATA: unreadable files, duplicates and leakage, class counts")
    p.add_argument("data", metavar="DATA", help="class folders, split folders or a CSV manifest")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("--workers", type=int, default=0, help="decode threads (default: one per core)")
    p.set_defaults(handler=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0 when the data looks clean, 1 when problems were found (2: DATA unusable as given)."""
    from imgclf.data.check import check

    report = check(args.data, workers=args.workers)
    text = json.dumps(report.to_dict()) if args.json else report.format()
    # Paths may hold characters the terminal cannot show (or undecodable bytes): escape those.
    encoding = sys.stdout.encoding or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding))
    return 1 if report.problems() else 0


def _add_compare(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("compare", help="the linear probe of several backbones on DATA, side by side")
    p.add_argument("data", metavar="DATA")
    p.add_argument("--backbones", help="comma-separated names (default: the curated ones available offline)")
    p.add_argument("--image-size", type=int, help="one input size for all (default: each backbone's own)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.set_defaults(handler=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from imgclf.training.compare import compare_backbones

    names = [n.strip() for n in args.backbones.split(",") if n.strip()] if args.backbones else None
    rows = compare_backbones(args.data, names, image_size=args.image_size, precision=args.precision)
    if args.json:
        print(json.dumps({"backbones": [r.to_dict() for r in rows]}))
        return 0
    print(f"{'backbone':<28} {'size':>5} {'probe val':>9} {'img/s':>7} {'params':>8} {'MB':>6}")
    for r in rows:
        speed = f"{r.images_per_second:.0f}" if r.images_per_second else "cached"
        print(f"{r.backbone:<28} {r.image_size:>5} {r.val_accuracy:>9.4f} {speed:>7} "
              f"{r.parameters / 1e6:>7.1f}M {r.weights_mb:>6.1f}")
    print(f"best probe: {rows[0].backbone} (train it with --backbone {rows[0].backbone})")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("evaluate", help="score a bundle on DATA (its test split, else all images)")
    p.add_argument("model", metavar="DIR")
    p.add_argument("data", metavar="DATA")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--runtime", choices=["auto", "torch", "openvino", "openvino-int8", "onnx-int8"], default="auto",
                   help="*-int8: the bundle's int8 model (imgclf export DIR --int8), to check it")
    p.add_argument("--tta", action="store_true", help="also score the image + its mirror averaged (2x the cost)")
    p.add_argument("--threshold", type=_probability, metavar="P",
                   help="multi-label: one threshold for every label instead of those stored in the bundle")
    p.set_defaults(handler=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from imgclf.api import evaluate

    metrics = evaluate(args.model, args.data, batch_size=args.batch_size, runtime=args.runtime, tta=args.tta,
                       threshold=args.threshold)
    if args.json:
        print(json.dumps(metrics))
        return 0
    if metrics.get("task") == "multi-label":
        _print_multilabel_evaluation(metrics)
        return 0
    print(f"{metrics['data']} ({metrics['split']}, {metrics['num_images']} images)")
    # Skewed classes: lead with the metrics that are not fooled by the majority class.
    lead = ["balanced_accuracy", "macro_f1"] if _imbalanced(metrics) else []
    rest = ["accuracy", "top5_accuracy", "macro_f1", "weighted_f1", "balanced_accuracy"]
    for key in lead + [k for k in rest if k not in lead]:
        print(f"  {key:<18} {metrics[key]:.4f}")
    width = max(len(c) for c in metrics["classes"])
    print(f"\n  {'class':<{width}}  precision  recall     f1  support")
    for name, row in metrics["per_class"].items():
        scores = f"{row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:5.4f}  {row['support']:7d}"
        print(f"  {name:<{width}}  {scores}")
    if metrics.get("tta"):
        tta = metrics["tta"]
        print(f"\n  test-time augmentation ({tta['method']}):")
        for key in ("accuracy", "top5_accuracy", "macro_f1"):
            print(f"  {key:<18} {tta[key + '_without']:.4f} without, {tta[key]:.4f} with")
    if metrics["skipped_files"]:
        print(f"\n  skipped {len(metrics['skipped_files'])} unreadable file(s)")
    print(f"\nconfusion matrix: {metrics['confusion_matrix_png']}")
    return 0


def _multilabel_line(metrics: dict[str, Any]) -> str:
    return (f"mAP {metrics['mAP']:.4f}, micro-F1 {metrics['micro_f1']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
            f"subset accuracy {metrics['subset_accuracy']:.4f}, Hamming loss {metrics['hamming_loss']:.4f} "
            f"({metrics['num_images']} images)")


def _print_multilabel_evaluation(metrics: dict[str, Any]) -> None:
    """The text form of a multi-label `evaluate`: the summary, then per label, worst AP first."""
    from imgclf.evaluation.multilabel import worst_labels

    print(f"{metrics['data']} ({metrics['split']}, {metrics['num_images']} images; thresholds from "
          f"{metrics['threshold_source']})")
    print(f"  {_multilabel_line(metrics)}")
    width = max(len(c) for c in metrics["classes"])
    print(f"\n  {'label':<{width}}  precision  recall     f1      AP  threshold  support")
    for name in worst_labels(metrics):
        row = metrics["per_label"][name]
        ap = f"{row['ap']:6.4f}" if row["ap"] is not None else "     -"
        print(f"  {name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:5.4f}  {ap}  "
              f"{row['threshold']:9.3f}  {row['support']:7d}")
    if metrics["skipped_files"]:
        print(f"\n  skipped {len(metrics['skipped_files'])} unreadable file(s)")


def _imbalanced(metrics: dict[str, Any]) -> bool:
    from imgclf.evaluation import is_imbalanced

    return is_imbalanced(metrics)


def _add_predict(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("predict", help="top-k labels for image files or folders")
    p.add_argument("model", metavar="DIR")
    p.add_argument("paths", metavar="PATH", nargs="+")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--runtime", choices=["auto", "torch", "onnx", "openvino", "openvino-int8", "onnx-int8"],
                   default="auto", help="*-int8: the bundle's int8 model, written by imgclf export DIR --int8")
    p.add_argument("--threshold", type=_probability, metavar="P",
                   help="multi-label: one threshold for every label instead of those stored in the bundle")
    p.set_defaults(handler=cmd_predict)


def _probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, got {text!r}")
    return value


def cmd_predict(args: argparse.Namespace) -> int:
    from imgclf.api import collect_images, load
    from imgclf.progress import log

    if args.top_k < 1:
        raise ImgclfError(f"--top-k must be at least 1, got {args.top_k}")
    files = collect_images(args.paths)
    model = load(args.model)
    # Build the fast frozen path first (OpenVINO converts the network once, ~5 s for lite0) so the
    # rate below is decode + inference only.
    built = time.perf_counter()
    runtime = model.forward_function(args.runtime).runtime
    start = time.perf_counter()
    predictions = model.predict([str(f) for f in files], top_k=args.top_k, batch_size=args.batch_size,
                                runtime=args.runtime, threshold=args.threshold)
    seconds = time.perf_counter() - start
    log(f"{len(files)} image(s) in {seconds:.2f} s ({len(files) / max(seconds, 1e-9):.1f} img/s) on {runtime}, "
        f"after {start - built:.1f} s to prepare it")
    rows = [p.to_dict() for p in predictions]
    if model.multilabel:
        _print_multilabel_predictions(rows, args.format)
    elif args.format == "json":
        print(json.dumps(rows, indent=2))
    elif args.format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["source", "rank", "label", "probability", "error"])
        for row in rows:
            if row["error"]:
                writer.writerow([row["source"], "", "", "", row["error"]])
            for rank, item in enumerate(row["top_k"], start=1):
                writer.writerow([row["source"], rank, item["label"], f"{item['probability']:.6f}", ""])
        sys.stdout.write(buffer.getvalue())
    else:
        for row in rows:
            if row["error"]:
                print(f"{row['source']}\tERROR: {row['error']}")
                continue
            guesses = "  ".join(f"{t['label']} {t['probability']:.3f}" for t in row["top_k"])
            print(f"{row['source']}\t{guesses}")
    return 1 if any(r["error"] for r in rows) else 0


def _print_multilabel_predictions(rows: list[dict[str, Any]], form: str) -> None:
    """Multi-label predictions, one row per image: every label over its threshold, with probabilities.

    CSV: `source,labels,probabilities,error` with `;`-separated labels (the training CSV's form)
    and their probabilities in the same order; an empty `labels` means none of them.
    """
    if form == "json":
        print(json.dumps(rows, indent=2))
        return
    if form == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["source", "labels", "probabilities", "error"])
        for row in rows:
            found = row.get("labels") or []
            writer.writerow([row["source"], ";".join(x["label"] for x in found),
                             ";".join(f"{x['probability']:.6f}" for x in found), row["error"] or ""])
        sys.stdout.write(buffer.getvalue())
        return
    for row in rows:
        if row["error"]:
            print(f"{row['source']}\tERROR: {row['error']}")
            continue
        found = row.get("labels") or []
        text = "  ".join(f"{x['label']} {x['probability']:.3f}" for x in found) or "(no label over its threshold)"
        print(f"{row['source']}\t{text}")


def _add_backbones(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("backbones", help="list curated backbones and whether their weights work offline")
    p.add_argument("--include", help="fnmatch pattern, e.g. 'tf_efficientnet*'")
    p.set_defaults(handler=cmd_backbones)


def cmd_backbones(args: argparse.Namespace) -> int:
    from imgclf.models.backbones import list_backbones, offline_status

    entries = list_backbones(args.include)
    width = max(len(e.name) for e in entries) if entries else 10
    print(f"{'name':<{width}}  {'offline weights':<42}  description")
    for e in entries:
        status = offline_status(e) or "no (needs the internet or --weights)"
        print(f"{e.name:<{width}}  {status:<42}  {e.summary}")
    print("\nAny other timm model name works too (with --weights FILE, or online).")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="offline end-to-end run on scikit-learn's digits")
    p.add_argument("--out", default="imgclf-demo", help="folder for the data, bundle and plots")
    p.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from imgclf.demo import run_demo

    result = run_demo(args.out)
    metrics = result["metrics"]
    print(f"\nheld-out accuracy: {metrics['accuracy']:.4f} on {metrics['num_images']} images "
          f"(top-5 {metrics['top5_accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f})")
    print("predictions on a few held-out images:")
    for p in result["predictions"]:
        truth = p.source.replace("\\", "/").split("/")[-2]
        print(f"  {p.source}: {p.label} ({p.probability:.3f}), true {truth}")
    print(f"bundle: {result['bundle']}")
    print(f"report: {Path(result['bundle']) / 'report' / 'report.html'}")
    print(f"finished in {result['seconds']:.0f} s")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("report", help="write an HTML evaluation report (figures, galleries, calibration)")
    p.add_argument("model", metavar="DIR")
    p.add_argument("data", metavar="DATA", nargs="?", help="the training data (default: as recorded in the bundle)")
    p.add_argument("--out", help="report folder (default DIR/report)")
    p.add_argument("--tta", action="store_true", help="also score the image + its mirror averaged (2x the cost)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--runtime", choices=["auto", "torch", "openvino"], default="auto")
    p.add_argument("--screenshot", metavar="PNG", help="also save a full-page PNG (needs playwright + chromium)")
    p.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from imgclf.report import write_report

    html = write_report(args.model, args.data, tta=args.tta, out=args.out, batch_size=args.batch_size,
                        device=args.device, runtime=args.runtime)
    metrics = json.loads((html.parent / "metrics.json").read_text(encoding="utf-8"))
    m, c = metrics["metrics"], metrics["calibration"]
    if metrics.get("task") == "multi-label":
        print(f"{metrics['split']}: {_multilabel_line(m)}")
    else:
        print(f"{metrics['split']}: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f} "
              f"({m['num_images']} images)")
        print(f"calibration: T = {c['temperature']:.3f} (fitted on val, stored in the bundle); "
              f"ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}")
    if metrics.get("tta"):
        print(f"TTA: accuracy {metrics['tta']['accuracy_without']:.4f} -> {metrics['tta']['accuracy']:.4f}")
    if args.screenshot:
        from imgclf.report.screenshot import take_screenshot

        print(f"screenshot: {take_screenshot(html, args.screenshot)}")
    print(f"report: {html}")
    return 0


def _add_summary(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("summary", help="Keras-style table of a model's layers and parameter counts")
    p.add_argument("model", metavar="DIR", nargs="?", help="a bundle; or describe a recipe's model with the flags")
    p.add_argument("--recipe", choices=[*RECIPE_CHOICES, *RECIPE_ALIASES], metavar="{" + ",".join(RECIPE_CHOICES) + "}",
                   default="finetune")
    p.add_argument("--backbone", help="default: the recipe's (vgg19 for article, else tf_efficientnet_lite0)")
    p.add_argument("--num-classes", type=int, help="number of classes (needed without DIR)")
    p.add_argument("--image-size", type=int, help="input side in px (default: 32 for article, else the backbone's)")
    p.add_argument("--expand", action="store_true", help="one row per backbone layer")
    p.set_defaults(handler=cmd_summary)


def cmd_summary(args: argparse.Namespace) -> int:
    from imgclf.summary import summarize_bundle, summarize_recipe

    if args.model:
        summary = summarize_bundle(args.model, expand=args.expand)
    elif args.num_classes is None:
        raise ImgclfError(
            "summary needs a bundle folder or --num-classes",
            fix="imgclf summary DIR, or imgclf summary --recipe article --backbone vgg19 --num-classes 10 "
            "--image-size 32",
        )
    else:
        summary = summarize_recipe(args.recipe, backbone=args.backbone, num_classes=args.num_classes,
                                   image_size=args.image_size, expand=args.expand)
    print(summary.table())
    return 0


COMMANDS: Sequence[Callable[[argparse._SubParsersAction], None]] = (  # type: ignore[type-arg]
    _add_train, _add_check, _add_compare, _add_evaluate, _add_predict, _add_backbones, _add_demo, _add_report,
    _add_summary, add_export, add_serve, add_review, add_rank, add_embed, add_similar, add_explain,
)


def build_parser() -> argparse.ArgumentParser:
    from imgclf import __version__

    parser = argparse.ArgumentParser(
        prog="imgclf", description="Image classification by transfer learning."
    )
    parser.add_argument("--version", action="version", version=f"imgclf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except ImgclfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
