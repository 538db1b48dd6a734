"""The GPU fast path of fine-tuning: where the images live, how batches reach the GPU, and what
happens when GPU memory runs out. On a CPU every function here leaves things as they were.

Where each split's decoded uint8 images live while fine-tuning (`choose_placement`, once per split):

- `"device"`: they fit in `GPU_DATA_SHARE` of the free GPU memory, so they are copied to the GPU
  once; every batch is then indexed, augmented and normalised there, with no host work per step.
  CIFAR-10 at 224 px is 45,000 x 3 x 224 x 224 bytes = 6.8 GB: 9% of an H100's 80 GB.
- `"pinned"`: they do not fit (or are streamed from disk): each batch is gathered on the host,
  pinned and copied asynchronously *as uint8* (a quarter of the bytes of float input), then
  augmented and normalised on the GPU.
- `"host"`: the device is the CPU; batches are used as the store gives them.

The first two are `store.to(device, resident=...)` (a `DeviceStore`, in `imgclf.data.pipeline`):
this module decides, the store moves the bytes.

When a training step runs out of GPU memory, `run_with_batch_fallback` halves the batch size and
starts the epoch again, down to `MIN_BATCH_SIZE`. The learning rate is *not* rescaled with the batch:
AdamW normalises each parameter's update by its own gradient scale, so its step size depends only
weakly on the batch size (the linear scaling rule, Goyal et al. 2017, was derived for SGD), and an
unscaled lr keeps a retried run identical in its settings to a fresh run started with the smaller
`--batch-size` and the same `--lr`; the batch size actually used is recorded in every epoch's history.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

import torch
from torch import nn

from imgclf.data.pipeline import Store
from imgclf.errors import ImgclfError
from imgclf.progress import log

Placement = Literal["device", "pinned", "host"]
T = TypeVar("T")

GPU_DATA_SHARE = 0.4  # images may take this share of free GPU memory; the rest is for the training step
MIN_BATCH_SIZE = 8  # below this BatchNorm statistics and gradients get too noisy to be worth running


class BatchSizeError(ImgclfError):
    """Even the smallest batch size ran out of GPU memory."""


def configure_cuda(device: torch.device, *, deterministic: bool) -> None:
    """Fast kernels on CUDA: cuDNN picks the fastest convolution for our fixed input shapes, and fp32
    matrix products (outside bf16 autocast) may use TF32. No-op on a CPU or with `deterministic`."""
    if device.type != "cuda" or deterministic:
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def free_device_memory(device: torch.device) -> int:
    """Free bytes on a CUDA device now (what the driver reports, other processes included)."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def choose_placement(
    nbytes: int, *, device: torch.device, in_memory: bool, free_bytes: int | None, share: float = GPU_DATA_SHARE
) -> Placement:
    """Where a split of `nbytes` decoded uint8 images lives while fine-tuning on `device`.

    Example:
        >>> choose_placement(7 * 2**30, device=torch.device("cuda"), in_memory=True, free_bytes=78 * 2**30)
        'device'
        >>> choose_placement(7 * 2**30, device=torch.device("cuda"), in_memory=True, free_bytes=10 * 2**30)
        'pinned'
        >>> choose_placement(7 * 2**30, device=torch.device("cpu"), in_memory=True, free_bytes=None)
        'host'
    """
    if device.type != "cuda":
        return "host"
    if in_memory and free_bytes is not None and nbytes <= share * free_bytes:
        return "device"
    return "pinned"


def place_store(store: Store, device: torch.device, *, name: str, free_bytes: int | None = None) -> Store:
    """`store` as fine-tuning should read it on `device`: the same store on a CPU, else `store.to(device)`.

    `free_bytes` (default: asked of the driver) is the free GPU memory the decision is based on;
    the chosen mode is logged.

    Example:
        >>> train = place_store(store, torch.device("cuda"), name="train")  # doctest: +SKIP
        >>> indices, batch = next(train.batches(np.arange(len(train)), 256))  # batch.is_cuda  # doctest: +SKIP
    """
    if device.type != "cuda":
        return store
    size = store.prep.image_size
    nbytes = len(store) * 3 * size * size
    if free_bytes is None:
        free_bytes = free_device_memory(device)
    placement = choose_placement(nbytes, device=device, in_memory=store.in_memory_tensor() is not None,
                                 free_bytes=free_bytes)
    gib = 2**30
    if placement == "device":
        log(f"{name}: {nbytes / gib:.1f} GiB of uint8 images copied to {device} once "
            f"({free_bytes / gib:.1f} GiB free); batches are indexed and augmented there")
    else:
        reason = "streamed from disk" if not store.in_memory else (
            f"{nbytes / gib:.1f} GiB > {GPU_DATA_SHARE:.0%} of {free_bytes / gib:.1f} GiB free on {device}")
        log(f"{name}: batches gathered on the host, pinned and copied as uint8 ({reason}); augmented on {device}")
    return store.to(device, resident=placement == "device")


def smaller_batch_size(batch_size: int, *, floor: int = MIN_BATCH_SIZE) -> int:
    """Half of `batch_size` after running out of memory; `BatchSizeError` when that is below `floor`.

    Example:
        >>> smaller_batch_size(256)
        128
    """
    smaller = batch_size // 2
    if smaller < floor:
        raise BatchSizeError(
            f"out of GPU memory at batch size {batch_size}, and {smaller} is below the smallest "
            f"batch size tried ({floor})",
            expected="a training step that fits in GPU memory",
            fix="pass a smaller --image-size, a smaller --backbone, --precision bf16, or free the GPU "
            "(other processes may hold its memory: see nvidia-smi)",
        )
    return smaller


def run_with_batch_fallback(
    run: Callable[[int], T], batch_size: int, *, floor: int = MIN_BATCH_SIZE
) -> tuple[T, int]:
    """`run(batch_size)`, retried at half the size after each `torch.cuda.OutOfMemoryError` (only that).

    Returns (the result, the batch size that worked). Each retry is logged, e.g.
    `out of memory at batch size 256: retrying at 128`, and the CUDA cache is emptied first.

    Example:
        >>> def step(size: int) -> int:
        ...     if size > 64:
        ...         raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        ...     return size
        >>> run_with_batch_fallback(step, 256)
        (64, 64)
    """
    while True:
        try:
            return run(batch_size), batch_size
        except torch.cuda.OutOfMemoryError:
            pass  # handled below: outside `except` the failed step's frames, and their tensors, are freed
        smaller = smaller_batch_size(batch_size, floor=floor)
        log(f"out of memory at batch size {batch_size}: retrying at {smaller} (learning rate unchanged)")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        batch_size = smaller


def training_forward(model: nn.Module, *, compile_model: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function a training step calls: `model` itself, or `torch.compile(model)` with `compile_model`.

    The compiled module shares its parameters with `model`, so the optimizer, checkpoints and the
    best-epoch weights keep working on `model`. Compiling takes about a minute on a GPU for the
    first step, and several minutes on a 2-core CPU; it pays off only over many steps.
    """
    if not compile_model:
        return model
    log("compiling the training model with torch.compile: the first steps take longer")
    return torch.compile(model)  # type: ignore[return-value]
