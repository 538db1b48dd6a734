"""The training step's precision: bf16 autocast only where it is measured to be faster.

Frozen passes (probe features, validation, prediction) and training steps are decided apart. For
frozen passes `runtime.compute_dtype` takes bf16 wherever the hardware runs it natively: OpenVINO's
bf16 inference is faster there (lite0 at 96 px on an AMD EPYC with AVX512-BF16: 2,811 against 2,075
img/s). The training step is another matter: on that CPU, which has AVX512-BF16 but no AMX, PyTorch's
bf16 autocast trained *slower* than fp32 (105-111 against 131-136 img/s on CIFAR-10 at 96 px) and
ended less accurate (0.8996 against 0.9054 test in a 15-minute budget; shared/evidence/10-default.md).
So with `precision="auto"` on a CPU with native bf16, a few real steps of the network are timed in
both precisions and bf16 is used only when it is at least `BF16_MIN_SPEEDUP` faster.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from imgclf.memory import training_heap
from imgclf.progress import log
from imgclf.runtime import autocast, compute_dtype

BF16_MIN_SPEEDUP = 1.2  # bf16 rounds every product to 8 bits of mantissa: worth it only for a clear gain
TIMED_ROUNDS = 3  # timed steps per precision, alternating, after one warm-up step each


def training_dtype(
    make_model: Callable[[], nn.Module],
    *,
    device: torch.device,
    precision: str,
    image_size: int,
    batch_size: int,
    deterministic: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> torch.dtype:
    """The autocast dtype for fine-tuning on `device` a network that `make_model()` builds (a copy of the
    backbone + head, returning logits; built only when a timing is needed).

    `precision` "fp32" or "bf16" is obeyed. "auto": bf16 on GPUs that support it, fp32 on CPUs
    without native bf16, and on CPUs with it whichever of the two trains faster by a few timed steps
    (bf16 only when `BF16_MIN_SPEEDUP` times faster), logged. With `deterministic`, "auto" on a CPU
    is fp32 without timing: a timing is not repeatable.

    Example:
        >>> training_dtype(lambda: nn.Linear(3, 2), device=torch.device("cpu"), precision="fp32", image_size=32,
        ...                batch_size=4)
        torch.float32
    """
    if precision == "fp32":
        return torch.float32
    if precision == "bf16" or device.type != "cpu":
        return compute_dtype(device, precision)
    if compute_dtype(device, "auto") != torch.bfloat16 or deterministic:
        return torch.float32  # no native bf16: emulated, it is ~10x slower (runtime/device.py)
    seconds = step_seconds(make_model(), device=device, dtypes=(torch.float32, torch.bfloat16),
                           image_size=image_size, batch_size=min(batch_size, 32), clock=clock)
    speedup = seconds[torch.float32] / max(seconds[torch.bfloat16], 1e-9)
    chosen = torch.bfloat16 if speedup >= BF16_MIN_SPEEDUP else torch.float32
    log(f"training precision: {'bf16' if chosen == torch.bfloat16 else 'fp32'} (this CPU runs bf16 natively; "
        f"a bf16 training step took {1 / speedup:.2f}x the time of an fp32 one, bf16 needs <= "
        f"{1 / BF16_MIN_SPEEDUP:.2f}x; --precision bf16 or fp32 forces one)")
    return chosen


def step_seconds(
    model: nn.Module, *, device: torch.device, dtypes: tuple[torch.dtype, ...], image_size: int, batch_size: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[torch.dtype, float]:
    """Median seconds of a training step (forward, backward, AdamW at lr 0) of `model` under each of `dtypes`.

    One warm-up step per dtype (allocator, kernel selection), then `TIMED_ROUNDS` rounds that time one
    step per dtype in turn, so the machine's slow spells and the allocator's growth fall on every
    dtype alike. Timed one dtype after the other, 2 steps each, the first (fp32) could take twice its
    time: a bf16 step once measured 0.51x an fp32 one, then 1.01x, where 4 repeats gave 1.14-1.59x (lite0,
    96 px, stem + 2 stages frozen, Zen 4, 2026-12-01); bf16 was chosen and trained at 82-108 img/s, fp32
    then at 133-162.
    """
    # The caller's copy, laid out as FitLoop lays out the network; its weights are not changed (lr 0).
    trial = model.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = torch.optim.AdamW([p for p in trial.parameters() if p.requires_grad], lr=0.0)
    noise = torch.Generator().manual_seed(0)  # not the global generator: the run's random draws stay the same
    x = torch.randn(batch_size, 3, image_size, image_size, generator=noise).to(device).contiguous(
        memory_format=torch.channels_last)

    def step(dtype: torch.dtype) -> float:
        start = clock()
        with autocast(device, dtype):
            loss = trial(x).float().logsumexp(1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return clock() - start

    times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in dtypes}
    with training_heap():  # as FitLoop trains (memory.TRAINING_MMAP_THRESHOLD)
        for dtype in dtypes:
            step(dtype)
        for _ in range(TIMED_ROUNDS):
            for dtype in dtypes:
                times[dtype].append(step(dtype))
    return {dtype: sorted(t)[len(t) // 2] for dtype, t in times.items()}
