"""`imgclf similar BUNDLE IMAGE`: the images most like IMAGE, by cosine similarity of the bundle's features.

The images searched are, in this order: `--in` (a DATA folder or CSV, image files, or an
embeddings file from `imgclf embed`), else the bundle's own index (`BUNDLE/index.npy`), else the
data the bundle was trained on. Features go through the feature cache, so a second search over the
same folder computes only the query.

Search is exact (one matrix product) below `INDEX_MIN` images; from there a faiss HNSW graph
(Malkov & Yashunin 2018) answers in well under a millisecond a query, at a recall near 1 for
top-10 at the settings below (faiss's own benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.bundle import Model
from imgclf.errors import BundleError, DataError
from imgclf.files import weights_digest
from imgclf.progress import log
from imgclf.review.embed import INDEX_FILE, EmbeddingSet, embed_files, load_embeddings
from imgclf.review.features import Embedder, embed_images, unlabelled

INDEX_MIN = 20_000  # below this many images an exact search is as fast as building a graph
HNSW_NEIGHBOURS = 32  # faiss IndexHNSWFlat's M: links per node
HNSW_SEARCH_DEPTH = 128  # efSearch: candidates kept while searching (recall vs time)


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


class SimilarityIndex:
    """Cosine nearest neighbours over a set of features: exact when small, faiss HNSW when large.

    Example:
        >>> index = SimilarityIndex(np.eye(3, dtype=np.float32), ["a", "b", "c"])
        >>> [p for p, _ in index.search(np.array([1.0, 0.1, 0.0]), 2)]
        ['a', 'b']
    """

    def __init__(self, features: np.ndarray, paths: list[str], *, labels: list[str] | None = None,
                 index_min: int = INDEX_MIN) -> None:
        self.features = _normalise(features)
        self.paths = list(paths)
        self.labels = labels
        self.kind = "exact"
        self._faiss: Any = None
        if len(paths) >= index_min:
            import faiss

            graph = faiss.IndexHNSWFlat(self.features.shape[1], HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efSearch = HNSW_SEARCH_DEPTH
            graph.add(self.features)
            self._faiss, self.kind = graph, "faiss hnsw"

    def search(self, query: np.ndarray, top_k: int = 10) -> list[tuple[str, float]]:
        """(path, cosine similarity) of the `top_k` most similar images, most similar first."""
        q = _normalise(query.reshape(1, -1))
        k = min(top_k, len(self.paths))
        if self._faiss is not None:
            scores, rows = self._faiss.search(q, k)
            return [(self.paths[int(r)], float(s)) for r, s in zip(rows[0], scores[0], strict=True) if r >= 0]
        similarity = self.features @ q[0]
        order = np.argsort(-similarity, kind="stable")[:k]
        return [(self.paths[int(r)], float(similarity[r])) for r in order]


@dataclass
class Neighbour:
    path: str
    similarity: float
    label: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "similarity": round(self.similarity, 6), "label": self.label}


def index_for(model: Model, bundle: str | Path, within: str | None = None) -> SimilarityIndex:
    """The index `similar` searches for `model` (see the module's docstring for the order).

    Raises:
        BundleError: an embeddings file made by another network or weights than the bundle's.

    Example:
        >>> index = index_for(imgclf.load("runs/pets"), "runs/pets", "photos/")  # doctest: +SKIP
    """
    own = Path(bundle) / INDEX_FILE
    if within is None and own.is_file():
        within = str(own)
    if within is None:
        within = model.info.data_source or None
        if within is None or not Path(within).exists():
            raise DataError(f"the bundle {str(bundle)!r} has no index and its training data is not at hand",
                            fix=f"pass --in DATA, or build one: imgclf embed DATA --bundle {bundle} --out {own}")
    if within.lower().endswith(".npy"):
        found = load_embeddings(within)
        check_same_network(found, model, within)
    else:
        found = embed_files([within], bundle=str(bundle))
    log(f"similar: searching {len(found.paths)} images ({within})")
    return SimilarityIndex(found.features, found.paths, labels=found.labels)


def check_same_network(found: EmbeddingSet, model: Model, file: str) -> None:
    """Raise BundleError unless `found` was made by this bundle's backbone (same weights, same size)."""
    network, weights = model.info.backbone.timm_name, weights_digest(model.module.backbone)
    size = model.preprocessing.image_size
    if (found.meta.get("network"), found.meta.get("weights"), found.meta.get("image_size")) != (network, weights, size):
        raise BundleError(
            f"the embeddings in {file!r} were made by {found.meta.get('source')} "
            f"({found.meta.get('network')}, {found.meta.get('image_size')} px), not by this bundle "
            f"({network}, {size} px): their features cannot be compared",
            expected="embeddings made with this bundle (imgclf embed DATA --bundle BUNDLE)",
            fix=f"rebuild them: imgclf embed DATA --bundle BUNDLE --out {file}",
        )


def similar_images(
    bundle: str | Path, image: str | Path, *, within: str | None = None, top_k: int = 10,
    index: SimilarityIndex | None = None, model: Model | None = None,
) -> list[Neighbour]:
    """The `top_k` images most like `image`, most similar first.

    Example:
        >>> [n.path for n in similar_images("runs/pets", "query.jpg", within="photos/", top_k=3)]  # doctest: +SKIP
        ['photos/cat/12.jpg', 'photos/cat/7.jpg', 'photos/dog/3.jpg']
    """
    if top_k < 1:
        raise DataError(f"--top-k must be at least 1, got {top_k}")
    model = model or Model.load(bundle)
    index = index or index_for(model, bundle, within)
    query = embed_images(unlabelled([str(image)]), Embedder.from_bundle(model, str(bundle)), desc="query")
    labels = dict(zip(index.paths, index.labels, strict=True)) if index.labels else {}
    return [Neighbour(p, s, labels.get(p)) for p, s in index.search(query.features[0], top_k)]
