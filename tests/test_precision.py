"""The training step's precision (training/precision.py): bf16 only where timed steps show it clearly faster.

The steps' seconds come from a fake clock that charges each forward pass by the autocast dtype it ran
under, so the decision is tested on any CPU, with or without native bf16.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from imgclf.training import precision
from imgclf.training.precision import training_dtype

CPU = torch.device("cpu")


class ChargedClock:
    """A clock that advances by what the last forward pass charged."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pending = 0.0

    def __call__(self) -> float:
        self.now += self.pending
        self.pending = 0.0
        return self.now


class ChargingNet(nn.Module):
    """A tiny conv net whose forward charges `costs[dtype]` seconds; `spikes` are extra seconds for the
    n-th forward of a dtype (a slow spell of the machine)."""

    def __init__(self, clock: ChargedClock, costs: dict[torch.dtype, float],
                 spikes: dict[tuple[torch.dtype, int], float] | None = None) -> None:
        super().__init__()
        self.clock, self.costs, self.spikes = clock, costs, spikes or {}
        self.calls: dict[torch.dtype, int] = {}
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
        count = self.calls[dtype] = self.calls.get(dtype, 0) + 1
        self.clock.pending += self.costs[dtype] + self.spikes.get((dtype, count), 0.0)
        return self.body(x)


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behave as on a CPU with native bf16 (AVX512-BF16 or AMX), where "auto" times both precisions."""
    real = precision.compute_dtype
    monkeypatch.setattr(precision, "compute_dtype",
                        lambda device, p: torch.bfloat16 if p == "auto" else real(device, p))


def choose(net: ChargingNet, clock: ChargedClock, **kwargs) -> torch.dtype:  # type: ignore[no-untyped-def]
    return training_dtype(lambda: net, device=CPU, precision=kwargs.pop("precision", "auto"), image_size=16,
                          batch_size=4, clock=clock, **kwargs)


@pytest.mark.usefixtures("native_bf16")
@pytest.mark.parametrize("bf16_cost, expected", [(0.5, torch.bfloat16), (0.9, torch.float32), (1.3, torch.float32)])
def test_bf16_trains_only_when_its_steps_are_clearly_faster(bf16_cost: float, expected: torch.dtype) -> None:
    clock = ChargedClock()
    net = ChargingNet(clock, {torch.float32: 1.0, torch.bfloat16: bf16_cost})
    assert choose(net, clock) == expected
    # one warm-up step and TIMED_ROUNDS timed steps in each precision
    assert net.calls == {torch.float32: 1 + precision.TIMED_ROUNDS, torch.bfloat16: 1 + precision.TIMED_ROUNDS}


@pytest.mark.usefixtures("native_bf16")
def test_one_slow_step_does_not_decide() -> None:
    clock = ChargedClock()
    # bf16 steps cost 1.1x fp32's, but the first timed fp32 step (the second fp32 forward) hits a slow spell.
    net = ChargingNet(clock, {torch.float32: 1.0, torch.bfloat16: 1.1}, spikes={(torch.float32, 2): 5.0})
    assert choose(net, clock) == torch.float32


@pytest.mark.usefixtures("native_bf16")
@pytest.mark.parametrize("kwargs, expected", [({"precision": "fp32"}, torch.float32),
                                              ({"precision": "bf16"}, torch.bfloat16),
                                              ({"deterministic": True}, torch.float32)])
def test_forced_or_deterministic_precision_times_nothing(kwargs: dict, expected: torch.dtype) -> None:
    clock = ChargedClock()
    net = ChargingNet(clock, {torch.float32: 1.0, torch.bfloat16: 0.1})
    assert choose(net, clock, **kwargs) == expected
    assert net.calls == {}


def test_without_native_bf16_auto_is_fp32_untimed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "compute_dtype", lambda device, p: torch.float32)
    clock = ChargedClock()
    net = ChargingNet(clock, {torch.float32: 1.0, torch.bfloat16: 0.1})
    assert choose(net, clock) == torch.float32
    assert net.calls == {}
