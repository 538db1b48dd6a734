"""A training run: data -> backbone -> plan -> head fit (probe) -> fine-tuning -> scores on val and test.

`run_training` returns what was trained (`TrainingRun`); scoring it, calibrating it, saving the
bundle and writing the report happen a layer above, in `imgclf.workflow.train`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from imgclf import distributed
from imgclf.config import AUTO_BACKBONE, TrainConfig, default_backbone, resolve_config, save_yaml, with_default_budget
from imgclf.data.check import preflight
from imgclf.data.dataset import Dataset, ImageSet
from imgclf.data.decisions import apply_decisions
from imgclf.data.pipeline import ImageStore, Preprocessing, Store, normalize
from imgclf.data.sources import load_dataset, stratified_split
from imgclf.errors import ConfigError
from imgclf.models.backbones import Backbone, create_backbone, resolve_backbone
from imgclf.models.classifier import HIGH_RESOLUTION_STRIDE, ImageClassifier, high_resolution_stages
from imgclf.progress import log
from imgclf.runtime import FrozenForward, StorePredictions, compute_dtype, pick_device, run_frozen
from imgclf.training.article import DEFAULT_SEED_EPOCHS, build_seed_model, fit_article, seed_meta, seed_setup
from imgclf.training.balance import balanced_class_weights
from imgclf.training.checkpoint import Checkpointer, open_checkpointer
from imgclf.training.choose import choose_backbone, wants_choice
from imgclf.training.eval_size import choose_eval_size
from imgclf.training.feature_cache import LazyForward, cache_for, cached_features, cached_probe
from imgclf.training.finetune import Callback, fit
from imgclf.training.multilabel import fit_multilabel_probe, multilabel_loss
from imgclf.training.precision import training_dtype
from imgclf.training.probe import PATH_STOP_DROP, STD_FLOOR, fit_probe
from imgclf.training.reproducible import make_deterministic
from imgclf.training.runlog import MetricsLog, TensorBoardLog
from imgclf.version import library_versions

DEFAULT_FINETUNE_EPOCHS = 5  # with early stopping on val accuracy (patience 3)
MIN_IMAGE_SIZE = 96  # below this lite0/ResNet final feature maps are 3x3 or smaller
MAX_UPSAMPLE = 5  # small images are enlarged at most 5x: beyond that it adds compute, not detail
CPU_FINETUNE_MAX_SIZE = 128  # fine-tuning cost grows with pixels; on a CPU cap the default here


def median_short_side(images: ImageSet, sample: int = 64, seed: int = 0) -> int | None:
    """Median shorter side of up to `sample` training images (header reads only, no decode)."""
    if images.arrays is not None:
        return int(min(images.arrays.shape[1:3]))
    if not len(images):
        return None
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(images), size=min(sample, len(images)), replace=False)
    sides = []
    for i in picks:
        try:
            with Image.open(images.paths[i]) as img:
                sides.append(min(img.size))
        except Exception:  # unreadable files are reported by the decoder later
            continue
    return int(np.median(sides)) if sides else None


def choose_image_size(native: int, median_side: int | None, recipe: str, device: torch.device) -> int:
    """The default input side: the backbone's native size, reduced for small images and CPU fine-tuning.

    Example:
        >>> choose_image_size(224, 32, "probe", torch.device("cpu"))
        160
        >>> choose_image_size(224, 800, "finetune", torch.device("cpu"))
        128
    """
    size = native
    if recipe == "finetune" and device.type == "cpu":
        size = min(size, CPU_FINETUNE_MAX_SIZE)
    if median_side is not None and median_side * MAX_UPSAMPLE < size:
        size = max(MIN_IMAGE_SIZE, 32 * round(median_side * MAX_UPSAMPLE / 32))
    return int(size)


def memory_budget(fraction: float) -> int:
    """Bytes of RAM that decoded images may take: `fraction` of what is available now."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 8 * 2**30
    return int(available * fraction)


def _store(images: ImageSet, prep: Preprocessing, cfg: TrainConfig, budget: int, name: str) -> ImageStore:
    store = ImageStore.decode(images, prep, memory_budget=budget, workers=cfg.workers, description=f"decode {name}")
    mode = "in memory" if store.in_memory else "streamed from disk"
    log(f"{name}: {len(store)} images at {prep.image_size} px, {mode}")
    return store


def resolve_run_config(config: TrainConfig | None = None, **overrides: Any) -> TrainConfig:
    """The configuration a `train` call runs with: `config` and `overrides` merged, the default time
    budget applied, and every mistake that can be found before reading data raised now.

    Example:
        >>> resolve_run_config(data="photos/", out="runs/p", recipe="probe").recipe
        'probe'
    """
    if config is None:
        cfg = resolve_config(**overrides)
    else:
        cfg = dataclasses.replace(config, **overrides) if overrides else config
    planned = with_default_budget(cfg)
    if planned is not cfg:
        log(f"no --epochs, --time-budget or --max-minutes: planning for the default budget of "
            f"{planned.time_budget_minutes:g} min (pass --epochs N or --time-budget MINUTES to choose)")
        cfg = planned
    if not cfg.data or not cfg.out:
        raise ConfigError("train needs both data and out", fix="imgclf train DATA --out DIR")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {cfg.out!r} is a file", fix="pass a folder path for the bundle")
    if cfg.backbone != AUTO_BACKBONE:
        resolve_backbone(cfg.backbone)  # a typo in the name fails now, not after reading the data
    if cfg.recipe == "article" and distributed.launch() is not None:
        raise ConfigError("--recipe article runs in one process", expected="a launch without torchrun",
                          fix="run it as `imgclf train ...`, or use --recipe finetune or probe with torchrun")
    return cfg


