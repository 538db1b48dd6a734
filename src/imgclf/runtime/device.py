"""Devices and precision: which device to run on, and which autocast dtype.

bf16 is used only where the hardware runs it natively (AMX or AVX512-BF16 on CPUs, and GPUs with
bf16 support): on a CPU without it, bf16 autocast is ~10x *slower* than fp32 (measured on an AMD
EPYC with AVX2: lite0 at 160 px, 46 img/s fp32 vs 5 img/s bf16).

Part of the runtime layer (`imgclf.runtime`): the frozen forward, training and the bundle use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import cache

import torch

from imgclf.errors import ConfigError


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' -> the first CUDA device if there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(f"unknown device {requested!r}", expected="auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r} asked for, but CUDA is not available", fix="pass --device cpu")
    return device


@cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16 (e.g. Intel Sapphire Rapids)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability in ("AVX512_BF16", "AMX") or bool(
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        or getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    )


def compute_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The autocast dtype for `precision` ('auto', 'bf16', 'fp32') on `device`."""
    if precision == "fp32":
        return torch.float32
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = cpu_has_native_bf16()
    if precision == "bf16" or native:
        return torch.bfloat16
    return torch.float32


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
