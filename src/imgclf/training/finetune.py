"""Fine-tuning: the visible loop. One function per step: schedule, one epoch, evaluate, fit.

The head arrives already fitted by a linear probe (LP-FT: a good head keeps the first gradient
steps from wrecking the pretrained features). Then the backbone is unfrozen with a lower learning
rate than the head (discriminative learning rates), AdamW with warmup and cosine decay, label
smoothing, batched augmentation and mixed precision where the hardware runs it natively.
Training stops early when validation accuracy stops improving, and the best epoch is kept.

What differs between recipes is a `FitStrategy`: `LPFT` (the default above) and the article's
recipe (`training/article.py`: SGD, a plateau scheduler, Keras-like augmentation, the last epoch
kept) run through the same `FitLoop`.

Everything the loop needs to continue is in `LoopState`; with a `checkpointer` (see
`training/checkpoint.py`) it is saved after every epoch and every few minutes within one, and a
resumed run continues at the exact batch, with the same augmentation draws, as one that never stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from imgclf import distributed
from imgclf.config import TrainConfig
from imgclf.data.pipeline import Augmentation, Preprocessing, Store, normalize
from imgclf.errors import ImgclfError
from imgclf.memory import training_heap
from imgclf.models.classifier import ImageClassifier
from imgclf.progress import log, progress
from imgclf.runtime import FrozenForward, autocast, run_frozen
from imgclf.training.balance import balanced_class_weights
from imgclf.training.gpu import configure_cuda, place_store, run_with_batch_fallback, training_forward
from imgclf.training.multilabel import MultilabelLoss, exact_matches, mean_average_precision, multilabel_loss


class Callback(Protocol):
    """Hooks into the loop. Every method is optional; return values are ignored."""

    def on_epoch_end(self, record: dict[str, Any], model: ImageClassifier) -> None: ...


@dataclass
class FitResult:
    """What `fit` did: one record per epoch (epoch 0: the starting model, the probe's head), and the one kept."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0  # 0: the starting model (the probe's head on the pretrained backbone) was kept
    best_val_accuracy: float = 0.0  # the selection score: val accuracy, or val mAP for a multi-label head
    stopped_early: bool = False
    best_val_loss: float = math.inf


def is_better(val_accuracy: float, val_loss: float, result: FitResult) -> bool:
    """Whether a model scoring (`val_accuracy`, `val_loss`) on val beats `result`'s best so far.

    Accuracy first, then the loss on ties: on a small val set (162 digits, one image 0.6 points)
    equal accuracies are common, and the mean cross-entropy separates them on every image.

    Example:
        >>> is_better(0.9, 0.3, FitResult(best_val_accuracy=0.9, best_val_loss=0.4))
        True
    """
    if val_accuracy != result.best_val_accuracy:
        return val_accuracy > result.best_val_accuracy
    return val_loss < result.best_val_loss


def best_finetuned_epoch(history: Sequence[dict[str, Any]]) -> int | None:
    """The fine-tuned epoch (>= 1) with the best val scores in `history` (`is_better`'s order; the
    earliest on a tie), or None before the first one.

    Example:
        >>> best_finetuned_epoch([{"epoch": 0, "val_accuracy": 0.9, "val_loss": 0.3},
        ...                       {"epoch": 1, "val_accuracy": 0.7, "val_loss": 0.8},
        ...                       {"epoch": 2, "val_accuracy": 0.8, "val_loss": 0.6},
        ...                       {"epoch": 3, "val_accuracy": 0.8, "val_loss": 0.7}])
        2
    """
    best: dict[str, Any] | None = None
    for record in history:
        if record["epoch"] >= 1 and (best is None or is_better(
                record["val_accuracy"], record["val_loss"],
                FitResult(best_val_accuracy=best["val_accuracy"], best_val_loss=best["val_loss"]))):
            best = record
    return None if best is None else int(best["epoch"])


