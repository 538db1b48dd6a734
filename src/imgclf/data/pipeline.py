"""Images to model inputs: decode once, keep uint8 tensors, augment and normalise whole batches.

The CPU is the scarce resource, so no per-image Python work happens inside the training loop:
every image is decoded and resized once (in threads; Pillow releases the GIL), kept in memory as a
uint8 tensor when it fits, and augmented a batch at a time with tensor operations.

Everything that reads images takes a `Store` (see its docstring): `ImageStore.decode` builds the one
that decodes, `store.subset(positions)` and `store.to(device)` are views of it.
"""

from __future__ import annotations

import os
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from imgclf.data.dataset import ImageSet
from imgclf.data.decode import UnreadableImageError
from imgclf.progress import progress

INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input tensor. Stored in every bundle.

    The image's shorter side is resized to `image_size` with `interpolation`, the centre square is
    cropped, and the uint8 RGB values become `(x / 255 - mean) / std`, laid out as N x 3 x H x W.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def to_dict(self) -> dict[str, object]:
        values: dict[str, object] = asdict(self)
        values["resize"] = "shorter side to image_size, then centre crop to a square"
        values["layout"] = "NCHW float32 RGB, (x / 255 - mean) / std"
        return values

    @classmethod
    def from_data_config(cls, config: Mapping[str, Any], image_size: int) -> Preprocessing:
        """The preprocessing a timm data config asks for (`Backbone.data_config`), at `image_size` px.

        The mean, std and interpolation travel with the pretrained weights; the size is ours to choose.

        Example:
            >>> config = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bilinear"}
            >>> Preprocessing.from_data_config(config, 96)
            Preprocessing(image_size=96, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation='bilinear')
        """
        mean, std = config["mean"], config["std"]
        return cls(
            image_size=image_size,
            mean=(float(mean[0]), float(mean[1]), float(mean[2])),
            std=(float(std[0]), float(std[1]), float(std[2])),
            interpolation=str(config.get("interpolation", "bicubic")),
        )

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> Preprocessing:
        return cls(
            image_size=int(values["image_size"]),  # type: ignore[call-overload]
            mean=tuple(values["mean"]),  # type: ignore[arg-type]
            std=tuple(values["std"]),  # type: ignore[arg-type]
            interpolation=str(values.get("interpolation", "bicubic")),
        )


