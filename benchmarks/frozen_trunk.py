"""Is freezing the early blocks, with their outputs computed once, worth it on a CPU?

An idea for more accuracy per CPU-minute (fast-CPU issue): freeze the stem and the first `cut`
stages of tf_efficientnet_lite0, compute their outputs once, and fine-tune only the later stages
on those stored feature maps, with the augmentation (random-resized crop and flip, as imgclf's)
applied to the feature maps instead of the pixels. A training step then skips the early,
high-resolution stages, forward and backward. This script measures the trade on the same images:

- rows `SIZE:CUT:EPOCHS`; CUT 0 is ordinary fine-tuning of the whole network on augmented pixels;
- the first 1,000 training images of every CIFAR-10 class, scored on the first 200 test images
  of every class; AdamW (head 1e-3, backbone 3e-4), warmup + cosine, label smoothing 0.1,
  batch 64, frozen BatchNorm, fp32, channels_last: imgclf's fine-tuning recipe without its
  probe-fitted head (both variants start from the same zero head).

Prints a table. Not a test: the default rows take about 16 minutes on 2 cores.

Usage:
    python benchmarks/frozen_trunk.py                    # 96:3:2 128:3:2 96:0:2
    python benchmarks/frozen_trunk.py 96:0:1 96:5:1
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10 import ensure_data  # noqa: E402
from cpu_time_to_accuracy import small_copy  # noqa: E402

from imgclf.data.decode import open_image  # noqa: E402
from imgclf.data.pipeline import Augmentation, image_to_tensor  # noqa: E402
from imgclf.models.backbones import create_backbone  # noqa: E402


def load(root: Path, split: str, per_class: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    classes = sorted(p.name for p in (root / split).iterdir())
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / split / name).glob("*.jpg"))[:per_class]]
    with ThreadPoolExecutor(2) as pool:
        images = list(pool.map(lambda item: image_to_tensor(open_image(item[0]), size), files))
    return torch.stack(images), torch.tensor([c for _, c in files])


def trunk(net: nn.Module, x: torch.Tensor, cut: int) -> torch.Tensor:
    x = net.bn1(net.conv_stem(x))
    for block in net.blocks[:cut]:
        x = block(x)
    return x


def tail(net: nn.Module, x: torch.Tensor, cut: int) -> torch.Tensor:
    for block in net.blocks[cut:]:
        x = block(x)
    return net.global_pool(net.bn2(net.conv_head(x)))


def run(backbone: nn.Module, data: Path, size: int, cut: int, epochs: int, batch: int = 64) -> dict[str, float]:
    start = time.perf_counter()
    x_train, y_train = load(data, "train", 1000, size)
    x_test, y_test = load(data, "test", 200, size)
    net = copy.deepcopy(backbone).to(memory_format=torch.channels_last).eval()  # eval: BatchNorm frozen
    head = nn.Linear(net.num_features, 10)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)

    def inputs(x: torch.Tensor) -> torch.Tensor:  # mean = std = 0.5, the offline weights' normalisation
        return ((x.float() / 255.0 - 0.5) / 0.5).contiguous(memory_format=torch.channels_last)

    extract_start = time.perf_counter()
    if cut:
        with torch.no_grad():
            x_train = torch.cat([trunk(net, inputs(x_train[i : i + 256]), cut) for i in range(0, len(x_train), 256)])
            x_test = torch.cat([trunk(net, inputs(x_test[i : i + 256]), cut) for i in range(0, len(x_test), 256)])
        trained = [p for part in (*net.blocks[cut:], net.conv_head, net.bn2) for p in part.parameters()]
    else:
        trained = list(net.parameters())
    extract = time.perf_counter() - extract_start

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last) if cut else inputs(x)
        return head(tail(net, x, cut) if cut else net(x))

    steps = epochs * (len(x_train) // batch)
    warm = max(1, int(0.05 * steps))
    optimizer = torch.optim.AdamW([{"params": list(head.parameters()), "lr": 1e-3}, {"params": trained, "lr": 3e-4}],
                                  weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm)))
    )
    augment, generator = Augmentation(), torch.Generator().manual_seed(0)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    train_start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(len(x_train) // batch):
            picks = order[i * batch : (i + 1) * batch]
            loss = criterion(forward(augment(x_train[picks], generator)), y_train[picks])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    train = time.perf_counter() - train_start
    with torch.no_grad():
        correct = sum(int((forward(x_test[i : i + 256]).argmax(1) == y_test[i : i + 256]).sum())
                      for i in range(0, len(x_test), 256))
    return {"accuracy": correct / len(x_test), "extract": extract, "train": train,
            "rate": epochs * len(x_train) / train, "total": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="*", default=["96:3:2", "128:3:2", "96:0:2"], help="SIZE:CUT:EPOCHS")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    data = small_copy(ensure_data(), 1000)
    backbone = create_backbone("tf_efficientnet_lite0").model
    results = []
    for row in args.rows:
        size, cut, epochs = (int(v) for v in row.split(":"))
        results.append((size, cut, epochs, run(backbone, data, size, cut, epochs)))
        print(f"{row}: test accuracy {results[-1][3]['accuracy']:.4f} in {results[-1][3]['total']:.0f} s", flush=True)
    print(f"\ntf_efficientnet_lite0, 10,000 train / 2,000 test CIFAR-10 images, {platform.machine()}, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| input | frozen stages | epochs | trunk outputs | training | train img/s | test accuracy | wall |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size, cut, epochs, r in results:
        frozen = f"stem + stages 0-{cut - 1} (stored)" if cut else "none"
        extract = f"{r['extract']:.0f} s" if cut else "-"
        print(f"| {size} px | {frozen} | {epochs} | {extract} | {r['train']:.0f} s | {r['rate']:.0f} | "
              f"{r['accuracy']:.4f} | {r['total']:.0f} s |")


if __name__ == "__main__":
    main()
