"""Fine-tuning: the visible loop. One function per step: schedule, one epoch, evaluate, fit.

The head arrives already fitted by a linear probe (LP-FT: a good head keeps the first gradient
steps from wrecking the pretrained features). Then the backbone is unfrozen with a lower learning
rate than the head (discriminative learning rates), AdamW with warmup and cosine decay, label
smoothing, batched augmentation and mixed precision where the hardware runs it natively.
Training stops early when validation accuracy stops improving, and the best epoch is kept.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from imgclf.config import TrainConfig
from imgclf.data.pipeline import Augmentation, ImageStore, normalize
from imgclf.errors import ImgclfError
from imgclf.model import ImageClassifier
from imgclf.progress import log, progress
from imgclf.runtime import FrozenForward, autocast
from imgclf.training.balance import balanced_class_weights
from imgclf.training.probe import run_frozen


class Callback(Protocol):
    """Hooks into the loop. Every method is optional; return values are ignored."""

    def on_epoch_end(self, record: dict[str, Any], model: ImageClassifier) -> None: ...


@dataclass
class FitResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    stopped_early: bool = False


def param_groups(model: ImageClassifier, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Head at `lr`, backbone at `lr * backbone_lr_ratio`; no weight decay on biases and norms."""
    groups = []
    for part, lr in ((model.head, cfg.lr), (model.backbone, cfg.lr * cfg.backbone_lr_ratio)):
        decay = [p for p in part.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in part.parameters() if p.requires_grad and p.ndim <= 1]
        groups.append({"params": decay, "lr": lr, "weight_decay": cfg.weight_decay})
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def warmup_cosine(
    total_steps: int,
    warmup_steps: int,
    *,
    time_window: tuple[float, float] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Any:
    """lr multiplier: linear from 0 to 1 over `warmup_steps`, then cosine down to 0 at the end.

    With `time_window` (start, deadline as `clock()` values) the cosine follows whichever is
    further along, steps or time, so the rate has decayed by the deadline even on a slower machine.

    Example:
        >>> warmup_cosine(100, 10)(55)
        0.5
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if time_window is not None:
            start, end = time_window
            progress_ = max(progress_, (clock() - start) / max(end - start, 1e-9))
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))

    return factor


def evaluate_store(
    model: ImageClassifier, store: ImageStore, *, batch_size: int, device: torch.device, precision: str
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(mean cross-entropy, accuracy, probabilities, labels) of `model` on the images of `store`."""
    forward = FrozenForward(model, image_size=store.prep.image_size, device=device, precision=precision)
    all_logits, labels = run_frozen(forward, store, batch_size=batch_size, desc="validate")
    loss = float(nn.functional.cross_entropy(all_logits, labels))
    acc = float((all_logits.argmax(1) == labels).float().mean())
    return loss, acc, torch.softmax(all_logits, 1).numpy(), labels.numpy()


def train_one_epoch(
    model: ImageClassifier,
    store: ImageStore,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    criterion: nn.Module,
    *,
    augment: Augmentation | None,
    epoch: int,
    cfg: TrainConfig,
    device: torch.device,
    dtype: torch.dtype,
    stop_at: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """One pass over `store`; with `stop_at` (a `clock()` value) it ends early once that passes."""
    model.set_backbone_trainable(True, freeze_bn=cfg.freeze_bn)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    order = np.random.default_rng(cfg.seed * 1000 + epoch).permutation(len(store))
    # Drop a last batch of a single image: BatchNorm in train mode cannot use it.
    if len(order) % cfg.batch_size == 1 and len(order) > 1:
        order = order[:-1]
    seen, correct, loss_sum = 0, 0, 0.0
    start = clock()
    stopped = False
    bar = progress(total=len(order), desc=f"epoch {epoch}")
    for step, (indices, batch) in enumerate(store.batches(order, cfg.batch_size)):
        if stop_at is not None and clock() >= stop_at:
            stopped = True
            break
        images = augment(batch, generator) if augment is not None else batch
        x = normalize(images, store.prep).to(device, non_blocking=True)
        y = store.labels[torch.from_numpy(indices)].to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(x)
            loss = criterion(logits.float(), y)
        if not torch.isfinite(loss):
            raise ImgclfError(
                f"the loss became {loss.item()} at epoch {epoch}, step {step}",
                expected="a finite loss",
                fix="lower --lr (e.g. by 10x) or check the input images",
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        seen += len(indices)
        correct += int((logits.argmax(1) == y).sum())
        loss_sum += loss.item() * len(indices)
        bar.update(len(indices))
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
    bar.close()
    seconds = clock() - start
    return {
        "stopped_mid_epoch": stopped,
        "images": seen,
        "train_loss": loss_sum / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "train_seconds": seconds,
        "train_images_per_s": seen / max(seconds, 1e-9),
    }


def fit(
    model: ImageClassifier,
    train_store: ImageStore,
    val_store: ImageStore,
    cfg: TrainConfig,
    *,
    epochs: int,
    device: torch.device,
    dtype: torch.dtype,
    callbacks: Sequence[Callback] = (),
    deadline: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> FitResult:
    """Fine-tune `model` in place for up to `epochs`, then load the best epoch's weights.

    With `deadline` (a `clock()` value), no epoch is started that would end after it. Under a time
    budget (`cfg.time_budget_minutes`) the deadline is hard instead: an epoch stops mid-way when
    it passes, the partial epoch is scored on val like any other and the best weights so far are
    kept, and the lr schedule decays by time as well as by steps (see training/budget.py).
    """
    result = FitResult()
    if epochs == 0:
        return result
    model.to(device)
    model.set_backbone_trainable(True, freeze_bn=cfg.freeze_bn)
    optimizer = torch.optim.AdamW(param_groups(model, cfg))
    steps_per_epoch = math.ceil(len(train_store) / cfg.batch_size)
    total = steps_per_epoch * epochs
    hard_deadline = deadline is not None and cfg.time_budget_minutes is not None
    window = (clock(), deadline) if hard_deadline and deadline is not None else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, max(1, int(cfg.warmup_fraction * total)), time_window=window, clock=clock)
    )
    # --balance: weight each image by 1 / its class frequency, so small classes count as much.
    weight = balanced_class_weights(train_store.labels, model.head.out_features).to(device) if cfg.balance else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    augment = Augmentation.named(cfg.augment, flip=cfg.flip)
    best_state: dict[str, torch.Tensor] | None = None
    since_best = 0
    for epoch in range(1, epochs + 1):
        record: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        record.update(
            train_one_epoch(
                model, train_store, optimizer, scheduler, criterion,
                augment=augment, epoch=epoch, cfg=cfg, device=device, dtype=dtype,
                stop_at=deadline if hard_deadline else None, clock=clock,
            )
        )
        val_loss, val_acc, _, _ = evaluate_store(
            model, val_store, batch_size=cfg.batch_size, device=device, precision=cfg.precision
        )
        record.update(val_loss=val_loss, val_accuracy=val_acc)
        result.history.append(record)
        log(
            f"epoch {epoch}/{epochs}: train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}"
            f" | val loss {val_loss:.4f} acc {val_acc:.4f} | {record['train_images_per_s']:.1f} img/s,"
            f" {record['train_seconds']:.0f} s"
        )
        for callback in callbacks:
            hook = getattr(callback, "on_epoch_end", None)
            if hook is not None:
                hook(record, model)
        if best_state is None or val_acc > result.best_val_accuracy:
            result.best_epoch, result.best_val_accuracy = epoch, val_acc
            best_state = copy.deepcopy(model.state_dict())
            since_best = 0
        else:
            since_best += 1
            if since_best >= cfg.patience:
                log(f"stopping early: no better val accuracy for {cfg.patience} epoch(s)")
                result.stopped_early = True
                break
        if record["stopped_mid_epoch"] or (hard_deadline and deadline is not None and clock() >= deadline):
            log(f"stopping in epoch {epoch} after {record['images']} images: the time budget's deadline passed")
            result.stopped_early = True
            break
        if (not hard_deadline and deadline is not None and epoch < epochs
                and clock() + record["train_seconds"] > deadline):
            log(f"stopping after epoch {epoch}: another epoch would pass the time limit")
            result.stopped_early = True
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result
