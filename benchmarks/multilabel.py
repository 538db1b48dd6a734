"""Multi-label benchmark: 2x2 mosaics of CIFAR-10 JPEGs, labelled with the set of classes present.

Not a test: it takes minutes. It builds the mosaics once (fixed seed) under
~/.cache/imgclf-bench/multilabel-*/ as JPEG files and a `path,labels,split` CSV, then compares:

- `ovr-lr`: the reference, scikit-learn's `OneVsRestClassifier(LogisticRegression())` on frozen
  features of the same backbone (tf_efficientnet_lite0, pooled, at `--baseline-size` px), 0.5
  thresholds;
- `probe`: `imgclf train CSV --recipe probe` (multi-output logistic regression, thresholds on val);
- `default`: `imgclf train CSV --time-budget MINUTES` (the default recipe under a time budget);
- `finetune`: `imgclf train CSV --epochs N --image-size S` (the default recipe, fixed epochs and
  size: what fine-tuning reaches when a contended machine leaves a budget no room for it);

each scored by `imgclf evaluate --json` on the test mosaics: mAP, micro-F1 (at the tuned
thresholds, and at 0.5), subset accuracy, and wall time (training plus scoring, in separate
processes).

A mosaic: a 2x2 grid of 32 px cells (64 x 64 px). 1-3 classes are drawn, then 1-4 images (at least
one per class, the rest from the same classes), placed in random cells; empty cells are mid-grey.
Train mosaics use CIFAR-10's train images, test mosaics its test images.

Usage:
    python benchmarks/multilabel.py                                  # 10,000 train / 2,000 test mosaics
    python benchmarks/multilabel.py --train 3000 --test 600          # the issue's reference size
    python benchmarks/multilabel.py --train 3000 --test 600 --rows ovr-lr probe
    python benchmarks/multilabel.py --train 3000 --test 600 --rows finetune --finetune-epochs 2 --finetune-size 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cifar10 import CACHE, ensure_data  # noqa: E402

CELL = 32  # px: a CIFAR-10 image
GREY = 128  # empty cells
BACKBONE = "tf_efficientnet_lite0"


def mosaic_labels(rng: np.random.Generator, num_classes: int) -> tuple[list[int], list[int]]:
    """(the classes present, one class per filled cell): 1-3 classes, 1-4 images, every class at least once."""
    chosen = sorted(rng.choice(num_classes, size=int(rng.integers(1, 4)), replace=False).tolist())
    images = int(rng.integers(len(chosen), 5))
    cells = chosen + rng.choice(chosen, size=images - len(chosen)).tolist()
    return chosen, [int(c) for c in rng.permutation(cells)]


def build_mosaics(source: Path, split: str, count: int, seed: int, out: Path) -> list[tuple[str, str, str]]:
    """Write `count` mosaics of `source/<split>/` JPEGs into `out/<split>/`; returns CSV rows."""
    classes = sorted(p.name for p in (source / split).iterdir() if p.is_dir())
    files = {c: sorted((source / split / c).glob("*.jpg")) for c in classes}
    rng = np.random.default_rng(seed)
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        present, cells = mosaic_labels(rng, len(classes))
        canvas = np.full((2 * CELL, 2 * CELL, 3), GREY, dtype=np.uint8)
        for position, cls in zip(rng.permutation(4)[: len(cells)], cells, strict=True):
            picture = files[classes[cls]][int(rng.integers(len(files[classes[cls]])))]
            with Image.open(picture) as img:
                tile = np.asarray(img.convert("RGB").resize((CELL, CELL)))
            y, x = divmod(int(position), 2)
            canvas[y * CELL:(y + 1) * CELL, x * CELL:(x + 1) * CELL] = tile
        name = f"{split}/{i:05d}.jpg"
        Image.fromarray(canvas).save(out / name, quality=95)
        rows.append((name, ";".join(classes[c] for c in present), split))
    return rows


def ensure_mosaics(train: int, test: int, seed: int) -> Path:
    """The CSV of the mosaic set (built once per size and seed)."""
    out = CACHE / f"multilabel-s{seed}-{train}-{test}"
    csv_path = out / "labels.csv"
    if not csv_path.is_file():
        source = ensure_data()
        rows = build_mosaics(source, "train", train, seed, out) + build_mosaics(source, "test", test, seed + 1, out)
        text = "path,labels,split\n" + "".join(f"{p},{labels},{s}\n" for p, labels, s in rows)
        temp = csv_path.with_suffix(".tmp")
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, csv_path)  # the CSV last: a half-built set is never taken as done
    return csv_path


def ovr_baseline(csv_path: Path, size: int) -> dict[str, float]:
    """scikit-learn's one-vs-rest logistic regression on frozen lite0 features, thresholds 0.5."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score
    from sklearn.multiclass import OneVsRestClassifier

    from imgclf.data.pipeline import ImageStore, Preprocessing
    from imgclf.data.sources import load_eval_split
    from imgclf.models.backbones import create_backbone
    from imgclf.runtime import FrozenForward, pick_device, run_frozen

    start = time.perf_counter()
    text = csv_path.read_text(encoding="utf-8").splitlines()
    classes = sorted({x for line in text[1:] for x in line.split(",")[1].split(";") if x})
    backbone = create_backbone(BACKBONE)
    prep = Preprocessing.from_data_config(backbone.data_config, size)
    forward = FrozenForward(backbone.model, image_size=size, device=pick_device("auto"))
    features = {}
    for split in ("train", "test"):
        rows = [line for line in text[1:] if line.endswith("," + split)]
        split_csv = csv_path.with_name(f"{split}-only.csv")
        split_csv.write_text("path,labels\n" + "".join(r.rsplit(",", 1)[0] + "\n" for r in rows), encoding="utf-8")
        images, _ = load_eval_split(str(split_csv), classes, multilabel=True)
        store = ImageStore.decode(images, prep, memory_budget=0, description=f"decode {split}")
        x, y, _ = run_frozen(forward, store, batch_size=64, desc=f"features {split}")
        features[split] = (x.numpy(), y.numpy())
    (train_x, train_y), (test_x, test_y) = features["train"], features["test"]
    model = OneVsRestClassifier(LogisticRegression(max_iter=2000)).fit(train_x, train_y)
    probs = model.predict_proba(test_x)
    pred = (probs >= 0.5).astype(int)
    return {"mAP": float(average_precision_score(test_y, probs, average="macro")),
            "micro_f1": float(f1_score(test_y, pred, average="micro")),
            "micro_f1_at_0.5": float(f1_score(test_y, pred, average="micro")),
            "subset_accuracy": float(accuracy_score(test_y, pred)), "seconds": time.perf_counter() - start,
            "size": size}


