"""`--time-budget MINUTES`: pick recipe, input size and epochs so the whole run fits the budget.

The budget is wall-clock time from the start of `train`, data loading, measuring, evaluation and
the report included. Two parts:

1. **A plan** (`plan_budget`, a pure function of measured rates): a few real training steps and
   frozen forward passes at the smallest and largest candidate sizes (`measure_rates`, ~10-25 s
   for lite0 on 2 cores) give seconds per image, interpolated linearly in pixels for the sizes
   between. The rule, with `seconds_left` = 95% of the budget minus what has already run:
   - fine-tuning at size S for E epochs costs: decode all images + convert the frozen network +
     head features (head-fit images + val) and the head's fit + E x (train / train_rate + val /
     frozen_rate + a conversion) + the test-time size search (a val pass per larger candidate, see
     training/eval_size.py) + scoring val and test once at up to the largest candidate size (the
     report reuses those scores);
   - a probe at size S costs: decoding and features of the images whose features are not in the
     feature cache yet (`Workload.cached`), the logistic-regression fit (`FIT_SECONDS_PER_UNIT`
     per train image x feature x class), saving and the report;
   - fine-tuning is possible at a size when half an epoch fits (`MIN_FIT_EPOCHS`); the epochs
     that fit are rounded up once a quarter of the last one fits (`finetune.whole_epochs`), at
     least 1: the guard below ends that last epoch at the deadline;
   - take the **largest size that still gets at least 3 epochs** (`MIN_GOOD_EPOCHS`), with as
     many epochs as fit, at most `max_epochs` (early stopping usually ends sooner);
   - else the smallest size with as many epochs (1 or 2) as fit;
   - else the linear probe at the largest size whose probe fits;
   - else the probe on a stratified subset of the train images, as many as fit (at the size that
     allows the most), when that is at least `MIN_PROBE_IMAGES_PER_CLASS` per class;
   - else stop before any work, with the estimate (`ConfigError`).
2. **A guard** at run time (`finetune.fit` in budget mode): the fine-tuning deadline is the
   budget's end minus the estimated closing work. Training steps stop mid-epoch when the deadline
   passes; the partial epoch is scored on val and the best weights so far are kept. The learning
   rate follows the cosine schedule by `max(step fraction, time fraction)`, so it has decayed by
   the deadline even when the machine runs slower than measured (e.g. a shared CPU).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import nn

from imgclf.errors import ConfigError
from imgclf.memory import training_heap
from imgclf.training import eval_size
from imgclf.training.finetune import whole_epochs

if TYPE_CHECKING:
    from imgclf.config import Recipe, TrainConfig
    from imgclf.data.dataset import Dataset, ImageSet
    from imgclf.data.pipeline import Preprocessing
    from imgclf.models.backbones import Backbone

CANDIDATE_SIZES = (96, 128, 160, 192, 224)  # px; below 96 lite0/ResNet feature maps are 3x3 or smaller
MIN_GOOD_EPOCHS = 3  # a larger input is worth it only while it leaves this many epochs
MIN_FIT_EPOCHS = 0.5  # fine-tune when half an epoch fits: lite0, CIFAR-10, 96 px, 0.63 of an epoch under a
# 15-min budget scored 0.865 val against 0.755 for the probe head it starts from (BENCHMARKS.md, 2026-11-27)
PLAN_FRACTION = 0.95  # plan for 95% of the budget: the guard absorbs the rest (limit: +10%)
FIXED_SECONDS = 10.0  # bundle save, plots and report HTML, measured ~3-8 s on 2 cores
# The probe's logistic-regression fit (training/probe.py), seconds per train image x feature x class:
# 45 s for 45,000 CIFAR-10 images x 1,280 features x 10 classes on this 2-core machine (2026-11-27).
FIT_SECONDS_PER_UNIT = 45.0 / (45_000 * 1_280 * 10)
MIN_PROBE_IMAGES_PER_CLASS = 5  # a probe on fewer train images per class is not worth planning
MAX_EPOCHS = 20  # without --epochs; early stopping (patience) usually ends the run sooner
MEASURE_STEPS = 3  # timed training steps per measured size, after WARMUP_STEPS
WARMUP_STEPS = 2  # the first steps run slower (allocator, kernel selection): measured 49 vs 77 img/s with one


@dataclass(frozen=True)
class Workload:
    """Images per split, how many train images fit the first head, and what the caches hold."""

    train: int
    val: int
    test: int
    head_fit: int
    features: int = 1280  # the backbone's feature width (the probe's fit costs n x features x classes)
    classes: int = 10
    # Input size -> (share of the train images, share of the val and test images) whose frozen
    # features are in the feature cache: a probe computes only the others.
    cached: dict[int, tuple[float, float]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.train + self.val + self.test


@dataclass(frozen=True)
class Rates:
    """Measured speeds in images per second; sizes in px."""

    train: dict[int, float]  # fine-tuning: forward, backward and optimizer step, augmentation included
    frozen: dict[int, float]  # inference on the fast frozen path (OpenVINO where installed)
    decode: float  # files decoded and resized per second (all threads)
    convert_seconds: float = 5.0  # building one frozen forward (OpenVINO converts the network)


@dataclass(frozen=True)
class Plan:
    recipe: Recipe  # "probe" or "finetune"
    image_size: int
    epochs: int
    seconds: float  # estimated wall time of the rest of the run
    closing_seconds: float  # of which: what runs after the fine-tuning deadline (val, test, report, saving)
    reason: str
    options: dict[str, float] = field(default_factory=dict)  # "finetune@128x3" -> estimated seconds
    search_seconds: float = 0.0  # of closing: scoring the last epoch and choosing the test-time size
    train_images: int | None = None  # a probe on this many train images (a stratified subset); None = all
    full_size_probe: int | None = None  # finetune: the size of a probe that competes with it for the bundle
    fit_epochs: float = 0.0  # finetune: the epochs that fit at `image_size` before rounding (`epochs`)


def _shared_seconds(size: int, work: Workload, rates: Rates) -> float:
    return work.total / rates.decode + rates.convert_seconds


def search_seconds(size: int, work: Workload, rates: Rates) -> float:
    """Choosing the test-time input size (training/eval_size.py): a val pass and a conversion per candidate."""
    larger = len(eval_size.candidate_sizes(size)) - 1
    return eval_size.estimated_seconds(size, work.val, rates.frozen[size]) + larger * rates.convert_seconds


def closing_seconds(size: int, work: Workload, rates: Rates) -> float:
    """After fine-tuning: the test-time size search, then scoring val and test once (the metrics
    and the report share it) at up to the largest candidate size, plus saving."""
    scale = (max(eval_size.candidate_sizes(size)) / size) ** 2
    scoring = (work.val + work.test) * scale / rates.frozen[size] + rates.convert_seconds
    return search_seconds(size, work, rates) + scoring + FIXED_SECONDS


def fit_seconds(train_images: int, work: Workload) -> float:
    """The probe's logistic-regression fit on `train_images` feature rows."""
    return FIT_SECONDS_PER_UNIT * train_images * work.features * max(work.classes, 2)


