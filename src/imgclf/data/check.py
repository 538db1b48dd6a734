"""`imgclf check`: a full-decode scan of a dataset before any training time is spent on it.

Every file is decoded by the same decoder that training uses (`imgclf.data.decode`), so what the
check calls unusable is exactly what training skips. The report gives:

- images per class and per split, and the distribution of image sizes, formats and modes;
- exact duplicates (same SHA-256 of the file bytes) and near duplicates (same picture re-encoded,
  resized or lightly edited: see `perceptual_hash`), within and across splits. A duplicate group
  that spans train, val and test is *leakage*: the test score is inflated by it;
- classes with 0 or 1 usable images, and how unbalanced the classes are;
- every file that cannot be used, with its reason; files that were ignored, with theirs.

File policy (the same one training uses, via `imgclf.data.sources`):

- Hidden files and folders (a name starting with "."; `.DS_Store`, AppleDouble `._x.jpg`,
  `.ipynb_checkpoints/`) are ignored. So are files without an image extension.
- Symbolic links to files are followed: the target is decoded, and a broken link or a link loop
  is an unusable file with that reason. Symbolic links to folders are not followed (a class
  folder that is a link is skipped with a warning), so a link loop can never hang the scan.
  `DATA` itself and its train/val/test folders may be links.
- Paths are handled as Python strings: Unicode names and spaces work; bytes that are not valid
  UTF-8 are kept (surrogate-escaped) and printed with backslash escapes.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.data.dataset import Dataset, ImageSet
from imgclf.data.decode import IMAGE_EXTENSIONS
from imgclf.data.layout import ACCEPTED, SPLIT_NAMES, detect_layout
from imgclf.data.multilabel import format_statistics, join_labels, label_statistics, split_labels
from imgclf.data.scan import Entry, FileResult, scan_file
from imgclf.data.scan_cache import ScanCache, signature
from imgclf.data.sources import list_class_folder, manifest_is_multilabel, read_manifest
from imgclf.errors import DataError
from imgclf.files import DIGEST_BYTES
from imgclf.progress import log, progress

NEAR_BITS = 5  # near duplicates: dHashes differ in at most this many of their 64 bits ...
NEAR_COLOUR = 8.0  # ... and their 4 x 4 colour thumbnails by at most this mean (0..255 levels)
IMBALANCE_RATIO = 3.0  # largest / smallest class at or above this is reported as imbalanced
_MAX_LISTED = 20  # text report: at most this many entries per list (JSON has them all)


@dataclass
class Discovery:
    """The files of a dataset as laid out on disk, before any decoding."""

    data: str
    source: str
    entries: list[Entry]
    empty_classes: list[tuple[str, str]] = field(default_factory=list)  # (split, class)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    warnings: list[str] = field(default_factory=list)
    multilabel: bool = False  # a `path,labels` CSV: each entry's label is a ";"-joined set (data.multilabel)


# --------------------------------------------------------------------------------------------
# Discovery


def discover(data: str) -> Discovery:
    """List the files of DATA (class folders, split folders or a CSV manifest) with their labels.

    Unlike `load_dataset`, nothing is carved out for validation: the splits are those on disk
    ("all" for plain class folders), and empty class folders are listed rather than dropped.

    Raises:
        DataError: DATA does not exist, is a built-in set, or is not a supported layout.

    Example:
        >>> found = discover("photos/")  # doctest: +SKIP
        >>> found.entries[0].split, found.entries[0].label  # doctest: +SKIP
        ('all', 'cat')
    """
    layout = detect_layout(data)
    if layout.path is None:
        raise DataError(
            f"{data!r} is a built-in dataset; check scans image files",
            fix="run imgclf check on a folder or CSV manifest",
        )
    path, splits = layout.path, layout.splits
    if layout.kind == "csv manifest":
        rows = read_manifest(path)
        entries = [Entry(p, split, label) for p, label, split in rows]
        return Discovery(data, layout.kind, entries, multilabel=manifest_is_multilabel(path))
    folders = {name: splits[name] for name in SPLIT_NAMES if name in splits} if splits else {"all": path}
    found = Discovery(data, layout.kind, [])
    for split, folder in folders.items():
        files, warnings = list_class_folder(folder)
        found.warnings.extend(warnings)
        for label in sorted(files):
            found.entries.extend(Entry(str(f), split, label) for f in files[label])
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if sub.name not in files and not sub.is_symlink():
                found.empty_classes.append((split, sub.name))
        found.ignored.extend(_ignored_files(folder))
    if not found.entries:
        raise DataError(f"no class folders with images in {str(path)!r}", expected=ACCEPTED)
    return found


def _ignored_files(root: Path) -> list[tuple[str, str]]:
    """Files under root's class folders that discovery leaves out, each with the reason."""
    ignored: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        for d in sorted(dirnames):
            if d.startswith("."):
                ignored.append((str(here / d) + os.sep, "hidden folder"))
            elif (here / d).is_symlink():
                ignored.append((str(here / d) + os.sep, "link to a folder (not followed)"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                ignored.append((str(here / name), "hidden file"))
            elif depth == 0:
                ignored.append((str(here / name), "not inside a class folder"))
            elif Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                ignored.append((str(here / name), "no image extension"))
    return ignored


# --------------------------------------------------------------------------------------------
# Scanning


def scan_files(
    entries: Sequence[Entry], *, workers: int = 0, desc: str = "check", cache: ScanCache | None = None
) -> list[FileResult]:
    """`scan_file` over `entries` in threads (Pillow and hashlib release the GIL), in order.

    With `cache`, files unchanged since a stored scan are not read again (see `data/scan_cache.py`),
    and the usable files scanned now are stored. Unusable files are never stored: a file that
    failed for a reason its bytes do not show (permissions, a flaky disk) is tried again next time.
    """
    workers = workers if workers > 0 else max(1, os.cpu_count() or 1)
    signatures = [signature(e.path) for e in entries] if cache is not None else []
    results: list[FileResult | None] = (
        list(cache.lookup(entries, signatures)) if cache is not None else [None] * len(entries)
    )
    todo = [i for i, r in enumerate(results) if r is None]
    bar = progress(total=len(todo), desc=desc, unit="file")
    with ThreadPoolExecutor(workers) as pool:
        for i, result in zip(todo, pool.map(scan_file, [entries[i] for i in todo]), strict=True):
            results[i] = result
            bar.update(1)
    bar.close()
    if cache is not None:
        log(f"{desc}: {len(entries) - len(todo)} file(s) unchanged since their last scan, {len(todo)} scanned")
        fresh = [i for i in todo if results[i].reason is None]  # type: ignore[union-attr]
        if fresh:
            cache.store([results[i] for i in fresh], [signatures[i] for i in fresh])  # type: ignore[misc]
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Duplicates


def exact_duplicate_groups(results: Sequence[FileResult]) -> list[list[int]]:
    """Indices of usable files that share a content hash, one list per group of 2 or more."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(results):
        if r.sha256 is not None:
            by_hash[r.sha256].append(i)
    return sorted((g for g in by_hash.values() if len(g) > 1), key=lambda g: g[0])


def near_duplicate_groups(
    results: Sequence[FileResult], *, max_bits: int = NEAR_BITS, max_colour: float = NEAR_COLOUR
) -> list[list[int]]:
    """Groups of usable files whose pictures nearly match, leaving out groups of exact copies only.

    Two files match when their dHashes differ in at most `max_bits` bits and their colour
    thumbnails by at most `max_colour` on average; groups are the connected components. Candidate
    pairs come from the pigeonhole trick: split the 64 bits into `max_bits + 1` bands; two hashes
    within `max_bits` of each other agree exactly on at least one band. So only files sharing a
    band are compared, instead of all pairs.

    Example:
        >>> near_duplicate_groups([])
        []
    """
    hashed = [(i, r.dhash, r.thumb) for i, r in enumerate(results) if r.dhash is not None and r.thumb is not None]
    if len(hashed) < 2:
        return []
    usable = [i for i, _, _ in hashed]
    hashes = np.asarray([h for _, h, _ in hashed], dtype=np.uint64)
    thumbs = np.stack([t for _, _, t in hashed]).reshape(len(hashed), -1).astype(np.float32)
    parent = list(range(len(usable)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    bands = max_bits + 1
    edges = np.linspace(0, 64, bands + 1).astype(int)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        keys = (hashes >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        buckets: dict[int, list[int]] = defaultdict(list)
        for position, key in enumerate(keys.tolist()):
            buckets[key].append(position)
        for members in buckets.values():
            if len(members) > 1:
                _link_close(np.asarray(members), hashes, thumbs, max_bits, max_colour, parent, find)
    groups: dict[int, list[int]] = defaultdict(list)
    for position in range(len(usable)):
        groups[find(position)].append(usable[position])
    near = [g for g in groups.values() if len(g) > 1 and len({results[i].sha256 for i in g}) > 1]
    return sorted(near, key=lambda g: g[0])


def _link_close(members, hashes, thumbs, max_bits, max_colour, parent, find) -> None:  # type: ignore[no-untyped-def]
    """Union every pair of `members` that is within the bit and colour limits."""
    for start in range(0, len(members), 256):  # 256 rows at a time: bounded memory for big buckets
        rows = members[start : start + 256]
        xor = hashes[rows][:, None] ^ hashes[members][None, :]
        bits = _POPCOUNT8[xor.view(np.uint8)].reshape(len(rows), len(members), 8).sum(axis=2)
        close_rows, close_cols = np.nonzero(bits <= max_bits)
        a, b = rows[close_rows], members[close_cols]
        pairs = a != b
        a, b = a[pairs], b[pairs]
        colour = np.abs(thumbs[a] - thumbs[b]).mean(axis=1)
        for x, y in zip(a[colour <= max_colour].tolist(), b[colour <= max_colour].tolist(), strict=True):
            rx, ry = find(x), find(y)
            if rx != ry:
                parent[rx] = ry


_POPCOUNT8 = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# The report


@dataclass
class CheckReport:
    """Everything `imgclf check` found. `to_dict()` is the JSON form; `format()` the text one."""

    data: str
    source: str
    results: list[FileResult]
    empty_classes: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    exact_groups: list[list[int]] = field(default_factory=list)
    near_groups: list[list[int]] = field(default_factory=list)
    multilabel: bool = False  # entries' labels are ";"-joined label sets: counts are per label

    def _names(self, label: str) -> list[str]:
        """The classes one entry counts towards: its label, or each label of its set."""
        return split_labels(label) if self.multilabel else [label]

    @property
    def unusable(self) -> list[FileResult]:
        return [r for r in self.results if r.reason is not None]

    @property
    def usable(self) -> list[FileResult]:
        return [r for r in self.results if r.reason is None]

    @property
    def bad_fraction(self) -> float:
        return len(self.unusable) / max(len(self.results), 1)

    def counts(self) -> dict[str, dict[str, int]]:
        """Usable images per split and class (classes sorted; every class listed in every split)."""
        classes = self.classes()
        table: dict[str, dict[str, int]] = {}
        for r in self.usable:
            row = table.setdefault(r.entry.split, dict.fromkeys(classes, 0))
            for name in self._names(r.entry.label):
                row[name] += 1
        for split, _ in self.empty_classes:
            table.setdefault(split, dict.fromkeys(classes, 0))
        return {s: table[s] for s in sorted(table, key=_split_order)}

    def classes(self) -> list[str]:
        named = {n for r in self.results for n in self._names(r.entry.label)}
        return sorted(named | {c for _, c in self.empty_classes})

    def class_totals(self) -> dict[str, int]:
        totals = dict.fromkeys(self.classes(), 0)
        for r in self.usable:
            for name in self._names(r.entry.label):
                totals[name] += 1
        return totals

    def imbalance(self) -> dict[str, Any]:
        """Largest and smallest class (by usable images, those with any) and their ratio."""
        totals = {c: n for c, n in self.class_totals().items() if n > 0}
        if not totals:
            return {"largest": None, "smallest": None, "ratio": None, "imbalanced": False}
        largest = max(totals, key=lambda c: totals[c])
        smallest = min(totals, key=lambda c: totals[c])
        ratio = totals[largest] / totals[smallest]
        return {
            "largest": {"class": largest, "images": totals[largest]},
            "smallest": {"class": smallest, "images": totals[smallest]},
            "ratio": round(ratio, 2),
            "imbalanced": ratio >= IMBALANCE_RATIO,
        }

    def size_distribution(self) -> dict[str, Any]:
        sizes = np.asarray([r.size for r in self.usable if r.size is not None], dtype=np.int64).reshape(-1, 2)
        if not len(sizes):
            return {}
        short = sizes.min(axis=1)

        def stats(values: np.ndarray) -> dict[str, int]:
            p = np.percentile(values, [0, 5, 50, 95, 100]).round().astype(int).tolist()
            return dict(zip(("min", "p5", "median", "p95", "max"), p, strict=True))

        common = Counter(f"{w}x{h}" for w, h in sizes.tolist()).most_common(5)
        return {
            "width": stats(sizes[:, 0]),
            "height": stats(sizes[:, 1]),
            "shorter_side": stats(short),
            "most_common": [{"size": s, "images": n} for s, n in common],
        }

    def _group(self, indices: list[int]) -> dict[str, Any]:
        files = [self.results[i].entry for i in indices]
        splits = {e.split for e in files}
        return {
            "files": [{"path": e.path, "split": e.split, "class": e.label} for e in files],
            "leakage": len(splits & {"train", "val", "test"}) > 1,
            "labels_differ": len({e.label for e in files}) > 1,
        }

    def problems(self) -> list[str]:
        """One line per kind of problem found; empty when the data looks clean."""
        found = []
        if self.unusable:
            found.append(f"{len(self.unusable)} unusable file(s)")
        exact = [self._group(g) for g in self.exact_groups]
        near = [self._group(g) for g in self.near_groups]
        leaks = sum(g["leakage"] for g in exact) + sum(g["leakage"] for g in near)
        if leaks:
            found.append(f"{leaks} duplicate group(s) across splits (leakage)")
        if any(g["labels_differ"] for g in exact + near):
            found.append("duplicates with different labels")
        totals = self.class_totals()
        if any(n == 0 for n in totals.values()):
            found.append("classes with no usable images")
        if self.missing_from_train():
            found.append("classes in val/test without training images")
        return found

    def missing_from_train(self) -> list[str]:
        """Classes with usable val or test images but none in train (training refuses those)."""
        counts = self.counts()
        if "train" not in counts:
            return []
        others = [s for s in counts if s != "train"]
        return [c for c, n in counts["train"].items() if n == 0 and any(counts[s][c] for s in others)]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the report.

        Example:
            >>> report = check("photos/")  # doctest: +SKIP
            >>> report.to_dict()["unusable"][0]  # doctest: +SKIP
            {'path': 'photos/cat/3.jpg', 'split': 'all', 'class': 'cat', 'reason': 'empty file (0 bytes)'}
        """
        totals = self.class_totals()
        exact = [self._group(g) for g in self.exact_groups]
        near = [self._group(g) for g in self.near_groups]
        usable = self.usable
        return {
            "data": self.data,
            "source": self.source,
            "files": len(self.results),
            "usable": len(usable),
            "unusable_count": len(self.unusable),
            "bad_fraction": round(self.bad_fraction, 6),
            "classes": self.classes(),
            "counts": self.counts(),
            "class_totals": totals,
            "empty_classes": sorted({c for c, n in totals.items() if n == 0}),
            "empty_class_folders": [{"split": s, "class": c} for s, c in self.empty_classes],
            "single_image_classes": sorted(c for c, n in totals.items() if n == 1),
            "classes_missing_from_train": self.missing_from_train(),
            "imbalance": self.imbalance(),
            "image_sizes": self.size_distribution(),
            "formats": dict(Counter(r.format for r in usable).most_common()),
            "modes": dict(Counter(r.mode for r in usable).most_common()),
            "animated": [r.entry.path for r in usable if r.animated],
            "exif_rotated": sum(r.exif_rotated for r in usable),
            "unusable": [
                {"path": r.entry.path, "split": r.entry.split, "class": r.entry.label, "reason": r.reason}
                for r in self.unusable
            ],
            "ignored": [{"path": p, "reason": why} for p, why in self.ignored],
            "exact_duplicates": exact,
            "near_duplicates": near,
            "leakage": {
                "exact_groups": sum(g["leakage"] for g in exact),
                "near_groups": sum(g["leakage"] for g in near),
            },
            "warnings": self.warnings,
            "problems": self.problems(),
            **({"multilabel": label_statistics([split_labels(r.entry.label) for r in usable], self.classes())}
               if self.multilabel else {}),
        }

    def format(self) -> str:
        """A human-readable report (lists are cut at 20 entries; `--json` has them all)."""
        d = self.to_dict()
        lines = [f"{d['data']} ({d['source']}): {d['files']} image file(s), {d['usable']} usable, "
                 f"{d['unusable_count']} unusable ({d['bad_fraction']:.1%})"]
        lines.append("")
        splits = list(d["counts"])
        width = max([len(c) for c in d["classes"]] + [5])
        lines.append(f"  {'class':<{width}}  " + "  ".join(f"{s:>6}" for s in splits) + "   total")
        for c in d["classes"]:
            row = "  ".join(f"{d['counts'][s].get(c, 0):>6}" for s in splits)
            lines.append(f"  {c:<{width}}  {row}  {d['class_totals'][c]:>6}")
        imb = d["imbalance"]
        if imb["ratio"] is not None:
            flag = "  <- imbalanced: consider --balance" if imb["imbalanced"] else ""
            lines.append(f"  largest/smallest class: {imb['largest']['class']} {imb['largest']['images']} / "
                         f"{imb['smallest']['class']} {imb['smallest']['images']} = {imb['ratio']}{flag}")
        if d["empty_classes"]:
            lines.append(f"  classes with no usable images: {', '.join(d['empty_classes'])}")
        if d["classes_missing_from_train"]:
            lines.append(f"  classes in val/test with no training images: {', '.join(d['classes_missing_from_train'])}")
        if d["single_image_classes"]:
            lines.append(f"  classes with a single image: {', '.join(d['single_image_classes'])}")
        if "multilabel" in d:
            lines += format_statistics(d["multilabel"])
        sizes = d["image_sizes"]
        if sizes:
            s = sizes["shorter_side"]
            lines.append(f"\nimage sizes: shorter side min {s['min']}, median {s['median']}, max {s['max']} px; "
                         "most common " + ", ".join(f"{m['size']} ({m['images']})" for m in sizes["most_common"]))
            lines.append("formats: " + ", ".join(f"{k} {v}" for k, v in d["formats"].items())
                         + "; modes: " + ", ".join(f"{k} {v}" for k, v in d["modes"].items()))
        if d["animated"] or d["exif_rotated"]:
            lines.append(f"animated (first frame used): {len(d['animated'])}; EXIF-rotated: {d['exif_rotated']}")
        lines += _listing("unusable files", [f"{u['path']}: {u['reason']}" for u in d["unusable"]])
        for kind, groups in (("exact duplicates", d["exact_duplicates"]), ("near duplicates", d["near_duplicates"])):
            lines += _listing(
                f"{kind} ({sum(g['leakage'] for g in groups)} across splits = leakage)" if groups else kind,
                [_describe_group(g) for g in groups],
            )
        lines += _listing("ignored", [f"{i['path']}: {i['reason']}" for i in d["ignored"]])
        lines += _listing("warnings", d["warnings"])
        lines.append("")
        lines.append("problems: " + "; ".join(d["problems"]) if d["problems"] else "no problems found")
        return "\n".join(lines)


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    lines = [f"\n{title} ({len(items)}):"] + [f"  {item}" for item in items[:_MAX_LISTED]]
    if len(items) > _MAX_LISTED:
        lines.append(f"  ... and {len(items) - _MAX_LISTED} more (--json lists them all)")
    return lines


def _describe_group(group: dict[str, Any]) -> str:
    tags = (" [LEAKAGE]" if group["leakage"] else "") + (" [labels differ]" if group["labels_differ"] else "")
    return " = ".join(f"{f['split']}/{f['class']}: {f['path']}" for f in group["files"]) + tags


def _split_order(split: str) -> int:
    order = ["train", "val", "test", "all"]
    return order.index(split) if split in order else len(order)


def check(data: str, *, workers: int = 0) -> CheckReport:
    """Scan DATA: decode every image, hash it, and report what would go wrong in training.

    Args:
        data: a folder of class folders, a folder with train/ (val/, test/), or a CSV manifest.
        workers: decode threads; 0 = one per core.

    Raises:
        DataError: DATA does not exist or is not a supported layout.

    Example:
        >>> report = check("photos/")  # doctest: +SKIP
        >>> [(u["path"], u["reason"]) for u in report.to_dict()["unusable"]]  # doctest: +SKIP
        [('photos/cat/broken.jpg', 'truncated image data: image file is truncated')]
    """
    found = discover(data)
    return report_for(found.entries, data=data, source=found.source, workers=workers,
                      empty_classes=found.empty_classes, ignored=found.ignored, warnings=found.warnings,
                      multilabel=found.multilabel)


def report_for(
    entries: Sequence[Entry],
    *,
    data: str,
    source: str,
    workers: int = 0,
    empty_classes: Iterable[tuple[str, str]] = (),
    ignored: Iterable[tuple[str, str]] = (),
    warnings: Iterable[str] = (),
    cache: ScanCache | None = None,
    multilabel: bool = False,
) -> CheckReport:
    """Scan `entries` (reusing `cache`, see `scan_files`) and build the report (duplicates included)."""
    results = scan_files(entries, workers=workers, cache=cache)
    return CheckReport(
        data=data,
        source=source,
        results=results,
        empty_classes=list(empty_classes),
        ignored=list(ignored),
        warnings=list(warnings),
        exact_groups=exact_duplicate_groups(results),
        near_groups=near_duplicate_groups(results),
        multilabel=multilabel,
    )


# --------------------------------------------------------------------------------------------
# Before training


def preflight(
    dataset: Dataset, *, max_bad_fraction: float, workers: int = 0, use_cache: bool = True
) -> tuple[Dataset, list[dict[str, str]]]:
    """Scan the training data; drop unusable files, or stop when too many of them are bad.

    The same scan as `imgclf check`, over the splits `train` will use (a val split carved out
    of train counts as val, so duplicates between it and train show up as leakage).

    Args:
        dataset: what `load_dataset` found.
        max_bad_fraction: stop when more than this share of all files is unusable.
        workers: decode threads; 0 = one per core.
        use_cache: skip files unchanged since an earlier run's scan (`data/scan_cache.py`).

    Returns:
        The dataset without the unusable files, and those files as {"path", "reason"} dicts.

    Raises:
        DataError: more than `max_bad_fraction` of the files are unusable, or a split (or every
            class but one) is left without images.

    Example:
        >>> dataset, skipped = preflight(load_dataset("photos/"), max_bad_fraction=0.05)  # doctest: +SKIP
    """
    splits: dict[str, ImageSet] = {"train": dataset.train, "val": dataset.val}
    if dataset.test is not None:
        splits["test"] = dataset.test
    if any(s.arrays is not None for s in splits.values()):
        return dataset, []  # built-in sets are held in memory, already decoded
    entries = [
        Entry(path, split, _label_text(label, dataset.classes))
        for split, images in splits.items()
        for path, label in zip(images.paths, images.labels, strict=True)
    ]
    cache = ScanCache.for_paths([e.path for e in entries]) if use_cache and entries else None
    report = report_for(entries, data=dataset.source, source=dataset.source, workers=workers, cache=cache)
    bad = report.unusable
    skipped = [{"path": r.entry.path, "reason": str(r.reason)} for r in bad]
    if report.bad_fraction > max_bad_fraction:
        raise _too_many_unreadable(skipped, len(entries), report.bad_fraction, max_bad_fraction)
    dataset = _with_digests(dataset, report.results)
    leaks = report.to_dict()["leakage"]
    if leaks["exact_groups"] or leaks["near_groups"]:
        log(f"warning: {leaks['exact_groups']} exact and {leaks['near_groups']} near duplicate group(s) span "
            "train/val/test (leakage: scores will be optimistic); `imgclf check DATA` lists them")
    if not bad:
        return dataset, skipped
    log(f"warning: skipping {len(bad)} of {len(entries)} files that cannot be read ({report.bad_fraction:.1%}); "
        "they are listed in the bundle's skipped_files.txt")
    cleaned = _with_digests(_without(dataset, {s["path"] for s in skipped}), report.results)
    for split in ("train", "val"):
        if not len(getattr(cleaned, split)):
            raise DataError(f"no readable images are left in the {split} split after skipping unreadable files",
                            fix="run `imgclf check DATA` and repair or replace the files it lists")
    if cleaned.test is not None and not len(cleaned.test):
        cleaned = dataclasses.replace(cleaned, test=None)
    counts = cleaned.train.class_counts(len(dataset.classes))
    empty = [c for c, n in zip(dataset.classes, counts, strict=True) if n == 0]
    if empty:
        log(f"warning: no readable training images left for class(es) {', '.join(empty)}")
    return cleaned, skipped


def _label_text(label: np.ndarray, classes: list[str]) -> str:
    """A label as the scan reports it: the class name, or a multi-label row's ";"-joined names."""
    if np.ndim(label):
        return join_labels([classes[j] for j in np.flatnonzero(label)])
    return classes[int(label)]


def _too_many_unreadable(skipped: list[dict[str, str]], total: int, fraction: float, limit: float) -> DataError:
    shown = "\n    ".join(f"{s['path']}: {s['reason']}" for s in skipped[:10])
    more = f"\n    ... and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    kinds = Counter(_reason_kind(s["reason"]) for s in skipped)
    reasons = ", ".join(f"{n} {why}" for why, n in kinds.most_common())
    return DataError(
        f"{len(skipped)} of {total} image files ({fraction:.1%}) cannot be read ({reasons}):\n    {shown}{more}",
        expected=f"at most {limit:.1%} unreadable files (max_bad_fraction)",
        fix="run `imgclf check DATA` for the full list and repair or remove those files, "
            "or raise --max-bad-fraction to train on the rest",
    )


def _without(dataset: Dataset, bad_paths: set[str]) -> Dataset:
    """`dataset` without the files in `bad_paths`, in every split."""
    def keep(images: ImageSet) -> ImageSet:
        return images.subset([i for i, p in enumerate(images.paths) if p not in bad_paths])

    return dataclasses.replace(dataset, train=keep(dataset.train), val=keep(dataset.val),
                               test=keep(dataset.test) if dataset.test is not None else None)


def _with_digests(dataset: Dataset, results: Sequence[FileResult]) -> Dataset:
    """The dataset with each split's `digests` taken from the scan's SHA-256s (see ImageSet)."""
    by_path = {r.entry.path: bytes.fromhex(r.sha256)[:DIGEST_BYTES] for r in results if r.sha256}

    def attach(images: ImageSet) -> ImageSet:
        if any(p not in by_path for p in images.paths):
            return images  # an unusable file, dropped later: no digests until the split is clean
        raw = b"".join(by_path[p] for p in images.paths)
        digests = np.frombuffer(raw, dtype=np.uint8).reshape(len(images), DIGEST_BYTES).copy()
        return dataclasses.replace(images, digests=digests)

    return dataclasses.replace(
        dataset, train=attach(dataset.train), val=attach(dataset.val),
        test=attach(dataset.test) if dataset.test is not None else None,
    )


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split(" (")[0]
