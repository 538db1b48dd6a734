"""Pre-flight scan results kept on disk, so a second run over the same files decodes none of them.

`imgclf train` decodes and hashes every file before it trains (`check.preflight`): on CIFAR-10's
60,000 JPEGs that is about a minute on 2 cores, on every run, even when every feature comes from the
feature cache. What the scan learns depends only on a file's bytes, so it is stored per file next to
the file's *stat signature* (size, modification time in ns, inode). A file whose signature is
unchanged is not read again: the rule make, rsync and git's index use. A file that is rewritten,
touched, replaced or added is scanned again; a file whose signature cannot be read (missing, a broken
link) is always scanned, and so reported.

Layout: `$IMGCLF_CACHE/scans/<hash of the data folder>.npz` (default `~/.cache/imgclf`), one table
per folder, its columns NumPy arrays read with `allow_pickle=False`. It is written to a temporary
name and renamed into place, so a crash or two runs at once leave a whole table (the last one
written wins). Rows of files the current run did not list are kept. A table that cannot be read is
ignored with a warning and rewritten. Nothing is evicted: delete the folder to reclaim the space
(about 200 bytes per file).

`imgclf check` does not use it: that command is the full re-read of every byte.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imgclf.data.scan import Entry, FileResult
from imgclf.files import atomic_write, cache_dir
from imgclf.progress import log

FORMAT_VERSION = 1  # bump when a stored column changes meaning
Signature = tuple[int, int, int]  # (size in bytes, mtime in ns, inode)


def scan_cache_dir() -> Path:
    """`$IMGCLF_CACHE/scans`, else `~/.cache/imgclf/scans`."""
    return cache_dir() / "scans"


def signature(path: str) -> Signature | None:
    """The stat signature of the file `path` points to (links followed), or None if it has none."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # missing, a broken link or loop, a NUL in the name
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")  # names that are not UTF-8 keep their own bytes


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class ScanCache:
    """The stored scan results of the files under one folder.

    Example:
        >>> cache = ScanCache.for_paths(paths)  # doctest: +SKIP
        >>> known = cache.lookup(entries, signatures)  # doctest: +SKIP
    """

    def __init__(self, file: Path) -> None:
        self.file = Path(file)
        self._rows: dict[str, tuple[Signature, FileResult]] | None = None

    @classmethod
    def for_paths(cls, paths: Sequence[str], root: Path | None = None) -> ScanCache:
        """The table for the folder that holds all of `paths` (their common parent)."""
        absolute = [os.path.abspath(p) for p in paths]
        folder = os.path.commonpath(absolute) if absolute else os.getcwd()
        if len(absolute) == 1:
            folder = os.path.dirname(folder)
        name = hashlib.blake2b(_encode(folder), digest_size=16).hexdigest()
        return cls((root or scan_cache_dir()) / f"{name}.npz")

    def _load(self) -> dict[str, tuple[Signature, FileResult]]:
        if self._rows is not None:
            return self._rows
        self._rows = {}
        if not self.file.is_file():
            return self._rows
        try:
            self._rows = _read_table(self.file)
        except Exception as exc:  # truncated, foreign or from another version: scan again
            log(f"warning: ignoring the unreadable scan cache {self.file} ({type(exc).__name__}: {exc}); "
                "its files are scanned again")
        return self._rows

    def lookup(self, entries: Sequence[Entry], signatures: Sequence[Signature | None]) -> list[FileResult | None]:
        """The stored result of each entry whose file still has the stored signature, else None."""
        import dataclasses

        rows = self._load()
        found: list[FileResult | None] = []
        for entry, sig in zip(entries, signatures, strict=True):
            row = rows.get(os.path.abspath(entry.path)) if sig is not None else None
            found.append(dataclasses.replace(row[1], entry=entry) if row is not None and row[0] == sig else None)
        return found

    def store(self, results: Sequence[FileResult], signatures: Sequence[Signature | None]) -> None:
        """Add (or replace) the rows of `results` and write the table; a write failure only warns."""
        rows = dict(self._load())
        for result, sig in zip(results, signatures, strict=True):
            if sig is not None:
                rows[os.path.abspath(result.entry.path)] = (sig, result)
        self._rows = rows
        self.file.parent.mkdir(parents=True, exist_ok=True)
        columns = _columns(rows)

        def write(temp: Path) -> None:
            with open(temp, "wb") as handle:  # a handle: np.savez would add ".npz" to a name
                np.savez(handle, **columns)  # type: ignore[arg-type]

        try:  # not flushed to disk: a table lost in a crash only means a full scan next time
            atomic_write(self.file, write, durable=False)
        except OSError as exc:  # a full or read-only disk must not stop the training run
            log(f"warning: could not write the scan cache {self.file} ({exc})")


def _columns(rows: dict[str, tuple[Signature, FileResult]]) -> dict[str, np.ndarray]:
    items = list(rows.items())
    results = [r for _, (_, r) in items]

    def text(values: list[str | None]) -> np.ndarray:
        return np.array([_encode(v or "") for v in values], dtype=bytes)

    return {
        "version": np.array(FORMAT_VERSION),
        "path": text([p for p, _ in items]),
        "signature": np.array([s for _, (s, _) in items], dtype=np.int64).reshape(len(items), 3),
        "reason": text([r.reason for r in results]),
        "width_height": np.array([r.size or (-1, -1) for r in results], dtype=np.int64).reshape(len(items), 2),
        "format": text([r.format for r in results]),
        "mode": text([r.mode for r in results]),
        "animated": np.array([r.animated for r in results], dtype=bool),
        "exif_rotated": np.array([r.exif_rotated for r in results], dtype=bool),
        "sha256": text([r.sha256 for r in results]),
        "has_hash": np.array([r.dhash is not None for r in results], dtype=bool),
        "dhash": np.array([r.dhash or 0 for r in results], dtype=np.uint64),
        "thumb": np.stack([r.thumb if r.thumb is not None else np.zeros((4, 4, 3), np.uint8) for r in results])
        if results else np.zeros((0, 4, 4, 3), np.uint8),
    }


def _read_table(file: Path) -> dict[str, tuple[Signature, FileResult]]:
    with np.load(file, allow_pickle=False) as table:
        if int(table["version"]) != FORMAT_VERSION:
            raise ValueError(f"format {int(table['version'])}, this imgclf reads {FORMAT_VERSION}")
        columns = {name: table[name] for name in table.files}
    n = len(columns["path"])
    if any(len(v) != n for k, v in columns.items() if k != "version"):
        raise ValueError("columns of different lengths")
    rows: dict[str, tuple[Signature, FileResult]] = {}
    for i in range(n):
        path = _decode(bytes(columns["path"][i]))
        width, height = (int(v) for v in columns["width_height"][i])
        result = FileResult(
            Entry(path, "", ""),
            reason=_decode(bytes(columns["reason"][i])) or None,
            size=(width, height) if width >= 0 else None,
            format=_decode(bytes(columns["format"][i])) or None,
            mode=_decode(bytes(columns["mode"][i])) or None,
            animated=bool(columns["animated"][i]),
            exif_rotated=bool(columns["exif_rotated"][i]),
            sha256=_decode(bytes(columns["sha256"][i])) or None,
            dhash=int(columns["dhash"][i]) if columns["has_hash"][i] else None,
            thumb=columns["thumb"][i].copy() if columns["has_hash"][i] else None,
        )
        size, mtime_ns, inode = (int(v) for v in columns["signature"][i])
        rows[path] = ((size, mtime_ns, inode), result)
    return rows
