"""Training steps per second with the backbone's early stages frozen (`--freeze-stages`).

A training step of a CNN on a CPU spends most of its time in the backward pass of its
high-resolution stages. This script times bare fine-tuning steps (forward, backward, AdamW; frozen
BatchNorm, channels_last, label smoothing, as `imgclf train` steps) of a backbone with the stem and
the first N stages frozen (timm's coarse grouping, as `models.classifier.early_stage_parameters`),
for N in `--stages`, in fp32 and bf16 autocast. No data: one random batch, reused (so the figures are
an upper bound of `imgclf train`'s, which also augments and gathers every batch).

Prints a table. Not a test: about 2 minutes for lite0 at 96 px on 2 cores.

Usage:
    python benchmarks/freeze_speed.py [--backbone tf_efficientnet_lite0] [--size 96] [--stages 0 1 2 3]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch
from torch import nn

from imgclf.memory import training_heap
from imgclf.models.classifier import ImageClassifier


def images_per_second(model: ImageClassifier, frozen: int, size: int, batch: int, dtype: torch.dtype | None,
                      steps: int) -> float:
    """Median training throughput over `steps` steps after 3 warm-up steps."""
    model.set_backbone_trainable(True, freeze_bn=True, frozen_stages=frozen)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    times = []
    with training_heap():
        for step in range(3 + steps):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                loss = criterion(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step >= 3:
                times.append(time.perf_counter() - start)
    return batch / sorted(times)[len(times) // 2]


def main() -> None:
    import timm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3],
                        help="as --freeze-stages: 0 nothing frozen, N the stem and the first N stages")
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone = timm.create_model(args.backbone, num_classes=0)
    model = ImageClassifier(backbone, nn.Linear(backbone.num_features, 10)).to(memory_format=torch.channels_last)
    print(f"{args.backbone}, {args.size} px, batch {args.batch}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {datetime.date.today()}")
    print("| frozen | fp32 img/s | bf16 img/s |")
    print("| --- | --- | --- |")
    for frozen in args.stages:
        label = "nothing" if frozen == 0 else f"the stem + {frozen} stage(s)"
        fp32 = images_per_second(model, frozen, args.size, args.batch, None, args.steps)
        bf16 = images_per_second(model, frozen, args.size, args.batch, torch.bfloat16, args.steps)
        print(f"| {label} | {fp32:.1f} | {bf16:.1f} |", flush=True)


if __name__ == "__main__":
    main()