def improves_on_val(history: Sequence[dict[str, Any]], epoch: int) -> bool:
    """Whether fine-tuned `epoch` improved on the fine-tuned epochs before it: the best of them on val
    (`best_finetuned_epoch`), or the one with the lowest val loss. Early stopping counts the epochs
    since the last that did.

    The loss counts too because on a small val set accuracy moves in steps of whole images and
    stalls while the model still improves: 2,000 CIFAR-10 images under a 15-min budget (20 planned
    epochs, 200 val images) scored val 0.780, 0.775, 0.775, 0.775 with val loss 0.773, 0.699, 0.632,
    0.671; stopped there on accuracy alone, the bundle kept epoch 1 (test 0.758, where 10 epochs
    of a 10-min budget reached 0.864). A falling loss says the schedule's tail is still to come.

    Example:
        >>> history = [{"epoch": 1, "val_accuracy": 0.78, "val_loss": 0.77},
        ...            {"epoch": 2, "val_accuracy": 0.775, "val_loss": 0.70},
        ...            {"epoch": 3, "val_accuracy": 0.775, "val_loss": 0.72}]
        >>> improves_on_val(history, 2), improves_on_val(history, 3)
        (True, False)
    """
    tuned = [r for r in history if 1 <= r["epoch"] <= epoch]
    lowest_loss = min(tuned, key=lambda r: r["val_loss"])  # the earliest on a tie
    return best_finetuned_epoch(tuned) == epoch or lowest_loss["epoch"] == epoch


@dataclass
class LoopState:
    """Where the loop stands; with the model, optimizer and scheduler, enough to continue exactly."""

    epoch: int = 1  # the epoch to run or continue (1-based)
    step: int = 0  # batches of `epoch` already trained on
    seen: int = 0  # images of `epoch` trained on so far
    correct: int = 0  # of those, predicted right
    loss_sum: float = 0.0  # summed per-image loss of `epoch` so far
    seconds: float = 0.0  # training time of `epoch` so far, s
    since_best: int = 0  # finished epochs since the last that improved on val (`improves_on_val`; early stopping)
    augment_generator: torch.Generator | None = None  # this epoch's augmentation RNG, mid-epoch
    best_state: dict[str, torch.Tensor] | None = None  # weights of the best epoch so far
    start_lr: float = 0.0  # the head's learning rate when `epoch` began (for its history record)


class Checkpointer(Protocol):
    """What `fit` needs from `training.checkpoint.Checkpointer`."""

    def restore_fit(self, model: ImageClassifier, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: LoopState, result: FitResult) -> None: ...

    def due(self) -> bool: ...

    def save_fit(self, model: ImageClassifier, optimizer: torch.optim.Optimizer, scheduler: Any,
                 state: LoopState, result: FitResult) -> None: ...


AugmentFunction = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class FitStrategy(Protocol):
    """What a recipe decides inside the one loop (`FitLoop`): how to step, and which epoch to keep.

    `keeps_best`: keep the best candidate on val and stop early after `cfg.patience` epochs without
    one (LP-FT), or keep the last epoch's weights and never stop early (Keras' `model.fit`, the article).
    """

    keeps_best: bool

    def optimizer(self, model: ImageClassifier, cfg: TrainConfig) -> torch.optim.Optimizer: ...

    def scheduler(self, optimizer: torch.optim.Optimizer, schedule: WarmupCosine) -> Any:
        """The per-step learning-rate scheduler (stepped after every batch, saved in checkpoints)."""
        ...

    def criterion(self, model: ImageClassifier, train_store: Store, cfg: TrainConfig,
                  device: torch.device) -> nn.Module: ...

    def augmentation(self, cfg: TrainConfig) -> AugmentFunction | None: ...

    def after_validation(self, record: dict[str, Any], optimizer: torch.optim.Optimizer) -> str:
        """Called with each epoch's record once it holds the val scores; returns text for its log line."""
        ...


class LPFT:
    """The default recipe's fine-tuning (LP-FT, after the probe fitted the head).

    AdamW with discriminative learning rates (`param_groups`), warm-up then cosine decay stepped per
    batch (`WarmupCosine`), label-smoothed cross-entropy (class-weighted with `--balance`), batched
    augmentation; the best candidate on val is kept (`is_better`).
    """

    keeps_best = True

    def optimizer(self, model: ImageClassifier, cfg: TrainConfig) -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups(model, cfg))

    def scheduler(self, optimizer: torch.optim.Optimizer, schedule: WarmupCosine) -> Any:
        # A lambda, not the object: LambdaLR would put the object's fields (a clock) in its state_dict.
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step))

    def criterion(self, model: ImageClassifier, train_store: Store, cfg: TrainConfig,
                  device: torch.device) -> nn.Module:
        if train_store.labels.ndim == 2:  # multi-label: binary cross-entropy per label (training.multilabel)
            return MultilabelLoss(reduction="sum" if distributed.active() else "mean")
        # --balance: weight each image by 1 / its class frequency, so small classes count as much.
        weight = balanced_class_weights(train_store.labels, model.num_classes).to(device) if cfg.balance else None
        # Under torchrun each rank sums its slice's losses (see train_one_epoch).
        reduction = "sum" if distributed.active() else "mean"
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing, reduction=reduction)

    def augmentation(self, cfg: TrainConfig) -> AugmentFunction | None:
        return Augmentation.named(cfg.augment, flip=cfg.flip)

    def after_validation(self, record: dict[str, Any], optimizer: torch.optim.Optimizer) -> str:
        return ""


