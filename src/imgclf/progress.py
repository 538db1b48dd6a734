"""Progress bars (images/s and ETA) and the run log, both on stderr so stdout stays parseable.

The run log goes through the standard `logging` module (the `imgclf` logger), so a library user can
route it like any other library's; by default it prints exactly what it always printed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


class ConsoleHandler(logging.Handler):
    """Writes each log line on stderr through `tqdm.write`, so an open progress bar is redrawn below it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)  # sys.stderr now: tests and notebooks replace it
        except Exception:  # logging's contract: a failing handler reports itself and never raises
            self.handleError(record)


LOGGER_NAME = "imgclf"
logger = logging.getLogger(LOGGER_NAME)
# The console output is there without any set-up, as it always was: a script calling imgclf.train
# sees the run's narrative. The lines do not propagate to the root logger, so a root handler
# (logging.basicConfig) does not print each of them a second time; see `log` for how to route them.
CONSOLE = ConsoleHandler()
CONSOLE.setFormatter(logging.Formatter("%(message)s"))
logger.addHandler(CONSOLE)
logger.setLevel(logging.INFO)
logger.propagate = False


def log(message: str) -> None:
    """One line of the run's narrative, at INFO on the `imgclf` logger: on stderr (and, with a
    timestamp, in any `log_to_file`).

    Under torchrun only rank 0 logs: the ranks run the same code, so their lines would repeat it.
    A library user routes the lines with the standard `logging` API.

    Example:
        >>> import logging
        >>> logger = logging.getLogger("imgclf")
        >>> logger.removeHandler(CONSOLE)  # no console lines ...
        >>> logger.propagate = True  # ... the root logger's handlers get them instead
        >>> logger.addHandler(CONSOLE); logger.propagate = False  # as it was
    """
    if not is_main():
        return
    logger.info(message)


@contextlib.contextmanager
def log_to_file(path: str | Path) -> Iterator[None]:
    """Also append every `log` line, with its time, to `path` (e.g. a run's train.log) while the block runs.

    Example:
        >>> with log_to_file("runs/x/train.log"):  # doctest: +SKIP
        ...     log("epoch 1/5: ...")
    """
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
