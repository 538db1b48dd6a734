"""Several processes, one run: `torchrun --nproc-per-node N -m imgclf train DATA --out DIR`.

torchrun sets `WORLD_SIZE`, `RANK`, `LOCAL_RANK` and `LOCAL_WORLD_SIZE` in every process it starts.
With `WORLD_SIZE` > 1, `imgclf.train` opens a process group (`nccl` on CUDA, `gloo` on the CPU) for
the length of the run and closes it at the end. Without torchrun (or with one process) no group is
made and every helper here hands back its input unchanged: a plain run is exactly what it was.

How the work is split, and why:

- **`--batch-size` is the global batch.** Every rank draws the same epoch order (a pure function of
  seed and epoch, `finetune.epoch_order`), takes the same global batch, augments all of it with the
  shared generator, so the augmentation draws are those of a one-process run (augmenting is ~6% of a
  step), and trains on its strided slice `[rank::world]`. Each rank's loss is its images' summed loss
  divided by the global batch's normaliser (its image count, or its summed class weights with
  `--balance`), so the ranks' losses add up to the global batch's mean loss, and
  `DistributedDataParallel` (which averages gradients) is given `world x` that. With frozen
  BatchNorm (the default, `freeze_bn=True`) the gradient is then the one-process gradient of the
  global batch, and N-process runs match one-process runs up to float summation order. With
  `freeze_bn=False` each rank normalises with its own slice's statistics, as in any DDP run.
- **Data.** Every rank decodes all training images (fine-tuning keeps them in memory; the memory
  budget is split between the processes of one machine): simple, and the same on every rank.
  Frozen passes (the probe's features, validation, the final scores) are sharded: each rank decodes
  and runs only its contiguous block of the images, and the outputs are all-gathered in order, so
  every rank sees the same numbers. Uneven blocks are padded for the gather and cut back after it.
- **The probe head** is fitted by every rank on the same gathered features (full-batch L-BFGS is
  deterministic, so the heads agree; DDP also copies rank 0's weights to the others at its start).
- **Time.** Every decision that depends on the clock (the `--max-minutes` and `--time-budget`
  deadlines, the time-driven lr decay, the test-time size search) reads `clock()`: rank 0's
  `time.perf_counter()`, broadcast, so all ranks stop at the same batch and none is left waiting in a
  collective. The `--time-budget` plan is measured on every rank at once (so the cores are as shared
  as in the run) and rank 0's plan is used by all.
- **Writes.** Only rank 0 writes: the bundle, checkpoints, `config.yaml`, `train.log`,
  `metrics.jsonl`, `history.json`, the report and the feature cache. Other ranks never create or
  write anything in `--out`, and log nothing. On `--resume`, rank 0 reads the newest checkpoint and
  sends it to the others, so `--out` need not be on a shared file system.
- **Threads.** Each process runs `cores // processes on this machine` torch (and OpenVINO) threads.
- **Failures.** A collective waits at most `IMGCLF_DISTRIBUTED_TIMEOUT_MINUTES` (default 30), then
  raises, so an error on one rank cannot leave the others waiting forever. On one machine torchrun
  also stops the other workers as soon as one exits with an error. Errors found on rank 0 while it
  works alone (opening the checkpoints, the time-budget plan) are sent to every rank and raised there.

Example:
    >>> # torchrun --nproc-per-node 2 -m imgclf train photos/ --out runs/photos  (each process runs:)
    >>> with session(torch.device("cpu")):  # doctest: +SKIP
    ...     model = train(cfg)
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import nn

from imgclf.errors import ImgclfError

TIMEOUT_ENV = "IMGCLF_DISTRIBUTED_TIMEOUT_MINUTES"
DEFAULT_TIMEOUT_MINUTES = 30.0  # longer than any step, checkpoint write or val pass of a sane run

T = TypeVar("T")


class RankFailedError(ImgclfError):
    """Another rank (rank 0) failed where every rank waits on its result."""


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a torchrun launch (from the environment torchrun sets)."""

    rank: int  # 0 .. world_size - 1, over all machines
    world_size: int  # processes in the run
    local_rank: int  # 0 .. local_world_size - 1, on this machine (the GPU it uses)
    local_world_size: int  # processes on this machine


def launch() -> Launch | None:
    """This process's place in a torchrun launch of more than one process, else None.

    Example:
        >>> launch() is None  # a plain `python -m imgclf train ...`  # doctest: +SKIP
        True
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "") or world)
    return Launch(rank=int(os.environ.get("RANK", "0")), world_size=world,
                  local_rank=int(os.environ.get("LOCAL_RANK", "0")), local_world_size=local_world)


def active() -> bool:
    """True while a process group of more than one process is open."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def rank() -> int:
    """This process's rank: from the open group, else from torchrun's environment, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def is_main() -> bool:
    """True on rank 0 (and in every run without torchrun): the process that logs and writes."""
    return rank() == 0


def cpu_cores() -> int:
    """The cores this process may use: the machine's (or its CPU affinity's), shared by its processes."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    started = launch()
    return max(1, cores // started.local_world_size) if started else max(1, os.cpu_count() or 1)


def rank_device(device: torch.device) -> torch.device:
    """`cuda` without an index becomes this process's GPU, `cuda:LOCAL_RANK`; anything else stays."""
    started = launch()
    if started is not None and device.type == "cuda" and device.index is None:
        return torch.device("cuda", started.local_rank)
    return device


def timeout_minutes() -> float:
    return float(os.environ.get(TIMEOUT_ENV, "") or DEFAULT_TIMEOUT_MINUTES)


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[None]:
    """Open the process group for a torchrun launch (no-op otherwise) and close it afterwards.

    A group that is already open (the caller's own) is used as it is and left open.
    """
    started = launch()
    if started is None or torch.distributed.is_initialized():
        yield
        return
    device = rank_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(cpu_cores())
    torch.distributed.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_minutes())
    )
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def describe() -> dict[str, Any]:
    """The launch, for the bundle's metadata (empty for a one-process run)."""
    if not active():
        return {}
    started = launch()
    return {"processes": world_size(), "processes_per_machine": started.local_world_size if started else 1,
            "backend": str(torch.distributed.get_backend())}


