"""Does `imgclf rank` pick better images to label than chance? CIFAR-10, 500 -> 3,000 labels.

Not a test: minutes once the features are cached (the label-noise benchmark caches the same ones).
A fixed pool of 10,000 CIFAR-10 training images (1,000 per class) and the 10,000 test images are
embedded once with lite0 at 224 px, through the feature cache. Each run starts from 500 labelled
images drawn at random (per seed), then adds 500 at a time up to 3,000, chosen

- `random`: at random from the rest of the pool;
- `margin`: the 500 with the smallest margin between the two most probable classes (uncertainty
  alone, `select_to_label(..., pool_factor=1)`);
- `rank`: what `imgclf rank` picks (`select_to_label` with its defaults: margin, then k-means
  into 500 clusters of the 3 x 500 most uncertain, the most uncertain of each);
- `rank-kcenter`: the same with k-center greedy instead of k-means.

After each step a linear probe (`training.probe.fit_logistic`, L2 `L2`, the same head as
`train --recipe probe`) is fitted on the labelled images and scored on the test set. Three seeds;
the table gives the mean test accuracy (and the spread over seeds) per step and strategy.

Usage:
    python benchmarks/active_learning.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cifar10 import CACHE, ensure_data, first_per_class  # noqa: E402

START, STEP, END = 500, 500, 3000
# One L2 strength for every fit and strategy: the probe's choice on 10,000 CIFAR-10 images at 224 px
# (the label-noise benchmark's first fold) was 0.1.
L2 = 0.1


def features() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pool features, pool labels, test features, test labels), lite0 at 224 px, from the cache."""
    from imgclf.data.dataset import ImageSet
    from imgclf.review.features import Embedder, embed_images

    data = ensure_data()
    pool_dir = first_per_class(data, {"train": 1000}, CACHE / "label-noise-images") / "train"
    embedder = Embedder.pretrained("tf_efficientnet_lite0", image_size=224)
    out = []
    for folder in (pool_dir, data / "test"):
        classes = sorted(p.name for p in folder.iterdir())
        files = [(str(f), i) for i, c in enumerate(classes) for f in sorted((folder / c).iterdir())]
        images = ImageSet(paths=[f for f, _ in files], labels=np.asarray([i for _, i in files], dtype=np.int64))
        emb = embed_images(images, embedder, desc=folder.name)
        out += [emb.features, images.labels[emb.positions]]
    return out[0], out[1], out[2], out[3]


def fit_and_score(x: np.ndarray, y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                  ) -> tuple[float, torch.nn.Linear]:
    from imgclf.training.probe import fit_logistic

    head = fit_logistic(torch.from_numpy(x), torch.from_numpy(y), 10, l2=L2)
    with torch.no_grad():
        accuracy = float((head(torch.from_numpy(test_x)).argmax(1).numpy() == test_y).mean())
    return accuracy, head


def run(strategy: str, seed: int, data: tuple[np.ndarray, ...]) -> list[float]:
    from imgclf.review.rank import select_to_label

    pool_x, pool_y, test_x, test_y = data
    rng = np.random.default_rng(seed)
    labelled = rng.choice(len(pool_x), START, replace=False)
    curve = []
    while True:
        accuracy, head = fit_and_score(pool_x[labelled], pool_y[labelled], test_x, test_y)
        curve.append(accuracy)
        if len(labelled) >= END:
            return curve
        rest = np.setdiff1d(np.arange(len(pool_x)), labelled)
        if strategy == "random":
            new = rng.choice(rest, STEP, replace=False)
        else:
            with torch.no_grad():
                probs = torch.softmax(head(torch.from_numpy(pool_x[rest])), dim=1).numpy()
            pool_factor = 1 if strategy == "margin" else 3
            diversity = "kcenter" if strategy == "rank-kcenter" else "kmeans"
            new = rest[select_to_label(probs, pool_x[rest], STEP, pool_factor=pool_factor, diversity=diversity)]
        labelled = np.concatenate([labelled, new])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=["random", "margin", "rank", "rank-kcenter"])
    args = parser.parse_args()
    started = time.perf_counter()
    data = features()
    print(f"features: pool {data[0].shape}, test {data[2].shape} ({time.perf_counter() - started:.0f} s)")
    curves = {s: np.array([run(s, seed, data) for seed in args.seeds]) for s in args.strategies}
    sizes = list(range(START, END + 1, STEP))
    print("\n| labelled | " + " | ".join(args.strategies) + " |")
    print("|---" * (len(args.strategies) + 1) + "|")
    for j, n in enumerate(sizes):
        cells = [f"{curves[s][:, j].mean():.4f} ({curves[s][:, j].min():.4f}-{curves[s][:, j].max():.4f})"
                 for s in args.strategies]
        print(f"| {n} | " + " | ".join(cells) + " |")
    if "random" in curves:
        for s in (s for s in args.strategies if s != "random"):
            beats = [bool((curves[s][:, j] > curves["random"][:, j]).all()) for j in range(1, len(sizes))]
            print(f"{s} beats random on every seed at every step after the first: {all(beats)} {beats}")
    print(f"total {time.perf_counter() - started:.0f} s (seeds {args.seeds})")


if __name__ == "__main__":
    main()