def imgclf_row(csv_path: Path, out: Path, extra: list[str]) -> dict[str, float]:
    """Train with the CLI, then score the test mosaics with `imgclf evaluate --json`."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "imgclf", "train", str(csv_path), "--out", str(out), *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    trained = time.perf_counter() - start
    scored = subprocess.run([sys.executable, "-m", "imgclf", "evaluate", str(out), str(csv_path), "--json"],
                            check=True, capture_output=True, text=True)
    metrics = json.loads(scored.stdout)
    meta = json.loads((out / "imgclf.json").read_text(encoding="utf-8"))
    chosen = (meta.get("selection") or {}).get("chosen", "probe")
    return {"mAP": metrics["mAP"], "micro_f1": metrics["micro_f1"], "micro_f1_at_0.5": metrics["micro_f1_at_0.5"],
            "subset_accuracy": metrics["subset_accuracy"], "seconds": time.perf_counter() - start,
            "train_seconds": trained, "size": meta["preprocessing"]["image_size"], "recipe": meta["recipe"],
            "chosen": chosen, "epochs": sum(1 for r in meta.get("history", []) if r.get("epoch", 0) > 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=10_000, help="training mosaics (default 10,000)")
    parser.add_argument("--test", type=int, default=2_000, help="test mosaics (default 2,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", nargs="+", default=["ovr-lr", "probe", "default"],
                        choices=["ovr-lr", "probe", "default", "finetune"])
    parser.add_argument("--finetune-epochs", type=int, default=2, help="epochs of the finetune row (2)")
    parser.add_argument("--finetune-size", type=int, default=128, help="input size of the finetune row (128 px)")
    parser.add_argument("--time-budget", type=float, default=5.0, help="minutes for the default row (5)")
    parser.add_argument("--baseline-size", type=int, default=256, help="the reference's input size (256 px)")
    parser.add_argument("--out", type=Path, default=CACHE / "multilabel-runs")
    parser.add_argument("--train-args", default="", help="more `imgclf train` options for the probe, finetune and "
                        "default rows, e.g. --train-args='--freeze-stages 0 --precision bf16'")
    args = parser.parse_args()

    started = time.perf_counter()
    csv_path = ensure_mosaics(args.train, args.test, args.seed)
    print(f"mosaics: {csv_path} ({time.perf_counter() - started:.0f} s)", flush=True)
    results: dict[str, dict[str, float]] = {}
    more = shlex.split(args.train_args)
    for row in args.rows:
        out = args.out / f"{row}-{args.train}-s{args.seed}"
        if row == "ovr-lr":
            results[row] = ovr_baseline(csv_path, args.baseline_size)
        elif row == "probe":
            results[row] = imgclf_row(csv_path, out, ["--recipe", "probe", *more])
        elif row == "finetune":
            results[row] = imgclf_row(csv_path, out, ["--epochs", str(args.finetune_epochs),
                                                      "--image-size", str(args.finetune_size), *more])
        else:
            results[row] = imgclf_row(csv_path, out, ["--time-budget", f"{args.time_budget:g}", *more])
        print(json.dumps({row: results[row]}), flush=True)
    print(f"\n{args.train} train / {args.test} test mosaics, seed {args.seed}, {BACKBONE}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("| row | size px | mAP | micro-F1 | micro-F1 @0.5 | subset acc | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row, r in results.items():
        label = {"default": f"default --time-budget {args.time_budget:g} {args.train_args} (ran: {r.get('recipe')})",
                 "finetune": f"finetune --epochs {args.finetune_epochs} (kept: {r.get('chosen')})"}.get(row, row)
        print(f"| {label} | {r['size']} | {r['mAP']:.3f} | {r['micro_f1']:.3f} | {r['micro_f1_at_0.5']:.3f} | "
              f"{r['subset_accuracy']:.3f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
