"""CIFAR-10 and CIFAR-100 from their official archives, downloaded into the cache on first use.

The archives hold Python pickles. We read them with a restricted unpickler that can only build
numpy arrays, lists and dicts, so a tampered archive cannot run code.

Cache folder: `$IMGCLF_CACHE/datasets` (default `~/.cache/imgclf/datasets`). An archive already
there (for example copied from another machine) is used as it is, without a download.
"""

from __future__ import annotations

import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.data.dataset import ImageSet
from imgclf.errors import DataError
from imgclf.files import cache_dir


@dataclass(frozen=True)
class CifarSpec:
    url: str
    md5: str
    archive: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes


CIFAR = {
    "cifar10": CifarSpec(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        archive="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_file="test_batch",
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
    ),
    "cifar100": CifarSpec(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        archive="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        train_files=("train",),
        test_file="test",
        meta_file="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
    ),
}
NAMES = frozenset(CIFAR)


class _ArrayUnpickler(pickle.Unpickler):
    """Builds only numpy arrays and plain containers; any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 encode bytes this way
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _read_pickle(path: Path) -> dict[bytes, Any]:
    try:
        with path.open("rb") as fh:
            value = _ArrayUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as exc:
        raise DataError(
            f"cannot read CIFAR file {str(path)!r}: {exc}",
            fix=f"delete {str(path.parent)!r} so that it is extracted or downloaded again",
        ) from None
    if not isinstance(value, dict):
        raise DataError(f"CIFAR file {str(path)!r} does not hold a dict")
    return value


def ensure_extracted(name: str, root: Path | None = None) -> Path:
    """Return the extracted folder of `name`, downloading and extracting the archive if needed."""
    spec = CIFAR[name]
    root = (root or cache_dir()) / "datasets"
    folder = root / spec.folder
    if (folder / spec.meta_file).is_file():
        return folder
    archive = root / spec.archive
    if not archive.is_file():
        root.mkdir(parents=True, exist_ok=True)
        try:
            from torchvision.datasets.utils import download_url

            download_url(spec.url, str(root), filename=spec.archive, md5=spec.md5)
        except Exception as exc:  # network errors come in many types; all mean the same here
            raise DataError(
                f"could not download {name} from {spec.url}: {exc}",
                expected=f"the archive at {str(archive)!r}, or internet access",
                fix=f"download {spec.archive} elsewhere and copy it to {str(root)!r} "
                "(or set IMGCLF_CACHE to a folder holding datasets/" + spec.archive + ")",
            ) from None
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(root, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(
            f"cannot extract {str(archive)!r}: {exc}",
            fix="delete the archive so that it is downloaded again",
        ) from None
    if not (folder / spec.meta_file).is_file():
        raise DataError(f"{str(archive)!r} does not contain {spec.folder}/{spec.meta_file}")
    return folder


def load_cifar(name: str) -> tuple[ImageSet, ImageSet, list[str]]:
    """Load (train, test, class names) of `cifar10` or `cifar100` as in-memory uint8 images."""
    spec = CIFAR[name]
    folder = ensure_extracted(name)
    meta = _read_pickle(folder / spec.meta_file)
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[spec.names_key]]

    def read(files: tuple[str, ...], split: str) -> ImageSet:
        arrays: list[np.ndarray] = []
        labels: list[int] = []
        for f in files:
            batch = _read_pickle(folder / f)
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            arrays.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.extend(int(v) for v in batch[spec.label_key])
        images = np.ascontiguousarray(np.concatenate(arrays))
        return ImageSet(
            paths=[f"{name}/{split}/{i}" for i in range(len(images))],
            labels=np.asarray(labels, dtype=np.int64),
            arrays=images,
        )

    return read(spec.train_files, "train"), read((spec.test_file,), "test"), classes
