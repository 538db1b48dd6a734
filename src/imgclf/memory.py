"""Process memory: glibc's mmap threshold, so that streaming passes give freed buffers back.

A bottom-layer module (with errors, config, files, progress and distributed): it imports nothing
of imgclf. `runtime.FrozenForward` sets it when it is built.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import platform
from collections.abc import Iterator
from functools import cache

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
# Above one decoded image (160 px: 77 KB) and below one batch (64 x 3 x 64 x 64: 786 KB). At 64 KiB
# every image buffer was mmapped and unmapped, with page faults and, with decode threads, TLB
# shootdowns: decoding CIFAR-10 at 160 px took 1.39 ms of CPU per image against 0.83 ms at 256 KiB,
# and memory grew the same 16 MB (the features) per 3,200 images either way (2026-11-27).
MMAP_THRESHOLD = 256 * 1024


# Training steps allocate and free the same activation buffers (megabytes each) at every step: under
# the streaming threshold each one is a fresh mmap, zero-filled page by page, and unmapped again.
# lite0 at 96 px, batch 64, fp32, 2 cores: 47 img/s with the threshold at 256 KiB, 104-121 img/s with
# it at 32 MiB (glibc's largest on 64-bit), the same as a process that never set it (121 img/s),
# 2026-12-01. Fine-tuning after a probe (which sets it) ran at 74-85 img/s for that reason.
TRAINING_MMAP_THRESHOLD = 32 * 1024 * 1024
_state = {"streaming": False}  # whether limit_heap_growth has pinned the streaming threshold


def _set_mmap_threshold(size: int) -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, size))
    except (OSError, AttributeError):  # not glibc after all: nothing to tune
        return False


@contextlib.contextmanager
def training_heap() -> Iterator[None]:
    """Within: glibc serves allocations below `TRAINING_MMAP_THRESHOLD` from its heap, so training
    steps reuse their buffers; after: the streaming threshold again, if it was set.

    Example:
        >>> with training_heap():
        ...     pass  # forward, backward, optimizer steps
    """
    _set_mmap_threshold(TRAINING_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if _state["streaming"]:
            _set_mmap_threshold(MMAP_THRESHOLD)


@cache
def limit_heap_growth() -> None:
    """On glibc, serve allocations of `MMAP_THRESHOLD` and more with mmap, so freed batch buffers
    go back to the OS at once.

    glibc raises its mmap threshold after the first large frees and then serves batch-sized
    buffers from its heaps. In a streaming frozen pass (buffers allocated by decode threads, freed
    by the main thread) the heaps kept growing: 0.8 MB per image at 160 px, a 15.6 GB peak for a
    CIFAR-10 probe over 60,000 images; flat at ~1.3 GB with this setting (2026-11-27).
    """
    _state["streaming"] = _set_mmap_threshold(MMAP_THRESHOLD)
