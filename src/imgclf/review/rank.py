"""`imgclf rank BUNDLE UNLABELLED_DIR`: which images to label next.

Uncertainty sampling with a diversity step:

1. The bundle's calibrated probabilities (its head on its backbone's features, divided by its
   temperature) give each image an uncertainty: `margin` (1 - (p1 - p2), the gap between the two
   most probable classes; Scheffer et al. 2001) or `entropy` (of the probabilities, over log C).
2. The most uncertain `POOL_FACTOR` x N images are candidates; k-means (scikit-learn) groups
   them into N clusters on the embeddings and each cluster gives its most uncertain image (as in
   Citovsky et al., "Batch Active Learning at Scale", NeurIPS 2021). So the top N are not 50
   near-copies of one confusing picture. k-center greedy (Sener & Savarese, "Core-Set", ICLR
   2018: each pick the candidate farthest from those picked) is the other choice; it reaches for
   outliers first, and lost to random early on in benchmarks/active_learning.py.

k-center greedy is written here (a dozen lines of numpy): the libraries that have it (e.g.
modAL, baal) bring a training framework with them.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgclf.bundle import Model
from imgclf.data.sources import collect_images
from imgclf.errors import ConfigError, DataError
from imgclf.files import atomic_write_text
from imgclf.progress import log
from imgclf.review.features import Embedder, embed_images, log_failed, unlabelled
from imgclf.review.page import ranking_page, thumbnails

METHODS = ("margin", "entropy")
# Candidates for the diversity step: the POOL_FACTOR x N most uncertain images. 1 would be
# uncertainty alone; larger trades uncertainty for coverage (measured in benchmarks/active_learning.py).
POOL_FACTOR = 3


def uncertainty(probabilities: np.ndarray, method: str = "margin") -> np.ndarray:
    """Per image, in [0, 1], higher = less sure: `margin` 1 - (p1 - p2), or `entropy` / log(C).

    Example:
        >>> uncertainty(np.array([[0.9, 0.1], [0.5, 0.5]])).round(2).tolist()
        [0.2, 1.0]
    """
    if method not in METHODS:
        raise ConfigError(f"unknown uncertainty {method!r}", expected=" or ".join(METHODS))
    if method == "entropy":
        p = np.clip(probabilities, 1e-12, 1.0)
        return -(p * np.log(p)).sum(1) / np.log(max(probabilities.shape[1], 2))
    top2 = np.sort(probabilities, axis=1)[:, -2:]
    return 1.0 - (top2[:, 1] - top2[:, 0])


def k_center_greedy(embeddings: np.ndarray, n: int, *, first: int = 0) -> np.ndarray:
    """`n` row indices of `embeddings`, each the farthest (cosine distance) from those picked before.

    Example:
        >>> k_center_greedy(np.array([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0]]), 2).tolist()
        [0, 2]
    """
    x = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    n = min(n, len(x))
    picked = [first]
    distance = 1.0 - x @ x[first]
    for _ in range(n - 1):
        distance[picked[-1]] = -np.inf  # never pick twice
        nxt = int(np.argmax(distance))
        picked.append(nxt)
        distance = np.minimum(distance, 1.0 - x @ x[nxt])
    return np.asarray(picked, dtype=np.int64)


def cluster_pick(embeddings: np.ndarray, scores: np.ndarray, n: int, *, seed: int = 0) -> np.ndarray:
    """`n` row indices: k-means (cosine) makes `n` clusters, and each gives its most uncertain member.

    Unlike k-center greedy, which reaches for the farthest points first (outliers, worth little
    to a classifier), every pick stands for a group of similar images.

    Example:
        >>> emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> sorted(cluster_pick(emb, np.array([0.2, 0.9, 0.5, 0.4]), 2).tolist())
        [1, 2]
    """
    from sklearn.cluster import KMeans

    x = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    n = min(n, len(x))
    clusters = KMeans(n_clusters=n, n_init=1, random_state=seed).fit_predict(x)
    picks = np.asarray([members[np.argmax(scores[members])]
                        for members in (np.flatnonzero(clusters == c) for c in range(n)) if len(members)])
    return picks[np.argsort(-scores[picks], kind="stable")]


def select_to_label(
    probabilities: np.ndarray, embeddings: np.ndarray, n: int, *, method: str = "margin",
    pool_factor: float = POOL_FACTOR, diversity: str = "kmeans",
) -> np.ndarray:
    """Indices of the `n` images to label next, most uncertain first (`diversity="kmeans"`) or in
    k-center greedy's order (`"kcenter"`).

    Example:
        >>> probs = np.array([[0.5, 0.5], [0.51, 0.49], [0.99, 0.01], [0.6, 0.4]])
        >>> emb = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.0, 1.0]])
        >>> select_to_label(probs, emb, 2, pool_factor=1.5).tolist()
        [0, 3]
    """
    if diversity not in ("kmeans", "kcenter"):
        raise ConfigError(f"unknown diversity {diversity!r}", expected="kmeans or kcenter")
    scores = uncertainty(probabilities, method)
    pool = np.argsort(-scores, kind="stable")[: max(n, int(round(pool_factor * n)))]
    if diversity == "kcenter":
        return pool[k_center_greedy(embeddings[pool], n)]
    return pool[cluster_pick(embeddings[pool], scores[pool], n)]


@dataclass
class RankResult:
    """The ranking `rank_images` wrote: `rows` in rank order."""

    rows: list[dict[str, Any]]
    csv: Path
    html: Path
    images: int
    unreadable: list[tuple[str, str]]
    seconds: float


def bundle_probabilities(model: Model, features: np.ndarray) -> np.ndarray:
    """The bundle's calibrated probabilities from its backbone's features (head, then / temperature).

    Example:
        >>> bundle_probabilities(imgclf.load("runs/pets"), features).shape  # doctest: +SKIP
        (120, 2)
    """
    with torch.no_grad():
        logits = model.module.head(torch.from_numpy(features).float())
    return torch.softmax(logits / model.temperature, dim=1).numpy()


def rank_images(
    bundle: str | Path, folder: str | Path, *, n: int = 100, out: str | Path = "ranking.csv", method: str = "margin",
) -> RankResult:
    """Rank the images of `folder` for labelling with `bundle`; write `out` (CSV) and the page next to it.

    Raises:
        DataError: no images in `folder`, or none readable. ConfigError: n < 1 or an unknown method.

    Example:
        >>> result = rank_images("runs/pets", "unlabelled/", n=50)  # doctest: +SKIP
        >>> result.rows[0]["path"]  # doctest: +SKIP
        'unlabelled/img_0412.jpg'
    """
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    uncertainty(np.ones((1, 2)) / 2, method)  # an unknown method fails before any work
    started = time.perf_counter()
    model = Model.load(bundle)
    files = collect_images([folder])
    images = unlabelled(files)
    embeddings = embed_images(images, Embedder.from_bundle(model, str(bundle)), desc="rank features")
    log_failed(embeddings.failed)
    probabilities = bundle_probabilities(model, embeddings.features)
    order = select_to_label(probabilities, embeddings.features, n, method=method)
    scores = uncertainty(probabilities, method)
    rows = [{"rank": r + 1, "path": str(Path(images.paths[embeddings.positions[i]]).resolve()),
             "guess": model.classes[int(probabilities[i].argmax())], "probability": float(probabilities[i].max()),
             "uncertainty": float(scores[i])} for r, i in enumerate(order)]
    csv_path, html_path = _write(rows, Path(out), folder=str(folder), method=method, total=len(embeddings.positions))
    log(f"rank: {len(rows)} of {len(embeddings.positions)} images to label next ({method} + k-center greedy)")
    return RankResult(rows, csv_path, html_path, len(embeddings.positions), embeddings.failed,
                      time.perf_counter() - started)


def _write(rows: list[dict[str, Any]], out: Path, *, folder: str, method: str, total: int) -> tuple[Path, Path]:
    if out.suffix.lower() != ".csv":
        raise DataError(f"--out {str(out)!r} is not a .csv file", fix="pass --out ranking.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["rank", "path", "guess", "probability", "uncertainty"])
    writer.writerows([r["rank"], r["path"], r["guess"], f"{r['probability']:.6f}", f"{r['uncertainty']:.6f}"]
                     for r in rows)
    atomic_write_text(out, buffer.getvalue())
    pictures = thumbnails([r["path"] for r in rows])
    html_path = out.with_suffix(".html")
    summary = f"{len(rows)} of {total} images in {folder}, most useful to label first ({method} + diversity)"
    atomic_write_text(html_path, ranking_page([{**r, "thumbnail": t} for r, t in zip(rows, pictures, strict=True)],
                                              title="imgclf rank: what to label next", summary=summary))
    return out, html_path