class NonFiniteLossError(ImgclfError):
    """The loss became NaN or inf: training stops before the weights are updated with it."""


def epoch_order(count: int, cfg: TrainConfig, epoch: int) -> np.ndarray:
    """The order of the training images in `epoch`: a permutation drawn from (seed, epoch) alone."""
    order = np.random.default_rng(cfg.seed * 1000 + epoch).permutation(count)
    # Drop a last batch of a single image: BatchNorm in train mode cannot use it.
    if len(order) % cfg.batch_size == 1 and len(order) > 1:
        order = order[:-1]
    return order


def param_groups(model: ImageClassifier, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Head at `lr`, backbone at `lr * backbone_lr_ratio`; no weight decay on biases and norms."""
    groups = []
    for part, lr in ((model.head, cfg.lr), (model.backbone, cfg.lr * cfg.backbone_lr_ratio)):
        decay = [p for p in part.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in part.parameters() if p.requires_grad and p.ndim <= 1]
        groups.append({"params": decay, "lr": lr, "weight_decay": cfg.weight_decay})
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


@dataclass
class WarmupCosine:
    """lr multiplier: linear from 0 to 1 over `warmup_steps`, then cosine down to 0 at the end.

    With `time_window` (start, deadline as `clock()` values) the cosine follows whichever is
    further along, steps or time, so the rate has decayed by the deadline even on a slower machine.
    `total_steps` may change while training (a time budget re-planned on the measured speed).

    Example:
        >>> WarmupCosine(100, 10)(55)
        0.5
    """

    total_steps: int
    warmup_steps: int
    time_window: tuple[float, float] | None = None
    clock: Callable[[], float] = time.perf_counter

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress_ = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        if self.time_window is not None:
            start, end = self.time_window
            progress_ = max(progress_, (self.clock() - start) / max(end - start, 1e-9))
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))


MIN_WARMUP_STEPS = 10  # digits, 2 epochs at lr 3e-4: val 0.937 with 10 warm-up steps, 0.923 with 2 (5%)


def warmup_steps(total_steps: int, fraction: float) -> int:
    """Steps of linear warm-up: `fraction` of all steps, at least `MIN_WARMUP_STEPS` (at most a quarter of all).

    Example:
        >>> warmup_steps(46, 0.05), warmup_steps(7000, 0.05), warmup_steps(8, 0.05)
        (10, 350, 2)
    """
    return max(1, int(fraction * total_steps), min(MIN_WARMUP_STEPS, total_steps // 4))


REPLAN_FROM_STEP = 5  # budget runs: time steps REPLAN_FROM_STEP..REPLAN_AT_STEP of the first epoch (the
REPLAN_AT_STEP = 30  # first ones run slow), then re-plan the epochs on that speed (see `replanned_epochs`)


def replanned_epochs(
    *, seconds_per_step: float, steps_per_epoch: int, steps_done: int, val_images: int, batch_size: int,
    seconds_left: float, max_epochs: int,
) -> int:
    """Epochs that fit in `seconds_left` at the measured training speed, rounded to the nearest, >= 1.

    A time budget's plan rests on a few steps timed before any data is loaded; a shared or noisy
    machine makes it wrong either way (measured here: 49-56 img/s planned, 77 img/s trained). The
    first epoch's own steps are the better measure. Val is scored at ~4x the training speed (a
    frozen forward vs forward + backward: 523 vs 77 img/s measured, so this is conservative), plus 5 s.

    Example:
        >>> replanned_epochs(seconds_per_step=1.0, steps_per_epoch=100, steps_done=30, val_images=640,
        ...                  batch_size=64, seconds_left=370, max_epochs=20)
        4
    """
    val_seconds = val_images / batch_size * seconds_per_step / 4 + 5.0
    epoch_seconds = steps_per_epoch * seconds_per_step + val_seconds
    this_epoch = (steps_per_epoch - steps_done) * seconds_per_step + val_seconds
    fit = 1 + max(0.0, seconds_left - this_epoch) / epoch_seconds
    return min(max_epochs, whole_epochs(fit))


PARTIAL_EPOCH = 0.25  # plan one more epoch when at least this share of it fits: the deadline cuts it


def whole_epochs(fit: float) -> int:
    """The epochs to plan when `fit` epochs fit in the time left: one more for a fraction >= PARTIAL_EPOCH.

    The last epoch is then cut at the deadline, with the learning rate annealed by time (WarmupCosine's
    time window), instead of leaving the time unused: rounding to the nearest left 1.45 fitting epochs
    of CIFAR-10 at 1, and 23% of a 15-minute budget idle (2026-11-30).

    Example:
        >>> whole_epochs(1.45), whole_epochs(1.2), whole_epochs(0.6)
        (2, 1, 1)
    """
    whole = math.floor(fit)
    return max(1, whole + (1 if fit - whole >= PARTIAL_EPOCH else 0))


def evaluate_store(
    model: ImageClassifier, store: Store, *, batch_size: int, device: torch.device, precision: str,
    shard: bool = False,
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(mean cross-entropy, accuracy, probabilities, labels) of `model` on the images of `store`.

    Multi-label (a label matrix): (mean binary cross-entropy per image, **mAP**, sigmoid
    probabilities, labels); mAP takes accuracy's place as the score epochs are selected by.
    With `shard` under torchrun, each rank scores its block of the images and all get every number.
    """
    forward = FrozenForward(model, image_size=store.prep.image_size, device=device, precision=precision)
    all_logits, labels, _ = run_frozen(forward, store, batch_size=batch_size, desc="validate", shard=shard)
    if labels.ndim == 2:
        probabilities = torch.sigmoid(all_logits)
        return (float(multilabel_loss(all_logits, labels)), mean_average_precision(probabilities, labels),
                probabilities.numpy(), labels.numpy())
    loss = float(nn.functional.cross_entropy(all_logits, labels))
    acc = float((all_logits.argmax(1) == labels).float().mean())
    return loss, acc, torch.softmax(all_logits, 1).numpy(), labels.numpy()


