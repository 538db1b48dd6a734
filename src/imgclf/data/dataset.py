"""The dataset types every other module shares: `ImageSet` (one split) and `Dataset` (the splits).

The bottom of the data layer: it imports only the decoder. `sources` and `cifar` build these,
the pipeline decodes them, training, the bundle and the report read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from imgclf.data.decode import open_image


@dataclass
class ImageSet:
    """The images and integer labels of one split.

    Images are files (`paths`) or, for the standard sets, rows of an in-memory uint8 array
    (`arrays`, shape N x H x W x 3) whose `paths` are stable names such as `cifar10/test/17`.
    """

    paths: list[str]
    # int64 N, indices into the dataset's class list; or, multi-label (see `data.multilabel`), an
    # N x C float32 0/1 matrix, one column per label: code that only indexes rows handles both.
    labels: np.ndarray
    arrays: np.ndarray | None = None
    # N x 16 uint8: the first 16 bytes of each file's SHA-256, when the pre-flight scan has them
    # (the feature cache's content keys, so a run does not read every file again to hash it).
    digests: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: np.ndarray | list[int]) -> ImageSet:
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSet(
            paths=[self.paths[i] for i in idx],
            labels=self.labels[idx],
            arrays=None if self.arrays is None else self.arrays[idx],
            digests=None if self.digests is None else self.digests[idx],
        )

    def load(self, index: int, *, draft_size: int | None = None) -> Image.Image:
        """Decode image `index` to RGB."""
        if self.arrays is not None:
            return Image.fromarray(self.arrays[index])
        return open_image(self.paths[index], draft_size=draft_size)

    def class_counts(self, num_classes: int) -> list[int]:
        """Images per class (multi-label: images carrying each label)."""
        if self.labels.ndim == 2:
            return self.labels.sum(axis=0).astype(np.int64).tolist() if len(self) else [0] * num_classes
        return np.bincount(self.labels, minlength=num_classes).tolist()


@dataclass
class Dataset:
    """Train, validation and (optional) test splits over one fixed class list."""

    classes: list[str]
    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    source: str  # what kind of DATA this was, for messages and the bundle
    val_from_train: bool  # True when val was carved out of train by a stratified split
    warnings: list[str] = field(default_factory=list)

    @property
    def multilabel(self) -> bool:
        """True when every image carries a set of labels (a `labels` CSV column), not one class."""
        return self.train.labels.ndim == 2

    def summary(self) -> dict[str, object]:
        n = len(self.classes)
        splits = {"train": self.train, "val": self.val, "test": self.test}
        return {
            "source": self.source,
            **({"task": "multi-label"} if self.multilabel else {}),
            "classes": self.classes,
            "val_from_train": self.val_from_train,
            "counts": {
                name: dict(zip(self.classes, split.class_counts(n), strict=False))
                for name, split in splits.items()
                if split is not None
            },
        }
