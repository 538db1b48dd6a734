"""Test-time input size: score the fine-tuned network on val a little above its training size.

Training on random-resized crops shows objects larger than a centre crop of the same size does,
so a network fine-tuned at S px usually scores best when tested somewhat above S (Touvron et al.,
"Fixing the train-test resolution discrepancy", NeurIPS 2019: ResNet-50 trained at 224 px is best
tested at 288). The size is chosen on validation only; the training size wins ties, and sizes the
network cannot take (a ViT with fixed position embeddings) are skipped.

Evidence (this 2-core machine, 2026-11-27): lite0 fine-tuned 2 epochs at 96 px on CIFAR-10 scores
val 0.8956 / 0.9000 / 0.9026 / 0.8984 / 0.8994 at 96 / 112 / 128 / 144 / 160 px; test goes from
0.8928 at 96 px to 0.9058 at 128 px (the size val picks). Cost: one val pass per candidate.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from imgclf.data.dataset import ImageSet
from imgclf.data.pipeline import ImageStore, Preprocessing
from imgclf.distributed import clock
from imgclf.models.classifier import ImageClassifier
from imgclf.progress import log

SIZE_FACTORS = (1.15, 1.3)  # candidates above the training size; FixRes's optimum is ~1.2-1.3x


def candidate_sizes(train_size: int) -> list[int]:
    """The training size and the larger sizes tried, rounded to multiples of 16 px.

    Example:
        >>> candidate_sizes(96)
        [96, 112, 128]
        >>> candidate_sizes(224)
        [224, 256, 288]
    """
    larger = {16 * round(train_size * f / 16) for f in SIZE_FACTORS}
    return sorted({train_size} | {s for s in larger if s > train_size})


def estimated_seconds(train_size: int, val_images: int, frozen_rate: float) -> float:
    """Seconds the search adds: a val pass per larger candidate, cost growing with pixels."""
    return sum(val_images * (s / train_size) ** 2 / frozen_rate for s in candidate_sizes(train_size)[1:])


def choose_eval_size(
    model: ImageClassifier,
    images: ImageSet,
    prep: Preprocessing,
    *,
    train_size_accuracy: float,
    batch_size: int,
    device: torch.device,
    precision: str,
    memory_budget: int,
    workers: int = 0,
    deadline: float | None = None,
    after_images: int = 0,
    score: str = "val accuracy",
) -> tuple[Preprocessing, dict[str, Any]]:
    """The preprocessing (input size) with the best val accuracy, and what was measured.

    `score` names the number in the log: "val mAP" for a multi-label head (`evaluate_store` then
    returns mAP where it returns accuracy for a single-label one).

    `train_size_accuracy` is val accuracy at `prep.image_size`, already known from training. A
    candidate starts only if its val pass and then scoring `after_images` more images at its size (val
    and test, once the size is chosen) would end by `deadline`: the seconds per image are the previous
    pass's, scaled by pixels. The first candidate has no measured pass; the plan reserved its time.
    Under torchrun every rank must call it: the val passes are sharded, and the time decisions use
    rank 0's clock (`distributed.clock`), so all ranks try the same sizes.
    """
    from imgclf.training.finetune import evaluate_store

    scores = {prep.image_size: float(train_size_accuracy)}
    best = prep
    previous: tuple[int, float] | None = None  # (size, seconds) of the last pass, for the estimate
    for size in candidate_sizes(prep.image_size)[1:]:
        if deadline is not None and previous is not None:
            per_image = previous[1] / max(len(images), 1) * (size / previous[0]) ** 2
            needed = per_image * (len(images) + after_images)
            if clock() + needed > deadline:
                rate = len(images) / max(previous[1], 1e-9)
                log(f"test-time size: {size} px skipped, it and scoring at it would end past the time limit "
                    f"(~{needed:.0f} s at {rate:.0f} val img/s at {previous[0]} px, {deadline - clock():.0f} s left)")
                break
        started = clock()
        candidate = dataclasses.replace(prep, image_size=size)
        store = ImageStore.decode(images, candidate, memory_budget=memory_budget, workers=workers,
                           description=f"decode val {size}px")
        try:
            _, accuracy, _, _ = evaluate_store(model, store, batch_size=batch_size, device=device, precision=precision,
                                               shard=True)
        except Exception as exc:  # noqa: BLE001 - e.g. fixed position embeddings; the training size still works
            log(f"test-time size: the network does not take {size} px ({type(exc).__name__}: {exc}); "
                f"keeping {best.image_size} px")
            break
        previous = (size, clock() - started)
        scores[size] = float(accuracy)
        if accuracy > scores[best.image_size]:
            best = candidate
    log(f"test-time size: {score} " + ", ".join(f"{s} px {a:.4f}" for s, a in scores.items())
        + f"; using {best.image_size} px")
    return best, {"train_size": prep.image_size, "chosen": best.image_size,
                  "val_accuracy": {str(s): a for s, a in scores.items()}}
