"""`imgclf predict` on a folder of 1,000 images against plain fp32 PyTorch on the same model.

Not a test. It unzips ../shared/data/cifar10-jpg.zip into ~/.cache/imgclf-bench once, copies the
first 100 test images of each class into a folder, and runs, each as its own process:

- `imgclf predict BUNDLE FOLDER --format csv` (the default, fast path), which logs
  "1000 image(s) in S s (R img/s) on RUNTIME, after P s to prepare it";
- the plain baseline (`--plain`): load the same bundle, decode the same files with the same
  preprocessing, run `model.module` in fp32 (contiguous memory, no autocast) in batches of 64.

Prints images/s (decoding and inference, the model already built) and whole-process wall time,
and the share of top-1 labels on which both agree. BUNDLE defaults to the CIFAR-10 fine-tuning
bundle of benchmarks/cifar10.py (`~/.cache/imgclf-bench/runs/finetune`).

Usage:
    python benchmarks/predict_speed.py [--bundle DIR] [--images 1000]
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10 import CACHE, ensure_data  # noqa: E402

RATE_LINE = re.compile(r"(\d+) image\(s\) in ([\d.]+) s \(([\d.]+) img/s\) on (\w+), after ([\d.]+) s")


def image_folder(count: int) -> Path:
    """`count` CIFAR-10 test JPEGs (the same share of every class), copied once."""
    folder = CACHE / f"predict-{count}"
    if not folder.is_dir():
        test = ensure_data() / "test"
        classes = sorted(p for p in test.iterdir() if p.is_dir())
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for class_dir in classes:
            for f in sorted(class_dir.iterdir())[: count // len(classes)]:
                shutil.copy(f, partial / f"{class_dir.name}_{f.name}")
        partial.rename(folder)
    return folder


def plain(bundle: str, folder: str, batch_size: int) -> None:
    """The baseline, run in its own process: prints `rate <img/s>`, then `<file>,<label>` lines."""
    import numpy as np
    import torch

    import imgclf
    from imgclf.data.dataset import ImageSet
    from imgclf.data.pipeline import ImageStore, normalize

    model = imgclf.load(bundle)
    net = model.module.eval().to(memory_format=torch.contiguous_format)
    files = sorted(str(p) for p in Path(folder).iterdir())
    start = time.perf_counter()
    store = ImageStore.decode(ImageSet(files, np.zeros(len(files), dtype=np.int64)), model.preprocessing,
                       memory_budget=2**30, description="decode")
    labels: list[int] = []
    with torch.inference_mode():
        for _, batch in store.batches(np.arange(len(store)), batch_size):
            labels += net(normalize(batch, model.preprocessing).contiguous()).argmax(1).tolist()
    seconds = time.perf_counter() - start
    print(f"rate {len(files) / seconds:.2f}")
    for file, label in zip(files, labels, strict=True):
        print(f"{file},{model.classes[label]}")


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(CACHE / "runs" / "finetune"))
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--plain", nargs=2, metavar=("BUNDLE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        plain(*args.plain, args.batch_size)
        return
    folder = image_folder(args.images)
    rows = []
    for _ in range(2):  # the machine's speed drifts: two rounds, alternating
        wall, done = timed([sys.executable, "-m", "imgclf", "predict", args.bundle, str(folder), "--format", "csv",
                            "--batch-size", str(args.batch_size)])
        match = RATE_LINE.search(done.stderr)
        if match is None:
            raise SystemExit(f"no rate line in imgclf predict's log:\n{done.stderr[-2000:]}")
        fast = {row["source"]: row["label"] for row in csv.DictReader(io.StringIO(done.stdout)) if row["rank"] == "1"}
        rows.append((f"imgclf predict ({match[4]})", float(match[3]), wall, float(match[5])))
        wall, done = timed([sys.executable, __file__, "--plain", args.bundle, str(folder),
                            "--batch-size", str(args.batch_size)])
        lines = done.stdout.splitlines()
        rate = float(lines[0].split()[1])
        reference = dict(line.rsplit(",", 1) for line in lines[1:])
        rows.append(("plain PyTorch fp32", rate, wall, float("nan")))
    agree = sum(fast[f] == reference[f] for f in reference) / len(reference)
    print(f"\n{args.images} CIFAR-10 test JPEGs, bundle {args.bundle}, batch {args.batch_size}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| command | img/s (decode + inference) | wall s (whole process) | of which: building the runtime |")
    print("| --- | --- | --- | --- |")
    for name, rate, wall, prepare in rows:
        print(f"| {name} | {rate:.1f} | {wall:.1f} | {'' if prepare != prepare else f'{prepare:.1f} s'} |")
    fast_rate = sum(r for n, r, _, _ in rows if n.startswith("imgclf")) / 2
    plain_rate = sum(r for n, r, _, _ in rows if n.startswith("plain")) / 2
    fast_wall = sum(w for n, _, w, _ in rows if n.startswith("imgclf")) / 2
    plain_wall = sum(w for n, _, w, _ in rows if n.startswith("plain")) / 2
    print(f"\nimages/s: {fast_rate / plain_rate:.2f}x plain fp32; whole process: {plain_wall / fast_wall:.2f}x; "
          f"top-1 labels agree on {agree:.1%} of the images")


if __name__ == "__main__":
    main()
