"""Frozen features (embeddings) of image files, through the feature cache.

Every command of this package starts here: `review` embeds DATA with a pretrained backbone (or a
bundle's), `rank`, `embed` and `similar` with a bundle's backbone. The features go through
`training.feature_cache`, so a second run on unchanged images computes nothing (the same cache as
`train --recipe probe` and `compare`: features a probe computed are reused here, and the other way
round).

`mirror=True` averages each image's features with those of its horizontal mirror (test-time
augmentation). The mirrored pass is cached under its own key: the backbone name gets a `|hflip`
suffix, and the flip is part of the network that runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgclf.bundle import Model
from imgclf.data.dataset import ImageSet
from imgclf.data.pipeline import ImageStore, Preprocessing
from imgclf.errors import DataError
from imgclf.models.backbones import create_backbone
from imgclf.progress import log
from imgclf.runtime import FrozenForward, compute_dtype, pick_device
from imgclf.training.feature_cache import LazyForward, cache_for, cached_features

# Decoded images stay in memory up to this many bytes (uint8, 3 x S x S each), else they stream:
# 2,000 CIFAR images at 224 px are 300 MB.
MEMORY_BUDGET = 2**30


class _Mirrored(nn.Module):
    """`module` applied to the horizontally flipped input (width is the last axis of N x 3 x H x W)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(torch.flip(x, dims=[3]))


@dataclass(frozen=True)
class Embedder:
    """A frozen network that maps images to feature vectors, with what identifies it.

    Build one with `Embedder.pretrained(name, image_size)` or `Embedder.from_bundle(model)`.

    Example:
        >>> embedder = Embedder.pretrained("tf_efficientnet_lite0", image_size=224)  # doctest: +SKIP
        >>> features = embed_images(images, embedder)  # doctest: +SKIP
    """

    name: str  # the timm architecture, for the cache key and messages
    module: nn.Module
    prep: Preprocessing
    source: str  # "pretrained NAME" or "bundle DIR": what the features come from, for files and messages

    @classmethod
    def pretrained(cls, name: str, *, image_size: int | None = None, images: ImageSet | None = None) -> Embedder:
        """A pretrained backbone at `image_size`, or (None) the size the probe would use for `images`:
        the backbone's own, less for small images (`training.run.choose_image_size`)."""
        from imgclf.training.run import choose_image_size, median_short_side

        backbone = create_backbone(name)
        if image_size is None:
            native = int(backbone.data_config["input_size"][-1])
            side = median_short_side(images) if images is not None else None
            image_size = choose_image_size(native, side, "probe", pick_device("auto"))
        prep = Preprocessing.from_data_config(backbone.data_config, image_size)
        return cls(backbone.entry.timm_name, backbone.model, prep, f"pretrained {name} at {image_size} px")

    @classmethod
    def from_bundle(cls, model: Model, source: str = "") -> Embedder:
        """The bundle's backbone at the bundle's preprocessing (its features are what its head reads)."""
        return cls(model.info.backbone.timm_name, model.module.backbone, model.preprocessing,
                   f"bundle {source}" if source else "bundle")


@dataclass
class Embeddings:
    """Features of the readable images of an `ImageSet`: `positions` are their places in it."""

    features: np.ndarray  # N x D float32
    positions: np.ndarray  # N int64
    failed: list[tuple[str, str]]  # (path, reason) of the images that could not be decoded


def embed_images(
    images: ImageSet, embedder: Embedder, *, mirror: bool = False, batch_size: int = 64, precision: str = "auto",
    desc: str = "features",
) -> Embeddings:
    """Features of every readable image of `images`, from the feature cache where they are there.

    Args:
        images: the files (labels are carried along, not used).
        embedder: the network.
        mirror: average with the mirrored image's features (2 passes the first time).
        batch_size: images per forward pass.
        precision: "auto" (bf16 where native), "fp32" or "bf16"; part of the cache key.
        desc: the progress bar's and the log line's name.

    Raises:
        DataError: no image could be decoded.

    Example:
        >>> emb = embed_images(ImageSet(paths=["a.jpg"], labels=np.zeros(1, int)), embedder)  # doctest: +SKIP
        >>> emb.features.shape  # doctest: +SKIP
        (1, 1280)
    """
    device = pick_device("auto")
    dtype = compute_dtype(device, precision)
    store = ImageStore.decode(images, embedder.prep, memory_budget=MEMORY_BUDGET, description=f"decode ({desc})")
    if not len(store):
        shown = "; ".join(f"{p}: {why}" for p, why in store.failed[:5])
        raise DataError(f"none of the {len(images)} image(s) could be decoded ({shown})",
                        fix="run `imgclf check DATA` and repair or replace the files it lists")
    passes = [(embedder.name, embedder.module)] + ([(f"{embedder.name}|hflip", _Mirrored(embedder.module))]
                                                   if mirror else [])
    total: torch.Tensor | None = None
    positions = np.zeros(0, dtype=np.int64)
    for name, module in passes:
        cache = cache_for(backbone_name=name, module=module, prep=embedder.prep, dtype=dtype)
        forward = LazyForward(functools.partial(FrozenForward, module, image_size=embedder.prep.image_size,
                                                device=device, precision=precision, keep_converted=True))
        label = f"{desc}{' (mirrored)' if name.endswith('|hflip') else ''}"
        features, _, positions = cached_features(forward, store, cache=cache, batch_size=batch_size, desc=label)
        total = features if total is None else total + features
    if total is None:  # unreachable: `passes` is never empty
        raise RuntimeError("no feature pass ran")
    kept = _store_positions(images, store, positions)
    return Embeddings((total / len(passes)).numpy().astype(np.float32), kept, list(store.failed))


def _store_positions(images: ImageSet, store: ImageStore, positions: np.ndarray) -> np.ndarray:
    """Positions in `store` -> positions in `images` (an in-memory store drops unreadable images up front)."""
    if len(store.images) == len(images):
        return positions.astype(np.int64)
    where = {p: i for i, p in enumerate(images.paths)}
    return np.asarray([where[store.images.paths[int(j)]] for j in positions], dtype=np.int64)


def unlabelled(paths: list[str] | list[Path]) -> ImageSet:
    """An ImageSet of files with no labels (all 0), for embedding or ranking.

    Example:
        >>> len(unlabelled(["a.jpg", "b.jpg"]))
        2
    """
    return ImageSet(paths=[str(p) for p in paths], labels=np.zeros(len(paths), dtype=np.int64))


def describe(embedder: Embedder, *, mirror: bool) -> dict[str, object]:
    """What produced a set of features, as stored next to them (`embed`) and compared by `similar`."""
    from imgclf.files import weights_digest

    return {"network": embedder.name, "source": embedder.source, "weights": weights_digest(embedder.module),
            "image_size": embedder.prep.image_size, "mirror": mirror}


def log_failed(failed: list[tuple[str, str]]) -> None:
    """Say which files were skipped as unreadable (as `check` lists them)."""
    if failed:
        shown = "\n  ".join(f"{p}: {why}" for p, why in failed[:20])
        more = f"\n  ... and {len(failed) - 20} more" if len(failed) > 20 else ""
        log(f"warning: skipped {len(failed)} unreadable file(s):\n  {shown}{more}")
