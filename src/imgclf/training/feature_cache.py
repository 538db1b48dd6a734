"""Frozen-backbone features kept on disk, so a second probe on the same images skips the backbone.

Layout: `$IMGCLF_CACHE/features/<model key>/<shard>.safetensors` (default `~/.cache/imgclf`).

- The *model key* hashes everything that changes the numbers: the backbone's timm name, every
  weight and buffer of the frozen network (so two random inits, or a fine-tuned copy, never share
  features), the preprocessing (size, interpolation, mean, std) and the compute dtype.
- Every image has a *content key*: the first 16 bytes of its file's SHA-256 (which the pre-flight
  scan has already computed: `ImageSet.digests`), or a hash of its array row for the in-memory
  standard sets. Features are stored per image, so a dataset that partly overlaps an
  earlier one (a new class added, a test split added) computes only the images it has not seen.
- Each call that computes new features writes one shard holding `keys` (N x 16 uint8 digests) and
  `features` (N x D float32). The shards are their own index: no shared file is ever rewritten, so
  two runs cannot corrupt each other. A shard is written to a temporary name and renamed into
  place (atomic on POSIX). A shard that cannot be read is reported, deleted and recomputed.

The probe's fitted head is kept too (`cached_probe`): `<model key>/heads/<hash>.safetensors`, keyed
by the features, labels and settings it was fitted on, so a run whose every input is unchanged skips
the fit (~45 s on CIFAR-10) as well as the network.

Nothing is evicted; delete the folder to reclaim the space (CIFAR-10 at 1,280 features per image:
about 300 MB for all 60,000 images).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgclf import distributed
from imgclf.data.dataset import Dataset, ImageSet
from imgclf.data.pipeline import Preprocessing, Store, default_workers
from imgclf.files import DIGEST_BYTES, atomic_write, cache_dir, file_sha256, hash_tensor, weights_digest
from imgclf.models.backbones import Backbone
from imgclf.progress import log, progress
from imgclf.runtime import run_frozen, stream_outputs
from imgclf.training.probe import ProbeResult

FORMAT_VERSION = 2  # bump when the meaning of a stored feature or key changes (2: SHA-256 content keys)
SHARD_SUFFIX = ".safetensors"


def feature_cache_dir() -> Path:
    """`$IMGCLF_CACHE/features`, else `~/.cache/imgclf/features`."""
    return cache_dir() / "features"


def model_key(
    *, backbone_name: str, module: nn.Module, prep: Preprocessing, dtype: torch.dtype, weights: str | None = None
) -> str:
    """The folder name for features of `module` under `prep`: changes when any of them changes.

    Example:
        >>> key = model_key(backbone_name="test_efficientnet", module=net, prep=prep,
        ...                 dtype=torch.float32)  # doctest: +SKIP
        >>> len(key)
        32
    """
    parts = [
        f"v{FORMAT_VERSION}", backbone_name, weights or weights_digest(module), str(prep.image_size),
        prep.interpolation,
        ",".join(f"{v:.6g}" for v in prep.mean), ",".join(f"{v:.6g}" for v in prep.std), str(dtype),
    ]
    return hashlib.blake2b("|".join(parts).encode(), digest_size=DIGEST_BYTES).hexdigest()


def content_keys(images: ImageSet, *, workers: int = 0) -> np.ndarray:
    """N x 16 uint8 digests of each image's content: the first 16 bytes of the file's SHA-256 (the
    pre-flight scan's, when `images.digests` has them), or a hash of the array row.

    An unreadable file gets a digest of its error text, so it never matches a real image.
    """
    if images.digests is not None:
        return np.array(images.digests, dtype=np.uint8, copy=True)

    def one(i: int) -> bytes:
        if images.arrays is not None:
            row = np.ascontiguousarray(images.arrays[i])
            digest = hashlib.blake2b(f"array{row.shape}{row.dtype};".encode(), digest_size=DIGEST_BYTES)
            digest.update(row.tobytes())
            return digest.digest()
        try:
            return file_sha256(images.paths[i])[:DIGEST_BYTES]
        except OSError as exc:
            return hashlib.sha256(f"unreadable:{images.paths[i]}:{exc}".encode()).digest()[:DIGEST_BYTES]

    with ThreadPoolExecutor(default_workers(workers)) as pool:  # hashlib releases the GIL on large reads
        digests = list(pool.map(one, range(len(images))))
    return np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(images), DIGEST_BYTES).copy()


class FeatureCache:
    """The stored features of one model key.

    Example:
        >>> cache = FeatureCache(feature_cache_dir() / key)  # doctest: +SKIP
        >>> found, rows = cache.lookup(keys)  # doctest: +SKIP
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _shards(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.name.endswith(SHARD_SUFFIX))

    def lookup(self, keys: np.ndarray, *, features: bool = True) -> tuple[np.ndarray, torch.Tensor | None]:
        """(found mask N, features of the found images in order, or None when none was found or
        `features` is False: then only the keys are read)."""
        from safetensors import safe_open

        wanted: dict[bytes, list[int]] = {}  # a list: the same image may appear more than once
        for i, k in enumerate(keys):
            wanted.setdefault(bytes(k), []).append(i)
        found = np.zeros(len(keys), dtype=bool)
        rows: dict[int, torch.Tensor] = {}
        for shard in self._shards():
            if found.all():
                break
            try:
                with safe_open(str(shard), framework="pt") as file:
                    shard_keys = file.get_tensor("keys").numpy()
                    if shard_keys.ndim != 2 or shard_keys.shape[1] != DIGEST_BYTES:
                        raise ValueError(f"keys of shape {tuple(shard_keys.shape)}")
                    hits = [(j, i) for j, k in enumerate(shard_keys) for i in wanted.get(bytes(k), ())
                            if not found[i]]
                    if not hits:
                        continue
                    if not features:
                        found[[i for _, i in hits]] = True
                        continue
                    stored = file.get_tensor("features")
                    if stored.shape[0] != len(shard_keys):
                        raise ValueError(f"{stored.shape[0]} feature rows for {len(shard_keys)} keys")
            except Exception as exc:  # a truncated or foreign file: recompute those images
                log(f"warning: ignoring unreadable feature cache file {shard} ({type(exc).__name__}: {exc}); "
                    "its images are computed again")
                if distributed.is_main():  # under torchrun only rank 0 writes the cache
                    shard.unlink(missing_ok=True)
                continue
            for j, i in hits:
                if not found[i]:
                    rows[i] = stored[j]
                    found[i] = True
        if not rows:
            return found, None
        return found, torch.stack([rows[int(i)] for i in np.flatnonzero(found)]).float()

    def add(self, keys: np.ndarray, features: torch.Tensor) -> Path | None:
        """Write one shard atomically; returns its path (None when there is nothing to write)."""
        from safetensors.torch import save_file

        if len(keys) == 0:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"{uuid.uuid4().hex}{SHARD_SUFFIX}"
        tensors = {"keys": torch.from_numpy(np.ascontiguousarray(keys)),
                   "features": features.detach().float().contiguous()}
        try:  # not flushed to disk: a shard lost in a crash is only computed again
            atomic_write(final, lambda temp: save_file(tensors, str(temp)), durable=False)
        except OSError as exc:  # a full or read-only disk must not fail the training run
            log(f"warning: could not write the feature cache in {self.folder} ({exc})")
            return None
        return final


class LazyForward:
    """Builds a frozen forward (e.g. an OpenVINO conversion, ~5 s for lite0) only when first called.

    On a full cache hit the backbone never runs, so it is never converted.

    Example:
        >>> forward = LazyForward(lambda: FrozenForward(net, image_size=160))  # doctest: +SKIP
    """

    def __init__(self, build: Callable[[], Callable[[torch.Tensor], torch.Tensor]]) -> None:
        self._build = build
        self._forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.calls = 0  # batches run through the network

    @property
    def built(self) -> bool:
        return self._forward is not None

    def build(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self._forward is None:
            self._forward = self._build()
        return self._forward

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.build()(batch)

    def stream(
        self, batches: Iterable[tuple[np.ndarray, torch.Tensor]], prep: Preprocessing
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """`stream_outputs` of the built forward (see FrozenForward.stream)."""
        for item in stream_outputs(self.build(), batches, prep):
            self.calls += 1
            yield item


def cached_features(
    forward: Callable[[torch.Tensor], torch.Tensor],
    store: Store,
    *,
    cache: FeatureCache | None,
    batch_size: int,
    desc: str,
    workers: int = 0,
    shard: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Like `run_frozen`: (features N x D, labels N, positions N in `store`) of the readable images
    of `store`, in order.

    Images whose features are in `cache` are read from it; only the others go through `forward`,
    and their features are added to the cache. With `cache=None` this is `run_frozen`. With
    `shard` under torchrun, each rank looks up and computes its block of the images, every rank
    gets all the features, and rank 0 alone adds the new ones to the cache.

    Example:
        >>> x, y, at = cached_features(forward, store, cache=cache, batch_size=64,
        ...                            desc="features train")  # doctest: +SKIP
    """
    if cache is None:
        return run_frozen(forward, store, batch_size=batch_size, desc=desc, shard=shard)  # type: ignore[arg-type]
    block = distributed.shard_range(len(store)) if shard else np.arange(len(store))
    images = store.images
    keys = content_keys(images if len(block) == len(store) else images.subset(block), workers=workers)
    found, cached = cache.lookup(keys)
    missing = np.flatnonzero(~found)
    computed_positions: list[np.ndarray] = []
    computed: list[torch.Tensor] = []
    if len(missing) and isinstance(forward, LazyForward):
        forward.build()  # a one-time conversion, not part of the images/s below
    started = time.perf_counter()
    if len(missing):
        bar = progress(total=len(missing), desc=desc)
        for indices, out in stream_outputs(forward, store.batches(block[missing], batch_size), store.prep):
            computed.append(out)
            computed_positions.append(indices)
            bar.update(len(indices))
        bar.close()
    seconds = time.perf_counter() - started  # decoding and the forward passes of the computed images
    new_positions = np.concatenate(computed_positions) if computed_positions else np.zeros(0, dtype=np.int64)
    new_features = torch.cat(computed) if computed else None
    # Store positions -> rows of `keys` (they differ only for a rank's block).
    new_keys = keys[np.searchsorted(block, new_positions)] if len(new_positions) else keys[:0]
    if shard and distributed.active():  # rank 0 writes what every rank computed
        gathered = distributed.gather_rows(new_features if new_features is not None else torch.zeros(0, 0))
        new_keys = distributed.gather_rows(torch.from_numpy(new_keys)).numpy()
        if distributed.is_main() and len(new_keys):
            cache.add(new_keys, gathered)
        hits, misses = (int(v) for v in distributed.all_sum([int(found.sum()), len(new_positions)]))
    else:
        if new_features is not None:
            cache.add(new_keys, new_features)
        hits, misses = int(found.sum()), len(new_positions)
    rate = f" in {seconds:.1f} s ({len(new_positions) / seconds:.0f} img/s)" if len(new_positions) else ""
    log(f"{desc}: {hits} from the feature cache, {misses} computed{rate}")
    # Put cached and new rows back in store order; images that failed to decode are left out.
    positions = np.concatenate([block[np.flatnonzero(found)], new_positions]).astype(np.int64)
    parts = [t for t in (cached, new_features) if t is not None]
    features = torch.cat(parts) if parts else torch.zeros(0, 0)
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    features, labels = features[torch.from_numpy(order)], store.labels[torch.from_numpy(positions)]
    if shard:
        return (distributed.gather_rows(features), distributed.gather_rows(labels),
                distributed.gather_rows(torch.from_numpy(positions)).numpy())
    return features, labels, positions


def cached_probe(
    fit: Callable[[], ProbeResult],
    cache: FeatureCache | None,
    *,
    inputs: Sequence[torch.Tensor | None],
    settings: dict[str, object],
) -> tuple[ProbeResult, bool]:
    """`fit()`, or the head it gave before on the same `inputs` (tensors) and `settings`.

    The probe's fit is a deterministic function of its features, labels and settings, and on a
    large set it is most of a run served from the feature cache (CIFAR-10: ~45 s of ~65 s), so
    its result is kept next to the features: `<model key>/heads/<hash of inputs and settings>`.
    Returns (result, whether it came from the cache).

    Example:
        >>> result, hit = cached_probe(lambda: fit_probe(x, y, vx, vy, 10, grid), cache,
        ...                            inputs=[x, y, vx, vy], settings={"grid": grid})  # doctest: +SKIP
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    if cache is None:
        return fit(), False
    digest = hashlib.blake2b(f"head v{FORMAT_VERSION};{sorted(settings.items())!r}".encode(), digest_size=16)
    for tensor in inputs:
        if tensor is None:
            digest.update(b"none;")
        else:
            hash_tensor(digest, tensor)
    file = cache.folder / "heads" / f"{digest.hexdigest()}{SHARD_SUFFIX}"
    if file.is_file():
        try:
            with safe_open(str(file), framework="pt") as stored:
                meta = stored.metadata()
                weight, bias = stored.get_tensor("weight"), stored.get_tensor("bias")
            head = nn.Linear(weight.shape[1], weight.shape[0])
            with torch.no_grad():
                head.weight.copy_(weight)
                head.bias.copy_(bias)
            scores = {float(k): float(v) for k, v in json.loads(meta["scores"]).items()}
            return ProbeResult(head, float(meta["l2"]), float(meta["val_accuracy"]), scores), True
        except Exception as exc:  # truncated or foreign: fit again, and replace it
            log(f"warning: ignoring unreadable cached probe head {file} ({type(exc).__name__}: {exc})")
    result = fit()
    if distributed.is_main():
        meta = {"l2": repr(result.l2), "val_accuracy": repr(result.val_accuracy),
                "scores": json.dumps({repr(k): v for k, v in result.scores.items()})}
        tensors = {"weight": result.head.weight.detach().contiguous(), "bias": result.head.bias.detach().contiguous()}
        try:  # not flushed to disk either: an unreadable head is fitted again
            file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(file, lambda temp: save_file(tensors, str(temp), metadata=meta), durable=False)
        except OSError as exc:
            log(f"warning: could not write the probe head to the cache ({exc})")
    return result, False


def cached_shares(
    backbone: Backbone, preps: dict[int, Preprocessing], dataset: Dataset, *, dtype: torch.dtype,
    root: Path | None = None,
) -> dict[int, tuple[float, float]]:
    """Size -> (share of train images, share of val and test images) whose features under that
    size's preprocessing are in the cache: what a time budget can count as already done.

    Example:
        >>> cached_shares(backbone, {96: prep96, 160: prep160}, dataset, dtype=torch.float32)  # doctest: +SKIP
        {96: (0.0, 0.0), 160: (1.0, 1.0)}
    """
    weights = weights_digest(backbone.model)
    evaluation = [s for s in (dataset.val, dataset.test) if s is not None]
    keys_train = content_keys(dataset.train)
    keys_eval = np.concatenate([content_keys(s) for s in evaluation]) if evaluation else keys_train[:0]
    shares: dict[int, tuple[float, float]] = {}
    for size, prep in preps.items():
        key = model_key(backbone_name=backbone.entry.timm_name, module=backbone.model, prep=prep, dtype=dtype,
                        weights=weights)
        cache = FeatureCache((root or feature_cache_dir()) / key)
        if not cache.folder.is_dir():
            shares[size] = (0.0, 0.0)
            continue
        found_train, _ = cache.lookup(keys_train, features=False)
        found_eval, _ = cache.lookup(keys_eval, features=False)
        shares[size] = (float(found_train.mean()) if len(found_train) else 1.0,
                        float(found_eval.mean()) if len(found_eval) else 1.0)
    return shares


def cache_for(
    *, backbone_name: str, module: nn.Module, prep: Preprocessing, dtype: torch.dtype, root: Path | None = None
) -> FeatureCache:
    """The cache of one frozen network under one preprocessing."""
    key = model_key(backbone_name=backbone_name, module=module, prep=prep, dtype=dtype)
    return FeatureCache((root or feature_cache_dir()) / key)

