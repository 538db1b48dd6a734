"""Probe feature extraction against the fastest runtime's bare forward pass, and a cached second run.

Not a test: at full size it takes about 10 minutes. It unzips ../shared/data/cifar10-jpg.zip into
~/.cache/imgclf-bench once (as benchmarks/cifar10.py does), then:

1. **Bare forward throughput** of the probe's backbone at the probe's input size, on uint8
   batches already in memory (no decoding), for each runtime: PyTorch fp32, ONNX Runtime fp32 (if
   installed), OpenVINO fp32 called one batch at a time, and OpenVINO's streamed path (what the
   probe uses: normalisation inside the network, whole batches to the throughput streams).
2. **First run**: `imgclf train DATA --recipe probe` with an empty cache folder: decoding,
   features for every image, the fit and the report. Extraction speed is read from the run's
   log ("features train: 0 from the feature cache, 45000 computed in S s (R img/s)").
3. The bare OpenVINO figure again (the machine's speed drifts; both are shown).
4. **Second run**: the same command; its scan, features and head come from the caches.
5. **Interleaved** (`--rounds`, default 5): in one process, on one compiled network, the bare
   streamed forward on in-memory batches, then the probe's extraction path (`run_frozen` over
   an `ImageStore` streaming a block of the JPEGs from disk), then the bare forward again, per
   round. The ratio of each round cancels most of this VM's drift (14% within minutes).

Prints a table. Record the figures in BENCHMARKS.md with the command, machine and date.

Usage:
    python benchmarks/probe_speed.py                     # all 60,000 images
    python benchmarks/probe_speed.py --per-class 100     # a smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10 import CACHE, ensure_data  # noqa: E402
from cpu_time_to_accuracy import small_copy  # noqa: E402

from imgclf.data.pipeline import ImageStore, Preprocessing, normalize  # noqa: E402
from imgclf.data.sources import load_dataset  # noqa: E402
from imgclf.models.backbones import create_backbone  # noqa: E402
from imgclf.runtime import FrozenForward, run_frozen  # noqa: E402

FEATURES_LINE = re.compile(r"features (\w+): (\d+) from the feature cache, (\d+) computed in ([\d.]+) s")


def network_and_prep(backbone: str, size: int) -> tuple[torch.nn.Module, Preprocessing]:
    """The pretrained headless backbone in eval mode, and its normalisation at `size`."""
    built = create_backbone(backbone)
    config = built.data_config
    return built.model.eval(), Preprocessing(size, tuple(config["mean"]), tuple(config["std"]))  # type: ignore[arg-type]


def bare_rates(backbone: str, size: int, batch: int, batches: int) -> dict[str, float]:
    """Images/s of each runtime on uint8 batches held in memory (normalisation counted)."""
    net, prep = network_and_prep(backbone, size)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    rates: dict[str, float] = {}

    def timed(name: str, run, count: int) -> None:  # type: ignore[no-untyped-def]
        run(1)  # warm-up, compilation
        start = time.perf_counter()
        run(count)
        rates[name] = count * batch / (time.perf_counter() - start)

    def plain(count: int) -> None:
        with torch.inference_mode():
            for _ in range(count):
                net(normalize(images, prep).contiguous())

    timed("PyTorch fp32", plain, max(2, batches // 4))
    runtimes = ["openvino"]
    try:
        import onnxruntime  # noqa: F401

        runtimes.insert(0, "onnx")
    except ImportError:
        pass
    for runtime in runtimes:
        forward = FrozenForward(net, image_size=size, runtime=runtime, precision="fp32")
        label = {"onnx": "ONNX Runtime fp32", "openvino": "OpenVINO fp32, one batch per call"}[runtime]
        timed(label, lambda count, f=forward: [f(normalize(images, prep)) for _ in range(count)], batches)
        if runtime == "openvino":
            def streamed(count: int, f: FrozenForward = forward) -> None:
                for _ in f.stream(((None, images) for _ in range(count)), prep):
                    pass

            timed("OpenVINO fp32, streamed (the probe's path)", streamed, batches)
    return rates


def interleaved(backbone: str, size: int, data: Path, rounds: int, block: int) -> list[tuple[float, float, float]]:
    """Per round: (bare img/s, extraction img/s, bare img/s), as described in the module docstring."""
    net, prep = network_and_prep(backbone, size)
    forward = FrozenForward(net, image_size=size, runtime="openvino", precision="fp32")  # limits heap growth too
    images = torch.randint(0, 256, (64, 3, size, size), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    train = load_dataset(str(data)).train
    block = min(block, len(train) // rounds)

    def bare() -> float:
        start = time.perf_counter()
        for _ in forward.stream(((None, images) for _ in range(block // 64)), prep):
            pass
        return block // 64 * 64 / (time.perf_counter() - start)

    bare()  # warm-up, compilation
    results = []
    for r in range(rounds):
        before = bare()
        store = ImageStore.decode(train.subset(np.arange(r * block, (r + 1) * block)), prep, memory_budget=0)
        start = time.perf_counter()
        outputs, _, _ = run_frozen(forward, store, batch_size=64, desc="extract")
        extraction = len(outputs) / (time.perf_counter() - start)
        results.append((before, extraction, bare()))
        print(f"round {r + 1}: bare {before:.1f}, extraction {extraction:.1f}, bare {results[-1][2]:.1f} img/s",
              flush=True)
    return results


def run_train(data: Path, out: Path, cache: Path) -> tuple[float, dict[str, tuple[int, float]]]:
    """Wall seconds of `imgclf train DATA --recipe probe`, and per split (computed, seconds)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "imgclf", "train", str(data), "--recipe", "probe", "--out", str(out)]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "IMGCLF_CACHE": str(cache)})
    wall = time.perf_counter() - start
    extraction = {m[1]: (int(m[3]), float(m[4])) for m in FEATURES_LINE.finditer((out / "train.log").read_text())}
    return wall, extraction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=0, help="use this many images per class (0 = all)")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=160, help="the probe's input size on CIFAR-10 (32 px x 5)")
    parser.add_argument("--batches", type=int, default=20, help="batches of 64 per bare measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (0 = none)")
    parser.add_argument("--block", type=int, default=3200, help="images per interleaved extraction")
    parser.add_argument("--interleaved-only", action="store_true", help="skip the two train runs")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    data = ensure_data() if not args.per_class else small_copy(ensure_data(), args.per_class)
    header = (f"\n{args.backbone} at {args.size} px, batch 64, {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    rounds = interleaved(args.backbone, args.size, data, args.rounds, args.block) if args.rounds else []
    if args.interleaved_only:
        print(header)
        print_interleaved(rounds)
        return
    before = bare_rates(args.backbone, args.size, 64, args.batches)
    work = Path(tempfile.mkdtemp(prefix="probe-speed-", dir=CACHE))
    try:
        first, extraction = run_train(data, work / "first", work / "cache")
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
        after = bare_rates(args.backbone, args.size, 64, args.batches)
        second, _ = run_train(data, work / "second", work / "cache")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    images = sum(n for n, _ in extraction.values())
    seconds = sum(s for _, s in extraction.values())
    rate = images / seconds if seconds else float("nan")
    print(header)
    print("| measurement | before the runs | after the first run |")
    print("| --- | --- | --- |")
    for name in before:
        print(f"| bare forward: {name} | {before[name]:.1f} img/s | {after[name]:.1f} img/s |")
    best = max(max(before.values()), max(after.values()))
    best_mean = max((before[k] + after[k]) / 2 for k in before)
    print("\n| extraction in the first run | images | seconds | img/s | of the fastest bare (mean / max) |")
    print("| --- | --- | --- | --- | --- |")
    for split, (n, s) in extraction.items():
        print(f"| features {split} | {n} | {s:.1f} | {n / s:.1f} | |")
    print(f"| all | {images} | {seconds:.1f} | {rate:.1f} | {rate / best_mean:.2f} / {rate / best:.2f} |")
    print("\n| run | wall seconds | of the first |")
    print("| --- | --- | --- |")
    print(f"| first (empty caches; peak memory {peak_mb:.0f} MB) | {first:.1f} | 1.00 |")
    print(f"| second (same data, caches filled) | {second:.1f} | {second / first:.3f} |")
    print_interleaved(rounds)


def print_interleaved(rounds: list[tuple[float, float, float]]) -> None:
    if not rounds:
        return
    print("\n| interleaved round | bare before | extraction | bare after | extraction / mean bare |")
    print("| --- | --- | --- | --- | --- |")
    ratios = []
    for r, (before, extraction, after) in enumerate(rounds, start=1):
        ratios.append(extraction / ((before + after) / 2))
        print(f"| {r} | {before:.1f} img/s | {extraction:.1f} img/s | {after:.1f} img/s | {ratios[-1]:.3f} |")
    print(f"| median | | | | **{float(np.median(ratios)):.3f}** |")


if __name__ == "__main__":
    main()