def probe_seconds(size: int, work: Workload, rates: Rates) -> float:
    """Estimated seconds of a probe run: decoding and features of the images the feature cache
    lacks (a probe streams its images: nothing else is decoded), the fit, saving and the report
    (which reuses the features' predictions)."""
    train_share, eval_share = work.cached.get(size, (0.0, 0.0))
    computed = work.train * (1 - train_share) + (work.val + work.test) * (1 - eval_share)
    network = rates.convert_seconds if computed else 0.0
    return (computed / rates.decode + network + computed / rates.frozen[size] + fit_seconds(work.train, work)
            + FIXED_SECONDS)


def probe_subset(size: int, work: Workload, rates: Rates, usable: float) -> int:
    """The most train images a probe at `size` can use within `usable` seconds (0 if none)."""
    fixed = probe_seconds(size, dataclasses.replace(work, train=0), rates)
    train_share = work.cached.get(size, (0.0, 0.0))[0]
    per_image = ((1 - train_share) * (1 / rates.decode + 1 / rates.frozen[size])
                 + fit_seconds(1, work))
    return max(0, min(work.train, int((usable - fixed) / per_image)))


def epoch_seconds(size: int, work: Workload, rates: Rates) -> float:
    """One fine-tuning epoch: the training steps, then scoring val (with its own conversion)."""
    return work.train / rates.train[size] + work.val / rates.frozen[size] + rates.convert_seconds


