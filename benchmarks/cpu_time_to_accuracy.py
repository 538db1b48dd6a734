"""CIFAR-10 (JPEG) test accuracy against wall time under `imgclf train --time-budget N`, and fastai.

Not a test: at full size it takes 5 + 15 + 45 minutes, plus the fastai baseline. It unzips
../shared/data/cifar10-jpg.zip into ~/.cache/imgclf-bench once, runs `imgclf train DATA
--time-budget N` per budget as a separate process, and prints budget, wall time, overrun, recipe,
input size, epochs and test accuracy. With --fastai it also runs fastai's `vision_learner` +
`fine_tune` on the same images with the same backbone and offline weights, with its epochs sized
to the same wall time (skipped with a message when fastai is not installed). Record the figures in
BENCHMARKS.md with the command, machine and date.

Usage:
    python benchmarks/cpu_time_to_accuracy.py                       # budgets 5, 15, 45 min
    python benchmarks/cpu_time_to_accuracy.py --budgets 15 --fastai
    # fastai is not an imgclf dependency: give it its own environment and run the script with it
    #   python3 -m venv ../fastai-venv && ../fastai-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 \
    #       fastai==2.8.12 -e .
    #   ../fastai-venv/bin/python benchmarks/cpu_time_to_accuracy.py --per-class 1000 --budgets 7 --fastai
    python benchmarks/cpu_time_to_accuracy.py --per-class 10 --budgets 1   # a smoke run (~1-2 min)
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10 import CACHE, ensure_data, first_per_class  # noqa: E402  (the same unzipped set as benchmarks/cifar10.py)


def small_copy(data: Path, per_class: int) -> Path:
    """train/ and test/ with the first `per_class` images of every class (copied once)."""
    return first_per_class(data, {"train": per_class, "test": per_class}, CACHE / f"cifar10-{per_class}pc")


def run_imgclf(data: Path, budget: float, out: Path, extra: list[str]) -> dict[str, object]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "imgclf", "train", str(data), "--out", str(out), "--time-budget", f"{budget:g}",
           *extra]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    meta = json.loads((out / "imgclf.json").read_text())
    cfg = meta["config"]
    name = meta["backbone"]["name"]
    return {"tool": f"imgclf ({name})", "backbone": name, "budget_min": budget, "wall_min": wall / 60,
            "recipe": cfg["recipe"],
            "size": cfg["image_size"], "epochs": sum(h["epoch"] > 0 for h in meta["history"]) or "-",  # 0: the probe
            "accuracy": meta["metrics"]["test"]["accuracy"]}


def run_fastai(data: Path, minutes: float, size: int, backbone: str) -> dict[str, object] | None:
    """fastai `vision_learner` + `fine_tune(epochs, freeze_epochs=1)`, epochs sized to `minutes`."""
    try:
        from fastai.vision.all import (
            ImageDataLoaders,
            Resize,
            accuracy,
            aug_transforms,
            vision_learner,
        )
    except ImportError:
        print("fastai is not installed: skipping the fastai baseline (pip install fastai)")
        return None
    import timm
    import torch

    from imgclf.models.backbones import create_backbone

    start = time.perf_counter()
    loaders = ImageDataLoaders.from_folder(data, train="train", valid="test", item_tfms=Resize(size),
                                           batch_tfms=aug_transforms(), bs=64, num_workers=0)
    # The same offline weights as imgclf: load them into timm's model, hand fastai the module.
    weights = create_backbone(backbone).model.state_dict()

    def arch(pretrained: bool = True, **kwargs: object) -> torch.nn.Module:
        model = timm.create_model(backbone, pretrained=False, num_classes=0, **kwargs)
        model.load_state_dict(weights, strict=False)
        return model

    learn = vision_learner(loaders, arch, metrics=accuracy, pretrained=True, n_out=len(loaders.vocab))
    # fine_tune's two stages, written out so the unfrozen epochs can be sized to `minutes`:
    # fine_tune(epochs, base_lr=2e-3, freeze_epochs=1) = one frozen fit_one_cycle at 2e-3, then
    # unfreeze and fit_one_cycle(epochs, slice(1e-3 / 100, 1e-3)).
    learn.fit_one_cycle(1, slice(2e-3))
    epoch_s = time.perf_counter() - start
    left = minutes * 60 - epoch_s
    epochs = max(1, int(left / (epoch_s * 1.5)))  # an unfrozen epoch costs ~1.5x a frozen one
    learn.unfreeze()
    learn.fit_one_cycle(epochs, slice(1e-3 / 100, 1e-3))
    accuracy_value = float(learn.validate()[1])
    return {"tool": "fastai", "budget_min": minutes, "wall_min": (time.perf_counter() - start) / 60,
            "recipe": f"fine_tune 1+{epochs}", "size": size, "epochs": 1 + epochs, "accuracy": accuracy_value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[5, 15, 45], help="minutes")
    parser.add_argument("--per-class", type=int, help="use only this many images per class and split (smoke runs)")
    parser.add_argument("--fastai", action="store_true", help="also run the fastai baseline at each budget")
    parser.add_argument("--backbone", help="pass --backbone NAME to imgclf (default: none, so auto)")
    parser.add_argument("--out", default=str(CACHE / "budget-runs"))
    parser.add_argument("extra", nargs="*", help="more imgclf train flags, after --")
    args = parser.parse_args()
    data = ensure_data()
    if args.per_class:
        data = small_copy(data, args.per_class)
    rows = []
    for budget in args.budgets:
        row = run_imgclf(data, budget, Path(args.out) / f"budget-{budget:g}",
                         [*(["--backbone", args.backbone] if args.backbone else []), *args.extra])
        rows.append(row)
        if args.fastai:
            # the backbone the imgclf run trained, so both tools fine-tune the same network
            baseline = run_fastai(data, row["wall_min"], int(row["size"]), str(row["backbone"]))  # type: ignore[arg-type]
            if baseline:
                rows.append(baseline)
    print(f"\nCIFAR-10 JPEG{f' ({args.per_class} per class)' if args.per_class else ''}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    print("| tool | budget | wall time | overrun | recipe | input | epochs | test accuracy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        overrun = 100 * (r["wall_min"] / r["budget_min"] - 1)  # type: ignore[operator]
        print(f"| {r['tool']} | {r['budget_min']:g} min | {r['wall_min']:.1f} min | {overrun:+.0f}% | "
              f"{r['recipe']} | {r['size']} px | {r['epochs']} | {r['accuracy']:.4f} |")


if __name__ == "__main__":
    main()
