"""The time budget: the plan, from injected rates (nothing is timed), and the guard, with a fake clock."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_BACKBONE, make_image_folder
from stand_ins import tiny_fit_inputs

from imgclf.errors import ConfigError
from imgclf.training.budget import (
    MIN_GOOD_EPOCHS,
    PLAN_FRACTION,
    Rates,
    Workload,
    candidate_sizes,
    epoch_seconds,
    finetune_seconds,
    interpolate,
    plan_budget,
    probe_seconds,
)
from imgclf.training.finetune import REPLAN_AT_STEP, WarmupCosine, replanned_epochs

# --------------------------------------------------------------------------------------------
# Time budget: the plan, from injected rates (nothing is timed)

RATES = Rates(
    train={96: 80.0, 128: 45.0, 160: 29.0},
    frozen={96: 400.0, 128: 230.0, 160: 150.0},
    decode=2000.0,
    convert_seconds=5.0,
)
CIFAR_LIKE = Workload(train=45000, val=5000, test=10000, head_fit=10000)


def _plan(minutes: float, **kwargs: object):  # type: ignore[no-untyped-def]
    options = dict(seconds_left=60 * minutes, work=CIFAR_LIKE, rates=RATES, sizes=(96, 128, 160), max_epochs=20)
    options.update(kwargs)
    return plan_budget(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize("minutes", [5, 15, 45, 90, 600])
def test_a_plan_never_exceeds_the_budget(minutes: float) -> None:
    plan = _plan(minutes)
    assert plan.seconds <= PLAN_FRACTION * 60 * minutes
    assert 0 < plan.closing_seconds < plan.seconds


def test_bigger_budgets_buy_larger_inputs_then_more_epochs() -> None:
    probe, short, medium, huge = _plan(7), _plan(15), _plan(45), _plan(600)
    assert probe.recipe == "probe" and probe.image_size == 128  # under half an epoch fits: the largest probe
    assert short.recipe == "finetune" and short.image_size == 96 and short.epochs < MIN_GOOD_EPOCHS
    assert medium.image_size == 96 and medium.epochs >= MIN_GOOD_EPOCHS
    assert huge.image_size == 160 and huge.epochs == 20  # capped by max_epochs
    for minutes, plan in ((45, medium), (600, huge)):
        # No larger input would have left MIN_GOOD_EPOCHS inside the budget.
        for size in (s for s in (96, 128, 160) if s > plan.image_size):
            assert finetune_seconds(size, MIN_GOOD_EPOCHS, CIFAR_LIKE, RATES) > PLAN_FRACTION * 60 * minutes


def test_epochs_that_fit_are_rounded_and_the_guard_cuts_the_last_one() -> None:
    fixed = finetune_seconds(96, 0, CIFAR_LIKE, RATES)
    epoch = epoch_seconds(96, CIFAR_LIKE, RATES)
    # One more epoch once a quarter of it fits (finetune.whole_epochs): the guard cuts it at the deadline.
    for fit, planned in ((1.2, 1), (1.3, 2), (1.6, 2), (0.6, 1), (2.5, 3)):
        minutes = (fixed + fit * epoch) / PLAN_FRACTION / 60
        plan = _plan(minutes, sizes=(96,))
        assert (plan.recipe, plan.epochs) == ("finetune", planned), fit
        assert plan.seconds <= PLAN_FRACTION * 60 * minutes + 1e-6  # rounded up: ends at the deadline
    assert _plan((fixed + 0.4 * epoch) / PLAN_FRACTION / 60, sizes=(96,)).recipe == "probe"


def test_epochs_and_recipe_limits_are_respected() -> None:
    assert _plan(600, max_epochs=2).epochs == 2
    probe = _plan(600, allow_finetune=False)
    assert probe.recipe == "probe" and probe.image_size == 160


def test_a_budget_too_small_for_anything_stops_before_work() -> None:
    with pytest.raises(ConfigError, match="even a linear probe"):
        _plan(1)


def test_sizes_between_measured_ones_are_interpolated_in_pixels() -> None:
    rates = interpolate({96: 100.0, 224: 20.0}, candidate_sizes(224))
    assert list(rates) == [96, 128, 160, 192, 224]
    assert rates[96] == 100.0 and rates[224] == 20.0
    assert all(a > b for a, b in zip(list(rates.values()), list(rates.values())[1:], strict=False))
    assert candidate_sizes(64) == [64] and candidate_sizes(160) == [96, 128, 160]


# --------------------------------------------------------------------------------------------
# Time budget: the guard, with a fake clock


class FakeClock:
    """Time moves by `tick` seconds at every reading."""

    def __init__(self, tick: float = 1.0) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_lr_decays_by_time_when_steps_lag_behind() -> None:
    clock = FakeClock(tick=0.0)
    factor = WarmupCosine(1000, 1, time_window=(0.0, 100.0), clock=clock)
    assert factor(10) == pytest.approx(1.0, abs=1e-3)  # early in steps and in time
    clock.now = 50.0
    assert factor(10) == pytest.approx(0.5)  # half the time gone: half-way down the cosine
    clock.now = 120.0
    assert factor(10) == pytest.approx(0.0)  # past the deadline


def test_fit_stops_mid_epoch_at_a_hard_deadline_and_keeps_the_best_weights(tmp_path: Path) -> None:
    from imgclf.config import TrainConfig
    from imgclf.models.classifier import ImageClassifier
    from imgclf.training.finetune import fit

    model, train, val = tiny_fit_inputs(make_image_folder(tmp_path / "data", per_class=12))
    cfg = TrainConfig(data="d", out="o", batch_size=4, time_budget_minutes=1.0, augment="none", patience=5)
    clock = FakeClock(tick=0.25)
    best: dict[str, torch.Tensor] = {}

    class KeepBest:
        def on_epoch_end(self, record: dict[str, object], model: ImageClassifier) -> None:
            if record["epoch"] == 1:
                clock.now = 998.0  # a slow machine: 2 s (8 clock readings, ~2 steps) left for epoch 2
            score = (record["val_accuracy"], -record["val_loss"])  # fit's rule: accuracy, then loss
            if not best or score > tuple(best["score"].tolist()):
                best.clear()
                best.update({k: v.clone() for k, v in model.state_dict().items()})
                best["score"] = torch.tensor(score, dtype=torch.float64)

    # 27 images / 4 per batch = 7 steps per epoch; epoch 1 takes ~30 fake seconds, far from 1000.
    result = fit(model, train, val, cfg, epochs=10, device=torch.device("cpu"), dtype=torch.float32,
                 deadline=1000.0, clock=clock, callbacks=[KeepBest()])
    last = result.history[-1]
    assert result.stopped_early and len(result.history) == 2
    assert last["stopped_mid_epoch"] and 0 < last["images"] < len(train)
    assert "val_accuracy" in last  # the partial epoch was scored too
    assert all(not h["stopped_mid_epoch"] for h in result.history[:-1])
    state = model.state_dict()
    assert all(torch.equal(state[k], best[k]) for k in state)  # the best epoch's weights are loaded


def test_replanned_epochs_follow_the_measured_speed() -> None:
    options = dict(steps_per_epoch=100, steps_done=30, val_images=640, batch_size=64, max_epochs=20)
    # 1 s a step: this epoch needs 70 + 7.5 s, every further one 107.5 s.
    assert replanned_epochs(seconds_per_step=1.0, seconds_left=77.5 + 3 * 107.5, **options) == 4  # type: ignore[arg-type]
    assert replanned_epochs(seconds_per_step=2.0, seconds_left=77.5 + 3 * 107.5, **options) == 2  # type: ignore[arg-type]
    assert replanned_epochs(seconds_per_step=1.0, seconds_left=10.0, **options) == 1  # type: ignore[arg-type]
    assert replanned_epochs(seconds_per_step=0.001, seconds_left=1e6, **options) == 20  # type: ignore[arg-type]


@pytest.mark.parametrize("max_epochs, trained", [(3, 3), (None, 1)])
def test_a_budget_run_re_plans_its_epochs_on_the_first_steps(tmp_path: Path, max_epochs: int | None,
                                                             trained: int) -> None:
    from imgclf.config import TrainConfig
    from imgclf.training.finetune import fit

    model, train, val = tiny_fit_inputs(make_image_folder(tmp_path / "data", per_class=16))
    assert len(train) > REPLAN_AT_STEP  # batch size 1: the re-plan happens inside epoch 1
    cfg = TrainConfig(data="d", out="o", batch_size=1, time_budget_minutes=1.0, augment="none", patience=5)
    # Planned for 1 epoch, but the clock says steps are fast and the deadline is far away: the
    # re-plan gives the cap. Without a cap (not a budget run's fit) the plan stands.
    result = fit(model, train, val, cfg, epochs=1, device=torch.device("cpu"), dtype=torch.float32,
                 deadline=1e9, clock=FakeClock(tick=0.001), max_epochs=max_epochs)
    assert len(result.history) == trained
    if trained > 1:
        assert result.history[1]["lr"] > 0  # epoch 2 started with a live learning rate, not a spent schedule


@pytest.mark.slow  # a real run under a 1-minute budget
def test_train_with_a_time_budget_records_the_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import imgclf

    monkeypatch.setenv("IMGCLF_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "data", per_class=10)
    model = imgclf.train(data=str(data), out=str(tmp_path / "m"), backbone=TINY_BACKBONE, random_init=True,
                         image_size=32, batch_size=8, time_budget_minutes=1.0)
    err = capsys.readouterr().err
    assert "time budget 1 min" in err
    config = json.loads((tmp_path / "m" / "imgclf.json").read_text())["config"]
    assert config["recipe"] == "finetune" and config["image_size"] == 32 and config["epochs"] >= MIN_GOOD_EPOCHS
    assert model.meta["wall_seconds"] <= 60 * 1.1


def test_a_short_budget_probes_a_stratified_subset_and_cached_features_are_free() -> None:
    usable = PLAN_FRACTION * 90
    assert all(probe_seconds(s, CIFAR_LIKE, RATES) > usable for s in (96, 128, 160))
    plan = _plan(1.5)  # no probe on all 45,000 train images fits
    assert plan.recipe == "probe" and plan.train_images is not None and 50 <= plan.train_images < 45000
    assert plan.seconds <= usable + 1e-6
    bigger = dataclasses.replace(CIFAR_LIKE, train=plan.train_images + 500)
    assert probe_seconds(plan.image_size, bigger, RATES) > usable  # the most that fit
    # Features already in the cache cost nothing but the fit: the whole set fits at 160 px.
    warm = _plan(1.5, work=dataclasses.replace(CIFAR_LIKE, cached={160: (1.0, 1.0)}))
    assert (warm.recipe, warm.image_size, warm.train_images) == ("probe", 160, None)


def test_fine_tuning_below_the_largest_size_pays_for_a_full_size_probe() -> None:
    from imgclf.training.budget import full_size_probe_seconds

    without, with_probe = _plan(45), _plan(45, full_size_probe=True)
    assert without.full_size_probe is None
    assert with_probe.recipe == "finetune" and with_probe.image_size == 96 and with_probe.full_size_probe == 160
    cost = full_size_probe_seconds(160, CIFAR_LIKE, RATES)
    # the head-fit images and val at 160 px, not all of train nor test (test is scored only if it wins)
    assert 0 < cost < probe_seconds(160, CIFAR_LIKE, RATES) / 2
    key = f"finetune@96x{without.epochs}"
    assert with_probe.options[key] == pytest.approx(without.options[key] + cost)
    assert with_probe.epochs <= without.epochs
    assert with_probe.seconds <= PLAN_FRACTION * 60 * 45
    # At the largest size there is nothing to compete with: no probe, no cost.
    huge = _plan(600, full_size_probe=True)
    assert huge.image_size == 160 and huge.full_size_probe is None
    assert huge.options["finetune@160x20"] == _plan(600).options["finetune@160x20"]
