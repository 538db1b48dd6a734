"""The pre-flight check's scan cache: only new or changed files are decoded again."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder
from PIL import Image

from imgclf.data.sources import load_dataset
from imgclf.training.feature_cache import (
    content_keys,
)


def test_the_scan_cache_reads_only_new_or_changed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from imgclf.data import check

    data = make_image_folder(tmp_path / "data", per_class=4)
    (tmp_path / "data" / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    dataset = load_dataset(str(data), val_fraction=0.25, seed=0)
    scanned: list[str] = []
    real_scan = check.scan_file

    def counting_scan(entry: check.Entry) -> check.FileResult:
        scanned.append(entry.path)
        return real_scan(entry)

    monkeypatch.setattr(check, "scan_file", counting_scan)
    cache = tmp_path / "cache"
    monkeypatch.setenv("IMGCLF_CACHE", str(cache))
    first, skipped = check.preflight(dataset, max_bad_fraction=0.5)
    total = len(scanned)
    assert total == 13 and [s["path"].endswith("broken.jpg") for s in skipped] == [True]
    scanned.clear()
    second, skipped_again = check.preflight(dataset, max_bad_fraction=0.5)
    # Only the unusable file is read again (a failure is never cached: it may be a permissions problem).
    assert [Path(p).name for p in scanned] == ["broken.jpg"] and skipped_again == skipped
    assert second.train.paths == first.train.paths
    assert np.array_equal(second.train.digests, first.train.digests)
    # The digests are the files' SHA-256 prefixes, and the feature cache's content keys.
    import hashlib

    path = first.train.paths[0]
    assert bytes(first.train.digests[0]) == hashlib.sha256(Path(path).read_bytes()).digest()[:16]
    no_digests = dataclasses.replace(first.train, digests=None)
    assert np.array_equal(content_keys(no_digests), content_keys(first.train))
    # A rewritten file (new bytes, new mtime) is scanned again; the others are not.
    changed = first.val.paths[0]
    Image.new("RGB", (40, 40), (1, 2, 3)).save(changed)
    os.utime(changed, ns=(1, 1))
    scanned.clear()
    third, _ = check.preflight(dataset, max_bad_fraction=0.5)
    assert sorted(Path(p).name for p in scanned) == sorted(["broken.jpg", Path(changed).name])
    assert not np.array_equal(third.val.digests[0], first.val.digests[0])
    # A damaged table is reported and rebuilt, never trusted.
    for table in (cache / "scans").glob("*.npz"):
        table.write_bytes(b"garbage")
    scanned.clear()
    check.preflight(dataset, max_bad_fraction=0.5)
    assert len(scanned) == total
