"""CIFAR from an archive in the official format, built here and placed in the cache."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from imgclf.data.sources import load_dataset, load_eval_split
from imgclf.errors import DataError


def _add(tar: tarfile.TarFile, name: str, obj: object) -> None:
    data = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_cifar10_archive(root: Path, per_batch: int = 20, payload: object | None = None) -> Path:
    rng = np.random.default_rng(0)
    folder = root / "datasets"
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tar:
        _add(tar, "cifar-10-batches-py/batches.meta", payload or {b"label_names": names})
        for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            labels = [i % 10 for i in range(per_batch)]
            data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            _add(tar, f"cifar-10-batches-py/{batch}", {b"data": data, b"labels": labels})
    return folder


def test_cifar10_from_a_cached_official_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10_archive(tmp_path)
    monkeypatch.setenv("IMGCLF_CACHE", str(tmp_path))
    ds = load_dataset("cifar10", val_fraction=0.1, seed=0)
    assert ds.classes[:3] == ["airplane", "automobile", "bird"]
    assert len(ds.train) + len(ds.val) == 100 and len(ds.val) == 10
    assert ds.test is not None and len(ds.test) == 20
    assert ds.train.arrays is not None and ds.train.arrays.shape[1:] == (32, 32, 3)
    assert ds.train.load(0).size == (32, 32)
    images, split = load_eval_split("cifar10", ds.classes)
    assert split == "cifar10 test" and len(images) == 20


class _Boom:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("pwned",))


def test_cifar_pickle_cannot_run_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_cifar10_archive(tmp_path, payload={b"label_names": [_Boom()]})
    monkeypatch.setenv("IMGCLF_CACHE", str(tmp_path))
    with pytest.raises(DataError, match=r"refusing to load (__builtin__|builtins)\.print"):
        load_dataset("cifar10")
    assert "pwned" not in capsys.readouterr().out


def test_download_failure_says_where_to_put_the_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.utils as tv_utils

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    monkeypatch.setenv("IMGCLF_CACHE", str(tmp_path))
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10")