def full_size_probe_seconds(size: int, work: Workload, rates: Rates) -> float:
    """The probe at `size` that competes with fine-tuning below it for the bundle (training/run.py):
    decoding and features of the head-fitting images and val, a conversion and the fit. Test is scored
    at that size only if it wins, in place of the fine-tuned network's scoring."""
    return probe_seconds(size, dataclasses.replace(work, train=work.head_fit, test=0), rates) - FIXED_SECONDS


def finetune_seconds(size: int, epochs: int, work: Workload, rates: Rates) -> float:
    head = (work.head_fit + work.val) / rates.frozen[size]
    return (_shared_seconds(size, work, rates) + head + fit_seconds(work.head_fit, work)
            + epochs * epoch_seconds(size, work, rates) + closing_seconds(size, work, rates))


def plan_budget(
    *,
    seconds_left: float,
    work: Workload,
    rates: Rates,
    sizes: Sequence[int],
    max_epochs: int,
    allow_finetune: bool = True,
    full_size_probe: bool = False,
) -> Plan:
    """Choose recipe, size and epochs for `seconds_left` (the rule is in the module docstring).

    With `full_size_probe`, fine-tuning below the largest size also pays for a probe at the largest
    size (`full_size_probe_seconds`), which competes with it for the bundle.

    Example:
        >>> rates = Rates(train={96: 80.0, 128: 45.0}, frozen={96: 400.0, 128: 230.0}, decode=2000.0)
        >>> plan = plan_budget(seconds_left=900, work=Workload(9000, 1000, 2000, 9000),
        ...                    rates=rates, sizes=(96, 128), max_epochs=20)
        >>> (plan.recipe, plan.image_size, plan.epochs)
        ('finetune', 128, 4)
    """
    sizes = sorted(sizes)
    usable = seconds_left * PLAN_FRACTION
    options: dict[str, float] = {}
    fitting: dict[int, tuple[float, int]] = {}  # size -> (epochs that fit, epochs planned)
    extra = {s: full_size_probe_seconds(sizes[-1], work, rates) if full_size_probe and s < sizes[-1] else 0.0
             for s in sizes}  # the probe at the largest size, beside fine-tuning below it
    if allow_finetune and max_epochs > 0:
        for size in sizes:
            fixed = finetune_seconds(size, 0, work, rates) + extra[size]
            fit_epochs = (usable - fixed) / epoch_seconds(size, work, rates)
            if fit_epochs >= MIN_FIT_EPOCHS:
                # Rounded up from a quarter epoch (`whole_epochs`): it costs nothing past the budget,
                # because the guard ends the last epoch at the deadline with the lr annealed by time.
                fitting[size] = (fit_epochs, min(max_epochs, whole_epochs(fit_epochs)))
                options[f"finetune@{size}x{fitting[size][1]}"] = (finetune_seconds(size, fitting[size][1], work, rates)
                                                                  + extra[size])
    for size in sizes:
        options[f"probe@{size}"] = probe_seconds(size, work, rates)
    good = [s for s, (fit, _) in fitting.items() if fit >= MIN_GOOD_EPOCHS]
    if good:
        size = max(good)
        reason = f"largest input that leaves >= {MIN_GOOD_EPOCHS} epochs"
    elif fitting:
        size = min(fitting)
        reason = f"no input leaves {MIN_GOOD_EPOCHS} epochs: the smallest, with the epochs that fit"
    else:
        return _plan_probe(seconds_left, work, rates, sizes, options,
                           "fine-tuning does not fit" if allow_finetune and max_epochs > 0 else "probe asked for")
    epochs = fitting[size][1]
    # After the deadline: scoring the last (maybe partial) epoch on val, then the closing work.
    after_deadline = work.val / rates.frozen[size] + rates.convert_seconds + closing_seconds(size, work, rates)
    # rounded up: the guard cuts the last epoch
    seconds = min(finetune_seconds(size, epochs, work, rates) + extra[size], usable)
    return Plan("finetune", size, epochs, seconds, after_deadline, reason,
                options, search_seconds=work.val / rates.frozen[size] + search_seconds(size, work, rates),
                full_size_probe=sizes[-1] if full_size_probe and size < sizes[-1] else None,
                fit_epochs=fitting[size][0])