def _comm_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Agreeing on values


def agree(value: T) -> T:
    """Rank 0's `value` on every rank (a picklable object); `value` itself without a group."""
    if not active():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]  # type: ignore[return-value]


def clock() -> float:
    """`time.perf_counter()`; under torchrun rank 0's, so every rank takes the same time decisions."""
    now = time.perf_counter()
    if not active():
        return now
    shared = torch.tensor([now], dtype=torch.float64, device=_comm_device())
    torch.distributed.broadcast(shared, src=0)
    return float(shared.item())


def rank0_result(compute: Callable[[], T], *, everywhere: bool = False) -> T:
    """`compute()` on rank 0 (on every rank with `everywhere`), its result given to every rank.

    If rank 0's call raises, every rank raises: rank 0 its own exception, the others a
    `RankFailedError` that quotes it, so none is left waiting for a result that will not come.
    """
    if not active():
        return compute()
    outcome: tuple[str, Any] = ("ok", None)
    failure: BaseException | None = None
    if everywhere or is_main():
        try:
            outcome = ("ok", compute())
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others are told
            failure = exc
            outcome = ("error", f"{type(exc).__name__}: {exc}")
    shared = agree(outcome if is_main() else ("ok", None))
    if is_main() and failure is not None:
        raise failure
    if shared[0] == "error":
        raise RankFailedError(f"rank 0 failed, so this rank stops too: {shared[1]}")
    return cast(T, outcome[1] if is_main() else shared[1])


def all_sum(values: Sequence[float | torch.Tensor]) -> list[float]:
    """The sums over all ranks of `values` (numbers or one-element tensors), as floats."""
    if not active():
        return [float(v) for v in values]
    device = _comm_device()
    stacked = torch.stack([torch.as_tensor(v).detach().to(device, torch.float64).reshape(()) for v in values])
    torch.distributed.all_reduce(stacked)
    return [float(v) for v in stacked.cpu()]


# --------------------------------------------------------------------------------------------
# Sharding and gathering


def shard_range(count: int) -> np.ndarray:
    """This rank's contiguous block of positions 0 .. count - 1 (all of them without a group).

    The first `count % world` ranks get one position more than the others; rank order is position
    order, so gathering the blocks in rank order gives back the original order.

    Example:
        >>> shard_range(5)  # one process
        array([0, 1, 2, 3, 4])
    """
    if not active():
        return np.arange(count)
    size, extra = divmod(count, world_size())
    start = rank() * size + min(rank(), extra)
    return np.arange(start, start + size + (rank() < extra))


def batch_slice(count: int) -> slice:
    """This rank's share of a global batch of `count` images: every world-th one from its rank."""
    return slice(rank(), None, world_size()) if active() else slice(None)


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `local` (rows x ...) in rank order; any rank may have 0 rows.

    The trailing dimensions come from the ranks that have rows (an empty block may be shaped 0 x 0).
    """
    if not active():
        return local
    shapes: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(shapes, (tuple(local.shape), str(local.dtype)))
    counts = [shape[0] for shape, _ in shapes]
    filled = [(shape, dtype) for shape, dtype in shapes if shape[0] > 0]
    if not filled:
        return local
    trailing, dtype_name = tuple(filled[0][0][1:]), filled[0][1]
    dtype = getattr(torch, dtype_name.replace("torch.", ""))
    device = _comm_device()
    padded = torch.zeros((max(counts), *trailing), dtype=dtype, device=device)
    if local.shape[0]:
        padded[: local.shape[0]] = local.to(device, dtype)
    parts = [torch.empty_like(padded) for _ in counts]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)]).to(local.device)


def gather_lists(items: list[T]) -> list[T]:
    """Every rank's `items`, concatenated in rank order (picklable items)."""
    if not active():
        return items
    lists: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(lists, items)
    return [item for part in lists for item in part]


# --------------------------------------------------------------------------------------------
# Models and runtimes


def wrap(model: nn.Module, device: torch.device, *, broadcast_buffers: bool) -> nn.Module:
    """`model` wrapped in DistributedDataParallel under torchrun, else `model` itself.

    Wrap after choosing the trainable parameters: DDP hooks only those that need gradients. Its
    construction copies rank 0's weights to every rank.
    """
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Newer torch renamed the option (the old name warns); both still copy rank 0's buffers at the start.
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    option: dict[str, Any] = {"forward_sync_buffers" if renamed else "broadcast_buffers": broadcast_buffers}
    return DistributedDataParallel(model, device_ids=ids, **option)


def openvino_properties() -> dict[str, Any]:
    """OpenVINO CPU settings for this process: under torchrun its share of the cores, unpinned
    (pinned threads of several processes would crowd onto the same cores); nothing otherwise."""
    if launch() is None:
        return {}
    return {"INFERENCE_NUM_THREADS": cpu_cores(), "ENABLE_CPU_PINNING": False}
