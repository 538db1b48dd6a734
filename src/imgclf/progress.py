"""Progress bars (images/s and ETA) and the run log, both on stderr so stdout stays parseable."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from imgclf.distributed import is_main


def progress(*, total: int, desc: str, unit: str = "img", **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr. Shown on a terminal; `IMGCLF_PROGRESS=1` forces it, `=0` hides it.

    Under torchrun only rank 0 shows bars.
    """
    setting = os.environ.get("IMGCLF_PROGRESS", "")
    disable = None if setting == "" else setting == "0"  # None: tqdm hides it off a terminal
    if not is_main():
        disable = True
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=False,
        dynamic_ncols=True,
        file=sys.stderr,
        disable=disable,
        mininterval=0.5,
        leave=False,
        **kwargs,
    )


_LOG_FILES: list[TextIO] = []


def log(message: str) -> None:
    """One line of the run's narrative, on stderr (and, with a timestamp, in any `log_to_file`).

    Under torchrun only rank 0 logs: the ranks run the same code, so their lines would repeat it.
    """
    if not is_main():
        return
    tqdm.write(message, file=sys.stderr)
    for handle in _LOG_FILES:
        handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        handle.flush()


@contextlib.contextmanager
def log_to_file(path: str | Path) -> Iterator[None]:
    """Also append every `log` line to `path` (e.g. a run's train.log) while the block runs.

    Example:
        >>> with log_to_file("runs/x/train.log"):  # doctest: +SKIP
        ...     log("epoch 1/5: ...")
    """
    handle = open(path, "a", encoding="utf-8")
    _LOG_FILES.append(handle)
    try:
        yield
    finally:
        _LOG_FILES.remove(handle)
        handle.close()