def global_normaliser(criterion: nn.Module, labels: torch.Tensor) -> torch.Tensor | int:
    """What a mean-reducing `criterion` divides the summed loss of a batch with `labels` by: the
    image count, or with class weights (`--balance`) the summed weights of the labels."""
    weight = getattr(criterion, "weight", None)
    return weight.cpu()[labels].sum().to(weight.device) if weight is not None else len(labels)


def _forward_loss(
    net: Callable[[torch.Tensor], torch.Tensor], criterion: nn.Module, images: torch.Tensor, labels: torch.Tensor,
    prep: Preprocessing, device: torch.device, dtype: torch.dtype,
) -> tuple[torch.Tensor, float, int]:
    """(loss to backpropagate, the batch's mean loss, images right) for one batch; under torchrun the
    batch was augmented whole (the draws are one process's) and this rank trains on its slice."""
    x, y = images, labels
    sharded = distributed.active()
    if sharded:
        keep = distributed.batch_slice(len(labels))
        x, y = images[keep], labels[keep]
    x = normalize(x, prep).to(device, non_blocking=True)
    y = y.to(device, non_blocking=True)
    with autocast(device, dtype):
        logits = net(x)
        loss = criterion(logits.float(), y)
    if sharded:  # this rank's share of the global batch's mean loss: the ranks' shares add up to it
        loss = loss / global_normaliser(criterion, labels)
        loss_value, correct = distributed.all_sum([loss, _right(logits, y)])
        return loss, float(loss_value), int(correct)
    return loss, loss.item(), int(_right(logits, y))