def image_to_array(img: Image.Image, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """Resize the shorter side to `size`, centre-crop a square; return uint8 size x size x 3 (may be read-only)."""
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        resample = INTERPOLATIONS.get(interpolation, Image.Resampling.BICUBIC)
        # reducing_gap makes large downscales several times faster at no visible cost.
        img = img.resize((new_w, new_h), resample, reducing_gap=3.0)
    if (new_w, new_h) != (size, size):  # a crop copies the pixels: only when there is something to cut
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def image_to_tensor(img: Image.Image, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """`image_to_array` as a uint8 3 x size x size tensor."""
    return torch.from_numpy(image_to_array(img, size, interpolation).copy()).permute(2, 0, 1)


def channels_last_uint8(count: int, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """An uninitialised uint8 batch: (N x 3 x S x S tensor in channels_last memory, its N x S x S x 3 array).

    Decoded images are written straight into the array's rows (HWC, as Pillow lays them out), so
    a batch costs one allocation and one copy per image; `normalize` and the frozen runtimes take
    channels_last input as it is.
    """
    array = np.empty((count, size, size, 3), dtype=np.uint8)
    return torch.from_numpy(array).permute(0, 3, 1, 2), array


def normalize(batch: torch.Tensor, prep: Preprocessing, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (or float 0..255) N x 3 x H x W -> normalised float input in channels_last memory."""
    mean = torch.tensor(prep.mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(prep.std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1) * 255.0
    out = (batch.float() - mean) / std
    return out.to(dtype).contiguous(memory_format=torch.channels_last)


def default_workers(requested: int = 0) -> int:
    return requested if requested > 0 else max(1, os.cpu_count() or 1)


class Store(ABC):
    """What training, the frozen runtime and evaluation read decoded images from.

    A store holds one ImageSet's images at `prep`'s input size and hands them out as uint8 batches
    (N x 3 x S x S, channels_last). There are three kinds, and all of them are built from an
    `ImageStore`, the one that decodes:

    - `ImageStore.decode(images, prep, ...)`: decoded on the host, in memory or streamed from disk;
    - `store.subset(positions)`: some of a store's images, without decoding them again;
    - `store.to(device)`: a store whose batches arrive on `device` (a CUDA GPU).

    Attributes every store has:
        prep: the preprocessing its images were decoded with.
        images: the ImageSet behind it, position for position (paths, labels, content keys).
        labels: int64 labels of `images`, on the host.
        failed: (path, reason) of every image that could not be decoded; streamed stores add to it
            as they go, and views share their parent's list.
        in_memory: whether the decoded images are held in memory (else each batch is decoded).

    Example:
        >>> store = ImageStore.decode(images, prep, memory_budget=2**30)  # doctest: +SKIP
        >>> for indices, batch in store.subset(np.arange(10)).batches(np.arange(10), 4): ...  # doctest: +SKIP
    """

    prep: Preprocessing
    images: ImageSet
    labels: torch.Tensor
    failed: list[tuple[str, str]]
    in_memory: bool

    def __len__(self) -> int:
        return len(self.images)

    @abstractmethod
    def in_memory_tensor(self) -> torch.Tensor | None:
        """All decoded images as one uint8 N x 3 x S x S tensor (channels_last), or None when they are streamed."""

    @abstractmethod
    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """(decoded indices, uint8 images in channels_last memory) for `indices`, positions in this store.

        In streaming mode an unreadable image is left out of the batch and added to `failed`.
        """

    @abstractmethod
    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield (indices, uint8 batch) over `order`, `batch_size` positions at a time."""

    def subset(self, positions: np.ndarray) -> Store:
        """The images at `positions` of this store as a store of their own, without decoding them again.

        Example:
            >>> head = store.subset(np.arange(100))  # doctest: +SKIP
            >>> len(head)  # doctest: +SKIP
            100
        """
        return SubsetStore(self, positions)

    def to(self, device: torch.device, *, resident: bool = False) -> Store:
        """This store with its batches on `device`: itself on a CPU, else a `DeviceStore`.

        With `resident`, the decoded images are copied to the device once and batches are indexed
        there (in-memory stores only); without it each batch is copied when it is read.

        Example:
            >>> on_gpu = store.to(torch.device("cuda"), resident=True)  # doctest: +SKIP
            >>> next(on_gpu.batches(np.arange(len(on_gpu)), 64))[1].is_cuda  # doctest: +SKIP
            True
        """
        if device.type != "cuda":
            return self
        return DeviceStore(self, device, resident=resident)


class ImageStore(Store):
    """The uint8 tensors of one ImageSet at the model's input size, decoded on the host.

    Build one with `ImageStore.decode`. When the decoded images fit in `memory_budget` bytes they
    are held in RAM; otherwise each batch is decoded when asked for, with the next batch decoding in
    a background thread. Images that cannot be decoded are dropped up front (in-memory mode) and
    listed in `failed`.

    Example:
        >>> store = ImageStore.decode(images, prep, memory_budget=2**30)  # doctest: +SKIP
        >>> for indices, batch in store.batches(np.arange(len(store)), 64): ...  # doctest: +SKIP
    """

    def __init__(
        self,
        images: ImageSet,
        prep: Preprocessing,
        *,
        tensor: torch.Tensor | None,
        workers: int = 0,
        failed: list[tuple[str, str]] | None = None,
    ) -> None:
        """A store over images already decoded into `tensor` (one row per image), or streamed when it is None."""
        self.images = images
        self.prep = prep
        self.workers = default_workers(workers)
        self.failed = [] if failed is None else failed
        self.in_memory = tensor is not None
        self._tensor = tensor
        self.labels = torch.from_numpy(images.labels)

    @classmethod
    def decode(
        cls,
        images: ImageSet,
        prep: Preprocessing,
        *,
        memory_budget: int,
        workers: int = 0,
        description: str = "decode",
    ) -> ImageStore:
        """Decode `images` at `prep`'s size now when they fit in `memory_budget` bytes, else stream them.

        Example:
            >>> store = ImageStore.decode(dataset.train, prep, memory_budget=2**30, workers=4)  # doctest: +SKIP
            >>> store.in_memory, len(store.failed)  # doctest: +SKIP
            (True, 0)
        """
        workers = default_workers(workers)
        size = prep.image_size
        if len(images) * 3 * size * size > memory_budget:
            return cls(images, prep, tensor=None, workers=workers)
        tensor, rows = channels_last_uint8(len(images), size)
        ok = np.ones(len(images), dtype=bool)
        failed: list[tuple[str, str]] = []
        bar = progress(total=len(images), desc=description, unit="img")
        with ThreadPoolExecutor(workers) as pool:
            decoded = pool.map(lambda j: _decode_into(images, j, rows[j], prep), range(len(images)))
            for i, error in enumerate(decoded):
                if error is not None:
                    ok[i] = False
                    failed.append((images.paths[i], error.reason))
                bar.update(1)
        bar.close()
        if ok.all():
            return cls(images, prep, tensor=tensor, workers=workers, failed=failed)
        keep = np.flatnonzero(ok)
        return cls(images.subset(keep), prep, tensor=tensor[torch.from_numpy(keep)], workers=workers, failed=failed)

    def in_memory_tensor(self) -> torch.Tensor | None:
        return self._tensor

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        if self._tensor is not None:
            return indices, self._tensor[torch.from_numpy(indices)]
        with ThreadPoolExecutor(self.workers) as pool:
            return self._decode_batch(indices, pool)

    def _decode_batch(self, indices: np.ndarray, pool: ThreadPoolExecutor) -> tuple[np.ndarray, torch.Tensor]:
        """Streaming mode's `batch`, decoded by `pool` straight into one channels_last buffer."""
        indices = np.asarray(indices, dtype=np.int64)
        batch, rows = channels_last_uint8(len(indices), self.prep.image_size)
        # One task per thread, not one per image: with a future per image, handing the work out cost
        # more CPU than decoding a small image (CIFAR at 160 px, 1 thread: 0.80-1.12 -> 0.63-0.70 ms).
        parts = [part for part in np.array_split(np.arange(len(indices)), self.workers) if len(part)]

        def decode(part: np.ndarray) -> list[UnreadableImageError | None]:
            return [_decode_into(self.images, int(indices[k]), rows[k], self.prep) for k in part]

        errors = [error for done in pool.map(decode, parts) for error in done]
        ok = np.array([error is None for error in errors], dtype=bool)
        for i, error in zip(indices, errors, strict=True):
            if error is not None:
                self.failed.append((self.images.paths[i], error.reason))
        if ok.all():
            return indices, batch
        return indices[ok], batch[torch.from_numpy(np.flatnonzero(ok))]

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield (indices, uint8 batch) over `order`; streaming mode decodes one batch ahead."""
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if self.in_memory:
            for chunk in chunks:
                yield self.batch(chunk)
            return
        ready: queue.Queue[tuple[np.ndarray, torch.Tensor] | BaseException | None] = queue.Queue(maxsize=2)

        def produce() -> None:
            try:
                with ThreadPoolExecutor(self.workers) as pool:  # one pool for all the batches
                    for chunk in chunks:
                        ready.put(self._decode_batch(chunk, pool))
            except BaseException as exc:  # handed to the consumer, which re-raises it
                ready.put(exc)
                return
            ready.put(None)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            if len(item[0]):
                yield item
        thread.join()


def _decode_into(images: ImageSet, index: int, row: np.ndarray, prep: Preprocessing) -> UnreadableImageError | None:
    """Decode image `index` into `row` (S x S x 3 uint8); the error instead if it cannot be read."""
    try:
        img = images.load(index, draft_size=prep.image_size)
    except UnreadableImageError as exc:
        return exc
    np.copyto(row, image_to_array(img, prep.image_size, prep.interpolation))
    return None


class SubsetStore(Store):
    """Some images of another store (`store.subset(positions)`): its batches, renumbered, without decoding again.

    Example:
        >>> head = SubsetStore(store, np.array([0, 5, 9]))  # doctest: +SKIP
        >>> head.batch(np.array([1]))[0]  # position 1 here is position 5 of `store`  # doctest: +SKIP
        array([1])
    """

    def __init__(self, parent: Store, positions: np.ndarray) -> None:
        """A view of `parent`'s images at `positions` (positions in `parent`)."""
        self.parent = parent
        self.positions = np.asarray(positions, dtype=np.int64)
        self.prep = parent.prep
        self.failed = parent.failed  # shared: a streamed parent records its failures there
        self.in_memory = parent.in_memory
        self.labels = parent.labels[torch.from_numpy(self.positions)]
        self.images = parent.images.subset(self.positions)  # content keys for the feature cache
        self._lookup = {int(p): i for i, p in enumerate(self.positions)}

    def in_memory_tensor(self) -> torch.Tensor | None:
        tensor = self.parent.in_memory_tensor()
        return None if tensor is None else tensor[torch.from_numpy(self.positions).to(tensor.device)]

    def _renumber(self, item: tuple[np.ndarray, torch.Tensor]) -> tuple[np.ndarray, torch.Tensor]:
        """A parent's (positions, batch) in this store's positions."""
        parent_positions, batch = item
        return np.asarray([self._lookup[int(p)] for p in parent_positions], dtype=np.int64), batch

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        return self._renumber(self.parent.batch(self.positions[np.asarray(indices, dtype=np.int64)]))

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for item in self.parent.batches(self.positions[np.asarray(order, dtype=np.int64)], batch_size):
            yield self._renumber(item)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host batch to `device`: pinned and asynchronous on CUDA, unchanged on a CPU.

    The pinned buffer may be dropped at once: PyTorch's pinned-memory allocator keeps it until the
    copy that reads it has finished.

    Example:
        >>> batch = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
        >>> to_device(batch, torch.device("cpu")) is batch
        True
    """
    if device.type != "cuda":
        return batch
    if batch.device.type == "cuda":
        return batch
    return batch.pin_memory().to(device, non_blocking=True)


class DeviceStore(Store):
    """A store whose batches arrive on `device` (`store.to(device)`); labels stay on the host.

    `resident`: the parent's decoded images are copied to `device` once and every batch is indexed
    there, with no host work per step (in-memory parents only). Otherwise each batch is gathered on
    the host, pinned and copied asynchronously as uint8 (a quarter of the bytes of float input).
    How training chooses between them: `imgclf.training.gpu.place_store`.

    Example:
        >>> train = DeviceStore(store, torch.device("cuda"), resident=True)  # doctest: +SKIP
        >>> indices, batch = next(train.batches(np.arange(len(train)), 256))  # batch.is_cuda  # doctest: +SKIP
    """

    def __init__(self, parent: Store, device: torch.device, *, resident: bool) -> None:
        """`parent`'s images with batches on `device`; `resident` copies them there now."""
        self.parent = parent
        self.device = device
        self.resident = resident
        self.prep = parent.prep
        self.failed = parent.failed
        self.in_memory = parent.in_memory
        self.labels = parent.labels
        self.images = parent.images
        host = parent.in_memory_tensor()
        if resident and host is None:
            raise ValueError("a resident DeviceStore needs an in-memory parent store")
        self._on_device = host.to(device) if resident and host is not None else None

    def in_memory_tensor(self) -> torch.Tensor | None:
        return self._on_device

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        if self._on_device is not None:
            return indices, self._on_device[torch.from_numpy(indices).to(self.device)]
        kept, batch = self.parent.batch(indices)
        return kept, to_device(batch, self.device)

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        if self._on_device is not None:
            for start in range(0, len(order), batch_size):
                yield self.batch(order[start : start + batch_size])
            return
        for indices, batch in self.parent.batches(order, batch_size):
            yield indices, to_device(batch, self.device)


# --------------------------------------------------------------------------------------------
# Batched augmentation


@dataclass(frozen=True)
class Augmentation:
    """Random-resized-crop scale/ratio ranges and horizontal flips, applied to whole batches."""

    scale: tuple[float, float] = (0.35, 1.0)  # share of the image area kept by the crop
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio range
    flip: bool = True

    @classmethod
    def named(cls, name: str, *, flip: bool = True) -> Augmentation | None:
        if name == "none":
            return None
        if name == "light":
            return cls(scale=(0.8, 1.0), ratio=(0.9, 1.1), flip=flip)
        return cls(flip=flip)  # standard, and an "auto" that no run resolved (training/run.py `_augmentation`)

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a uint8 or float N x 3 x S x S batch; returns float 0..255 of the same size.

        The random draws come from `generator` on the CPU whatever the batch's device, so a batch
        gets the same crops and flips on a GPU as on a CPU; only the crop boxes are copied over.
        """
        from torchvision.ops import roi_align

        n, _, height, width = batch.shape
        area = torch.empty(n).uniform_(*self.scale, generator=generator) * height * width
        log_ratio = torch.empty(n).uniform_(
            float(np.log(self.ratio[0])), float(np.log(self.ratio[1])), generator=generator
        )
        aspect = torch.exp(log_ratio)
        crop_w = torch.sqrt(area * aspect).clamp(max=width)
        crop_h = torch.sqrt(area / aspect).clamp(max=height)
        x0 = torch.rand(n, generator=generator) * (width - crop_w)
        y0 = torch.rand(n, generator=generator) * (height - crop_h)
        boxes = torch.stack([torch.arange(n, dtype=torch.float32), x0, y0, x0 + crop_w, y0 + crop_h], 1)
        boxes = boxes.to(batch.device)
        out = roi_align(batch.float(), boxes, output_size=(height, width), sampling_ratio=2, aligned=True)
        if self.flip:
            flip = (torch.rand(n, generator=generator) < 0.5).to(batch.device)
            out = torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)
        return out
