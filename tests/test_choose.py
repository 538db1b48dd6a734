"""`--backbone auto`: the screening of the offline backbones and the choice among them (training/choose.py)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_BACKBONE, make_image_folder

from imgclf.config import TrainConfig
from imgclf.data.check import preflight
from imgclf.data.sources import load_dataset
from imgclf.models.backbones import create_backbone
from imgclf.training import budget, choose
from imgclf.training.choose import Screened, choose_backbone, decide, paired_loss_z, wants_choice

SIZE = 32


def row(name: str, accuracy: float, losses: list[float], epochs: float | None = 5.0) -> Screened:
    tensor = torch.tensor(losses)
    return Screened(name, accuracy, float(tensor.mean()), 500.0, 1.0, fine_tune_epochs=epochs, losses=tensor)


def test_the_paired_loss_test_counts_standard_errors_of_the_per_image_difference() -> None:
    current = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert paired_loss_z(current, current - 0.5) == math.inf  # the same gain on every image
    candidate = current - torch.tensor([0.4, 0.6, 0.4, 0.6])  # mean 0.5, std 0.1155, n 4: se 0.0577
    assert paired_loss_z(current, candidate) == pytest.approx(0.5 / (0.11547 / 2), rel=1e-3)
    assert paired_loss_z(candidate, current) < 0
    assert paired_loss_z(torch.tensor([1.0]), torch.tensor([0.0])) == 0.0  # one image says nothing


def test_a_larger_backbone_wins_only_with_higher_accuracy_and_a_clearly_lower_loss() -> None:
    base = row("lite0", 0.80, [0.5, 0.7, 0.6, 0.9, 0.4, 0.8])
    clearly = row("lite2", 0.85, [0.3, 0.5, 0.4, 0.6, 0.2, 0.6])
    assert decide([base, clearly], {"lite2"})[0] == "lite2"
    noisy = row("lite2", 0.85, [0.1, 1.2, 0.2, 1.1, 0.1, 0.9])  # lower on average, not clearly
    name, reason = decide([base, noisy], {"lite2"})
    assert name == "lite0" and "does not beat lite0 clearly" in reason
    lower_loss_only = row("lite2", 0.80, clearly.losses.tolist())  # type: ignore[union-attr]
    assert decide([base, lower_loss_only], {"lite2"})[0] == "lite0"


def test_a_backbone_the_budget_cannot_train_long_enough_is_not_chosen_however_good() -> None:
    base = row("lite0", 0.80, [0.5, 0.7, 0.6, 0.9])
    better = row("lite2", 0.95, [0.1, 0.2, 0.1, 0.2], epochs=1.4)
    name, reason = decide([base, better], eligible=set())
    assert name == "lite0" and "fewer than 3 epochs (1.4)" in reason


def test_candidates_are_compared_in_turn_against_the_current_choice() -> None:
    lite0 = row("lite0", 0.80, [0.9, 0.8, 0.9, 0.8])
    lite1 = row("lite1", 0.85, [0.5, 0.4, 0.5, 0.4])
    lite2 = row("lite2", 0.84, [0.2, 0.1, 0.2, 0.1])  # beats lite0 clearly, but not lite1 on accuracy
    assert decide([lite0, lite1, lite2], {"lite1", "lite2"})[0] == "lite1"


def test_only_a_default_fine_tuning_run_under_a_budget_chooses() -> None:
    cfg = TrainConfig(data="d", out="o", time_budget_minutes=5)
    assert wants_choice(cfg)
    assert not wants_choice(dataclasses.replace(cfg, backbone="tf_efficientnet_lite0"))  # named, even the default
    assert not wants_choice(dataclasses.replace(cfg, recipe="probe"))
    assert not wants_choice(dataclasses.replace(cfg, time_budget_minutes=None, epochs=3))
    assert not wants_choice(dataclasses.replace(cfg, weights="w.safetensors"))
    assert not wants_choice(dataclasses.replace(cfg, random_init=True))


# The rest screen two real (tiny, random) networks on generated images. The default's weights are zeroed:
# its features are constant, so its probe is at chance, and the other's features separate the colours.
RATES = budget.Rates(train={SIZE: 400.0}, frozen={SIZE: 2000.0}, decode=2000.0, convert_seconds=0.5)


def setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, minutes: float, rates: budget.Rates = RATES,
            batch_size: int = 8, data: Path | None = None):
    """cfg, the zeroed default backbone, its plan, the dataset; the candidate list is the two networks."""
    monkeypatch.setenv("IMGCLF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(choose, "offline_backbones", lambda: [TINY_BACKBONE, "test_efficientnet_alt"])
    made: list[str] = []

    def create(name: str) -> object:
        made.append(name)
        torch.manual_seed(1)
        return dataclasses.replace(create_backbone(TINY_BACKBONE, random_init=True), entry=dataclasses.replace(
            create_backbone(TINY_BACKBONE, random_init=True).entry, name=name))

    monkeypatch.setattr(choose, "create_backbone", create)
    data = data or make_image_folder(tmp_path / "data", per_class=16)
    dataset, _ = preflight(load_dataset(str(data), val_fraction=0.25, seed=0), max_bad_fraction=0.05)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "out"), time_budget_minutes=minutes, image_size=SIZE,
                      batch_size=batch_size, precision="fp32", freeze_stages=0)
    default = create_backbone(TINY_BACKBONE, random_init=True)
    with torch.no_grad():
        for p in default.model.parameters():
            p.zero_()
    started = 0.0
    clock = lambda: 1.0  # noqa: E731 - one second has passed whenever the plan looks
    planned = budget.plan_run(cfg, default, dataset, device=torch.device("cpu"), dtype=torch.float32,
                              started=started, upper_size=SIZE, rates=rates, clock=clock)

    def run() -> choose.Choice | None:
        return choose_backbone(cfg, default, planned, dataset, device=torch.device("cpu"), dtype=torch.float32,
                               started=started, upper_size=lambda b: SIZE, prepare=lambda c, b: c, clock=clock)

    return run, made


def test_the_screening_picks_the_backbone_whose_probe_is_clearly_better(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run, made = setting(tmp_path, monkeypatch, minutes=5)
    choice = run()
    assert choice is not None and made == ["test_efficientnet_alt"]
    summary = choice.summary
    assert [c["backbone"] for c in summary["candidates"]] == [TINY_BACKBONE, "test_efficientnet_alt"]
    default, other = summary["candidates"]
    assert default["val_accuracy"] < 0.5 < 0.9 <= other["val_accuracy"]  # chance against the colours
    assert other["val_loss"] < default["val_loss"] and other["fine_tune_epochs"] >= budget.MIN_GOOD_EPOCHS
    assert summary["chosen"] == "test_efficientnet_alt" and "beats" in summary["reason"]
    assert choice.backbone.entry.name == "test_efficientnet_alt"
    assert choice.run.cfg.backbone == "test_efficientnet_alt" and choice.run.cfg.recipe == "finetune"
    assert summary["train_images"] + summary["val_images"] == 48


def test_multi_label_data_is_screened_by_val_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_multilabel import make_multilabel_csv

    run, _ = setting(tmp_path, monkeypatch, minutes=5, data=make_multilabel_csv(tmp_path / "ml", images=64))
    choice = run()
    assert choice is not None and choice.summary["chosen"] == "test_efficientnet_alt"
    default, other = choice.summary["candidates"]
    assert other["val_accuracy"] > default["val_accuracy"]  # val mAP: the zeroed network's is the label rates
    assert other["val_loss"] < default["val_loss"]  # BCE summed over the labels


def test_a_budget_that_leaves_the_slower_backbone_too_few_epochs_keeps_the_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # At 1.07 train img/s the 5-min budget leaves the default about 8 epochs of its 36 train images (and
    # the screening's timed steps, batches of 2, fit its 10%); the candidate is taken to run at 0.3x the
    # default's speed (whatever the timing measured for these two tiny networks), so it gets about 2.
    slow = dataclasses.replace(RATES, train={SIZE: 1.07})
    run, made = setting(tmp_path, monkeypatch, minutes=5, rates=slow, batch_size=2)
    real = choose.scaled_rates
    monkeypatch.setattr(choose, "scaled_rates", lambda rates, ratio: real(rates, 0.3))
    choice = run()
    assert choice is not None and made == ["test_efficientnet_alt"]
    default, other = choice.summary["candidates"]
    assert 6 <= default["fine_tune_epochs"] < 10 and other["fine_tune_epochs"] < 3
    assert other["val_accuracy"] > default["val_accuracy"]  # better, but not trainable in this budget
    assert choice.summary["chosen"] == TINY_BACKBONE and "fewer than 3 epochs" in choice.summary["reason"]
    assert choice.backbone.entry.name == TINY_BACKBONE


def test_nothing_is_screened_when_the_default_itself_gets_fewer_than_three_epochs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    run, made = setting(tmp_path, monkeypatch, minutes=5, rates=dataclasses.replace(RATES, train={SIZE: 0.2}))
    assert run() is None and made == []  # no other backbone was even built
    assert "not screened: the budget leaves" in capsys.readouterr().err


def test_resumed_runs_keep_the_backbone_they_recorded(tmp_path: Path) -> None:
    from imgclf.training.run import _plan

    data = make_image_folder(tmp_path / "data", per_class=6)
    dataset, _ = preflight(load_dataset(str(data), val_fraction=0.25, seed=0), max_bad_fraction=0.05)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "o"), epochs=1, image_size=SIZE, random_init=True)
    assert cfg.backbone == "auto"
    setup = _plan(cfg, dataset, torch.device("cpu"), 0.0, recorded_backbone=TINY_BACKBONE)
    assert setup.cfg.backbone == TINY_BACKBONE and setup.backbone_choice is None