def _right(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Images predicted right: the top class, or (multi-label) the whole label set at 0.5."""
    return exact_matches(logits, labels) if labels.ndim == 2 else (logits.argmax(1) == labels).sum()


def _non_finite(loss_value: float, epoch: int, step: int, indices: np.ndarray, store: Store) -> NonFiniteLossError:
    paths = [store.images.paths[int(i)] for i in indices[:4]]
    return NonFiniteLossError(
        f"the loss became {loss_value} at epoch {epoch}, step {step} (batch of {len(indices)} images: "
        f"positions {indices[:8].tolist()}{', e.g. ' + ', '.join(paths) if paths else ''}); "
        "training stopped before these weights were updated or saved",
        expected="a finite loss",
        fix="lower --lr (e.g. by 10x) or check the input images; the last good checkpoint is kept",
    )


def train_one_epoch(
    model: ImageClassifier,
    store: Store,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    criterion: nn.Module,
    *,
    augment: AugmentFunction | None,
    epoch: int,
    cfg: TrainConfig,
    device: torch.device,
    dtype: torch.dtype,
    state: LoopState | None = None,
    on_step: Callable[[], None] | None = None,
    stop_at: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
    net: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train on one epoch's batches, from `state.step` on; `on_step` runs after every batch.

    With `stop_at` (a `clock()` value) the epoch ends early once that passes. `net` computes the
    logits: `model`, a `torch.compile`d `model` sharing its parameters, or under torchrun a
    DistributedDataParallel wrapping it (maybe compiled), in which case each rank trains on its
    slice of every global batch (see imgclf.distributed; `criterion` must then sum,
    `reduction="sum"`, and the loss is divided by the global batch's normaliser).
    """
    model.set_backbone_trainable(True, freeze_bn=cfg.freeze_bn, frozen_stages=cfg.freeze_stages or 0)
    net = net if net is not None else model
    state = state if state is not None else LoopState(epoch=epoch)
    if state.step == 0 or state.augment_generator is None:
        state.augment_generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    generator = state.augment_generator
    order = epoch_order(len(store), cfg, epoch)
    start = clock() - state.seconds
    stopped = False
    bar = progress(total=len(order), desc=f"epoch {epoch}", initial=min(state.step * cfg.batch_size, len(order)))
    batches = store.batches(order[state.step * cfg.batch_size :], cfg.batch_size)
    for step, (indices, batch) in enumerate(batches, start=state.step):
        if stop_at is not None and clock() >= stop_at:
            stopped = True
            break
        images = augment(batch, generator) if augment is not None else batch
        labels = store.labels[torch.from_numpy(indices)]
        loss, loss_value, correct = _forward_loss(net, criterion, images, labels, store.prep, device, dtype)
        if not math.isfinite(loss_value):
            bar.close()
            raise _non_finite(loss_value, epoch, step, indices, store)
        optimizer.zero_grad(set_to_none=True)
        # DistributedDataParallel averages the ranks' gradients: times world, they sum to the global batch's.
        (loss * distributed.world_size() if distributed.active() else loss).backward()
        optimizer.step()
        scheduler.step()
        state.step = step + 1
        state.seen += len(indices)
        state.correct += int(correct)
        state.loss_sum += loss_value * len(indices)
        state.seconds = clock() - start
        bar.update(len(indices))
        bar.set_postfix(loss=f"{state.loss_sum / state.seen:.3f}", acc=f"{state.correct / state.seen:.3f}",
                        refresh=False)
        if on_step is not None:
            on_step()
    bar.close()
    seconds = clock() - start
    return {
        "stopped_mid_epoch": stopped,
        "images": state.seen,
        "train_loss": state.loss_sum / max(state.seen, 1),
        "train_accuracy": state.correct / max(state.seen, 1),
        "train_seconds": seconds,
        "train_images_per_s": state.seen / max(seconds, 1e-9),
    }


def fit(
    model: ImageClassifier,
    train_store: Store,
    val_store: Store,
    cfg: TrainConfig,
    *,
    epochs: int,
    device: torch.device,
    dtype: torch.dtype,
    callbacks: Sequence[Callback] = (),
    checkpointer: Checkpointer | None = None,
    deadline: float | None = None,
    max_epochs: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
    baseline: dict[str, float] | None = None,
    strategy: FitStrategy | None = None,
) -> FitResult:
    """Fine-tune `model` in place for up to `epochs`, then load the best epoch's weights.

    `strategy` is the recipe's part (default `LPFT()`; the article's is `article.ArticleStrategy`).

    `baseline` holds the starting model's val scores (`val_accuracy`, `val_loss`; the probe's head
    on the frozen backbone, scored on the same val images): it is candidate epoch 0, so the model
    returned is never worse on val than the one fine-tuning started from (`is_better` decides).

    With a `checkpointer`, the run continues from its last checkpoint (if any) and saves a new
    one after every epoch and whenever `checkpointer.due()` says so within an epoch.
    Under torchrun the model trains in DistributedDataParallel, every rank on its slice of each
    batch, and validation is sharded; pass `clock=distributed.clock` so all ranks stop together.
    With `deadline` (a `clock()` value), no epoch is started that would end after it. Under a time
    budget (`cfg.time_budget_minutes`) the deadline is hard instead: an epoch stops mid-way when
    it passes, the partial epoch is scored on val like any other and the best weights so far are
    kept, and the lr schedule decays by time as well as by steps (see training/budget.py); with
    `max_epochs`, the epochs are re-planned early in the first epoch on the measured speed, up to it.
    A run resumed after that point keeps the plan it was resumed with.
    """
    loop = FitLoop(model, train_store, val_store, cfg, epochs=epochs, device=device, dtype=dtype,
                   callbacks=callbacks, checkpointer=checkpointer, deadline=deadline, max_epochs=max_epochs,
                   clock=clock, baseline=baseline, strategy=strategy or LPFT())
    return loop.run()


class FitLoop:
    """One fine-tuning run, read top to bottom in `run`: epochs -> steps -> evaluate -> select.

    The state that a step, an epoch and a checkpoint share lives on the object (no closures): the
    optimizer and schedule, `state` (where the loop stands, enough to resume at the exact batch)
    and `result` (the history and the best candidate). `fit` is the function to call.
    """

    def __init__(
        self, model: ImageClassifier, train_store: Store, val_store: Store, cfg: TrainConfig, *, epochs: int,
        device: torch.device, dtype: torch.dtype, callbacks: Sequence[Callback], checkpointer: Checkpointer | None,
        deadline: float | None, max_epochs: int | None, clock: Callable[[], float],
        baseline: dict[str, float] | None, strategy: FitStrategy,
    ) -> None:
        self.model, self.cfg, self.epochs, self.device, self.dtype = model, cfg, epochs, device, dtype
        self.strategy = strategy
        self.callbacks, self.checkpointer, self.clock = callbacks, checkpointer, clock
        self.deadline, self.max_epochs, self.baseline = deadline, max_epochs, baseline
        self.hard_deadline = deadline is not None and cfg.time_budget_minutes is not None
        self.result, self.state = FitResult(), LoopState()
        if epochs == 0:
            return
        # One memory layout for the weights whatever ran before (inputs are channels_last too), so a
        # resumed run uses the same kernels, and so the same float rounding, as an uninterrupted one.
        model.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
        model.set_backbone_trainable(True, freeze_bn=cfg.freeze_bn, frozen_stages=cfg.freeze_stages or 0)
        configure_cuda(device, deterministic=cfg.deterministic)
        # On CUDA the uint8 images move to the GPU once when they fit (else per batch, pinned); no-op on a CPU.
        self.train_store = place_store(train_store, device, name="train")
        self.val_store = place_store(val_store, device, name="val")
        self.optimizer = strategy.optimizer(model, cfg)
        self.steps_per_epoch = math.ceil(len(self.train_store) / cfg.batch_size)
        window = (clock(), deadline) if self.hard_deadline and deadline is not None else None
        self.schedule = WarmupCosine(0, 1, time_window=window, clock=clock)
        self.set_epochs(epochs)
        self.scheduler = strategy.scheduler(self.optimizer, self.schedule)
        self.replan = BudgetReplan() if self.hard_deadline and max_epochs is not None else None
        self.criterion = strategy.criterion(model, self.train_store, cfg, device)
        self.augment = strategy.augmentation(cfg)
        if checkpointer is not None:
            checkpointer.restore_fit(model, self.optimizer, self.scheduler, self.state, self.result)
        # Frozen BatchNorm statistics are the same on every rank: no need to broadcast them each step.
        self.net = training_forward(distributed.wrap(model, device, broadcast_buffers=not cfg.freeze_bn),
                                    compile_model=cfg.compile)

    def run(self) -> FitResult:
        """Train, score every epoch on val, keep the best candidate; returns the history and the choice."""
        if self.epochs == 0:
            return self.result
        self.start_from_baseline()
        while self.state.epoch <= self.epochs and not self.result.stopped_early:
            if self.state.step == 0:
                self.state.start_lr = self.optimizer.param_groups[0]["lr"]
            record: dict[str, Any] = {"epoch": self.state.epoch, "lr": self.state.start_lr}
            trained, _ = run_with_batch_fallback(self.train_epoch, self.cfg.batch_size)
            record.update(trained, batch_size=self.cfg.batch_size)
            self.evaluate(record)
            self.select(record)
            self.end_epoch(record)
        if self.strategy.keeps_best and self.state.best_state is not None:
            self.model.load_state_dict(self.state.best_state)
        for record in self.result.history:
            record["selected"] = record["epoch"] == self.result.best_epoch
        self.model.eval()
        return self.result

    def start_from_baseline(self) -> None:
        """A new run: the starting model (the probe's head) is candidate epoch 0, the one to beat."""
        if self.state.best_state is not None or self.baseline is None:
            return
        self.result.history.append({"epoch": 0, "model": "probe head, frozen backbone",
                                    "val_loss": self.baseline["val_loss"],
                                    "val_accuracy": self.baseline["val_accuracy"],
                                    **({"val_map": self.baseline["val_map"]} if "val_map" in self.baseline else {})})
        self.result.best_epoch, self.result.best_val_accuracy = 0, self.baseline["val_accuracy"]
        self.result.best_val_loss = self.baseline["val_loss"]
        self.state.best_state = copy.deepcopy(self.model.state_dict())

    def set_epochs(self, count: int) -> None:
        """Plan `count` epochs: the schedule's length and warm-up follow."""
        self.epochs = count
        self.schedule.total_steps = self.steps_per_epoch * count
        self.schedule.warmup_steps = warmup_steps(self.schedule.total_steps, self.cfg.warmup_fraction)

    def train_epoch(self, batch_size: int) -> dict[str, Any]:
        """Train `state.epoch` at `batch_size`; called again at half the size after running out of GPU memory."""
        if batch_size != self.cfg.batch_size:  # after an out-of-memory error: the epoch starts again at the new size
            self.cfg = dataclasses.replace(self.cfg, batch_size=batch_size)
            self.steps_per_epoch = math.ceil(len(self.train_store) / batch_size)
            self.set_epochs(self.epochs)  # the same epochs, in more steps
            # step() moves it to this epoch's start
            self.scheduler.last_epoch = (self.state.epoch - 1) * self.steps_per_epoch - 1
            self.scheduler.step()
            self.state.start_lr = self.optimizer.param_groups[0]["lr"]
            self.state.step, self.state.seen, self.state.correct = 0, 0, 0
            self.state.loss_sum, self.state.seconds, self.state.augment_generator = 0.0, 0.0, None
        with training_heap():  # training steps reuse their buffers (see memory.TRAINING_MMAP_THRESHOLD)
            return train_one_epoch(
                self.model, self.train_store, self.optimizer, self.scheduler, self.criterion,
                augment=self.augment, epoch=self.state.epoch, cfg=self.cfg, device=self.device, dtype=self.dtype,
                state=self.state, on_step=self.on_step, stop_at=self.deadline if self.hard_deadline else None,
                clock=self.clock, net=self.net,
            )

    def on_step(self) -> None:
        """After every batch: the budget's re-plan early in epoch 1, and a checkpoint when one is due."""
        if self.replan is not None:
            self.replan.after_step(self)
        if self.checkpointer is not None and self.checkpointer.due():
            self.checkpointer.save_fit(self.model, self.optimizer, self.scheduler, self.state, self.result)

    def evaluate(self, record: dict[str, Any]) -> None:
        """Score the epoch's network on val (sharded under torchrun), let the strategy see it, log the line."""
        started = self.clock()
        val_loss, val_acc, _, _ = evaluate_store(self.model, self.val_store, batch_size=self.cfg.batch_size,
                                                 device=self.device, precision=self.cfg.precision, shard=True)
        # What another epoch costs: its training (with any time before a resume) and this scoring.
        record.update(val_loss=val_loss, val_accuracy=val_acc,
                      epoch_seconds=record["train_seconds"] + self.clock() - started)
        multilabel = self.val_store.labels.ndim == 2  # val_accuracy holds val mAP, the selection score
        if multilabel:
            record["val_map"] = val_acc
        note = self.strategy.after_validation(record, self.optimizer)
        self.result.history.append(record)
        log(
            f"epoch {record['epoch']}/{self.epochs}: train loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.4f} | val loss {val_loss:.4f} {'mAP' if multilabel else 'acc'} "
            f"{val_acc:.4f}{note} | "
            f"{record['train_images_per_s']:.1f} img/s, {record['epoch_seconds']:.0f} s"
        )

    def select(self, record: dict[str, Any]) -> None:
        """Keep the epoch's weights if they beat the best candidate so far; stop after `patience`
        epochs in a row that did not improve on the fine-tuned epochs' val accuracy or val loss
        (`improves_on_val`).

        The probe's head (epoch 0) is a candidate for the bundle but not the mark that early stopping
        counts from: at peak learning rate the first epochs often score below it and then climb
        (digits, 20 planned epochs: probe 0.930, epochs 0.769, 0.846, 0.902), and stopping them there
        cuts off what the cosine's tail would bring. Nothing is lost by going on: the probe still wins
        at the end if no epoch beats it.
        A strategy that keeps the last epoch (the article's) takes every epoch and never stops early.
        """
        state, result = self.state, self.result
        if not self.strategy.keeps_best:
            result.best_epoch, result.best_val_accuracy = record["epoch"], record["val_accuracy"]
            result.best_val_loss = record["val_loss"]
            return
        if state.best_state is None or is_better(record["val_accuracy"], record["val_loss"], result):
            result.best_epoch, result.best_val_accuracy = record["epoch"], record["val_accuracy"]
            result.best_val_loss = record["val_loss"]
            state.best_state = copy.deepcopy(self.model.state_dict())
        state.since_best = 0 if improves_on_val(result.history, record["epoch"]) else state.since_best + 1
        if state.since_best >= self.cfg.patience:
            log(f"stopping early: neither val {'mAP' if 'val_map' in record else 'accuracy'} nor val loss improved "
                f"for {self.cfg.patience} epoch(s)")
            result.stopped_early = True

    def end_epoch(self, record: dict[str, Any]) -> None:
        """Move to the next epoch, checkpoint, stop at the deadline, tell the callbacks."""
        state, result, epoch = self.state, self.result, record["epoch"]
        state.epoch, state.step, state.seen, state.correct = epoch + 1, 0, 0, 0
        state.loss_sum, state.seconds, state.augment_generator = 0.0, 0.0, None
        if self.checkpointer is not None:
            self.checkpointer.save_fit(self.model, self.optimizer, self.scheduler, state, result)
        if not result.stopped_early and self.deadline is not None:
            if record["stopped_mid_epoch"] or (self.hard_deadline and self.clock() >= self.deadline):
                log(f"stopping in epoch {epoch} after {record['images']} images: the time budget's deadline passed")
                result.stopped_early = True
            elif (not self.hard_deadline and epoch < self.epochs
                  and self.clock() + record["epoch_seconds"] > self.deadline):
                log(f"stopping after epoch {epoch}: another epoch would pass the time limit")
                result.stopped_early = True
        for callback in self.callbacks:
            hook = getattr(callback, "on_epoch_end", None)
            if hook is not None:
                hook(record, self.model)


@dataclass
class BudgetReplan:
    """Budget runs: time steps REPLAN_FROM_STEP..REPLAN_AT_STEP of the first epoch, then re-plan the
    epochs on that speed (`replanned_epochs`), up to the loop's `max_epochs`."""

    started: float | None = None  # clock() at step REPLAN_FROM_STEP

    def after_step(self, loop: FitLoop) -> None:
        state = loop.state
        if state.epoch != 1 or loop.deadline is None or loop.max_epochs is None:
            return
        if state.step == REPLAN_FROM_STEP:
            self.started = loop.clock()
        elif state.step == REPLAN_AT_STEP and self.started is not None:
            seconds_per_step = (loop.clock() - self.started) / (REPLAN_AT_STEP - REPLAN_FROM_STEP)
            count = replanned_epochs(
                seconds_per_step=seconds_per_step, steps_per_epoch=loop.steps_per_epoch, steps_done=state.step,
                val_images=len(loop.val_store), batch_size=loop.cfg.batch_size,
                seconds_left=loop.deadline - loop.clock(), max_epochs=loop.max_epochs,
            )
            if count != loop.epochs:
                log(f"re-planned on the first {REPLAN_AT_STEP} steps ({loop.cfg.batch_size / seconds_per_step:.0f} "
                    f"img/s): {count} epoch(s) instead of {loop.epochs}")
                loop.set_epochs(count)
