"""A person's decisions about flagged images (keep, relabel, remove), read from a CSV and applied to a dataset.

`imgclf review` writes `label_issues.csv` and a page on which a person marks each flagged image
*keep*, *relabel* (to a label they pick) or *remove*; the page exports those marks as a CSV.
`imgclf train DATA --exclude FILE` and `--relabel FILE` apply them to the images training reads,
in memory: the user's files and folders are never touched.

Two forms of FILE are accepted, told apart by the header:

- decisions (the page's export): `path,given_label,decision,label`, where `decision` is `keep`,
  `relabel` or `remove`, and `label` is the new label of a `relabel` row (ignored otherwise).
  `--exclude` applies the `remove` rows, `--relabel` the `relabel` rows; pass the same file to both
  to apply all of them.
- `label_issues.csv` itself (no `decision` column): `--exclude` removes every listed image (the
  whole flagged set, as a benchmark does), `--relabel` gives every row of kind `label` its
  `suggested_label`.

Paths are matched after `os.path.realpath`, so a relative path in DATA, an absolute one in the CSV
and a symbolic link all name the same file. Relative paths in FILE are relative to FILE's folder
(as in a CSV manifest). Part of the data layer: it imports only `dataset`.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from imgclf.data.dataset import Dataset, ImageSet
from imgclf.errors import DataError
from imgclf.progress import log

Action = Literal["keep", "relabel", "remove"]
ACTIONS: tuple[Action, ...] = ("keep", "relabel", "remove")
DECISION_COLUMNS = ("path", "given_label", "decision", "label")  # what the review page exports
_MAX_SHOWN = 10  # bad rows listed in an error


@dataclass(frozen=True)
class Decision:
    """What to do with one image: `label` is the new label of a relabel, else None."""

    path: str  # os.path.realpath of the file
    action: Action
    label: str | None = None


@dataclass
class Decisions:
    """The decisions read from one CSV file.

    Example:
        >>> decisions = read_decisions("review/decisions.csv")  # doctest: +SKIP
        >>> decisions.counts()  # doctest: +SKIP
        {'keep': 12, 'relabel': 3, 'remove': 5}
    """

    source: str
    rows: list[Decision]

    def counts(self) -> dict[str, int]:
        found = Counter(d.action for d in self.rows)
        return {a: found.get(a, 0) for a in ACTIONS}

    def removals(self) -> set[str]:
        return {d.path for d in self.rows if d.action == "remove"}

    def relabels(self) -> dict[str, str]:
        return {d.path: str(d.label) for d in self.rows if d.action == "relabel"}


def _real(path: str, base: Path) -> str:
    full = Path(path).expanduser()
    return os.path.realpath(full if full.is_absolute() else base / full)


def read_decisions(path: str | Path, *, issues_action: Action = "remove") -> Decisions:
    """Read a decisions CSV (the review page's export) or a `label_issues.csv`.

    Args:
        path: the CSV file.
        issues_action: what a `label_issues.csv` row (no `decision` column) means: "remove" (every
            row) or "relabel" (rows of kind `label`, to their `suggested_label`).

    Raises:
        DataError: the file is missing or unreadable, lacks the columns, or has bad rows (all
            listed, with their line numbers).

    Example:
        >>> read_decisions("decisions.csv").removals()  # doctest: +SKIP
        {'/data/pets/cat/17.jpg'}
    """
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the decisions file {str(path)!r}: {exc}",
                        fix="pass the CSV that the review page exported, or label_issues.csv") from None
    reader = csv.DictReader(text.splitlines())
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    if "path" not in header or ("decision" not in header and "suggested_label" not in header):
        raise DataError(
            f"{str(path)!r} has the columns {header!r}",
            expected=f"the review page's export ({','.join(DECISION_COLUMNS)}) or imgclf review's label_issues.csv",
            fix="export the decisions again from review.html, or pass DIR/label_issues.csv",
        )
    rows, problems = _parse_rows(reader, file, issues_action=issues_action, decided="decision" in header)
    if problems:
        shown = "\n    ".join(problems[:_MAX_SHOWN])
        more = f"\n    ... and {len(problems) - _MAX_SHOWN} more" if len(problems) > _MAX_SHOWN else ""
        raise DataError(f"{str(path)!r} has {len(problems)} bad row(s):\n    {shown}{more}",
                        expected=f"decision one of {', '.join(ACTIONS)}; a label on every relabel row; "
                                 "one decision per image",
                        fix="fix or delete those lines")
    return Decisions(str(path), rows)


def _parse_rows(
    reader: csv.DictReader, file: Path, *, issues_action: Action, decided: bool
) -> tuple[list[Decision], list[str]]:
    """(decisions, problems) of every data row; a row's line number is its place in the file."""
    rows: dict[str, Decision] = {}
    problems: list[str] = []
    for line, row in enumerate(reader, start=2):
        raw = (row.get("path") or "").strip()
        if not raw:
            if any((v or "").strip() for v in row.values() if isinstance(v, str)):
                problems.append(f"line {line}: empty path")
            continue
        if decided:
            action = (row.get("decision") or "").strip().lower()
            label = (row.get("label") or "").strip() or None
        elif issues_action == "relabel":
            if (row.get("kind") or "label").strip() != "label":
                continue  # an outlier or a duplicate: no label to give it
            action, label = "relabel", (row.get("suggested_label") or "").strip() or None
        else:
            action, label = "remove", None
        if action not in ACTIONS:
            problems.append(f"line {line}: decision {action!r}")
            continue
        if action == "relabel" and not label:
            problems.append(f"line {line}: relabel without a label")
            continue
        decision = Decision(_real(raw, file.parent), action, label if action == "relabel" else None)  # type: ignore[arg-type]
        earlier = rows.get(decision.path)
        if earlier is not None and earlier != decision:
            problems.append(f"line {line}: {raw!r} already has the decision {earlier.action}")
            continue
        rows[decision.path] = decision
    return list(rows.values()), problems


def apply_decisions(dataset: Dataset, *, exclude: str | None = None, relabel: str | None = None) -> Dataset:
    """`dataset` without the images `exclude` removes and with the labels `relabel` gives, in every split.

    The one call training makes (`training.run`); with neither file it returns `dataset` as it is.

    Raises:
        DataError: a file is unreadable or malformed, none of its images is in DATA, a relabel
            names a class DATA does not have, or a split is left without images.

    Example:
        >>> dataset = apply_decisions(load_dataset("pets/"), exclude="review/decisions.csv")  # doctest: +SKIP
    """
    if not exclude and not relabel:
        return dataset
    removals: set[str] = set()
    relabels: dict[str, str] = {}
    if exclude:
        decisions = read_decisions(exclude, issues_action="remove")
        removals = decisions.removals()
        if decisions.relabels() and relabel != exclude:
            log(f"note: {len(decisions.relabels())} relabel decision(s) in {exclude} are not applied; "
                f"pass --relabel {exclude} as well to apply them")
    if relabel:
        relabels = read_decisions(relabel, issues_action="relabel").relabels()
    if relabels and dataset.train.labels.ndim == 2:
        raise DataError(f"{relabel!r} relabels images, but DATA is multi-label (a set of labels per image)",
                        expected="single-label DATA for --relabel", fix="edit the labels column of the CSV instead")
    unknown = sorted(set(relabels.values()) - set(dataset.classes))
    if unknown:
        raise DataError(f"{relabel!r} relabels images to class(es) DATA does not have: {', '.join(unknown[:10])}",
                        expected=f"labels among {', '.join(dataset.classes[:20])}",
                        fix="correct those labels in the decisions file")
    index = {c: i for i, c in enumerate(dataset.classes)}
    seen: set[str] = set()
    relabelled: list[int] = []  # per split: images given a new label

    def change(images: ImageSet) -> ImageSet:
        real = [_real(p, Path.cwd()) if images.arrays is None else p for p in images.paths]
        keep = [i for i, p in enumerate(real) if p not in removals]
        labels = images.labels.copy()
        for i, p in enumerate(real):
            if p in relabels:
                labels[i] = index[relabels[p]]
        seen.update(p for p in real if p in removals or p in relabels)
        relabelled.append(sum(p in relabels and p not in removals for p in real))
        return dataclasses.replace(images, labels=labels).subset(keep)

    changed = dataclasses.replace(dataset, train=change(dataset.train), val=change(dataset.val),
                                  test=change(dataset.test) if dataset.test is not None else None)
    _report(dataset, changed, removals | set(relabels), seen, [f for f in (exclude, relabel) if f],
            relabelled=sum(relabelled))
    return changed


def _report(
    before: Dataset, after: Dataset, named: set[str], seen: set[str], files: list[str], *, relabelled: int
) -> None:
    """Log what the decisions changed; raise when they match nothing or empty a split."""
    if named and not seen:
        raise DataError(f"none of the {len(named)} image(s) in {' and '.join(files)} is in the data {before.source!r}",
                        expected="a decisions file written for this DATA (by imgclf review DATA)",
                        fix="run imgclf review on this DATA and export the decisions again")
    if len(seen) < len(named):
        log(f"warning: {len(named) - len(seen)} image(s) in {' and '.join(files)} are not in DATA (moved or "
            "deleted since the review?); they are ignored")
    for split in ("train", "val"):
        if not len(getattr(after, split)):
            raise DataError(f"the decisions remove every image of the {split} split",
                            fix="keep some images, or remove fewer")
    removed = {s: len(getattr(before, s)) - len(getattr(after, s))
               for s in ("train", "val", "test") if getattr(before, s) is not None}
    log(f"decisions ({', '.join(files)}): removed " + ", ".join(f"{n} {s}" for s, n in removed.items())
        + f" image(s), relabelled {relabelled}; {len(seen)} of {len(named)} listed image(s) found in DATA")
