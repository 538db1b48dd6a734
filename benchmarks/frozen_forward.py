"""Throughput of a frozen backbone's forward pass on each runtime imgclf can use.

This is the evidence behind `runtime.FrozenForward` choosing OpenVINO on CPUs and bf16 only where
the CPU runs it natively. Prints a table of runtime vs images/s.

Usage:
    python benchmarks/frozen_forward.py [--backbone tf_efficientnet_lite0] [--sizes 96 160 224] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import torch

from imgclf.models.backbones import create_backbone
from imgclf.runtime import FrozenForward, cpu_has_native_bf16


def images_per_second(run, batch: torch.Tensor, repeats: int) -> float:  # type: ignore[no-untyped-def]
    run(batch)  # warm-up (and one-time compilation)
    start = time.perf_counter()
    for _ in range(repeats):
        run(batch)
    return repeats * len(batch) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 160, 224])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    model = create_backbone(args.backbone, pretrained=False).model.eval()
    rows = []
    for size in args.sizes:
        batch = torch.randn(args.batch, 3, size, size)

        def torch_plain(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return model.to(memory_format=torch.contiguous_format)(x)

        def torch_bf16(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))

        runners = {
            "PyTorch fp32": torch_plain,
            "PyTorch fp32 + channels_last": FrozenForward(model, image_size=size, runtime="torch", precision="fp32"),
            "PyTorch bf16 autocast + channels_last": torch_bf16,
            "OpenVINO fp32": FrozenForward(model, image_size=size, runtime="openvino", precision="fp32"),
        }
        if cpu_has_native_bf16():
            runners["OpenVINO bf16"] = FrozenForward(model, image_size=size, runtime="openvino", precision="bf16")
        try:
            import onnxruntime  # noqa: F401

            runners["ONNX Runtime fp32"] = FrozenForward(model, image_size=size, runtime="onnx", precision="fp32")
        except Exception:  # optional extra; also skipped if this version has no onnx runtime
            pass
        for name, run in runners.items():
            rows.append((name, size, images_per_second(run, batch, args.repeats)))
    print(f"\n{args.backbone}, batch {args.batch}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, native bf16: {cpu_has_native_bf16()}, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| runtime | input | images/s |")
    print("| --- | --- | --- |")
    for name, size, speed in rows:
        print(f"| {name} | {size} px | {speed:.1f} |")


if __name__ == "__main__":
    main()
