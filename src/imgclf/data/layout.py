"""What kind of DATA argument this is: the one layout detector.

Training (`sources.load_dataset`), evaluation (`sources.load_eval_split`) and `imgclf check`
(`check.discover`) all start here, so they agree on what a DATA argument means. Forms, detected in
this order:

1. `cifar10` / `cifar100`: the standard sets, downloaded into the cache on first use.
2. A CSV manifest with `path,label` columns (and an optional `split` column of train/val/test).
3. A folder holding `train/` (and optionally `val/` and `test/`), each with a folder per class.
4. A folder with a folder per class.

Part of the data layer: it imports only `cifar` (for the names of the standard sets) and errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from imgclf.data import cifar
from imgclf.errors import DataError

SPLIT_NAMES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}
ACCEPTED = (
    "a folder with one sub-folder of images per class; a folder with train/ (and optionally "
    "val/, test/) each holding class folders; a CSV file with path,label columns; or cifar10 / "
    "cifar100"
)
Kind = Literal["builtin", "csv manifest", "split folders", "class folders"]


@dataclass(frozen=True)
class Layout:
    """A DATA argument, recognised but not yet listed.

    `name` is the standard set's name for "builtin" (e.g. "cifar10"); `path` is the CSV file or
    the folder otherwise; `splits` maps "train" / "val" / "test" to the split folders found (for
    "split folders" only; it may lack "train", which training refuses and `imgclf check` accepts).
    """

    kind: Kind
    path: Path | None = None
    name: str = ""
    splits: dict[str, Path] = field(default_factory=dict)


def detect_layout(data: str) -> Layout:
    """Recognise DATA as a standard set, a CSV manifest, split folders or class folders.

    Raises:
        DataError: DATA does not exist, or is a file but not a .csv manifest.

    Example:
        >>> detect_layout("cifar10")
        Layout(kind='builtin', path=None, name='cifar10', splits={})
        >>> detect_layout("photos/").kind  # doctest: +SKIP
        'class folders'
    """
    if data.lower() in cifar.NAMES:
        return Layout("builtin", name=data.lower())
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(
            f"DATA {data!r} does not exist",
            expected=ACCEPTED,
            fix="check the path (relative paths are resolved from the current folder)",
        )
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(f"DATA {data!r} is a file but not a .csv manifest", expected=ACCEPTED)
        return Layout("csv manifest", path)
    splits = find_split_dirs(path)
    return Layout("split folders", path, splits=splits) if splits else Layout("class folders", path)


def find_split_dirs(root: Path) -> dict[str, Path]:
    """The split folders directly in `root` ("train": root/train, ...), by any of the SPLIT_NAMES.

    Example:
        >>> find_split_dirs(Path("flowers/"))  # doctest: +SKIP
        {'train': PosixPath('flowers/train'), 'test': PosixPath('flowers/test')}
    """
    found: dict[str, Path] = {}
    children = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    for split, names in SPLIT_NAMES.items():
        for name in names:
            if name in children:
                found[split] = children[name]
                break
    return found
