"""CIFAR-10 (JPEG) benchmark of the `probe` and `finetune` recipes, through the real CLI.

Not a test: it takes tens of minutes. It unzips ../shared/data/cifar10-jpg.zip into
~/.cache/imgclf-bench once, runs `imgclf train` (and `imgclf evaluate` for the subset check) as
separate processes, and prints a table of recipe, image size, epochs, wall time, images/s and test
accuracy. Record the figures in BENCHMARKS.md with the command, machine and date.

Usage:
    python benchmarks/cifar10.py                        # all rows below
    python benchmarks/cifar10.py --rows probe-500 probe # some of them
    python benchmarks/cifar10.py --rows finetune --finetune-budget 38   # the planner picks size and epochs
    python benchmarks/cifar10.py --finetune-epochs 3 --finetune-size 96   # fixed size and epochs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZIP = ROOT.parent / "shared" / "data" / "cifar10-jpg.zip"
CACHE = Path(os.environ.get("IMGCLF_BENCH_CACHE", Path.home() / ".cache" / "imgclf-bench"))


def ensure_data() -> Path:
    """The unzipped set, `CACHE/cifar10/{train,test}/<class>/*.jpg`."""
    folder = CACHE / "cifar10"
    if not (folder / "test").is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(ZIP) as archive:
            archive.extractall(CACHE)
    return folder


def first_per_class(source: Path, counts: dict[str, int], target: Path) -> Path:
    """`target/<split>/<class>/`: copies of the first `counts[split]` images of every class of
    `source/<split>/` (made once; an existing `target` is reused)."""
    if not all((target / split).is_dir() for split in counts):
        for split, count in counts.items():
            for class_dir in sorted((source / split).iterdir()):
                out = target / split / class_dir.name
                out.mkdir(parents=True, exist_ok=True)
                for f in sorted(class_dir.iterdir())[:count]:
                    shutil.copy(f, out / f.name)
    return target


def subset(folder: Path, per_class: int) -> Path:
    """A train folder with the first `per_class` images of every class (copied once)."""
    target = CACHE / f"train-{per_class}"
    if not target.is_dir():
        for class_dir in sorted((folder / "train").iterdir()):
            out = target / class_dir.name
            out.mkdir(parents=True)
            for f in sorted(class_dir.iterdir())[:per_class]:
                shutil.copy(f, out / f.name)
    return target


def run(cmd: list[str]) -> float:
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def imgclf(*args: str) -> list[str]:
    return [sys.executable, "-m", "imgclf", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=["probe-500", "probe", "finetune"],
                        choices=["probe-500", "probe", "finetune"])
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--finetune-size", type=int, default=96)
    parser.add_argument("--finetune-budget", type=float, default=0,
                        help="minutes: run finetune with --time-budget instead of fixed epochs and size")
    parser.add_argument("--out", default=str(CACHE / "runs"))
    args = parser.parse_args()
    data = ensure_data()
    out = Path(args.out)
    rows = []
    for row in args.rows:
        bundle = out / row
        shutil.rmtree(bundle, ignore_errors=True)
        if row == "probe-500":
            # The Core issue's check: train on 500 images per class, evaluate on the full test set.
            train_s = run(imgclf("train", str(subset(data, 500)), "--out", str(bundle), "--recipe", "probe"))
            eval_s = run(imgclf("evaluate", str(bundle), str(data / "test"), "--json"))
            metrics = json.loads((bundle / "evaluation.json").read_text())
            wall, accuracy, images = train_s + eval_s, metrics["accuracy"], 5000 + 10000
            epochs = "-"
        else:
            cmd = imgclf("train", str(data), "--out", str(bundle), "--recipe", row)
            if row == "finetune" and args.finetune_budget:
                cmd += ["--time-budget", str(args.finetune_budget)]
            elif row == "finetune":
                cmd += ["--epochs", str(args.finetune_epochs), "--image-size", str(args.finetune_size)]
            wall = run(cmd)
            meta = json.loads((bundle / "imgclf.json").read_text())
            accuracy = meta["metrics"]["test"]["accuracy"]
            trained = [h for h in meta["history"] if h["epoch"] > 0]  # epoch 0: the probe's head
            epochs = str(len(trained)) if trained else "-"
            images = 60000
        meta = json.loads((bundle / "imgclf.json").read_text())
        history = [h for h in meta["history"] if h["epoch"] > 0]
        speed = (sum(h["train_images_per_s"] for h in history) / len(history)) if history else images / wall
        # Fine-tuning may test above its training size (training/eval_size.py): show both.
        train_size, test_size = meta["config"]["image_size"] or meta["preprocessing"]["image_size"], \
            meta["preprocessing"]["image_size"]
        size = f"{train_size} px" if train_size == test_size else f"{train_size} px, tested at {test_size} px"
        rows.append((row, size, epochs, wall, speed, accuracy))

    print(f"\nCIFAR-10 JPEG, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| row | image size | epochs | wall time | images/s | test accuracy |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, size, epochs, wall, speed, accuracy in rows:
        kind = "train img/s" if epochs != "-" else "img/s end to end"
        print(f"| {name} | {size} | {epochs} | {wall / 60:.1f} min | {speed:.0f} ({kind}) | {accuracy:.4f} |")


if __name__ == "__main__":
    main()