def _plan_probe(
    seconds_left: float, work: Workload, rates: Rates, sizes: list[int], options: dict[str, float], why: str
) -> Plan:
    """The largest input whose probe fits; else the probe on the most train images that fit (a
    stratified subset), at the size that allows the most (cached features count); else stop."""
    usable = seconds_left * PLAN_FRACTION
    probes = [s for s in sizes if probe_seconds(s, work, rates) <= usable]
    if probes:
        size = max(probes)
        return Plan("probe", size, 0, probe_seconds(size, work, rates), FIXED_SECONDS,
                    f"{why}: the largest input whose probe fits", options)
    subsets = {s: probe_subset(s, work, rates, usable) for s in sizes}
    size = max(sizes, key=lambda s: (subsets[s], s))
    least = MIN_PROBE_IMAGES_PER_CLASS * max(work.classes, 2)
    if subsets[size] < min(least, work.train):
        need = probe_seconds(sizes[0], dataclasses.replace(work, train=min(least, work.train)), rates) / 60
        raise ConfigError(
            f"the time budget leaves {seconds_left / 60:.1f} min, but even a linear probe at {sizes[0]} px on "
            f"{least} training images ({MIN_PROBE_IMAGES_PER_CLASS} per class) and the {work.val + work.test} "
            f"val and test images needs about {need:.1f} min on this machine",
            expected="a budget that fits at least that probe",
            fix=f"pass --time-budget {math.ceil(need / PLAN_FRACTION + 1)} or more, or use fewer images",
        )
    part = dataclasses.replace(work, train=subsets[size])
    return Plan("probe", size, 0, probe_seconds(size, part, rates), FIXED_SECONDS,
                f"{why}, nor a probe on all {work.train} training images: a probe on the {subsets[size]} that fit",
                options, train_images=subsets[size])


def candidate_sizes(upper: int) -> list[int]:
    """The planned input sizes: `CANDIDATE_SIZES` up to `upper` px (or just `upper` below 96)."""
    return [s for s in CANDIDATE_SIZES if s <= upper] or [upper]


def _per_image_seconds(measured: dict[int, float], size: int) -> float:
    """Seconds per image at `size`, linear in pixels through the measured sizes (images/s given)."""
    points = sorted(measured)
    if len(points) == 1:
        return (1 / measured[points[0]]) * (size * size) / (points[0] * points[0])
    (s0, s1) = points[0], points[-1]
    t0, t1 = 1 / measured[s0], 1 / measured[s1]
    slope = (t1 - t0) / (s1 * s1 - s0 * s0)
    return max(t0 + slope * (size * size - s0 * s0), 1e-6)


def interpolate(measured: dict[int, float], sizes: Sequence[int]) -> dict[int, float]:
    """Images/s at every size from those measured at two (or one) of them.

    Example:
        >>> interpolate({96: 100.0, 224: 20.0}, [96, 160, 224])[96]
        100.0
    """
    return {s: measured[s] if s in measured else 1 / _per_image_seconds(measured, s) for s in sizes}


def measure_rates(
    backbone: nn.Module,
    num_features: int,
    *,
    sizes: Sequence[int],
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    precision: str,
    freeze_bn: bool,
    frozen_stages: int = 0,
    decode_images: Callable[[int], tuple[int, float]],
    clock: Callable[[], float] = time.perf_counter,
) -> Rates:
    """Time a few real steps at the smallest and largest of `sizes`, on a copy of the network.

    `decode_images(size)` decodes a sample at `size` and returns (images, seconds).
    """
    from imgclf.runtime import FrozenForward

    measured_sizes = sorted({min(sizes), max(sizes)})
    train: dict[int, float] = {}
    frozen: dict[int, float] = {}
    convert = 0.0
    for size in measured_sizes:
        images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
        train[size] = training_rate(backbone, num_features, size=size, batch_size=batch_size, device=device,
                                    dtype=dtype, freeze_bn=freeze_bn, frozen_stages=frozen_stages, clock=clock,
                                    images=images)
        start = clock()
        forward = FrozenForward(copy.deepcopy(backbone), image_size=size, device=device, precision=precision)
        convert = max(convert, clock() - start)
        x = (images.float() / 255.0).contiguous(memory_format=torch.channels_last)
        forward(x)  # warm-up
        start = clock()
        forward(x)
        frozen[size] = batch_size / max(clock() - start, 1e-9)
        del forward
    count, seconds = decode_images(max(sizes))
    return Rates(
        train=interpolate(train, sizes), frozen=interpolate(frozen, sizes),
        decode=count / max(seconds, 1e-9) if count else 1e9, convert_seconds=convert,
    )


