"""Checkpoints that survive a kill at any moment, and exact resume from them.

A checkpoint is a folder `OUT/checkpoints/ckpt-NNNNNN/` holding two files:

- `tensors.safetensors`: the model, the best epoch's weights, the optimizer's moments and the torch
  generator states (`model.*`, `best.*`, `optimizer.<param>.<name>`, `rng.*`);
- `state.json`: everything else: the stage (`head` after the linear probe, `fit` during fine-tuning),
  epoch and step, the position in the data order, the scheduler, the optimizer's hyperparameters,
  numpy's and Python's generator states, early-stopping counters, history and the resolved config.

Both files are written into `.tmp-ckpt-NNNNNN-PID/`, fsynced, and the folder is renamed into place
(`os.replace`, atomic on POSIX and Windows), then the parent folder is fsynced. A reader therefore sees a
complete checkpoint or none; a kill leaves only a `.tmp-*` folder, which the next start deletes. The
two newest checkpoints are kept; older ones are first renamed to `.trash-*` and then deleted, so a
kill while deleting never leaves a half-deleted `ckpt-*` folder either.

Loading reads JSON and safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imgclf.config import TrainConfig
from imgclf.errors import ConfigError, ImgclfError, check_format
from imgclf.files import TEMP_PREFIX, atomic_write_text, fsync_dir, fsync_file
from imgclf.models.classifier import ImageClassifier, non_finite_tensors, state_dict_mismatch
from imgclf.progress import log
from imgclf.training.finetune import FitResult, LoopState, NonFiniteLossError
from imgclf.training.reproducible import rng_states, set_rng_states

CHECKPOINTS = "checkpoints"
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
FINISHED_FILE = "finished.json"  # written once the bundle is saved: the run needs nothing more
FORMAT = "imgclf-checkpoint"
FORMAT_VERSION = 1
KEEP = 2  # complete checkpoints kept; the older one is the fallback if the newest cannot be read
TRASH_PREFIX = ".trash-"
# Options that may differ between a run and its resumption: they change where and how fast it
# runs, not what it computes.
RESUMABLE_CHANGES = frozenset(
    {"out", "device", "workers", "memory_fraction", "resume", "tensorboard", "checkpoint_minutes", "compile",
     "scan_cache", "keep_checkpoints"}
)
# Test hook: seconds to sleep in the middle of every checkpoint write, so a test can kill it there.
PAUSE_ENV = "IMGCLF_TEST_CHECKPOINT_PAUSE"


class CheckpointError(ImgclfError):
    """A checkpoint is missing, corrupt, or belongs to a different run."""


# --------------------------------------------------------------------------------------------
# Leftovers


def remove_stale(folder: Path) -> list[Path]:
    """Delete the `.tmp-*` and `.trash-*` leftovers of killed writes in `folder`; returns them."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for item in folder.iterdir():
        if item.name.startswith((TEMP_PREFIX, TRASH_PREFIX)):
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
            removed.append(item)
    return removed


# --------------------------------------------------------------------------------------------
# Reading


