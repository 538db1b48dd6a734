"""`imgclf review DATA`: likely label errors, outliers and near-duplicates, for a person to decide on.

The steps, each reusing what the package already has:

1. `check`'s scan of DATA (`data.check`, with the scan cache): unreadable files are skipped and
   listed, and its exact and near duplicate groups are the `duplicate` rows.
2. Frozen features of every readable image (`review.features`, through the feature cache).
3. Out-of-fold probabilities of the linear probe, then cleanlab (`review.issues`): `label` rows
   (with the suggested label) and `outlier` rows.
4. `DIR/label_issues.csv` (`path,given_label,suggested_label,score,kind`, ranked: label issues by
   cleanlab's ranking, then outliers, then duplicates; one row per image) and `DIR/review.html`.

`score` is in [0, 1] and higher means more likely a problem: 1 - cleanlab's label quality for
`label`, 1 - the outlier score for `outlier`, 1.0 (exact copy) or 0.9 (near copy) for `duplicate`.
Every image of DATA is reviewed, test split included: a wrong test label skews every score.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgclf.bundle import Model
from imgclf.config import DEFAULT_BACKBONE
from imgclf.data.check import CheckReport, discover, report_for
from imgclf.data.dataset import ImageSet
from imgclf.data.layout import detect_layout
from imgclf.data.scan_cache import ScanCache
from imgclf.errors import DataError
from imgclf.files import atomic_write, atomic_write_text, cache_dir, hash_tensor
from imgclf.progress import log
from imgclf.review.features import Embedder, embed_images, log_failed
from imgclf.review.issues import (
    DEFAULT_FILTER,
    DEFAULT_FOLDS,
    DEFAULT_RANK,
    LabelIssues,
    find_label_issues,
    find_outliers,
    out_of_fold_probabilities,
)
from imgclf.review.page import MAX_PAGE_ROWS, review_page, thumbnails

CSV_COLUMNS = ("path", "given_label", "suggested_label", "score", "kind")
KINDS = ("label", "outlier", "duplicate")  # the order of the ranking, and which kind an image listed twice keeps
MIN_IMAGES = 10  # fewer and five folds of a probe say nothing


@dataclass
class IssueRow:
    """One flagged image: a row of label_issues.csv (`note` only shows on the page)."""

    path: str
    given_label: str
    suggested_label: str
    score: float
    kind: str
    note: str = ""

    def csv_row(self) -> list[str]:
        return [self.path, self.given_label, self.suggested_label, f"{self.score:.6f}", self.kind]


@dataclass
class ReviewResult:
    """What `review_data` found and wrote. `to_dict()` is `imgclf review --json`."""

    data: str
    out: Path
    csv: Path
    html: Path
    rows: list[IssueRow]
    images: int  # images reviewed (readable)
    classes: list[str]
    unreadable: list[dict[str, str]]  # {"path", "reason"}, as `check` lists them
    network: str  # where the features came from
    oof_accuracy: float  # out-of-fold probe accuracy against the given labels
    estimated_label_issues: int  # cleanlab's estimate of how many labels are wrong
    seconds: dict[str, float] = field(default_factory=dict)
    probabilities: np.ndarray | None = field(default=None, repr=False)  # N x C out-of-fold, for benchmarks
    paths: list[str] = field(default_factory=list, repr=False)  # the reviewed images, rows of `probabilities`

    def counts(self) -> dict[str, int]:
        return {kind: sum(r.kind == kind for r in self.rows) for kind in KINDS}

    def to_dict(self, top: int = 20) -> dict[str, Any]:
        return {
            "data": self.data, "images": self.images, "classes": self.classes, "counts": self.counts(),
            "top": [dataclasses.asdict(r) for r in self.rows[:top]],
            "files": {"label_issues_csv": str(self.csv), "review_html": str(self.html)},
            "unreadable": self.unreadable, "features": self.network, "oof_accuracy": round(self.oof_accuracy, 6),
            "estimated_label_issues": self.estimated_label_issues,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }


@dataclass(frozen=True)
class ReviewSettings:
    """How `review_data` decides (defaults measured in BENCHMARKS.md, issue 17)."""

    backbone: str = DEFAULT_BACKBONE  # pretrained features; ignored when `bundle` is given
    image_size: int | None = None  # None: the backbone's size, less for small images (as the probe)
    bundle: str | None = None  # features from this trained bundle's backbone instead
    # Average the features of each image and its mirror (test-time augmentation): 2x the first run's
    # network time. CIFAR-10, 10% flipped: recall of the flagged set 0.838 -> 0.852 (0.85 is the
    # issue's target), 5%: precision 0.508 -> 0.534 (BENCHMARKS.md, issue 17).
    mirror: bool = True
    folds: int = DEFAULT_FOLDS
    filter_by: str = DEFAULT_FILTER  # cleanlab's find_label_issues(filter_by=...)
    rank_by: str = DEFAULT_RANK  # cleanlab's label quality score
    # "estimate": flag the lowest-quality images, as many as cleanlab's num_label_issues estimates are
    # wrong; "cleanlab": the set `filter_by` finds. On CIFAR-10 with 5% flipped, lite0 224 px: estimate
    # 860 flagged, precision 0.51, recall 0.87; prune_by_noise_rate 1,292, 0.32, 0.84 (review.md).
    count: str = "estimate"
    rounds: int = 1  # rounds of out-of-fold fits; each after the first trains without the last round's flags
    outliers: bool = True
    seed: int = 0
    workers: int = 0
    batch_size: int = 64


def review_data(data: str, *, out: str | Path = "review", settings: ReviewSettings | None = None) -> ReviewResult:
    """Find likely label errors, outliers and duplicates in DATA; write label_issues.csv and review.html.

    Args:
        data: a folder of class folders, a folder with train/ (val/, test/), or a CSV manifest.
        out: the folder for label_issues.csv and review.html (created; files replaced atomically).
        settings: the features and methods (`ReviewSettings`).

    Raises:
        DataError: DATA is missing, empty, a built-in set, has one class or too few readable images.

    Example:
        >>> result = review_data("pets/", out="pets-review")  # doctest: +SKIP
        >>> result.counts()  # doctest: +SKIP
        {'label': 14, 'outlier': 3, 'duplicate': 2}
    """
    settings = settings or ReviewSettings()
    started = time.perf_counter()
    report, images, classes = _scan(data, workers=settings.workers)
    scanned = time.perf_counter()
    embedder = _embedder(settings, images)
    embeddings = embed_images(images, embedder, mirror=settings.mirror, batch_size=settings.batch_size,
                              desc="review features")
    log_failed(embeddings.failed)
    kept = embeddings.positions
    labels = images.labels[kept]
    embedded = time.perf_counter()
    probabilities, issues = label_issues(embeddings.features, labels, len(classes), settings)
    paths = [images.paths[i] for i in kept]
    rows = [IssueRow(paths[i], classes[labels[i]], classes[issues.suggested[i]], 1.0 - float(issues.quality[i]),
                     "label") for i in issues.ranked]
    if settings.outliers and len(kept) > MIN_IMAGES:
        flagged, scores = find_outliers(embeddings.features, labels)
        rows += [IssueRow(paths[i], classes[labels[i]], classes[issues.suggested[i]], 1.0 - float(scores[i]),
                          "outlier", "unlike the rest of the data") for i in flagged]
    rows += _duplicate_rows(report)
    rows = _one_per_image(rows)
    accuracy = float((probabilities.argmax(1) == labels).mean())
    log(f"review: {len(kept)} images, out-of-fold accuracy on the given labels {accuracy:.4f}; flagged "
        + ", ".join(f"{sum(r.kind == k for r in rows)} {k}" for k in KINDS)
        + f" (cleanlab estimates {issues.estimated_count} wrong labels)")
    found = time.perf_counter()
    unreadable = [{"path": r.entry.path, "reason": str(r.reason)} for r in report.unusable]
    unreadable += [{"path": p, "reason": why} for p, why in embeddings.failed]
    result = ReviewResult(data=data, out=Path(out), csv=Path(out) / "label_issues.csv",
                          html=Path(out) / "review.html", rows=rows, images=len(kept), classes=classes,
                          unreadable=unreadable, network=embedder.source, oof_accuracy=accuracy,
                          estimated_label_issues=issues.estimated_count, probabilities=probabilities, paths=paths)
    _write(result)
    result.seconds = {"scan": scanned - started, "features": embedded - scanned, "issues": found - embedded,
                      "write": time.perf_counter() - found, "total": time.perf_counter() - started}
    return result


def label_issues(
    features: np.ndarray, labels: np.ndarray, num_classes: int, settings: ReviewSettings
) -> tuple[np.ndarray, LabelIssues]:
    """(out-of-fold probabilities, cleanlab's findings), over `settings.rounds` rounds: each round after
    the first fits its heads without the images the previous round flagged (still scoring them).

    Example:
        >>> probs, issues = label_issues(features, labels, 10, ReviewSettings(rounds=2))  # doctest: +SKIP
    """
    file = _probabilities_file(features, labels, settings)
    if file.is_file():  # the same features, labels and settings: the fits' result is kept
        try:
            with np.load(file) as stored:
                probabilities = stored["probabilities"]
            log(f"review: out-of-fold probabilities from the cache ({file.parent})")
            return probabilities, find_label_issues(labels, probabilities, filter_by=settings.filter_by,
                                                    rank_by=settings.rank_by, count=settings.count)
        except (OSError, ValueError, KeyError) as exc:
            log(f"warning: ignoring the unreadable cached probabilities {file} ({exc})")
    probabilities, l2 = out_of_fold_probabilities(features, labels, num_classes, folds=settings.folds,
                                                  seed=settings.seed)
    issues = find_label_issues(labels, probabilities, filter_by=settings.filter_by, rank_by=settings.rank_by,
                               count=settings.count)
    for _ in range(settings.rounds - 1):
        suspected = np.zeros(len(labels), dtype=bool)
        suspected[issues.ranked] = True
        log(f"review: another round without the {int(suspected.sum())} suspected labels in training")
        probabilities, _ = out_of_fold_probabilities(features, labels, num_classes, folds=settings.folds,
                                                     seed=settings.seed, l2=l2, leave_out=suspected)
        issues = find_label_issues(labels, probabilities, filter_by=settings.filter_by, rank_by=settings.rank_by,
                                   count=settings.count)
    try:  # not flushed to disk: a lost file is only computed again
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(file, lambda temp: _save_probabilities(temp, probabilities), durable=False)
    except OSError as exc:
        log(f"warning: could not keep the out-of-fold probabilities in the cache ({exc})")
    return probabilities, issues


def _probabilities_file(features: np.ndarray, labels: np.ndarray, settings: ReviewSettings) -> Path:
    """`$IMGCLF_CACHE/review/<hash>.npz`: keyed by the features, the labels and what the fits depend on.

    The k-fold fits are most of a review served from the feature cache (CIFAR-10, 10,000 images:
    tens of seconds); with this a second review of unchanged data takes seconds.
    """
    digest = hashlib.blake2b(f"oof v1;{settings.folds};{settings.seed};{settings.rounds};"
                             f"{settings.filter_by};{settings.rank_by};{settings.count}".encode(), digest_size=16)
    hash_tensor(digest, torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)), "features")
    hash_tensor(digest, torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)), "labels")
    return cache_dir() / "review" / f"{digest.hexdigest()}.npz"


def _save_probabilities(path: Path, probabilities: np.ndarray) -> None:
    with path.open("wb") as f:  # a file object: np.savez would add ".npz" to the temporary name
        np.savez(f, probabilities=probabilities)


def _scan(data: str, *, workers: int) -> tuple[CheckReport, ImageSet, list[str]]:
    """`check`'s scan of DATA: (report, the readable labelled images with their digests, classes)."""
    if detect_layout(data).path is None:
        raise DataError(f"{data!r} is a built-in dataset held in memory; review shows image files",
                        fix="review a folder of class folders or a CSV manifest")
    try:
        found = discover(data)
    except DataError as exc:  # check's message, with how to fix it for a review
        raise DataError(exc.what, expected=exc.expected,
                        fix=exc.fix or "put each class's images in its own sub-folder (DATA/cat/1.jpg), then review "
                        "again") from None
    for warning in found.warnings:
        log(f"warning: {warning}")
    cache = ScanCache.for_paths([e.path for e in found.entries])
    report = report_for(found.entries, data=data, source=found.source, workers=workers,
                        empty_classes=found.empty_classes, ignored=found.ignored, cache=cache)
    if report.unusable:
        log_failed([(r.entry.path, str(r.reason)) for r in report.unusable])
    usable = report.usable
    classes = sorted({r.entry.label for r in usable})
    if len(classes) < 2:
        raise DataError(f"{data!r} has {len(classes)} class(es) with readable images"
                        f"{' (' + classes[0] + ')' if classes else ''}",
                        expected="at least two classes: a label can only be wrong if there is another one",
                        fix="add a folder of images for every other class")
    if len(usable) < MIN_IMAGES:
        raise DataError(f"{data!r} has {len(usable)} readable image(s)",
                        expected=f"at least {MIN_IMAGES}, a few per class, to score each label with a probe that "
                                 "did not see it", fix="add images, then review again")
    index = {c: i for i, c in enumerate(classes)}
    digests = np.frombuffer(b"".join(bytes.fromhex(r.sha256 or "0" * 64)[:16] for r in usable),
                            dtype=np.uint8).reshape(len(usable), 16).copy()
    images = ImageSet(paths=[r.entry.path for r in usable],
                      labels=np.asarray([index[r.entry.label] for r in usable], dtype=np.int64), digests=digests)
    return report, images, classes


def _embedder(settings: ReviewSettings, images: ImageSet) -> Embedder:
    if settings.bundle:
        embedder = Embedder.from_bundle(Model.load(settings.bundle), settings.bundle)
    else:
        embedder = Embedder.pretrained(settings.backbone, image_size=settings.image_size, images=images)
    log(f"review: features from the {embedder.source}" + (" with its mirror" if settings.mirror else ""))
    return embedder


def _duplicate_rows(report: CheckReport) -> list[IssueRow]:
    """Every member of a duplicate group but its first: the copies a person may remove."""
    rows = []
    for groups, score, what in ((report.exact_groups, 1.0, "exact copy"), (report.near_groups, 0.9, "near copy")):
        for group in groups:
            first = report.results[group[0]].entry
            for i in group[1:]:
                entry = report.results[i].entry
                rows.append(IssueRow(entry.path, entry.label, first.label, score, "duplicate",
                                     f"{what} of {first.path}"))
    return rows


def _one_per_image(rows: list[IssueRow]) -> list[IssueRow]:
    """Rows in `KINDS` order (each kind keeps its own ranking), an image listed twice keeping its first kind."""
    seen: set[str] = set()
    ordered = []
    for kind in KINDS:
        for row in rows:
            if row.kind == kind and row.path not in seen:
                seen.add(row.path)
                ordered.append(row)
    return ordered


def _write(result: ReviewResult) -> None:
    """label_issues.csv (every row, absolute paths) and review.html (the first MAX_PAGE_ROWS), atomically."""
    result.out.mkdir(parents=True, exist_ok=True)
    for row in result.rows:  # absolute: the decisions must name the same files wherever train runs from
        row.path = os.path.abspath(row.path)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(r.csv_row() for r in result.rows)
    atomic_write_text(result.csv, buffer.getvalue())
    shown = result.rows[:MAX_PAGE_ROWS]
    pictures = thumbnails([r.path for r in shown])
    counts = result.counts()
    summary = (f"{result.data}: {result.images} images, {len(result.classes)} classes; "
               + ", ".join(f"{n} {k}" for k, n in counts.items())
               + f"; features: {result.network}; out-of-fold accuracy on the given labels {result.oof_accuracy:.3f}"
               + (f"; {len(result.unreadable)} unreadable file(s) skipped" if result.unreadable else ""))
    note = f"The page shows the first {MAX_PAGE_ROWS} of {len(result.rows)} rows." if len(result.rows) > len(shown) \
        else ""
    page_rows = [{**dataclasses.asdict(r), "thumbnail": t} for r, t in zip(shown, pictures, strict=True)]
    page = review_page(page_rows, classes=result.classes, title=f"imgclf review: {result.data}", summary=summary,
                       key=os.path.abspath(result.out), note=note)
    atomic_write_text(result.html, page)
