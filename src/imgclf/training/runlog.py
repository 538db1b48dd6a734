"""The run folder's own account of a run: per-epoch metrics as JSON lines, and TensorBoard events.

Both are `fit` callbacks. `train.log` (every log line, timestamped) comes from
`progress.log_to_file`, and `config.yaml` from `config.save_yaml`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imgclf.errors import ConfigError
from imgclf.files import atomic_write_text
from imgclf.models.classifier import ImageClassifier

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsLog:
    """Appends one JSON object per finished epoch to `out/metrics.jsonl`.

    Example:
        >>> fit(..., callbacks=[MetricsLog("runs/x", history=[])])  # doctest: +SKIP
    """

    def __init__(self, out: str | Path, *, history: list[dict[str, Any]]) -> None:
        """Start the file from `history`: empty for a new run, the checkpoint's when resuming.

        Rewriting it (atomically) drops the lines of epochs that a killed run logged after its
        last checkpoint, which the resumed run trains again.
        """
        self.path = Path(out) / METRICS_FILE
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in history))

    def on_epoch_end(self, record: dict[str, Any], model: ImageClassifier) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


class TensorBoardLog:
    """Writes every number of the epoch record as a TensorBoard scalar under `out/tensorboard`."""

    def __init__(self, out: str | Path, *, first_epoch: int = 1) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "--tensorboard needs the tensorboard package",
                fix="pip install tensorboard, or leave out --tensorboard",
            ) from None
        # purge_step drops events a killed run wrote after its last checkpoint.
        self.writer = SummaryWriter(str(Path(out) / TENSORBOARD_DIR), purge_step=first_epoch)

    def on_epoch_end(self, record: dict[str, Any], model: ImageClassifier) -> None:
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, global_step=int(record["epoch"]))
        self.writer.flush()


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True
