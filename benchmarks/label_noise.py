"""How well `imgclf review` finds flipped labels: CIFAR-10, 10,000 training images, 5% and 10% flipped.

Not a test: it takes tens of minutes the first time (features), minutes after. It needs the
CIFAR-10 JPEGs (benchmarks/cifar10.py unzips them into ~/.cache/imgclf-bench/cifar10) and writes
its manifests and outputs under ~/.cache/imgclf-bench/label-noise.

Three parts, each printing a table:

1. Levers (in-process, the library functions `imgclf review` calls): per feature set (lite0 at
   224 px, with its mirror, lite1/lite2, ensembles of them) and per cleanlab method, the precision at
   N = number of flips, and the precision and recall of the flagged set against the flips.
2. The command itself (`imgclf review MANIFEST --json`, a separate process) with its defaults and
   with any flags given by --review-flags: precision and recall of label_issues.csv, and wall time
   first (empty feature cache, with --cold) and cached.
3. Retraining: `imgclf train --recipe probe` on the noisy labels, with `--exclude label_issues.csv`,
   and on the clean labels; accuracy on the untouched CIFAR-10 test set (10,000 images).

The flips: a fixed seed picks round(f x 10,000) images and gives each a different class, uniformly.

Usage:
    python benchmarks/label_noise.py                         # all parts, 5% and 10%
    python benchmarks/label_noise.py --parts levers --features lite0 lite0-mirror
    python benchmarks/label_noise.py --parts cli retrain --review-flags="--mirror"
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cifar10 import CACHE, ensure_data, first_per_class  # noqa: E402

WORK = CACHE / "label-noise"
PER_CLASS = 1000  # 10 classes x 1,000 = 10,000 training images
SEED = 17
# feature set -> [(backbone, image size, mirror)]: an ensemble averages its members' probabilities
FEATURES = {
    "lite0": [("tf_efficientnet_lite0", 224, False)],
    "lite0-mirror": [("tf_efficientnet_lite0", 224, True)],
    "lite2": [("tf_efficientnet_lite2", 260, False)],
    "lite2-mirror": [("tf_efficientnet_lite2", 260, True)],
    "lite0+lite2": [("tf_efficientnet_lite0", 224, False), ("tf_efficientnet_lite2", 260, False)],
    "lite0+lite2-mirror": [("tf_efficientnet_lite0", 224, True), ("tf_efficientnet_lite2", 260, True)],
}
METHODS = [  # (filter_by, rank_by, count)
    ("prune_by_noise_rate", "self_confidence", "cleanlab"),
    ("prune_by_noise_rate", "normalized_margin", "cleanlab"),
    ("both", "self_confidence", "cleanlab"),
    ("confident_learning", "self_confidence", "cleanlab"),
    ("predicted_neq_given", "self_confidence", "cleanlab"),
    ("prune_by_noise_rate", "self_confidence", "estimate"),
    ("prune_by_noise_rate", "normalized_margin", "estimate"),
]


def make_manifests(noise: float) -> tuple[Path, Path, Path, set[str]]:
    """(review manifest: noisy train rows; train manifest: noisy train + test rows; clean train + test
    manifest; the flipped paths)."""
    data = ensure_data()
    train_dir = first_per_class(data, {"train": PER_CLASS}, CACHE / "label-noise-images") / "train"
    classes = sorted(p.name for p in train_dir.iterdir())
    rows = [(str(f.resolve()), c) for c in classes for f in sorted((train_dir / c).iterdir())]
    rng = np.random.default_rng(SEED)
    flipped_idx = rng.choice(len(rows), size=round(noise * len(rows)), replace=False)
    noisy = list(rows)
    for i in flipped_idx:
        others = [c for c in classes if c != rows[i][1]]
        noisy[i] = (rows[i][0], others[int(rng.integers(len(others)))])
    test = [(str(f.resolve()), c) for c in classes for f in sorted((data / "test" / c).iterdir())]
    folder = WORK / f"noise-{round(noise * 100)}"
    folder.mkdir(parents=True, exist_ok=True)

    def write(name: str, items: list[tuple[str, str]], test_rows: bool) -> Path:
        path = folder / name
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", "split"])
            writer.writerows((p, c, "train") for p, c in items)
            if test_rows:
                writer.writerows((p, c, "test") for p, c in test)
        return path

    return (write("review.csv", noisy, False), write("train.csv", noisy, True), write("clean.csv", rows, True),
            {rows[i][0] for i in flipped_idx})


def scores(flagged_ranked: list[str], flips: set[str]) -> dict[str, float]:
    """Precision at N (= number of flips), and precision and recall of the whole flagged set."""
    n = len(flips)
    hits = [p in flips for p in flagged_ranked]
    return {"p_at_n": float(np.mean(hits[:n])) if hits else 0.0,
            "precision": float(np.mean(hits)) if hits else 0.0,
            "recall": sum(hits) / n, "flagged": len(hits)}


def oof_probabilities(manifest: Path, members: list[tuple[str, int, bool]], rounds: int = 1) -> tuple[
        list[str], np.ndarray, np.ndarray, float]:
    """(paths, labels, averaged out-of-fold probabilities, seconds) for a feature set."""
    from imgclf.data.check import discover
    from imgclf.review.features import Embedder, embed_images
    from imgclf.review.label_review import ReviewSettings, label_issues

    found = discover(str(manifest))
    classes = sorted({e.label for e in found.entries})
    from imgclf.data.dataset import ImageSet

    images = ImageSet(paths=[e.path for e in found.entries],
                      labels=np.asarray([classes.index(e.label) for e in found.entries], dtype=np.int64))
    total = None
    start = time.perf_counter()
    for backbone, size, mirror in members:
        emb = embed_images(images, Embedder.pretrained(backbone, image_size=size), mirror=mirror, desc=backbone)
        assert len(emb.positions) == len(images), "every CIFAR JPEG decodes"
        probs, _ = label_issues(emb.features, images.labels, len(classes), ReviewSettings(rounds=rounds))
        total = probs if total is None else total + probs
    assert total is not None
    return images.paths, images.labels, total / len(members), time.perf_counter() - start


def levers(noise: float, feature_sets: list[str], rounds_list: list[int]) -> None:
    from imgclf.review.issues import find_label_issues

    review_csv, _, clean_csv, flips = make_manifests(noise)
    truth = {}
    with clean_csv.open() as f:
        for row in csv.DictReader(f):
            truth[row["path"]] = row["label"]
    print(f"\n## Levers, {noise:.0%} flipped ({len(flips)} flips)\n")
    print("| features | rounds | filter_by | rank_by | count | P@N | flagged | precision | recall | OOF acc (true) "
          "| s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, rounds in ((n, r) for n in feature_sets for r in rounds_list):
        paths, labels, probs, seconds = oof_probabilities(review_csv, FEATURES[name], rounds)
        classes = sorted(set(truth.values()))
        true = np.asarray([classes.index(truth[p]) for p in paths])
        oof_true = float((probs.argmax(1) == true).mean())
        for filter_by, rank_by, count in METHODS:
            issues = find_label_issues(labels, probs, filter_by=filter_by, rank_by=rank_by, count=count)
            s = scores([paths[i] for i in issues.ranked], flips)
            print(f"| {name} | {rounds} | {filter_by} | {rank_by} | {count} | {s['p_at_n']:.3f} | {s['flagged']} | "
                  f"{s['precision']:.3f} | {s['recall']:.3f} | {oof_true:.4f} | {seconds:.0f} |", flush=True)


def run_json(cmd: list[str], env: dict[str, str] | None = None) -> tuple[dict, float]:
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env)
    return json.loads(done.stdout), time.perf_counter() - start


def imgclf(*args: str) -> list[str]:
    return [sys.executable, "-m", "imgclf", *args]


def read_flagged(path: Path) -> list[str]:
    with path.open() as f:
        return [row["path"] for row in csv.DictReader(f) if row["kind"] == "label"]


def cli(noise: float, flags: list[str], cold: bool) -> Path:
    """Run `imgclf review` (cold first when asked, then cached); print its scores; return label_issues.csv."""
    review_csv, _, _, flips = make_manifests(noise)
    out = WORK / f"noise-{round(noise * 100)}" / ("review" + "".join(flags).replace("-", "_"))
    times = {}
    if cold:
        with tempfile.TemporaryDirectory(prefix="imgclf-cold-") as cache:
            env = {**os.environ, "IMGCLF_CACHE": cache}
            _, times["first"] = run_json(imgclf("review", str(review_csv), "--out", str(out), "--json", *flags), env)
    result, times["cached"] = run_json(imgclf("review", str(review_csv), "--out", str(out), "--json", *flags))
    s = scores(read_flagged(Path(result["files"]["label_issues_csv"])), flips)
    print(f"\n## imgclf review {' '.join(flags)}, {noise:.0%} flipped ({len(flips)} flips)\n")
    print("| P@N | flagged | precision | recall | counts | OOF acc (given) | first run s | cached s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {s['p_at_n']:.3f} | {s['flagged']} | {s['precision']:.3f} | {s['recall']:.3f} | {result['counts']} | "
          f"{result['oof_accuracy']:.4f} | {times.get('first', float('nan')):.0f} | {times['cached']:.0f} |",
          flush=True)
    return Path(result["files"]["label_issues_csv"])


def bundle_test_accuracy(out: Path) -> float:
    meta = json.loads((out / "imgclf.json").read_text())
    return float(meta["metrics"]["test"]["accuracy"])


def retrain(noise: float, issues_csv: Path) -> None:
    """Probe test accuracy: noisy labels, noisy labels with --exclude, clean labels."""
    _, train_csv, clean_csv, _ = make_manifests(noise)
    folder = WORK / f"noise-{round(noise * 100)}"
    common = ["--recipe", "probe", "--image-size", "224"]
    rows = []
    for name, data, extra in (("noisy", train_csv, []), ("noisy --exclude", train_csv, ["--exclude", str(issues_csv)]),
                              ("clean", clean_csv, [])):
        out = folder / f"bundle-{name.replace(' ', '').replace('-', '_')}"
        start = time.perf_counter()
        cmd = imgclf("train", str(data), "--out", str(out), *common, *extra)
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        rows.append((name, bundle_test_accuracy(out), time.perf_counter() - start))
    print(f"\n## Retrained probe, {noise:.0%} flipped: accuracy on the CIFAR-10 test set (10,000 images)\n")
    print("| labels | test accuracy | wall s |")
    print("|---|---|---|")
    for name, acc, seconds in rows:
        print(f"| {name} | {acc:.4f} | {seconds:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.10])
    parser.add_argument("--parts", nargs="+", default=["levers", "cli", "retrain"],
                        choices=["levers", "cli", "retrain"])
    parser.add_argument("--features", nargs="+", default=list(FEATURES), choices=list(FEATURES))
    parser.add_argument("--rounds", type=int, nargs="+", default=[1, 2], help="review's --rounds values to compare")
    parser.add_argument("--review-flags", default="", help="extra flags for imgclf review, e.g. '--mirror'")
    parser.add_argument("--cold", action="store_true", help="also time a first run with an empty feature cache")
    args = parser.parse_args()
    flags = args.review_flags.split()
    for noise in args.noise:
        if "levers" in args.parts:
            levers(noise, args.features, args.rounds)
        issues_csv = cli(noise, flags, args.cold and noise == args.noise[0]) if {"cli", "retrain"} & set(args.parts) \
            else None
        if "retrain" in args.parts and issues_csv is not None:
            retrain(noise, issues_csv)


if __name__ == "__main__":
    main()
