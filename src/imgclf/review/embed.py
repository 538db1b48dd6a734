"""`imgclf embed DATA|PATHS --out FILE`: the features of images, to use anywhere (and `similar`'s index).

FILE is either

- `NAME.npy`: an N x D float32 array, with `NAME.json` beside it: the paths (row order), labels and
  classes when DATA has them, and what made the features (network, weights digest, input size);
- `NAME.parquet` (needs pandas and pyarrow): one row per image, `path`, `label` and `embedding`,
  with the same description in the file's metadata.

`imgclf embed DATA --bundle DIR --out DIR/index.npy` gives a bundle an index: `similar` and the
served page's "similar images" panel use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.bundle import Model
from imgclf.config import DEFAULT_BACKBONE
from imgclf.data.dataset import ImageSet
from imgclf.data.sources import collect_images
from imgclf.errors import DataError
from imgclf.files import atomic_write, atomic_write_text
from imgclf.progress import log
from imgclf.review.features import Embedder, describe, embed_images, log_failed, unlabelled

FORMAT = "imgclf-embeddings"
FORMAT_VERSION = 1
INDEX_FILE = "index.npy"  # a bundle's own index: BUNDLE/index.npy (+ index.json)


@dataclass
class EmbeddingSet:
    """Features with their paths (row order), labels if any, and what made them."""

    features: np.ndarray  # N x D float32
    paths: list[str]
    labels: list[str] | None
    meta: dict[str, Any]  # describe(...): network, source, weights, image_size, mirror


def images_of(inputs: list[str]) -> tuple[ImageSet, list[str] | None]:
    """(the images, class names or None): a labelled DATA (one folder of class folders or a CSV manifest)
    keeps its labels; files and plain folders have none.

    Example:
        >>> images, classes = images_of(["photos/"])  # doctest: +SKIP
    """
    from imgclf.data.check import discover

    if len(inputs) == 1:
        try:
            found = discover(inputs[0])
        except DataError:
            found = None
        if found is not None and found.entries:
            classes = sorted({e.label for e in found.entries})
            index = {c: i for i, c in enumerate(classes)}
            return ImageSet(paths=[e.path for e in found.entries],
                            labels=np.asarray([index[e.label] for e in found.entries], dtype=np.int64)), classes
    return unlabelled(collect_images(list(inputs))), None


def embed_files(
    inputs: list[str], *, bundle: str | None = None, backbone: str = DEFAULT_BACKBONE, image_size: int | None = None,
    mirror: bool = False,
) -> EmbeddingSet:
    """Embed DATA or image paths with a bundle's backbone (`bundle`) or a pretrained one.

    Example:
        >>> found = embed_files(["photos/"], bundle="runs/pets")  # doctest: +SKIP
        >>> found.features.shape  # doctest: +SKIP
        (240, 1280)
    """
    images, classes = images_of(inputs)
    embedder = (Embedder.from_bundle(Model.load(bundle), bundle) if bundle
                else Embedder.pretrained(backbone, image_size=image_size, images=images))
    embeddings = embed_images(images, embedder, mirror=mirror, desc="embed")
    log_failed(embeddings.failed)
    paths = [str(Path(images.paths[i]).resolve()) for i in embeddings.positions]
    labels = [classes[int(images.labels[i])] for i in embeddings.positions] if classes else None
    meta = {**describe(embedder, mirror=mirror), "failed": [{"path": p, "reason": r} for p, r in embeddings.failed]}
    return EmbeddingSet(embeddings.features, paths, labels, meta)


def save_embeddings(found: EmbeddingSet, out: str | Path) -> Path:
    """Write `found` as .npy (+ .json) or .parquet, atomically; returns the main file.

    Example:
        >>> save_embeddings(embed_files(["photos/"]), "photos.npy")  # doctest: +SKIP
        PosixPath('photos.npy')
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    description = {"format": FORMAT, "format_version": FORMAT_VERSION, **found.meta,
                   "count": len(found.paths), "dimensions": int(found.features.shape[1])}
    if out.suffix.lower() == ".parquet":
        _save_parquet(found, out, description)
    elif out.suffix.lower() == ".npy":
        atomic_write(out, lambda temp: _save_npy(temp, found.features))
        atomic_write_text(out.with_suffix(".json"), json.dumps({**description, "paths": found.paths,
                                                                "labels": found.labels}, indent=1))
    else:
        raise DataError(f"--out {str(out)!r} has an unknown suffix", expected=".npy or .parquet",
                        fix="pass --out embeddings.npy")
    log(f"embed: {len(found.paths)} x {found.features.shape[1]} features ({found.meta['source']}) -> {out}")
    return out


def _save_npy(path: Path, features: np.ndarray) -> None:
    with path.open("wb") as f:  # a file object: np.save would add ".npy" to the temporary name
        np.save(f, features, allow_pickle=False)


def _save_parquet(found: EmbeddingSet, out: Path, description: dict[str, Any]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("writing parquet needs pyarrow", fix="pip install pyarrow, or pass --out FILE.npy") from None
    labels: list[str | None] = list(found.labels) if found.labels else [None] * len(found.paths)
    table = pa.table({"path": found.paths, "label": labels,
                      "embedding": list(found.features)})
    table = table.replace_schema_metadata({"imgclf": json.dumps(description)})
    atomic_write(out, lambda temp: pq.write_table(table, str(temp)))


def load_embeddings(file: str | Path) -> EmbeddingSet:
    """Read a .npy (+ .json) file that `save_embeddings` wrote.

    Raises:
        DataError: missing, unreadable, or not written by imgclf embed.

    Example:
        >>> load_embeddings("runs/pets/index.npy").features.shape  # doctest: +SKIP
        (240, 1280)
    """
    file = Path(file)
    sidecar = file.with_suffix(".json")
    if file.suffix.lower() != ".npy" or not file.is_file() or not sidecar.is_file():
        raise DataError(f"{str(file)!r} is not an embeddings file of imgclf embed",
                        expected="NAME.npy with NAME.json beside it (imgclf embed DATA --out NAME.npy)",
                        fix="run imgclf embed first, or pass a DATA folder")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        features = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {str(file)!r}: {exc}", fix="run imgclf embed again") from None
    if meta.get("format") != FORMAT or len(meta.get("paths", [])) != len(features):
        raise DataError(f"{str(sidecar)!r} does not describe {str(file)!r}", fix="run imgclf embed again")
    return EmbeddingSet(features.astype(np.float32), list(meta["paths"]), meta.get("labels"), meta)
