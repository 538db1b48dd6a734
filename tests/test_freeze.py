"""Fine-tuning with the early stages frozen (`freeze_stages`), and the budget's epoch cap."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_BACKBONE, make_image_folder
from stand_ins import tiny_fit_inputs
from torch import nn

from imgclf.data.sources import load_dataset
from imgclf.errors import ImgclfError


def _tiny_fit(tmp_path: Path, *, freeze_stages: int, freeze_bn: bool) -> tuple[dict[str, torch.Tensor],
                                                                               dict[str, torch.Tensor]]:
    """(state before, state after) one epoch of fine-tuning the tiny backbone."""
    from imgclf.config import TrainConfig
    from imgclf.training.finetune import fit

    model, train, val = tiny_fit_inputs(make_image_folder(tmp_path / "data", per_class=8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(data="d", out="o", batch_size=4, augment="none", lr=1e-2, freeze_bn=freeze_bn,
                      freeze_stages=freeze_stages)
    fit(model, train, val, cfg, epochs=1, device=torch.device("cpu"), dtype=torch.float32)
    return before, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_frozen_stages_keep_their_weights_and_statistics_while_the_rest_trains(tmp_path: Path,
                                                                                freeze_bn: bool) -> None:
    before, after = _tiny_fit(tmp_path, freeze_stages=2, freeze_bn=freeze_bn)
    # test_efficientnet: stem (conv_stem, bn1), blocks.0, blocks.1 frozen; blocks.2 on and the head train.
    frozen = [k for k in before if k.startswith(("backbone.conv_stem", "backbone.bn1", "backbone.blocks.0.",
                                                 "backbone.blocks.1."))]
    trained = [k for k in before if k.startswith(("backbone.blocks.2.", "head.")) and k.endswith("weight")]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # weights and BatchNorm running statistics
    assert all(not torch.equal(before[k], after[k]) for k in trained)
    if not freeze_bn:  # BatchNorm in train mode after the frozen stages updates its statistics
        statistic = "backbone.blocks.2.0.bn1.running_mean"
        assert not torch.equal(before[statistic], after[statistic])


def test_no_frozen_stages_trains_the_stem_too(tmp_path: Path) -> None:
    before, after = _tiny_fit(tmp_path, freeze_stages=0, freeze_bn=True)
    assert not torch.equal(before["backbone.conv_stem.weight"], after["backbone.conv_stem.weight"])


def test_freezing_every_stage_or_an_unnamed_backbone_is_refused() -> None:
    import timm

    from imgclf.models.classifier import early_stage_parameters

    net = timm.create_model(TINY_BACKBONE, num_classes=0)  # stem + 5 stages
    assert len(early_stage_parameters(net, 4)) > len(early_stage_parameters(net, 1)) > 0
    with pytest.raises(ImgclfError, match="would freeze all") as info:
        early_stage_parameters(net, 5)
    assert "0 to 4" in str(info.value) and "--recipe probe" in str(info.value)
    with pytest.raises(ImgclfError, match="does not name its stages"):
        early_stage_parameters(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), 1)


def test_a_negative_freeze_stages_or_one_with_the_article_is_a_config_error() -> None:
    from imgclf.config import TrainConfig
    from imgclf.errors import ConfigError

    with pytest.raises(ConfigError, match="freeze_stages"):
        TrainConfig(data="d", out="o", freeze_stages=-1)
    with pytest.raises(ConfigError, match="article trains its whole network"):
        TrainConfig(data="d", out="o", recipe="article", freeze_stages=2)


@pytest.mark.parametrize("epochs, cap", [(None, "MAX_EPOCHS"), (4, 4)])
def test_a_budget_re_plan_may_add_epochs_up_to_the_users_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             epochs: int | None, cap: int | str) -> None:
    """The plan sets cfg.epochs; the cap for the re-plan on the first steps' speed is the user's
    --epochs or MAX_EPOCHS, not the plan's count (which left a mosaic run's last 74 s unused)."""
    import dataclasses

    from imgclf.config import TrainConfig
    from imgclf.training import budget
    from imgclf.training.run import _plan

    def plan_two_epochs(cfg: TrainConfig, *args: object, **kwargs: object) -> budget.BudgetRun:
        return budget.BudgetRun(dataclasses.replace(cfg, image_size=32, epochs=2), 1e9, 1e9, None, None)

    monkeypatch.setattr(budget, "plan_run", plan_two_epochs)
    dataset = load_dataset(str(make_image_folder(tmp_path / "data", per_class=4)), val_fraction=0.25, seed=0)
    cfg = TrainConfig(data="d", out="o", backbone=TINY_BACKBONE, random_init=True, time_budget_minutes=5,
                      epochs=epochs, precision="fp32")
    setup = _plan(cfg, dataset, torch.device("cpu"), time.perf_counter())
    assert setup.cfg.epochs == 2
    assert setup.epoch_cap == (budget.MAX_EPOCHS if cap == "MAX_EPOCHS" else cap)


@pytest.mark.parametrize("recipe, device, given, expected", [
    ("finetune", "cpu", None, 2),  # auto on a CPU: stem, blocks.0 (stride 2) and blocks.1 (stride 4)
    ("finetune", "cuda", None, 0),  # auto on a GPU: everything trains
    ("probe", "cpu", None, 0),
    ("finetune", "cpu", 0, 0),  # given: kept
    ("finetune", "cpu", 3, 3),
])
def test_auto_freezes_the_high_resolution_stages_on_a_cpu(recipe: str, device: str, given: int | None,
                                                          expected: int) -> None:
    from imgclf.config import TrainConfig
    from imgclf.models.backbones import create_backbone
    from imgclf.training.run import _frozen_stages

    cfg = TrainConfig(data="d", out="o", backbone=TINY_BACKBONE, recipe=recipe, freeze_stages=given)  # type: ignore[arg-type]
    backbone = create_backbone(TINY_BACKBONE, random_init=True)
    assert _frozen_stages(cfg, backbone, torch.device(device)).freeze_stages == expected


def test_high_resolution_stages_of_common_backbones() -> None:
    import timm

    from imgclf.models.classifier import high_resolution_stages

    counts = {name: high_resolution_stages(timm.create_model(name, num_classes=0))
              for name in ("tf_efficientnet_lite0", "resnet18", "vit_tiny_patch16_224")}
    assert counts == {"tf_efficientnet_lite0": 2, "resnet18": 1, "vit_tiny_patch16_224": 0}
    assert high_resolution_stages(nn.Sequential(nn.Conv2d(3, 8, 3))) == 0  # no timm naming: nothing frozen
