"""Process memory: glibc's mmap threshold, so that streaming passes give freed buffers back.

A bottom-layer module (with errors, config, files, progress and distributed): it imports nothing
of imgclf. `runtime.FrozenForward` sets it when it is built.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from functools import cache

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
# Above one decoded image (160 px: 77 KB) and below one batch (64 x 3 x 64 x 64: 786 KB). At 64 KiB
# every image buffer was mmapped and unmapped, with page faults and, with decode threads, TLB
# shootdowns: decoding CIFAR-10 at 160 px took 1.39 ms of CPU per image against 0.83 ms at 256 KiB,
# and memory grew the same 16 MB (the features) per 3,200 images either way (2026-11-27).
MMAP_THRESHOLD = 256 * 1024


@cache
def limit_heap_growth() -> None:
    """On glibc, serve allocations of `MMAP_THRESHOLD` and more with mmap, so freed batch buffers
    go back to the OS at once.

    glibc raises its mmap threshold after the first large frees and then serves batch-sized
    buffers from its heaps. In a streaming frozen pass (buffers allocated by decode threads, freed
    by the main thread) the heaps kept growing: 0.8 MB per image at 160 px, a 15.6 GB peak for a
    CIFAR-10 probe over 60,000 images; flat at ~1.3 GB with this setting (2026-11-27).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc after all: nothing to tune
        return
