"""Progress bars (images/s and ETA) and the run log, both on stderr so stdout stays parseable."""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm import tqdm


def progress(*, total: int, desc: str, unit: str = "img", **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr. Shown on a terminal; `IMGCLF_PROGRESS=1` forces it, `=0` hides it."""
    setting = os.environ.get("IMGCLF_PROGRESS", "")
    disable = None if setting == "" else setting == "0"  # None: tqdm hides it off a terminal
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


def log(message: str) -> None:
    """One line of the run's narrative, on stderr."""
    tqdm.write(message, file=sys.stderr)
