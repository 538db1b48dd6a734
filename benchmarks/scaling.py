"""Probe feature extraction with 1 and N torchrun processes on one machine: images/s and speedup.

What is timed is the probe's feature pass as `imgclf train --recipe probe --no-feature-cache`
runs it under torchrun: each process streams (decodes) its block of the images, runs the frozen
backbone on them (OpenVINO where installed) and the features are all-gathered to every process
(`feature_cache.cached_features(..., shard=True)`). The frozen network is built and warmed up
before the clock starts (OpenVINO converts it once per process, ~5 s for lite0), and the clock
stops when every process has all the features.

Speedup is relative to ONE process using ALL the cores (the plain `imgclf train` run). On one
machine the processes share those cores, so the ideal is 1.0: the table shows what splitting the
cores between processes gains or loses (the decode threads and the network run side by side in
separate processes instead of in one). Across GPUs or machines each process brings its own
hardware and the ideal is N (then per-process efficiency = speedup / N).

Usage (the lead runs the full size; a smoke run takes ~1 min):
    python benchmarks/scaling.py --images 5000            # 1 and 2 processes, CIFAR-10 JPEGs
    python benchmarks/scaling.py --images 200 --processes 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path.home() / ".cache" / "imgclf-bench" / "cifar10" / "train"


def worker(args: argparse.Namespace) -> None:
    """One torchrun process: extract features of the first `--images` of a shuffled image folder."""
    import numpy as np
    import torch

    from imgclf import distributed
    from imgclf.data.pipeline import ImageStore, Preprocessing
    from imgclf.data.sources import load_dataset
    from imgclf.models.backbones import create_backbone
    from imgclf.runtime import FrozenForward
    from imgclf.training.feature_cache import cached_features

    with distributed.session(torch.device("cpu")):
        dataset = load_dataset(str(args.data), val_fraction=0.1, seed=0)
        picks = np.random.default_rng(0).permutation(len(dataset.train))[: args.images]
        images = dataset.train.subset(np.sort(picks))
        backbone = create_backbone(args.backbone)
        config = backbone.data_config
        prep = Preprocessing(image_size=args.image_size, mean=tuple(config["mean"]), std=tuple(config["std"]),
                             interpolation=str(config.get("interpolation", "bicubic")))
        threads = torch.get_num_threads()
        # memory_budget 0: streamed from disk, as the probe reads its images.
        store = ImageStore.decode(images, prep, memory_budget=0, workers=distributed.cpu_cores())
        forward = FrozenForward(backbone.model, image_size=prep.image_size, device=torch.device("cpu"))
        forward(torch.zeros(args.batch_size, 3, prep.image_size, prep.image_size))  # warm-up
        distributed.agree(None)  # every process ready: start the clock together
        start = time.perf_counter()
        features, labels, _ = cached_features(forward, store, cache=None, batch_size=args.batch_size,
                                           desc="features", shard=True)
        seconds = distributed.agree(time.perf_counter() - start)  # rank 0 ends after its gather
        if distributed.is_main():
            Path(args.result).write_text(json.dumps({
                "processes": distributed.world_size(), "threads": threads, "images": int(len(labels)),
                "feature_dim": int(features.shape[1]), "seconds": seconds, "runtime": forward.runtime,
            }))


def run(processes: int, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="imgclf-scaling-") as folder:
        result = Path(folder) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(processes), __file__, "--worker", "--result", str(result), "--data", str(args.data),
                   "--images", str(args.images), "--backbone", args.backbone, "--image-size",
                   str(args.image_size), "--batch-size", str(args.batch_size)]
        env = dict(os.environ, IMGCLF_PROGRESS="0")
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        return json.loads(result.read_text())  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="an image folder (class subfolders)")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=160, help="the probe's default for CIFAR's 32 px images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = [run(n, args) for n in args.processes]
    base = next((r for r in rows if r["processes"] == 1), None) or rows[0]
    base_rate = base["images"] / base["seconds"]
    print(f"{args.backbone} at {args.image_size} px, {args.images} images of {args.data}, "
          f"batch {args.batch_size}, {os.cpu_count()} cores, frozen forward on {rows[0]['runtime']}")
    print("speedup = images/s over that of 1 process using all the cores (ideal on one machine: 1.0)")
    print(f"{'processes':>9} {'threads/process':>15} {'images/s':>9} {'seconds':>8} {'speedup':>8}")
    for row in rows:
        rate = row["images"] / row["seconds"]
        speedup = rate / base_rate
        print(f"{row['processes']:>9} {row['threads']:>15} {rate:>9.1f} {row['seconds']:>8.1f} {speedup:>8.2f}")


if __name__ == "__main__":
    main()