@dataclasses.dataclass
class TrainingRun:
    """What training produced, for the layers above to score, calibrate and save as a bundle."""

    model: ImageClassifier  # on the CPU, in eval mode
    classes: list[str]
    prep: Preprocessing  # the test-time preprocessing (its size may exceed the training size)
    meta: dict[str, Any]  # the bundle's description of the run: backbone, head, recipe, config, history...
    predictions: dict[str, StorePredictions]  # the final model's logits on val and test
    stores: dict[str, ImageStore]  # val and test, decoded at `prep`'s size
    dataset: Dataset
    checkpointer: Checkpointer  # `finish` it once the bundle is saved
    started: float  # time.perf_counter() at the start of the run


@dataclasses.dataclass
class _Setup:
    """The plan for one run: what `_fit` trains, at what size and precision, until when."""

    cfg: TrainConfig  # with the time budget's choices (recipe, size, epochs) filled in
    dataset: Dataset  # the probe may use a stratified subset of train under a tight budget
    backbone: Backbone
    prep: Preprocessing
    dtype: torch.dtype  # the training steps' autocast dtype
    deadline: float | None = None  # no epoch after the first may end past it
    search_end: float | None = None  # the test-time size search, and scoring at its size, must end by then
    epoch_cap: int | None = None  # budget runs: the most epochs a re-plan may give
    full_size_probe: int | None = None  # finetune below the probe's size: a probe there competes for the bundle
    backbone_choice: dict[str, Any] | None = None  # `--backbone auto`'s screening, when it ran


