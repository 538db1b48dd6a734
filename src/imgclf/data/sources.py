"""Find the images and labels behind a DATA argument, and the image files behind predict's arguments.

The kind of DATA is recognised by `layout.detect_layout` (a standard set, a CSV manifest with
`path,label[,split]` columns whose paths are relative to the CSV file, split folders or class
folders); this module lists its files and labels into a `Dataset`.

The class -> index map is fixed from the training data (sorted names) and reused everywhere after.
Part of the data layer, above `dataset`, `layout` and `cifar`.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import numpy as np

from imgclf.data import cifar
from imgclf.data.dataset import Dataset, ImageSet
from imgclf.data.decode import is_image_file
from imgclf.data.layout import ACCEPTED, SPLIT_NAMES, detect_layout
from imgclf.data.multilabel import (
    MULTILABEL_COLUMN,
    SEPARATOR,
    is_multilabel,
    iterative_split,
    join_labels,
    multi_hot,
    parse_labels_cell,
    split_labels,
    unknown_labels,
    unknown_labels_error,
)
from imgclf.errors import BundleError, DataError

# --------------------------------------------------------------------------------------------
# Discovery


def list_class_folder(root: Path) -> tuple[dict[str, list[Path]], list[str]]:
    """Map class name -> sorted image files under `root/<class>/` (recursively).

    Symbolic links to files are followed; links to folders are not, so a link loop cannot hang
    the scan. Returns the mapping and warnings about folders that hold no images.
    """
    classes: dict[str, list[Path]] = {}
    warnings: list[str] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.is_symlink():
            warnings.append(f"skipped linked folder {str(sub)!r} (links to folders are not followed)")
            continue
        files = sorted(p for p in _walk_files(sub) if is_image_file(p))
        if files:
            classes[sub.name] = files
        else:
            warnings.append(
                f"class folder {str(sub)!r} holds no images; it is left out of the class list"
            )
    return classes, warnings


def _walk_files(folder: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames)
    return found


def describe_folder(root: Path) -> str:
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    dirs = [p.name for p in entries if p.is_dir()]
    files = [p for p in entries if p.is_file()]
    images = [p for p in files if is_image_file(p)]
    listed = ", ".join(sorted(dirs)[:5]) + ("..." if len(dirs) > 5 else "")
    return (
        f"{len(dirs)} folder(s){' (' + listed + ')' if dirs else ''}, {len(files)} file(s)"
        f" of which {len(images)} image(s) directly inside"
    )


def _image_set(class_files: dict[str, list[Path]], class_index: dict[str, int]) -> ImageSet:
    paths: list[str] = []
    labels: list[int] = []
    for name, files in class_files.items():
        paths.extend(str(f) for f in files)
        labels.extend([class_index[name]] * len(files))
    return ImageSet(paths=paths, labels=np.asarray(labels, dtype=np.int64))


def _check_classes(classes: list[str], where: str) -> None:
    if not classes:
        raise DataError(
            f"no images found in {where}",
            expected=ACCEPTED,
            fix="point DATA at the folder that holds the class folders, and check the files are images",
        )
    if len(classes) == 1:
        raise DataError(
            f"only one class ({classes[0]!r}) found in {where}",
            expected="at least two classes: a classifier needs something to tell apart",
            fix="add a folder of images for every other class",
        )


def _unknown_classes_error(unknown: set[str], split: str, classes: list[str]) -> DataError:
    return DataError(
        f"the {split} split has classes that the training data lacks: {', '.join(sorted(unknown))}",
        expected=f"{split} classes drawn from the training classes ({', '.join(classes)})",
        fix=f"add training images for those classes or remove them from {split}",
    )


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (keep, held_out) with `fraction` of every class held out, seeded.

    Every class with at least 2 images keeps at least 1 and holds out at least 1. A multi-label
    matrix (N x C, see `data.multilabel`) is split by iterative stratification instead.

    Example:
        >>> keep, held = stratified_split(np.array([0, 0, 0, 0, 1, 1, 1, 1]), 0.5, seed=0)
        >>> sorted(np.bincount(np.array([0, 0, 0, 0, 1, 1, 1, 1])[held]).tolist())
        [2, 2]
    """
    if is_multilabel(labels):
        return iterative_split(labels, fraction, seed)
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    held: list[np.ndarray] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_held = int(round(len(idx) * fraction))
        if len(idx) >= 2:
            n_held = min(max(n_held, 1), len(idx) - 1)
        else:
            n_held = 0
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def load_dataset(data: str, *, val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """Detect the kind of `data` and return its splits.

    Example:
        >>> ds = load_dataset("photos/")  # doctest: +SKIP
        >>> ds.classes
        ['cat', 'dog']
    """
    layout = detect_layout(data)
    if layout.path is None:  # a standard set, held in memory
        train, test, classes = cifar.load_cifar(layout.name)
        keep, held = stratified_split(train.labels, val_fraction, seed)
        return Dataset(classes, train.subset(keep), train.subset(held), test, layout.name, True)
    path, splits = layout.path, layout.splits
    if layout.kind == "csv manifest":
        return _from_csv(path, val_fraction=val_fraction, seed=seed)
    if "train" in splits:
        return _from_split_folders(splits, val_fraction=val_fraction, seed=seed, root=path)
    if splits:
        found = ", ".join(f"{k}/" for k in splits)
        raise DataError(
            f"{str(path)!r} has {found} but no train/ folder",
            expected="train/ next to val/ and test/, each holding class folders",
            fix="rename the training folder to train/, or point DATA at a folder of class folders",
        )
    class_files, warnings = list_class_folder(path)
    if not class_files:
        raise DataError(
            f"no class folders with images in {str(path)!r}: found {describe_folder(path)}",
            expected=ACCEPTED,
            fix="put each class's images in its own sub-folder, e.g. DATA/cat/1.jpg",
        )
    classes = sorted(class_files)
    _check_classes(classes, repr(str(path)))
    full = _image_set(class_files, {c: i for i, c in enumerate(classes)})
    keep, held = stratified_split(full.labels, val_fraction, seed)
    return Dataset(classes, full.subset(keep), full.subset(held), None, "class folders", True, warnings)


def _from_split_folders(
    splits: dict[str, Path], *, val_fraction: float, seed: int, root: Path
) -> Dataset:
    train_files, warnings = list_class_folder(splits["train"])
    classes = sorted(train_files)
    _check_classes(classes, repr(str(splits["train"])))
    index = {c: i for i, c in enumerate(classes)}
    train = _image_set(train_files, index)
    others: dict[str, ImageSet] = {}
    for split in ("val", "test"):
        if split not in splits:
            continue
        files, more = list_class_folder(splits[split])
        warnings.extend(more)
        unknown = set(files) - set(classes)
        if unknown:
            raise _unknown_classes_error(unknown, split, classes)
        if files:
            others[split] = _image_set(files, index)
    if "val" in others:
        val, val_from_train = others["val"], False
    else:
        keep, held = stratified_split(train.labels, val_fraction, seed)
        train, val, val_from_train = train.subset(keep), train.subset(held), True
    return Dataset(classes, train, val, others.get("test"), "split folders", val_from_train, warnings)


def _from_csv(path: Path, *, val_fraction: float, seed: int) -> Dataset:
    rows = read_manifest(path)
    if manifest_is_multilabel(path):
        return _from_multilabel_csv(path, rows, val_fraction=val_fraction, seed=seed)
    labels_by_split: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    for file, label, split in rows:
        labels_by_split[split].append((file, label))
    classes = sorted({label for _, label in labels_by_split["train"]})
    _check_classes(classes, f"the train rows of {str(path)!r}")
    index = {c: i for i, c in enumerate(classes)}

    def make(items: list[tuple[str, str]], split: str) -> ImageSet:
        unknown = {label for _, label in items} - set(classes)
        if unknown:
            raise _unknown_classes_error(unknown, split, classes)
        return ImageSet(
            paths=[f for f, _ in items],
            labels=np.asarray([index[label] for _, label in items], dtype=np.int64),
        )

    train = make(labels_by_split["train"], "train")
    warnings: list[str] = []
    counts = Counter(label for _, label in labels_by_split["train"])
    if labels_by_split["val"]:
        val, val_from_train = make(labels_by_split["val"], "val"), False
    else:
        keep, held = stratified_split(train.labels, val_fraction, seed)
        train, val, val_from_train = train.subset(keep), train.subset(held), True
    test = make(labels_by_split["test"], "test") if labels_by_split["test"] else None
    singles = sorted(c for c, n in counts.items() if n < 2)
    if singles:
        warnings.append(f"classes with a single training image: {', '.join(singles)}")
    return Dataset(classes, train, val, test, "csv manifest", val_from_train, warnings)


def _from_multilabel_csv(
    path: Path, rows: list[tuple[str, str, str]], *, val_fraction: float, seed: int
) -> Dataset:
    """A `path,labels[,split]` manifest's splits: label matrices over the sorted training labels."""
    by_split: dict[str, list[tuple[str, list[str]]]] = {"train": [], "val": [], "test": []}
    for file, text, split in rows:
        by_split[split].append((file, split_labels(text)))
    classes = sorted({x for _, labels in by_split["train"] for x in labels})
    if not classes:
        raise DataError(f"the train rows of {str(path)!r} carry no labels at all",
                        expected="at least one label on some training image",
                        fix="fill the labels column (labels separated by ';')")

    def make(split: str) -> ImageSet:
        items = by_split[split]
        unknown = unknown_labels([labels for _, labels in items], classes)
        if unknown:
            raise unknown_labels_error(unknown, f"the {split} rows of {str(path)!r}", classes)
        return ImageSet(paths=[f for f, _ in items], labels=multi_hot([labels for _, labels in items], classes))

    train, warnings = make("train"), []
    rare = [c for c, n in zip(classes, train.class_counts(len(classes)), strict=True) if n < 2]
    if rare:
        warnings.append(f"labels on a single training image: {', '.join(rare)}")
    if by_split["val"]:
        val, val_from_train = make("val"), False
    else:
        keep, held = iterative_split(train.labels, val_fraction, seed)
        train, val, val_from_train = train.subset(keep), train.subset(held), True
    test = make("test") if by_split["test"] else None
    return Dataset(classes, train, val, test, "csv manifest (multi-label)", val_from_train, warnings)


def read_manifest(path: Path) -> list[tuple[str, str, str]]:
    """Parse a `path,label[,split]` CSV into (absolute path, label, split) rows.

    All bad rows are collected and reported together, with their line numbers.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read CSV {str(path)!r}: {exc}", fix="save it as UTF-8 text") from None
    reader = csv.reader(text.splitlines())
    header = [h.strip().lower() for h in next(reader, [])]
    multilabel = _manifest_is_multilabel(header, path)
    if "path" not in header or not ("label" in header or multilabel):
        raise DataError(
            f"CSV {str(path)!r} has header {header!r}",
            expected="a header row with 'path' and 'label' (and optionally 'split'); or, for several labels "
            "per image, 'path' and 'labels'",
            fix="add the header line: path,label (or path,labels with labels separated by ';')",
        )
    col_path, col_label = header.index("path"), header.index(MULTILABEL_COLUMN if multilabel else "label")
    col_split = header.index("split") if "split" in header else None
    rows: list[tuple[str, str, str]] = []
    problems: list[str] = []
    for line_no, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) < len(header) or (multilabel and len(row) > len(header)):
            hint = f" (separate labels with {SEPARATOR!r}, not ',')" if len(row) > len(header) else ""
            problems.append(f"line {line_no}: {len(row)} field(s), expected {len(header)}{hint}")
            continue
        file, label = row[col_path].strip(), row[col_label].strip()
        split = row[col_split].strip().lower() if col_split is not None else "train"
        split = next((k for k, names in SPLIT_NAMES.items() if split in names), split)
        if multilabel:  # canonical "a;b" text; an empty cell is allowed and means "none of these"
            names, problem = parse_labels_cell(label)
            if problem:
                problems.append(f"line {line_no}: {problem}")
                continue
            label = join_labels(names)
        if not file or (not label and not multilabel):
            problems.append(f"line {line_no}: empty {'path' if not file else 'label'}")
            continue
        if split not in SPLIT_NAMES:
            problems.append(f"line {line_no}: unknown split {split!r} (use train, val or test)")
            continue
        full = (path.parent / file).resolve()
        if not full.is_file():
            problems.append(f"line {line_no}: file {file!r} not found (looked for {str(full)!r})")
            continue
        rows.append((str(full), label, split))
    if problems:
        shown = "\n    ".join(problems[:20])
        more = f"\n    ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(
            f"CSV {str(path)!r} has {len(problems)} bad row(s):\n    {shown}{more}",
            expected="every row: an existing image path (relative to the CSV) and a label"
            + (f" set (labels separated by {SEPARATOR!r}, empty for none)" if multilabel else ""),
            fix="fix or delete those lines",
        )
    if not rows:
        raise DataError(f"CSV {str(path)!r} has no rows", expected="one row per image")
    return rows


def _manifest_is_multilabel(header: list[str], path: Path) -> bool:
    """True for a `path,labels[,split]` manifest (see `data.multilabel`); both columns is ambiguous."""
    if MULTILABEL_COLUMN in header and "label" in header:
        raise DataError(
            f"CSV {str(path)!r} has both a 'label' and a 'labels' column",
            expected="'label' (one class per image) or 'labels' (several, separated by ';'), not both",
            fix="keep one of the two columns",
        )
    return MULTILABEL_COLUMN in header


def manifest_is_multilabel(path: Path) -> bool:
    """Whether the CSV manifest at `path` has a `labels` column (several labels per image).

    Example:
        >>> manifest_is_multilabel(Path("photos.csv"))  # doctest: +SKIP
        True
    """
    text = path.read_text(encoding="utf-8-sig")
    header = [h.strip().lower() for h in next(csv.reader(text.splitlines()[:1]), [])]
    return _manifest_is_multilabel(header, path)


def load_eval_split(data: str, classes: list[str], *, multilabel: bool = False) -> tuple[ImageSet, str]:
    """The images to evaluate a bundle on: a test split when DATA has one, else all its images.

    Labels are mapped through the bundle's `classes`; a class the bundle does not know is an error.
    A `multilabel` bundle needs a `path,labels` CSV (labels come back as a matrix), and a
    single-label bundle data with one label per image.
    """
    index = {c: i for i, c in enumerate(classes)}
    layout = detect_layout(data)
    if layout.path is None:  # a standard set: its test split
        _, test, data_classes = cifar.load_cifar(layout.name)
        named = [(p, data_classes[i]) for p, i in zip(test.paths, test.labels, strict=False)]
        return _relabel(named, index, classes, data, arrays=test.arrays), f"{layout.name} test"
    path, splits = layout.path, layout.splits
    if layout.kind == "csv manifest":
        rows = read_manifest(path)
        chosen = [r for r in rows if r[2] == "test"] or rows
        split = "test rows" if any(r[2] == "test" for r in rows) else "all rows"
        if manifest_is_multilabel(path) != multilabel:
            raise _task_mismatch(data, multilabel)
        if multilabel:
            return _relabel_multilabel([(f, lab) for f, lab, _ in chosen], classes, data), split
        return _relabel([(f, lab) for f, lab, _ in chosen], index, classes, data), split
    if multilabel:
        raise _task_mismatch(data, multilabel)
    folder, split = path, "all images"
    for name in ("test", "val"):
        if name in splits:
            folder, split = splits[name], f"{name}/"
            break
    else:
        if "train" in splits:
            folder, split = splits["train"], "train/"
    files, _ = list_class_folder(folder)
    if not files:
        raise DataError(f"no class folders with images in {str(folder)!r}", expected=ACCEPTED)
    named = [(str(f), c) for c, fs in files.items() for f in fs]
    return _relabel(named, index, classes, data), split


def _relabel(
    named: list[tuple[str, str]],
    index: dict[str, int],
    classes: list[str],
    data: str,
    arrays: np.ndarray | None = None,
) -> ImageSet:
    unknown = sorted({label for _, label in named} - set(index))
    if unknown:
        raise BundleError(
            f"the data {data!r} has classes the model was not trained on: {', '.join(unknown[:10])}",
            expected=f"classes drawn from the model's: {', '.join(classes[:20])}",
            fix="evaluate with data of the same classes, or train a model on these classes",
        )
    return ImageSet(
        paths=[p for p, _ in named],
        labels=np.asarray([index[label] for _, label in named], dtype=np.int64),
        arrays=arrays,
    )


def _task_mismatch(data: str, multilabel: bool) -> BundleError:
    if multilabel:
        return BundleError(f"the model is multi-label but {data!r} has one label per image",
                           expected="a CSV manifest with path,labels columns (labels separated by ';')",
                           fix="evaluate with a path,labels CSV, or use a model trained on single labels")
    return BundleError(f"the model is single-label but {data!r} is a multi-label CSV (a 'labels' column)",
                       expected="class folders or a CSV with path,label columns",
                       fix="evaluate with single-label data, or train a model on this multi-label CSV")


def _relabel_multilabel(named: list[tuple[str, str]], classes: list[str], data: str) -> ImageSet:
    sets = [split_labels(text) for _, text in named]
    unknown = unknown_labels(sets, classes)
    if unknown:
        raise BundleError(
            f"the data {data!r} has labels the model was not trained on: {', '.join(unknown[:10])}",
            expected=f"labels drawn from the model's: {', '.join(classes[:20])}",
            fix="evaluate with data of the same labels, or train a model on these labels",
        )
    return ImageSet(paths=[p for p, _ in named], labels=multi_hot(sets, classes))


def collect_images(paths: list[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into image files, sorted within each folder.

    What `predict` and the export's parity check run on: any image files, no labels needed.

    Raises:
        DataError: a path does not exist, or nothing that looks like an image was found.

    Example:
        >>> collect_images(["photos/cat/", "dog.jpg"])[:2]  # doctest: +SKIP
        [PosixPath('photos/cat/1.jpg'), PosixPath('photos/cat/2.jpg')]
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p)))
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"{str(raw)!r} does not exist", fix="pass image files or folders of images")
    if not found:
        raise DataError(
            f"no images found in {', '.join(map(str, paths))}",
            expected="files with an image extension (.jpg, .png, ...) or folders holding them",
        )
    return found