@dataclass
class Checkpoint:
    """One checkpoint read from disk: its tensors and its JSON state."""

    folder: Path
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]

    @property
    def seq(self) -> int:
        return int(self.state["seq"])

    def part(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors whose names start with `prefix` + '.', with the prefix removed."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}

    def describe(self) -> str:
        loop = self.state.get("loop")
        if self.state["stage"] == "head" or not loop:
            return "after the head fit"
        return f"at epoch {loop['epoch']}, step {loop['step']}"


def checkpoint_folders(out: str | Path) -> list[Path]:
    """The complete checkpoint folders of run folder `out`, oldest first."""
    folder = Path(out) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("ckpt-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def read_checkpoint(folder: str | Path) -> Checkpoint:
    """Read and check one checkpoint folder (JSON and safetensors only; nothing is unpickled).

    Raises:
        CheckpointError: a file is missing, unreadable or corrupt, or a weight is NaN or inf.

    Example:
        >>> read_checkpoint("runs/x/checkpoints/ckpt-000012").describe()  # doctest: +SKIP
        'at epoch 3, step 5'
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / TENSORS_FILE))
    except (OSError, ValueError, SafetensorError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError(
            f"checkpoint {str(folder)!r} cannot be read: {type(exc).__name__}: {str(exc)[:300]}",
            fix="resume from an older checkpoint (delete this folder) or start the run again",
        ) from None
    check_format(state, source=str(folder / STATE_FILE), kind="checkpoint", format=FORMAT, version=FORMAT_VERSION,
                 error=CheckpointError)
    bad = non_finite_tensors(tensors)
    if bad:
        raise CheckpointError(f"checkpoint {str(folder)!r} has NaN or inf values in {', '.join(bad[:5])}")
    return Checkpoint(folder, tensors, state)


def latest_checkpoint(out: str | Path) -> Checkpoint | None:
    """The newest checkpoint of run folder `out` that reads correctly, or None if it has none.

    Example:
        >>> latest_checkpoint("runs/x").describe()  # doctest: +SKIP
        'at epoch 3, step 5'
    """
    for folder in reversed(checkpoint_folders(out)):
        try:
            return read_checkpoint(folder)
        except CheckpointError as exc:
            log(f"warning: skipping an unreadable checkpoint: {exc.what}")
    return None


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `module`; any missing, unexpected or reshaped key is listed in the error."""
    mismatch = state_dict_mismatch(module, state)
    if mismatch:
        raise CheckpointError(
            f"the weights in {source} do not match the model: {mismatch}",
            expected="a checkpoint of the same backbone and class count",
            fix="resume with the options of the original run, or use a new --out",
        )
    module.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------
# Writing and resuming


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's JSON")


def _tensors(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in state.items()}


class Checkpointer:
    """Writes the checkpoints of one run folder and restores the run from the newest one.

    Example:
        >>> checkpoints = Checkpointer.open(cfg)  # doctest: +SKIP
        >>> fit(model, train, val, cfg, epochs=5, device=cpu, dtype=dtype,  # doctest: +SKIP
        ...     checkpointer=checkpoints)
    """

    def __init__(self, out: Path, cfg: TrainConfig, resume_from: Checkpoint | None) -> None:
        self.folder = out / CHECKPOINTS
        self.cfg = cfg
        self.resume_from = resume_from
        self.probe_info: dict[str, Any] | None = resume_from.state.get("probe") if resume_from else None
        # The training steps' dtype, chosen by timing (training/precision.py): a resumed run must use the
        # one the run began with, not time again (a close call can go the other way on a busy machine).
        self.training_dtype: str | None = resume_from.state.get("training_dtype") if resume_from else None
        # The backbone the run trains (`--backbone auto` may have chosen one): a resumed run keeps it.
        self.backbone: str | None = resume_from.state.get("backbone") if resume_from else None
        self.seq = resume_from.seq if resume_from else max(
            (int(p.name[5:]) for p in checkpoint_folders(out)), default=0
        )
        self.last_save = time.monotonic()

    @classmethod
    def open(cls, cfg: TrainConfig) -> Checkpointer:
        """Prepare `cfg.out` for checkpoints: clean leftovers and find what to resume from.

        Raises:
            ConfigError: the folder holds an unfinished run and `cfg.resume` is off, or the
                run to resume was made with different options.
        """
        out = Path(cfg.out)
        folder = out / CHECKPOINTS
        for item in remove_stale(folder) + remove_stale(out):
            log(f"removed {item.name}, left by an interrupted write")
        existing = checkpoint_folders(out)
        finished = (folder / FINISHED_FILE).is_file()
        if not cfg.resume:
            if existing and not finished:
                raise ConfigError(
                    f"{str(out)!r} holds the checkpoints of an unfinished run",
                    expected="--resume to continue it, or an --out folder without one",
                    fix=f"add --resume, or delete {str(folder)!r} to start over",
                )
            if folder.is_dir():
                trash = folder.with_name(f"{TRASH_PREFIX}{CHECKPOINTS}-{os.getpid()}")
                os.replace(folder, trash)  # atomically gone, then deleted at leisure
                shutil.rmtree(trash, ignore_errors=True)
            return cls(out, cfg, None)
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            log(f"--resume: no checkpoint in {str(out)!r} yet; starting from the beginning")
            return cls(out, cfg, None)
        check_same_run(checkpoint, cfg)
        log(f"resuming from {checkpoint.folder.name}, {checkpoint.describe()}")
        return cls(out, cfg, checkpoint)

    def resumed_history(self) -> list[dict[str, Any]]:
        """The fine-tuned epochs' records of the run being resumed (empty for a new run); not epoch 0,
        the probe's head, which metrics.jsonl and TensorBoard do not list."""
        if self.resume_from is None or self.resume_from.state["stage"] != "fit":
            return []
        return [r for r in self.resume_from.state["result"]["history"] if r["epoch"] > 0]

    # -- the head (linear probe) stage -------------------------------------------------------

    def restore_model(self, model: ImageClassifier) -> dict[str, Any]:
        """Load the checkpoint's weights and generator states; returns the probe's summary."""
        checkpoint = self.resume_from
        if checkpoint is None:
            raise CheckpointError("there is no checkpoint to restore the model from")
        load_strict(model, checkpoint.part("model"), f"checkpoint {str(checkpoint.folder)!r}")
        set_rng_states(checkpoint.part("rng"), checkpoint.state["rng"])
        return dict(checkpoint.state.get("probe") or {})

    def save_head(self, model: ImageClassifier, probe_info: dict[str, Any]) -> None:
        """Checkpoint the model right after the head fit, so a resumed run skips the probe."""
        self.probe_info = probe_info
        self._write({"stage": "head"}, _tensors("model", model.state_dict()))

    # -- the fine-tuning stage ---------------------------------------------------------------

    def due(self) -> bool:
        """True when `checkpoint_minutes` have passed since the last checkpoint (0: always)."""
        return time.monotonic() - self.last_save >= self.cfg.checkpoint_minutes * 60.0

    def restore_fit(
        self, model: ImageClassifier, optimizer: torch.optim.Optimizer, scheduler: Any, state: LoopState,
        result: FitResult,
    ) -> None:
        """Put the optimizer, scheduler, loop, history and generators back as they were saved."""
        checkpoint = self.resume_from
        if checkpoint is None or checkpoint.state["stage"] != "fit":
            return
        saved = checkpoint.state
        moments: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in saved["optimizer"]["state"].items()}
        for name, tensor in checkpoint.part("optimizer").items():
            index, key = name.split(".", 1)
            moments.setdefault(int(index), {})[key] = tensor
        groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()}  # JSON made the tuple a list
                  for group in saved["optimizer"]["param_groups"]]
        optimizer.load_state_dict({"state": moments, "param_groups": groups})
        # Moments in the same memory layout as their weights, as a fresh optimizer makes them.
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key, value in optimizer.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor) and value.shape == p.shape:
                        optimizer.state[p][key] = torch.empty_like(p).copy_(value)
        scheduler.load_state_dict(saved["scheduler"])
        loop = saved["loop"]
        for key in ("epoch", "step", "seen", "correct", "loss_sum", "seconds", "since_best", "start_lr"):
            setattr(state, key, loop[key])
        best = checkpoint.part("best")
        state.best_state = best or None
        augment = checkpoint.tensors.get("augment_rng")
        state.augment_generator = torch.Generator().set_state(augment) if augment is not None else None
        record = saved["result"]
        result.history = list(record["history"])
        result.best_epoch = int(record["best_epoch"])
        result.best_val_accuracy = float(record["best_val_accuracy"])
        loss = record.get("best_val_loss")  # absent before 2026-11-30; None for inf
        result.best_val_loss = math.inf if loss is None else float(loss)
        result.stopped_early = bool(record["stopped_early"])
        set_rng_states(checkpoint.part("rng"), saved["rng"])

    def save_fit(
        self, model: ImageClassifier, optimizer: torch.optim.Optimizer, scheduler: Any, state: LoopState,
        result: FitResult,
    ) -> None:
        """Checkpoint the fine-tuning loop as it stands after a whole batch or epoch.

        Raises:
            NonFiniteLossError: a weight is NaN or inf; nothing is written, the last good one stays.
        """
        weights = model.state_dict()
        bad = non_finite_tensors(weights)
        if bad:
            raise NonFiniteLossError(
                f"weights became NaN or inf at epoch {state.epoch}, step {state.step} ({', '.join(bad[:3])})",
                expected="finite weights",
                fix=f"lower --lr (e.g. by 10x); the last good checkpoint in {str(self.folder)!r} was kept",
            )
        optimizer_state = optimizer.state_dict()
        tensors = _tensors("model", weights)
        plain: dict[str, dict[str, Any]] = {}
        for index, values in optimizer_state["state"].items():
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
                else:
                    plain.setdefault(str(index), {})[key] = value
        if state.best_state is not None:
            tensors.update(_tensors("best", state.best_state))
        if state.augment_generator is not None:
            tensors["augment_rng"] = state.augment_generator.get_state()
        values = {
            "stage": "fit",
            "loop": {
                "epoch": state.epoch, "step": state.step,
                # The data order is a permutation drawn from (seed, epoch), so the step fixes the position.
                "position": state.step * self.cfg.batch_size,
                "seen": state.seen, "correct": state.correct, "loss_sum": state.loss_sum,
                "seconds": state.seconds, "since_best": state.since_best, "start_lr": state.start_lr,
            },
            "optimizer": {"state": plain, "param_groups": optimizer_state["param_groups"]},
            "scheduler": scheduler.state_dict(),
            "result": {"history": result.history, "best_epoch": result.best_epoch,
                       "best_val_accuracy": result.best_val_accuracy, "stopped_early": result.stopped_early,
                       "best_val_loss": result.best_val_loss if math.isfinite(result.best_val_loss) else None},
        }
        self._write(values, tensors)

    # -- files -------------------------------------------------------------------------------

    def finish(self, *, keep: bool = False) -> None:
        """Mark the run complete (its bundle is saved), so a new run may reuse the folder.

        Unless `keep` (`--keep-checkpoints`), the checkpoints are deleted: the bundle holds the
        result, and a checkpoint with its optimizer state is ~3.5x the weights (a 10-class photo run
        left 105 MB beside its 14 MB `model.safetensors`).
        """
        self.folder.mkdir(parents=True, exist_ok=True)  # a seed run writes no checkpoints before this
        atomic_write_text(self.folder / FINISHED_FILE, json.dumps({"seq": self.seq}) + "\n")
        if keep:
            return
        for folder in checkpoint_folders(self.folder.parent):
            trash = folder.with_name(f"{TRASH_PREFIX}{folder.name}-{os.getpid()}")
            os.replace(folder, trash)  # atomically gone, then deleted at leisure
            shutil.rmtree(trash, ignore_errors=True)

    def _write(self, values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        from imgclf.version import library_versions

        rng_tensors, rng_values = rng_states()
        tensors.update(_tensors("rng", rng_tensors))
        self.seq += 1
        name = f"ckpt-{self.seq:06d}"
        state = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "seq": self.seq,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **values,
            "probe": self.probe_info, "training_dtype": self.training_dtype, "backbone": self.backbone,
            "rng": rng_values,
            "threads": torch.get_num_threads(),
            "config": self.cfg.to_dict(), "versions": library_versions(),
        }
        text = json.dumps(state, indent=1, default=_json_default)
        self.folder.mkdir(parents=True, exist_ok=True)
        temp = self.folder / f"{TEMP_PREFIX}{name}-{os.getpid()}"
        temp.mkdir()
        save_file(tensors, str(temp / TENSORS_FILE))
        fsync_file(temp / TENSORS_FILE)
        pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
        if pause > 0:
            time.sleep(pause)
        with open(temp / STATE_FILE, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        fsync_dir(temp)
        os.replace(temp, self.folder / name)
        fsync_dir(self.folder)
        self.last_save = time.monotonic()
        self._prune()

    def _prune(self) -> None:
        for old in checkpoint_folders(self.folder.parent)[:-KEEP]:
            trash = old.with_name(f"{TRASH_PREFIX}{old.name}")
            os.replace(old, trash)
            shutil.rmtree(trash, ignore_errors=True)


class ReplicaCheckpointer(Checkpointer):
    """The checkpointer of a torchrun rank other than 0: restores like rank 0's, writes nothing.

    It still checks the weights before each (skipped) save, so a NaN stops every rank alike.
    """

    def finish(self, *, keep: bool = False) -> None:
        pass

    def _write(self, values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.last_save = time.monotonic()


def open_checkpointer(cfg: TrainConfig) -> Checkpointer:
    """`Checkpointer.open(cfg)`; under torchrun on rank 0 only, which sends the checkpoint it
    resumes from (or its error) to the other ranks, so `--out` need not be shared by the machines.
    """
    from safetensors.torch import load, save

    from imgclf import distributed

    if not distributed.active():
        return Checkpointer.open(cfg)
    opened: list[Checkpointer] = []

    def open_on_rank0() -> tuple[str, bytes, dict[str, Any]] | None:
        opened.append(Checkpointer.open(cfg))
        found = opened[0].resume_from
        return None if found is None else (str(found.folder), save(found.tensors), found.state)

    sent = distributed.rank0_result(open_on_rank0)
    if opened:
        return opened[0]
    resume_from = None if sent is None else Checkpoint(Path(sent[0]), load(sent[1]), sent[2])
    return ReplicaCheckpointer(Path(cfg.out), cfg, resume_from)


def check_same_run(checkpoint: Checkpoint, cfg: TrainConfig) -> None:
    """Refuse to resume with options that change what the run computes.

    Raises:
        ConfigError: listing every option whose value differs from the checkpoint's.
    """
    saved = checkpoint.state.get("config", {})
    now = cfg.to_dict()
    differ = [
        f"{key}: {saved.get(key)!r} then, {now.get(key)!r} now"
        for key in sorted(set(saved) | set(now))
        if key not in RESUMABLE_CHANGES and saved.get(key) != now.get(key)
    ]
    if differ:
        raise ConfigError(
            f"cannot resume {str(cfg.out)!r} with different options ({'; '.join(differ)})",
            expected="the options of the interrupted run (they are in its config.yaml)",
            fix=f"pass the same options, e.g. --config {str(Path(cfg.out) / 'config.yaml')} --resume, "
            "or use a new --out",
        )