def run_training(cfg: TrainConfig, out: Path) -> TrainingRun:
    """Train under `cfg`: load data -> build the backbone -> plan -> fit. Writes the run's own files
    into `out` (config.yaml, metrics, checkpoints) on rank 0; the bundle is the caller's to save.
    """
    started = time.perf_counter()
    if cfg.deterministic:
        log(f"deterministic: on, {make_deterministic(cfg.seed)} thread(s)")
    else:
        torch.manual_seed(cfg.seed)
    if distributed.active():
        log(f"distributed: {distributed.world_size()} processes, {torch.get_num_threads()} thread(s) each")
    checkpointer = open_checkpointer(cfg)
    callbacks: list[Callback] = []
    if distributed.is_main():
        save_yaml(cfg, out / "config.yaml")
        callbacks.append(MetricsLog(out, history=checkpointer.resumed_history()))
        if cfg.tensorboard:
            callbacks.append(TensorBoardLog(out, first_epoch=len(checkpointer.resumed_history()) + 1))
    dataset, unreadable = _load_data(cfg)
    if dataset.multilabel and cfg.balance:
        log("warning: --balance weights single-label classes; it is ignored for multi-label data")
    if dataset.multilabel and cfg.recipe == "article":
        raise ConfigError("--recipe article trains a softmax over single labels; this data is multi-label",
                          expected="--recipe finetune (default) or probe for a path,labels CSV",
                          fix="drop --recipe article")
    device = distributed.rank_device(pick_device(cfg.device))
    setup = _plan(cfg, dataset, device, started, recorded_dtype=checkpointer.training_dtype,
                  recorded_backbone=checkpointer.backbone)
    checkpointer.training_dtype = str(setup.dtype).replace("torch.", "")
    checkpointer.backbone = setup.cfg.backbone
    cfg, dataset, backbone, prep = setup.cfg, setup.dataset, setup.backbone, setup.prep
    log(f"backbone: {cfg.backbone}, {backbone.num_features} features, weights: {backbone.weights_source}")
    log(f"input: {prep.image_size} px, {prep.interpolation}, mean {prep.mean}, std {prep.std}; "
        f"device {device}, {str(setup.dtype).replace('torch.', '')}")
    # Deadlines in rank 0's clock, which `distributed.clock` reads on every rank.
    deadline, search_end = distributed.agree((setup.deadline, setup.search_end))
    fitted = _fit(backbone, dataset, prep, cfg, device, setup.dtype, checkpointer, callbacks, deadline, search_end,
                  setup.epoch_cap, setup.full_size_probe)
    # Streamed images that failed to decode are found by the rank that read them.
    failed = distributed.gather_lists([item for s in fitted.stores.values() for item in s.failed])
    skipped = unreadable + [{"path": p, "reason": r} for p, r in dict.fromkeys(failed)]
    meta = {
        "backbone": {
            "name": cfg.backbone,
            "timm_name": backbone.entry.timm_name,
            "weights_source": backbone.weights_source,
            "num_features": backbone.num_features,
        },
        "head": {"kind": "linear", "in_features": backbone.num_features, "num_classes": len(dataset.classes)},
        "recipe": cfg.recipe,
        # The seed network's conv base and dense head replace the two entries above.
        **(seed_meta(backbone, len(dataset.classes)) if cfg.recipe == "article" else {}),
        "config": cfg.to_dict(),
        "data": dataset.summary(),
        "probe": fitted.probe_info,
        "history": fitted.history,
        # LP-FT's choice among the probe's head (epoch 0) and the epochs; the article recipe keeps its last epoch.
        **({"selection": selection_summary(fitted.history, fitted.full_size_probe)}
           if fitted.history and fitted.history[0]["epoch"] == 0 else {}),
        **({"full_size_probe": fitted.full_size_probe} if fitted.full_size_probe else {}),
        **({"backbone_choice": setup.backbone_choice} if setup.backbone_choice else {}),
        **({"test_time_size": fitted.eval_size} if fitted.eval_size else {}),
        "skipped_files": skipped,
        "hardware": {"device": str(device), "dtype": str(setup.dtype),
                     "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                     **distributed.describe()},
        "versions": library_versions(),
    }
    return TrainingRun(model=fitted.model, classes=dataset.classes, prep=fitted.prep, meta=meta,
                       predictions=fitted.predictions, stores=fitted.stores, dataset=dataset,
                       checkpointer=checkpointer, started=started)


def _load_data(cfg: TrainConfig) -> tuple[Dataset, list[dict[str, str]]]:
    """The dataset, after the pre-flight scan; and the files it dropped as unreadable."""
    dataset = load_dataset(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
    dataset = apply_decisions(dataset, exclude=cfg.exclude, relabel=cfg.relabel)  # imgclf review's (no-op without)
    # Decode every file once up front: unreadable ones are dropped (or too many stop the run) now,
    # not discovered in epoch 7.
    dataset, unreadable = preflight(dataset, max_bad_fraction=cfg.max_bad_fraction, workers=cfg.workers,
                                    use_cache=cfg.scan_cache)
    for warning in dataset.warnings:
        log(f"warning: {warning}")
    test_count = len(dataset.test) if dataset.test is not None else 0
    log(
        f"data: {dataset.source}, {len(dataset.classes)} classes; train {len(dataset.train)}, "
        f"val {len(dataset.val)}{' (held out from train)' if dataset.val_from_train else ''}, test {test_count}"
    )
    return dataset, unreadable


def _plan(cfg: TrainConfig, dataset: Dataset, device: torch.device, started: float, *,
          recorded_dtype: str | None = None, recorded_backbone: str | None = None) -> _Setup:
    """Build the backbone and decide size, precision, epochs and deadlines (the time budget's plan).
    `--backbone auto` under a budget may screen the offline backbones first (training/choose.py).

    `recorded_dtype` and `recorded_backbone` are the training dtype and backbone of the run being
    resumed, if any: they are kept.
    """
    dtype = compute_dtype(device, cfg.precision)
    deadline = started + 60 * cfg.max_minutes if cfg.max_minutes else None
    choosing = wants_choice(cfg) and recorded_backbone is None  # a resumed run keeps its backbone
    if cfg.backbone == AUTO_BACKBONE:
        cfg = dataclasses.replace(cfg, backbone=recorded_backbone or default_backbone(cfg.recipe))
    if cfg.recipe == "article":
        prep, backbone = seed_setup(cfg, median_short_side(dataset.train, seed=cfg.seed))
        cfg = dataclasses.replace(cfg, freeze_stages=cfg.freeze_stages or 0)  # the article freezes nothing
        if cfg.time_budget_minutes:  # no plan for seed: a hard deadline before the scoring (see _fit)
            deadline = min(deadline or float("inf"), started + 60 * cfg.time_budget_minutes)
        return _Setup(cfg, dataset, backbone, prep, dtype, deadline, deadline)
    backbone = create_backbone(cfg.backbone, weights=cfg.weights, random_init=cfg.random_init)
    given = cfg  # freeze_stages as given, for another backbone's own
    cfg = _frozen_stages(cfg, backbone, device)
    if recorded_dtype is not None:
        dtype = getattr(torch, recorded_dtype)
    elif cfg.recipe == "finetune":  # frozen passes keep `compute_dtype`'s choice; training steps are timed
        dtype = _training_dtype(backbone, len(dataset.classes), cfg, device)
    median_side = median_short_side(dataset.train, seed=cfg.seed)

    def upper_size(network: Backbone) -> int:  # the probe's input size: the largest the plan considers
        return choose_image_size(int(network.data_config["input_size"][-1]), median_side, "probe", device)

    upper = upper_size(backbone)
    if not cfg.time_budget_minutes:
        prep = _preprocessing(backbone, cfg, device, median_side)
        full_size = (upper if cfg.full_size_probe and cfg.image_size is None and cfg.recipe == "finetune"
                     and cfg.epochs != 0 and prep.image_size < upper else None)
        return _Setup(_augmentation(cfg, median_side, prep.image_size), dataset, backbone, prep, dtype, deadline,
                      deadline, full_size_probe=full_size)
    from imgclf.training.budget import MAX_EPOCHS, plan_run

    # The user's cap (--epochs) or MAX_EPOCHS, taken before the plan sets cfg.epochs: the re-plan on the
    # first steps' speed may add epochs up to it (capped at the plan's own count, 4 mosaic epochs that fit
    # were left unused: 226 s of a 300-s budget, 2026-12-01).
    epoch_cap = cfg.epochs if cfg.epochs is not None else MAX_EPOCHS
    # Every rank measures (the cores are shared as in the run); all follow rank 0's plan.
    planned = distributed.rank0_result(
        lambda: plan_run(cfg, backbone, dataset, device=device, dtype=dtype, started=started,
                         upper_size=upper, parallel=distributed.world_size()),
        everywhere=True,
    )
    choice = None
    if choosing and distributed.active():
        log(f"backbone: {cfg.backbone} (auto; not screened: under torchrun the default backbone trains)")
    elif choosing:
        choice = choose_backbone(cfg, backbone, planned, dataset, device=device, dtype=dtype, started=started,
                                 upper_size=upper_size,
                                 prepare=lambda c, b: _frozen_stages(dataclasses.replace(
                                     c, freeze_stages=given.freeze_stages), b, device, quiet=True))
        if choice is not None:
            backbone, planned = choice.backbone, choice.run
    cfg, budget_deadline, search_end = planned.cfg, planned.deadline, planned.search_end
    probe_images, full_size = planned.probe_images, planned.full_size_probe
    if choice is not None and choice.backbone.entry.name != given.backbone:
        cfg = _frozen_stages(dataclasses.replace(cfg, freeze_stages=given.freeze_stages), backbone, device)
    if probe_images is not None:  # the budget fits a probe on part of train only
        _, kept = stratified_split(dataset.train.labels, probe_images / len(dataset.train), cfg.seed)
        dataset = dataclasses.replace(dataset, train=dataset.train.subset(np.sort(kept)))
        log(f"time budget: the probe uses {len(dataset.train)} training images, a stratified subset")
    prep = _preprocessing(backbone, cfg, device, median_side)
    return _Setup(_augmentation(cfg, median_side, prep.image_size), dataset, backbone, prep, dtype,
                  min(deadline or float("inf"), budget_deadline), search_end, epoch_cap, full_size,
                  choice.summary if choice is not None else None)


def _augmentation(cfg: TrainConfig, median_side: int | None, image_size: int) -> TrainConfig:
    """`cfg` with `augment` decided: as given, or (auto) from how the images compare with the input.

    Images smaller than the training input (CIFAR-10's 32 px at 96, the digits' 8 px) get light
    crops (80-100% of the area): every view is already an upsampled one, and a crop of 35% of a
    32 px image holds 19 px of picture. Measured with the backbone's lr equal to the head's (2026-12-01,
    BENCHMARKS.md): 9,000 CIFAR images, 2 epochs, test 0.8785 against 0.8560 with standard crops;
    CIFAR-10 in 15 min, the default command, 0.9038 (fp32) and 0.9000 (bf16), 0.8828 before; the
    digits in 5 min 0.9861, where with standard crops no epoch beat the probe (0.9554). Larger images
    keep standard crops (35-100%), which zoom within detail the image has.
    """
    if cfg.augment != "auto" or cfg.recipe != "finetune":
        return cfg
    if median_side is not None and median_side < image_size:
        log(f"augmentation: light random-resized crops (80-100% of the area): the training images "
            f"(median side {median_side} px) are upsampled to {image_size} px (--augment standard crops 35-100%)")
        return dataclasses.replace(cfg, augment="light")
    return dataclasses.replace(cfg, augment="standard")


def _frozen_stages(cfg: TrainConfig, backbone: Backbone, device: torch.device, *, quiet: bool = False) -> TrainConfig:
    """`cfg` with `freeze_stages` decided: as given, or (auto) the high-resolution stages on a CPU.

    On a CPU the backward pass of the stages at output stride <= 4 is most of a fine-tuning step
    (lite0, 96 px: 124 img/s training everything, 200 with the stem and both stages frozen, fp32;
    in `imgclf train` 137-154 against 100-111 img/s), while the accuracy at equal epochs stays
    (CIFAR-10, 9,000 images, 2 epochs: 0.8505 against 0.8530, 2,000 test images; BENCHMARKS.md). A GPU
    has the compute to train them.
    """
    if cfg.freeze_stages is not None:
        return cfg
    stages = high_resolution_stages(backbone.model) if cfg.recipe == "finetune" and device.type == "cpu" else 0
    if stages and not quiet:
        log(f"fine-tuning keeps the stem and the first {stages} stage(s) of {cfg.backbone} frozen (output stride "
            f"<= {HIGH_RESOLUTION_STRIDE}: most of a training step's cost on a CPU; --freeze-stages 0 trains them)")
    return dataclasses.replace(cfg, freeze_stages=stages)


def _training_dtype(backbone: Backbone, num_classes: int, cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """`training_dtype` for the backbone with a new head; under torchrun every rank follows rank 0."""
    def trial() -> ImageClassifier:  # a copy: the timed steps must not touch the backbone's weights
        model = ImageClassifier(copy.deepcopy(backbone.model), nn.Linear(backbone.num_features, num_classes))
        model.set_backbone_trainable(True, freeze_bn=cfg.freeze_bn, frozen_stages=cfg.freeze_stages or 0)
        return model

    def measure() -> torch.dtype:
        return training_dtype(trial, device=device, precision=cfg.precision,
                              image_size=cfg.image_size or MIN_IMAGE_SIZE, batch_size=cfg.batch_size,
                              deterministic=cfg.deterministic)

    with torch.random.fork_rng(devices=[]):  # the trial head's initialisation draws nothing from the run's RNG
        dtype: torch.dtype = distributed.rank0_result(measure, everywhere=True)
    return dtype


def selection_summary(history: list[dict[str, Any]], full_size_probe: dict[str, Any] | None = None) -> dict[str, Any]:
    """Which candidate the bundle holds (the probe's head, epoch 0, a fine-tuned epoch, or the probe at
    full size) and every val score.

    Example:
        >>> selection_summary([{"epoch": 0, "val_accuracy": 0.9, "val_loss": 0.3, "selected": True},
        ...                    {"epoch": 1, "val_accuracy": 0.8, "val_loss": 0.5, "selected": False}])["chosen"]
        'probe'
    """
    chosen = next((r for r in history if r.get("selected")), history[-1])
    score = "mAP" if "val_map" in chosen else "accuracy"
    summary = {
        "chosen": "probe" if chosen["epoch"] == 0 else f"epoch {chosen['epoch']}",
        "epoch": chosen["epoch"],
        "rule": f"the highest val {score}, then the lowest val loss, over the probe's head (epoch 0) and every epoch",
        "candidates": [{"epoch": r["epoch"], "val_accuracy": r.get("val_accuracy"), "val_loss": r.get("val_loss")}
                       for r in history],
    }
    if full_size_probe is not None:
        size, scores = full_size_probe["image_size"], full_size_probe["selection"]
        summary["rule"] += (f"; then a linear probe at {size} px on the pretrained backbone, kept if its val {score} "
                            "is higher than the best of those (at the test-time sizes tried)")
        summary["candidates"].append({"epoch": None, "model": f"probe at {size} px", "val_accuracy":
                                      scores["val_accuracy"], "val_loss": scores["val_loss"]})
        if full_size_probe["selected"]:
            summary.update(chosen=f"probe at {size} px", epoch=None)
    return summary


def _preprocessing(backbone: Backbone, cfg: TrainConfig, device: torch.device, median_side: int | None
                   ) -> Preprocessing:
    """`--image-size` (or the plan's), else the default for the recipe and the training images'
    `median_side` (`median_short_side`)."""
    config = backbone.data_config
    size = cfg.image_size or choose_image_size(int(config["input_size"][-1]), median_side, cfg.recipe, device)
    return Preprocessing.from_data_config(config, size)


def _head_fit_subset(labels: np.ndarray, cfg: TrainConfig) -> np.ndarray | None:
    """Indices of the stratified subset of train that a fine-tuning run's probes are fitted on
    (`head_fit_images`), or None when train is no larger."""
    if len(labels) <= cfg.head_fit_images:
        return None
    _, kept = stratified_split(labels, cfg.head_fit_images / len(labels), cfg.seed)
    return kept


@dataclasses.dataclass
class _Fitted:
    """What `_fit` produces for the bundle and the report."""

    model: ImageClassifier
    probe_info: dict[str, Any]
    history: list[dict[str, Any]]
    stores: dict[str, ImageStore]  # val and test at `prep`'s size
    predictions: dict[str, StorePredictions]  # the final model's logits on val and test (metrics, report)
    prep: Preprocessing  # the test-time preprocessing (the size may exceed the training size)
    eval_size: dict[str, Any] | None = None  # the test-time size search, when it ran
    full_size_probe: dict[str, Any] | None = None  # the probe that competed with fine-tuning, when one did


def _fit(
    backbone: Backbone,
    dataset: Dataset,
    prep: Preprocessing,
    cfg: TrainConfig,
    device: torch.device,
    dtype: torch.dtype,
    checkpointer: Checkpointer,
    callbacks: list[Callback],
    deadline: float | None = None,
    search_end: float | None = None,
    epoch_cap: int | None = None,
    full_size_probe: int | None = None,
) -> _Fitted:
    """Fit the head on frozen features, then (finetune) train the whole network and choose the
    test-time input size on val; or (seed) train the article's network end to end. No epoch after
    the first starts that would end past `deadline`; the size search ends by `search_end`. With
    `full_size_probe` (a size), a probe there on the pretrained backbone competes for the bundle.
    """
    # Under torchrun every process on a machine decodes the training images: they share the budget.
    launched = distributed.launch()
    budget = distributed.agree(memory_budget(cfg.memory_fraction / (launched.local_world_size if launched else 1)))
    finetune = cfg.recipe in ("finetune", "article")
    # The probe reads every image once, so streaming costs nothing extra; fine-tuning re-reads
    # train and val every epoch, so those are kept decoded in memory when they fit.
    stores = {
        "train": _store(dataset.train, prep, cfg, budget if finetune else 0, "train"),
        "val": _store(dataset.val, prep, cfg, budget // 4 if finetune else 0, "val"),
    }
    if dataset.test is not None:
        stores["test"] = _store(dataset.test, prep, cfg, 0, "test")
    if cfg.recipe == "article":
        model = build_seed_model(backbone.model, backbone.num_features, len(dataset.classes))
        epochs = DEFAULT_SEED_EPOCHS if cfg.epochs is None else cfg.epochs
        if cfg.time_budget_minutes and deadline is not None:
            deadline -= _seed_closing_seconds(model, stores, cfg, device)
        seed_history = fit_article(model, stores["train"], stores["val"], cfg, epochs=epochs, device=device,
                                   dtype=dtype, deadline=deadline, callbacks=callbacks,
                                   clock=distributed.clock).history
        scored = _predict_splits(model, stores, cfg, device, len(dataset.classes))
        return _Fitted(model.cpu().eval(), {}, seed_history, stores, scored, prep)
    predictions: dict[str, StorePredictions] = {}
    if checkpointer.resume_from is not None:  # the head was fitted before the interruption
        model = ImageClassifier(backbone.model, nn.Linear(backbone.num_features, len(dataset.classes)))
        probe_info = checkpointer.restore_model(model)
    else:
        model, probe_info, predictions = _fit_head(backbone, dataset, prep, cfg, device, stores)
        checkpointer.save_head(model, probe_info)
    history: list[dict[str, Any]] = []
    eval_size: dict[str, Any] | None = None
    epochs = DEFAULT_FINETUNE_EPOCHS if cfg.epochs is None else cfg.epochs
    candidate = (_fit_full_size_probe(backbone, dataset, full_size_probe, prep, cfg, device)
                 if full_size_probe and finetune and epochs > 0 and checkpointer.resume_from is None else None)
    if finetune and epochs > 0:
        result = fit(model, stores["train"], stores["val"], cfg, epochs=epochs, device=device, dtype=dtype,
                     callbacks=callbacks, checkpointer=checkpointer, deadline=deadline, max_epochs=epoch_cap,
                     clock=distributed.clock, baseline=probe_info.get("selection"))
        history = result.history
        score = "val mAP" if dataset.multilabel else "val accuracy"  # what finetune.fit selects by
        if result.best_epoch == 0:
            log(f"kept the probe's head on the pretrained backbone: {score} {result.best_val_accuracy:.4f} "
                "(no fine-tuned epoch scored better on val)")
        else:
            log(f"best epoch {result.best_epoch}: {score} {result.best_val_accuracy:.4f}")
        # The size search is for networks trained on random-resized crops; the probe's backbone never was.
        if cfg.test_time_size_search and cfg.augment == "standard" and result.best_epoch > 0:
            chosen, eval_size = choose_eval_size(
                model, dataset.val, prep, train_size_accuracy=result.best_val_accuracy,
                batch_size=cfg.batch_size, device=device, precision=cfg.precision, memory_budget=budget // 4,
                workers=cfg.workers, deadline=search_end, score=score,
                after_images=len(dataset.val) + (len(dataset.test) if dataset.test is not None else 0),
            )
            if chosen != prep:
                prep = chosen
                _store_eval_splits(stores, dataset, prep, cfg, val_budget=budget // 4)
        if candidate is not None and _full_size_probe_wins(candidate, result.best_val_accuracy, eval_size, score):
            model, prep = candidate.model, candidate.prep
            _store_eval_splits(stores, dataset, prep, cfg, val_budget=0)
            for record in history:
                record["selected"] = False
    if not predictions:  # fine-tuned, or resumed without the probe's features
        predictions = _predict_splits(model, stores, cfg, device, len(dataset.classes))
    return _Fitted(model.cpu().eval(), probe_info, history, stores, predictions, prep, eval_size,
                   candidate.info if candidate is not None else None)


def _store_eval_splits(stores: dict[str, ImageStore], dataset: Dataset, prep: Preprocessing, cfg: TrainConfig,
                       *, val_budget: int) -> None:
    """Val and test (when there is one) in `stores` again, at `prep`: the bundle's input once it differs
    from training's (a test-time size, or the full-size probe). `val_budget`: bytes val may keep in memory."""
    stores["val"] = _store(dataset.val, prep, cfg, val_budget, "val")
    if dataset.test is not None:
        stores["test"] = _store(dataset.test, prep, cfg, 0, "test")


@dataclasses.dataclass
class _FullSizeProbe:
    """A linear probe at the probe's input size on a copy of the pretrained backbone, fitted before
    fine-tuning at a smaller size changes the backbone: a candidate for the bundle."""

    model: ImageClassifier
    prep: Preprocessing
    info: dict[str, Any]  # image_size, the probe's l2, scores and images, selection (val scores), selected


def _fit_full_size_probe(backbone: Backbone, dataset: Dataset, size: int, train_prep: Preprocessing,
                         cfg: TrainConfig, device: torch.device) -> _FullSizeProbe:
    """The probe at `size`: on the head-fit images (a stratified subset of train, as the probe that
    starts fine-tuning) and val, streamed; without label smoothing, as the probe recipe fits."""
    log(f"full-size probe: a linear probe at {size} px on the pretrained backbone competes for the bundle with "
        f"fine-tuning at {train_prep.image_size} px (--no-full-size-probe leaves it out)")
    prep = Preprocessing.from_data_config(backbone.data_config, size)
    subset = _head_fit_subset(dataset.train.labels, cfg)  # the same images as the probe fine-tuning starts from
    train = dataset.train if subset is None else dataset.train.subset(np.sort(subset))
    part = dataclasses.replace(dataset, train=train, test=None)
    stores: dict[str, ImageStore] = {"train": _store(part.train, prep, cfg, 0, "train"),
                                     "val": _store(part.val, prep, cfg, 0, "val")}
    pretrained = dataclasses.replace(backbone, model=copy.deepcopy(backbone.model))
    model, info, _ = _fit_head(pretrained, part, prep, dataclasses.replace(cfg, recipe="probe"), device, stores)
    return _FullSizeProbe(model, prep, {"image_size": size, **info, "selected": False})


def _full_size_probe_wins(candidate: _FullSizeProbe, best_val: float, eval_size: dict[str, Any] | None,
                          score: str) -> bool:
    """Whether the probe at full size scores above the fine-tuned network (or the probe's head that
    started it: `best_val`, and the test-time sizes tried) on val; recorded in `candidate.info`, logged."""
    fine_tuned = max([best_val, *(eval_size or {}).get("val_accuracy", {}).values()])
    mine = candidate.info["selection"]["val_accuracy"]
    candidate.info["selected"] = wins = mine > fine_tuned
    size = candidate.prep.image_size
    log(f"full-size probe: {score} {mine:.4f} at {size} px against {fine_tuned:.4f} for the fine-tuned network: "
        + (f"the bundle holds the probe at {size} px" if wins else "the fine-tuned network stays"))
    return wins


def _fit_head(
    backbone: Backbone,
    dataset: Dataset,
    prep: Preprocessing,
    cfg: TrainConfig,
    device: torch.device,
    stores: dict[str, ImageStore],
) -> tuple[ImageClassifier, dict[str, Any], dict[str, StorePredictions]]:
    """The linear probe: a logistic-regression head on frozen features (finetune: of a subset).

    Returns the model, probe details, and, when the backbone will not be fine-tuned, the head's
    logits on val and test, computed from the features already at hand (or in the feature cache),
    so neither the scores nor the report run the backbone over val and test again.
    """
    finetune = cfg.recipe == "finetune"

    def build_forward() -> FrozenForward:  # built on first use: a full cache hit never converts the network
        built = FrozenForward(backbone.model, image_size=prep.image_size, device=device, precision=cfg.precision,
                              keep_converted=cfg.feature_cache)
        log(f"frozen forward runs on {built.runtime}")
        return built

    forward = LazyForward(build_forward)
    cache = cache_for(backbone_name=backbone.entry.timm_name, module=backbone.model, prep=prep,
                      dtype=compute_dtype(device, cfg.precision)) if cfg.feature_cache else None

    def frozen_features(forward: LazyForward, store: Store, *, batch_size: int, desc: str) -> Any:
        return cached_features(forward, store, cache=cache, batch_size=batch_size, desc=desc, workers=cfg.workers,
                               shard=True)

    head_store: Store = stores["train"]
    subset = _head_fit_subset(head_store.labels.numpy(), cfg) if finetune else None
    if subset is not None:
        head_store = head_store.subset(subset)
    train_x, train_y, _ = frozen_features(forward, head_store, batch_size=cfg.batch_size, desc="features train")
    val_x, val_y, val_at = frozen_features(forward, stores["val"], batch_size=cfg.batch_size, desc="features val")
    multilabel = dataset.multilabel  # a sigmoid per label, chosen by val mAP (training.multilabel)
    weight = balanced_class_weights(train_y, len(dataset.classes)) if cfg.balance and not multilabel else None
    # Fine-tuning goes on minimising the label-smoothed loss: the head starts at that loss's optimum.
    smoothing = cfg.label_smoothing if finetune and not multilabel else 0.0
    probe, reused = cached_probe(
        (lambda: fit_multilabel_probe(train_x, train_y, val_x, val_y, cfg.probe_l2)) if multilabel else
        (lambda: fit_probe(train_x, train_y, val_x, val_y, len(dataset.classes), cfg.probe_l2, class_weight=weight,
                           label_smoothing=smoothing)),
        cache, inputs=[train_x, train_y, val_x, val_y, weight],
        settings={"classes": len(dataset.classes), "l2": sorted(cfg.probe_l2), "stop": PATH_STOP_DROP,
                  "std_floor": STD_FLOOR, **({"label_smoothing": smoothing} if smoothing else {}),
                  **({"task": "multi-label"} if multilabel else {})},
    )
    log(f"linear probe: val {'mAP' if multilabel else 'accuracy'} {probe.val_accuracy:.4f} (L2 {probe.l2:g}; "
        + ", ".join(f"{k:g}: {v:.3f}" for k, v in sorted(probe.scores.items())) + ")"
        + ("; the head fitted on these same features before, from the cache" if reused else ""))
    model = ImageClassifier(backbone.model, probe.head)
    with torch.no_grad():  # the probe's scores in the terms fine-tuning's epochs are chosen by (see finetune.fit)
        val_logits = probe.head(val_x) if len(val_y) else torch.zeros(0, len(dataset.classes))
        if multilabel:  # the "accuracy" that selection compares is val mAP for a multi-label head
            val_loss, val_accuracy = float(multilabel_loss(val_logits, val_y)), probe.val_accuracy
        else:
            val_loss = float(nn.functional.cross_entropy(val_logits, val_y)) if len(val_y) else 0.0
            val_accuracy = float((val_logits.argmax(1) == val_y).float().mean()) if len(val_y) else 0.0
    probe_info = {"l2": probe.l2, "val_accuracy": probe.val_accuracy,
                  "scores": {f"{k:g}": v for k, v in probe.scores.items()}, "images": len(train_y),
                  "label_smoothing": smoothing, "selection": {"val_loss": val_loss, "val_accuracy": val_accuracy,
                                **({"val_map": val_accuracy} if multilabel else {})}}
    predictions: dict[str, StorePredictions] = {}
    if not finetune or cfg.epochs == 0:
        # The backbone will not change: score the probe's head on features already computed.
        outputs = {"val": (val_x, val_y, val_at)}
        if "test" in stores:
            outputs["test"] = frozen_features(forward, stores["test"], batch_size=cfg.batch_size, desc="features test")
        with torch.no_grad():
            for split, (x, y, at) in outputs.items():
                logits = probe.head(x).numpy() if len(y) else np.zeros((0, len(dataset.classes)), np.float32)
                predictions[split] = StorePredictions(logits=logits, labels=y.numpy(), positions=at)
    return model, probe_info, predictions


def _seed_closing_seconds(
    model: ImageClassifier, stores: dict[str, ImageStore], cfg: TrainConfig, device: torch.device
) -> float:
    """Seconds the article recipe needs after training under a budget: the last epoch's val pass and
    the final val and test scores (which the report reuses), at a speed timed on 2 batches.

    Measured need: VGG19 at 32 px scores ~170 img/s here, so 15,000 val + 10,000 test images take
    minutes, more than a fixed 10% of a 15-minute budget (which overran by 40%).
    """
    from imgclf.training.budget import FIXED_SECONDS

    start = time.perf_counter()
    forward = FrozenForward(model, image_size=stores["val"].prep.image_size, device=device, precision=cfg.precision)
    convert = time.perf_counter() - start
    batches = stores["val"].batches(np.arange(min(len(stores["val"]), 3 * cfg.batch_size)), cfg.batch_size)
    timed, seconds = 0, 0.0
    for index, (indices, batch) in enumerate(batches):
        start = time.perf_counter()
        forward(normalize(batch, stores["val"].prep))
        if index:  # the first batch warms up
            timed, seconds = timed + len(indices), seconds + time.perf_counter() - start
    rate = timed / seconds if seconds > 0 else 1000.0
    images = 2 * len(stores["val"]) + len(stores.get("test", ()))
    closing = images / rate + 2 * convert + FIXED_SECONDS  # + building the 2 frozen forwards
    log(f"time budget: {closing:.0f} s kept for scoring ({images} image passes at {rate:.0f} img/s)")
    return closing


def _predict_splits(
    model: ImageClassifier, stores: dict[str, ImageStore], cfg: TrainConfig, device: torch.device, num_classes: int
) -> dict[str, StorePredictions]:
    """The trained `model`'s logits on val and, if present, test: one pass each, shared by the
    metrics and the report."""
    forward = FrozenForward(model, image_size=stores["val"].prep.image_size, device=device, precision=cfg.precision)
    predictions: dict[str, StorePredictions] = {}
    for split in ("val", "test"):
        if split in stores:
            logits, labels, positions = run_frozen(forward, stores[split], batch_size=cfg.batch_size,
                                                   desc=f"score {split}", shard=True)
            if not len(labels):
                logits = torch.zeros(0, num_classes)
            predictions[split] = StorePredictions(logits=logits.numpy(), labels=labels.numpy(), positions=positions)
    return predictions