def training_rate(
    backbone: nn.Module, num_features: int, *, size: int, batch_size: int, device: torch.device, dtype: torch.dtype,
    freeze_bn: bool, frozen_stages: int = 0, clock: Callable[[], float] = time.perf_counter,
    images: torch.Tensor | None = None,
) -> float:
    """Images/s of fine-tuning steps (augmentation, forward, backward, AdamW) at `size` on a copy of
    `backbone` with a new head: `MEASURE_STEPS` timed after `WARMUP_STEPS`. `images`: a uint8 batch
    (default: random pixels)."""
    from imgclf.data.pipeline import Augmentation
    from imgclf.models.classifier import ImageClassifier
    from imgclf.runtime import autocast

    generator = torch.Generator().manual_seed(0)
    augment = Augmentation()
    model = ImageClassifier(copy.deepcopy(backbone), nn.Linear(num_features, 10)).to(device)
    model.set_backbone_trainable(True, freeze_bn=freeze_bn, frozen_stages=frozen_stages)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    if images is None:
        images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 10, (batch_size,))
    seconds = 0.0
    with training_heap():  # as FitLoop trains (memory.TRAINING_MMAP_THRESHOLD)
        for step in range(WARMUP_STEPS + MEASURE_STEPS):
            start = clock()
            x = (augment(images, generator) / 255.0).to(device).contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                loss = nn.functional.cross_entropy(model(x).float(), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # CUDA runs asynchronously: wait, or only launches are timed
            if step >= WARMUP_STEPS:
                seconds += clock() - start
    return MEASURE_STEPS * batch_size / max(seconds, 1e-9)


def sample_decoder(images: ImageSet, prep_at: Callable[[int], Preprocessing], *, workers: int, sample: int = 64,
                   clock: Callable[[], float] = time.perf_counter) -> Callable[[int], tuple[int, float]]:
    """A `decode_images` for `measure_rates`: decode up to `sample` images of an ImageSet at a size."""
    from imgclf.data.pipeline import ImageStore

    def decode(size: int) -> tuple[int, float]:
        n = min(sample, len(images))
        if n == 0:
            return 0, 0.0
        picks = np.linspace(0, len(images) - 1, n).astype(np.int64)
        start = clock()
        ImageStore.decode(images.subset(picks), prep_at(size), memory_budget=2**40, workers=workers,
                   description="measure decode")
        return n, clock() - start

    return decode


class BudgetRun(NamedTuple):
    """What `plan_run` decided."""

    cfg: TrainConfig  # recipe, image_size and epochs set
    deadline: float  # a `clock()` value: fine-tuning stops by then
    search_end: float  # the test-time size search, and scoring at its size, end by then
    probe_images: int | None  # a probe on this many train images (a stratified subset); None = all
    full_size_probe: int | None  # the size of a probe that competes with fine-tuning for the bundle
    # What the plan was made from, for a choice of backbone (training/choose.py) to plan again with.
    plan: Plan | None = None
    rates: Rates | None = None
    work: Workload | None = None


def plan_run(
    cfg: TrainConfig,
    backbone: Backbone,
    dataset: Dataset,
    *,
    device: torch.device,
    dtype: torch.dtype,
    started: float,
    upper_size: int,
    parallel: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    rates: Rates | None = None,
    quiet: bool = False,
) -> BudgetRun:
    """Measure, plan, log; returns the config with recipe, image_size and epochs set, and the
    deadlines and sizes that go with it (`BudgetRun`).

    Given `rates` (another backbone's, scaled: training/choose.py), nothing is measured; `quiet` does
    not log the plan.

    With the feature cache on, features already cached at a size count as free for a probe there.

    `--image-size` limits the plan to that size, `--epochs` caps the epochs, `--recipe probe`
    rules out fine-tuning. `parallel` processes (torchrun) share the training steps and frozen
    passes: their measured rates, each taken while the others measure too, are multiplied by it.
    """
    from imgclf.data.pipeline import Preprocessing
    from imgclf.progress import log
    from imgclf.runtime import compute_dtype

    budget_s = 60.0 * (cfg.time_budget_minutes or 0.0)
    sizes = [cfg.image_size] if cfg.image_size else candidate_sizes(upper_size)

    def prep_at(size: int) -> Preprocessing:
        return Preprocessing.from_data_config(backbone.data_config, size)

    if rates is None:
        rates = measure_rates(
            backbone.model, backbone.num_features, sizes=sizes, batch_size=cfg.batch_size, device=device,
            dtype=dtype, precision=cfg.precision, freeze_bn=cfg.freeze_bn, frozen_stages=cfg.freeze_stages or 0,
            decode_images=sample_decoder(dataset.train, prep_at, workers=cfg.workers, clock=clock), clock=clock,
        )
    if parallel > 1:
        rates = dataclasses.replace(rates, train={s: r * parallel for s, r in rates.train.items()},
                                    frozen={s: r * parallel for s, r in rates.frozen.items()})
    cached: dict[int, tuple[float, float]] = {}
    if cfg.feature_cache:
        from imgclf.training.feature_cache import cached_shares

        cached = cached_shares(backbone, {s: prep_at(s) for s in sizes}, dataset,
                               dtype=compute_dtype(device, cfg.precision))
    work = Workload(
        train=len(dataset.train), val=len(dataset.val), test=len(dataset.test) if dataset.test is not None else 0,
        head_fit=min(len(dataset.train), cfg.head_fit_images), features=backbone.num_features,
        classes=len(dataset.classes), cached=cached,
    )
    seconds_left = budget_s - (clock() - started)
    max_epochs = cfg.epochs if cfg.epochs is not None else MAX_EPOCHS
    plan = plan_budget(seconds_left=seconds_left, work=work, rates=rates, sizes=sizes, max_epochs=max_epochs,
                       allow_finetune=cfg.recipe == "finetune", full_size_probe=cfg.full_size_probe)
    log_plan = (lambda _: None) if quiet else log
    log_plan(f"time budget {cfg.time_budget_minutes:g} min, {seconds_left:.0f} s left after measuring: "
        f"{plan.recipe} at {plan.image_size} px" + (f", {plan.epochs} epoch(s)" if plan.epochs else "")
        + (f" on {plan.train_images} of {work.train} train images" if plan.train_images is not None else "")
        + (f", and a probe at {plan.full_size_probe} px to compete with it" if plan.full_size_probe else "")
        + "".join(f"; cached features at {s} px: {a:.0%} of train, {b:.0%} of val and test"
                  for s, (a, b) in cached.items() if a or b)
        + f", estimated {plan.seconds:.0f} s ({plan.reason}); measured train "
        + ", ".join(f"{s}: {rates.train[s]:.0f}" for s in sizes) + " img/s, frozen "
        + ", ".join(f"{s}: {rates.frozen[s]:.0f}" for s in sizes) + f" img/s, decode {rates.decode:.0f} img/s")
    deadline = started + budget_s - plan.closing_seconds
    # The size search may use the whole budget but its fixed end (a conversion, saving): it checks each
    # candidate against the speed it measures, which the start's frozen rate can misjudge (826 img/s
    # measured, 915-1,759 seen: 128 px skipped while the run ended 36 s early, CIFAR-10, 2026-12-01).
    search_end = max(started + budget_s - FIXED_SECONDS - rates.convert_seconds, deadline + plan.search_seconds)
    planned = dataclasses.replace(cfg, recipe=plan.recipe, image_size=plan.image_size, epochs=plan.epochs)
    return BudgetRun(planned, deadline, search_end, plan.train_images, plan.full_size_probe, plan, rates, work)
