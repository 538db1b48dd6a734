"""Multi-label data: the `labels` cell of a CSV manifest, the label matrix and its stratified split.

A CSV manifest whose header has a `labels` column (`path,labels[,split]`) is multi-label: each
cell holds zero or more labels separated by `;` (`cat;dog`). An empty cell is allowed and means
"none of these". The single-label `label` column keeps its meaning, and a folder layout cannot
carry several labels, so it stays single-label.

A multi-label split's `ImageSet.labels` is an N x C float32 0/1 matrix (one column per label of
the dataset's sorted label list) instead of N integers: every consumer that only indexes rows
(stores, caches, subsets) works unchanged, and `labels.ndim == 2` is how the rest of imgclf tells
the two tasks apart (`is_multilabel`).

The validation split is carved out by iterative stratification (Sechidis et al., 2011) from the
`iterative-stratification` package (`iterstrat`), so that every label, rare ones included, keeps
about its share in train and val.

Part of the data layer, beside `cifar`: it imports only `dataset` and errors.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from imgclf.errors import DataError

SEPARATOR = ";"
MULTILABEL_COLUMN = "labels"
# Characters people use between labels instead of ";": seeing one inside a cell is almost always
# a wrong separator, not a label name, so it is an error with the fix rather than a new label.
WRONG_SEPARATORS = (",", "|")


def is_multilabel(labels: np.ndarray) -> bool:
    """True for a multi-label matrix (N x C), False for single-label integers (N).

    Example:
        >>> is_multilabel(np.zeros((3, 2), np.float32)), is_multilabel(np.array([0, 1]))
        (True, False)
    """
    return np.asarray(labels).ndim == 2


def parse_labels_cell(cell: str) -> tuple[list[str], str | None]:
    """The sorted, de-duplicated labels of one `labels` cell, and a problem (None when fine).

    Example:
        >>> parse_labels_cell(" dog ; cat;dog")
        (['cat', 'dog'], None)
        >>> parse_labels_cell("")
        ([], None)
        >>> parse_labels_cell("cat,dog")[1]
        "labels separated by ',': use ';' (cat;dog)"
    """
    text = cell.strip()
    for wrong in WRONG_SEPARATORS:
        if wrong in text:
            fixed = SEPARATOR.join(part.strip() for part in text.split(wrong) if part.strip())
            return [], f"labels separated by {wrong!r}: use {SEPARATOR!r} ({fixed})"
    parts = [p.strip() for p in text.split(SEPARATOR)] if text else []
    if any(not p for p in parts) and len(parts) > 1:
        return [], f"an empty label between separators in {cell.strip()!r}"
    return sorted(set(parts)), None


def join_labels(labels: Sequence[str]) -> str:
    """The canonical text of a label set: sorted, joined by `;` ("" = no label)."""
    return SEPARATOR.join(sorted(set(labels)))


def split_labels(text: str) -> list[str]:
    """`join_labels`' inverse.

    Example:
        >>> split_labels("cat;dog"), split_labels("")
        (['cat', 'dog'], [])
    """
    return [p for p in text.split(SEPARATOR) if p]


def multi_hot(label_sets: Sequence[Sequence[str]], classes: Sequence[str]) -> np.ndarray:
    """The N x C float32 0/1 matrix of `label_sets` over `classes` (every label must be in `classes`).

    Example:
        >>> multi_hot([["b"], [], ["a", "b"]], ["a", "b"]).tolist()
        [[0.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
    """
    index = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(label_sets), len(classes)), dtype=np.float32)
    for row, labels in enumerate(label_sets):
        for label in labels:
            matrix[row, index[label]] = 1.0
    return matrix


def unknown_labels(label_sets: Sequence[Sequence[str]], classes: Sequence[str]) -> list[str]:
    """Labels used in `label_sets` that `classes` lacks, sorted."""
    known = set(classes)
    return sorted({label for labels in label_sets for label in labels} - known)


def unknown_labels_error(unknown: list[str], where: str, classes: Sequence[str]) -> DataError:
    """The error for labels outside the training label list (named, with the list and the fix)."""
    return DataError(
        f"{where} has labels that the training rows never use: {', '.join(unknown[:10])}"
        + (f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""),
        expected=f"labels drawn from the training labels ({', '.join(list(classes)[:20])})",
        fix="check those labels' spelling, or add training rows that carry them",
    )


def iterative_split(matrix: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the rows of a label matrix into (keep, held_out) index arrays, `fraction` held out,
    by iterative stratification: every label keeps about `fraction` of its images in held_out.

    Rows without any label are stratified too (as a label of their own, "none of these"), so
    they are not all dumped into one side. Seeded: the same matrix, fraction and seed give the
    same split.

    Example:
        >>> m = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [1, 1], [1, 1], [0, 0], [0, 0]], np.float32)
        >>> keep, held = iterative_split(m, 0.5, seed=0)
        >>> m[held].sum(0).tolist(), len(held)
        ([2.0, 2.0], 4)
    """
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    n = len(matrix)
    n_held = int(round(n * fraction))
    if n < 2 or n_held == 0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    n_held = min(n_held, n - 1)
    targets = np.asarray(matrix) > 0.5
    # The extra "no label" column stratifies the empty rows and keeps the target 2-D with at least
    # two columns, which is what iterstrat (via scikit-learn's type_of_target) demands.
    targets = np.concatenate([targets, ~targets.any(axis=1, keepdims=True)], axis=1)
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n_held, random_state=seed)
    keep, held = next(splitter.split(np.zeros((n, 1)), targets.astype(np.int64)))
    return np.sort(keep).astype(np.int64), np.sort(held).astype(np.int64)


def label_statistics(label_sets: Sequence[Sequence[str]], classes: Sequence[str] | None = None) -> dict[str, Any]:
    """Counts per label, the co-occurrence table, images with no label and labels per image.

    `co_occurrence[a][b]` is the number of images carrying both a and b (the diagonal: a's count).

    Example:
        >>> stats = label_statistics([["cat", "dog"], ["cat"], []])
        >>> stats["counts"], stats["no_label"], stats["co_occurrence"]["cat"]["dog"]
        ({'cat': 2, 'dog': 1}, 1, 1)
    """
    names = sorted(set(classes) if classes is not None else {x for labels in label_sets for x in labels})
    matrix = multi_hot([[x for x in labels if x in set(names)] for labels in label_sets], names)
    pairs = (matrix.T @ matrix).astype(np.int64)
    per_image = matrix.sum(axis=1)
    cardinality = Counter(int(k) for k in per_image)
    return {
        "labels": names,
        "images": len(label_sets),
        "counts": {name: int(pairs[i, i]) for i, name in enumerate(names)},
        "no_label": int((per_image == 0).sum()),
        "labels_per_image": {"mean": round(float(per_image.mean()), 4) if len(per_image) else 0.0,
                             "histogram": {str(k): cardinality[k] for k in sorted(cardinality)}},
        "co_occurrence": {a: {b: int(pairs[i, j]) for j, b in enumerate(names)} for i, a in enumerate(names)},
    }


def format_statistics(stats: dict[str, Any], *, top_pairs: int = 10) -> list[str]:
    """Text lines for `imgclf check`: labels per image, images without labels, the most frequent pairs.

    Example:
        >>> format_statistics(label_statistics([["a", "b"], ["a"], []]))[0]
        'multi-label: 3 image(s), 1.00 label(s) per image on average; 1 with no label (allowed: none of these)'
    """
    lines = [f"multi-label: {stats['images']} image(s), {stats['labels_per_image']['mean']:.2f} label(s) per image "
             f"on average; {stats['no_label']} with no label (allowed: none of these)"]
    histogram = ", ".join(f"{k}: {v}" for k, v in stats["labels_per_image"]["histogram"].items())
    lines.append(f"  labels per image: {histogram}")
    names = stats["labels"]
    co = stats["co_occurrence"]
    pairs = sorted(((co[a][b], a, b) for i, a in enumerate(names) for b in names[i + 1:] if co[a][b]), reverse=True)
    if pairs:
        lines.append("  most frequent pairs: " + ", ".join(f"{a}+{b} {n}" for n, a, b in pairs[:top_pairs]))
    return lines
