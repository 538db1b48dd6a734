"""int8 against fp32 and bf16 on CIFAR-10 (issue 20): speed, accuracy, agreement and file size, in one run.

Not a test. For each backbone it:

1. builds a probe bundle once (`imgclf train DATA --recipe probe`, cached under
   ~/.cache/imgclf-bench/int8-bundles/) on the first 300 training JPEGs of every class (3,000; 10%
   held out for validation), with the 1,000 test JPEGs (100 per class) as the test split;
2. exports it to int8 (`imgclf.export.export_int8`, i.e. `imgclf export --int8`) for OpenVINO
   (NNCF) and ONNX (ONNX Runtime static quantization), under the default 1-point gate;
3. runs every runtime on the 1,000 test JPEGs: PyTorch fp32, OpenVINO fp32, OpenVINO bf16, ONNX
   fp32, OpenVINO int8 and ONNX int8. Per runtime: images/s of the frozen forward (batch 64, the
   images already decoded and resized: the network alone, with its uint8 -> float normalisation),
   best of `--rounds` rounds taken in turn so that a busy neighbour hurts every runtime alike;
   images/s of end-to-end `Model.predict` on the JPEG files (decode, resize, forward); test top-1;
   top-1 agreement with PyTorch fp32; the model file's size.

Targets (issue 20): int8 top-1 within 1 point of fp32; at least 1.5x the images/s of the best
non-int8 runtime for the frozen forward; a file at most 30% of fp32's.

Usage:
    python benchmarks/int8.py                                   # lite0 and lite1
    python benchmarks/int8.py --backbones tf_efficientnet_lite0 --rounds 2
    python benchmarks/int8.py --keep-exports          # re-measure the int8 models already exported
    python benchmarks/int8.py --accuracy-aware openvino   # retry only OpenVINO refusals accuracy-aware
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10 import CACHE, ensure_data, first_per_class  # noqa: E402

BATCH = 64
EXPORTS: list[str] = []  # what each int8 export did, printed with the table


@dataclass
class Row:
    backbone: str
    runtime: str
    forward_ips: float  # frozen forward, images/s (best round)
    predict_ips: float  # end-to-end Model.predict on the JPEG files, images/s
    accuracy: float
    agreement: float  # top-1 agreement with PyTorch fp32
    file_bytes: int


def bundle_for(backbone: str, data: Path) -> Path:
    """The probe bundle of `backbone` on `data`, trained once and kept."""
    bundle = CACHE / "int8-bundles" / backbone
    if not (bundle / "imgclf.json").is_file():
        cmd = [sys.executable, "-m", "imgclf", "train", str(data), "--out", str(bundle), "--recipe", "probe",
               "--backbone", backbone]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return bundle


def export_both(bundle: Path, accuracy_aware_formats: list[str]) -> list[str]:
    """int8 exports for OpenVINO and ONNX, as a user would make them: the default first, and on a
    refusal the next step the message offers (`--accuracy-aware`, for `accuracy_aware_formats`).
    Returns one line per attempt."""
    from imgclf.errors import ImgclfError
    from imgclf.export import export_int8

    lines = []
    for fmt in ("openvino", "onnx"):
        for accuracy_aware in (False, True) if fmt in accuracy_aware_formats else (False,):
            started = time.perf_counter()
            try:
                gate = export_int8(bundle, format=fmt, accuracy_aware=accuracy_aware).quantized.gate
                outcome = "passed"
            except ImgclfError as exc:
                gate, outcome = getattr(exc, "report", None), "REFUSED"
                if gate is None:
                    raise
            lines.append(f"{bundle.name} {fmt} int8, {gate.method}: val top-1 {gate.reference_accuracy:.4f} "
                         f"({gate.reference_runtime}) -> {gate.int8_accuracy:.4f}, drop {gate.drop_points:.2f} "
                         f"points: {outcome} ({time.perf_counter() - started:.0f} s)")
            print(lines[-1], flush=True)
            if outcome == "passed":
                break
    return lines


def engines(model, bundle: Path) -> dict[str, tuple[object, int]]:  # noqa: ANN001
    """runtime name -> (forward, model file bytes)."""
    from imgclf.runtime import FrozenForward
    from imgclf.runtime.int8 import Int8Forward, int8_model_path
    from imgclf.runtime.onnx import module_to_onnx
    from imgclf.runtime.openvino import converted_path

    size = model.preprocessing.image_size
    module = model.module.float().eval()
    found: dict[str, tuple[object, int]] = {}
    found["pytorch fp32"] = (FrozenForward(module, image_size=size, precision="fp32", runtime="torch"),
                             (bundle / "model.safetensors").stat().st_size)
    openvino_fp32 = FrozenForward(module, image_size=size, precision="fp32", runtime="openvino", keep_converted=True)
    xml = converted_path(module, size)
    found["openvino fp32"] = (openvino_fp32, xml.stat().st_size + xml.with_suffix(".bin").stat().st_size)
    found["openvino bf16"] = (FrozenForward(module, image_size=size, precision="bf16", runtime="openvino",
                                            keep_converted=True), found["openvino fp32"][1])
    with tempfile.TemporaryDirectory() as folder:
        onnx_fp32 = Path(folder) / "model.onnx"
        module_to_onnx(module, size, onnx_fp32)
        found["onnx fp32"] = (FrozenForward(module, image_size=size, precision="fp32", runtime="onnx"),
                              onnx_fp32.stat().st_size)
    for fmt in ("openvino", "onnx"):
        path = int8_model_path(bundle, fmt)
        if path.is_file():
            files = [path, path.with_suffix(".bin")] if fmt == "openvino" else [path]
            found[f"{fmt} int8"] = (Int8Forward(module, path, fmt), sum(f.stat().st_size for f in files))
        else:  # refused by the gate: quantized again without it, to show what was refused
            found[f"{fmt} int8 (refused)"] = ungated_int8(model, fmt)
    return found


def ungated_int8(model, fmt: str) -> tuple[object, int]:  # noqa: ANN001
    """The default int8 quantization of `fmt` without the gate (quantize's own steps), kept in memory."""
    from imgclf.quantize import _quantize_onnx, _quantize_openvino, gate_data
    from imgclf.runtime.int8 import Int8Forward

    data = gate_data(model)
    quantize = _quantize_openvino if fmt == "openvino" else _quantize_onnx
    with tempfile.TemporaryDirectory() as folder:
        path, _ = quantize(model, data, Path(folder), accuracy_aware=False, max_drop=1.0)
        files = [path, path.with_suffix(".bin")] if fmt == "openvino" else [path]
        return Int8Forward(model.module, path, fmt), sum(f.stat().st_size for f in files)


def forward_pass(forward, store) -> tuple[float, np.ndarray]:  # noqa: ANN001
    """(images/s, top-1 per image) of one frozen pass over `store`, batch 64."""
    from imgclf.runtime import stream_outputs

    order = np.arange(len(store))
    for _ in stream_outputs(forward, store.batches(order[:BATCH], BATCH), store.prep):
        pass  # warm-up: compiles the input path
    top1 = np.empty(len(store), dtype=np.int64)
    start = time.perf_counter()
    for indices, out in stream_outputs(forward, store.batches(order, BATCH), store.prep):
        top1[indices] = out.argmax(1).numpy()
    return len(store) / (time.perf_counter() - start), top1


def measure(backbone: str, data: Path, rounds: int, *, export: bool, accuracy_aware: list[str]) -> list[Row]:
    import torch

    import imgclf
    from imgclf.data.pipeline import ImageStore
    from imgclf.data.sources import load_eval_split
    from imgclf.runtime import compute_dtype
    from imgclf.runtime.int8 import INT8_RUNTIMES

    bundle = bundle_for(backbone, data)
    if export:
        EXPORTS.extend(export_both(bundle, accuracy_aware))
    model = imgclf.load(bundle)
    images, _ = load_eval_split(str(data), model.classes)
    store = ImageStore.decode(images, model.preprocessing, memory_budget=2**31, description="decode test")
    labels = store.labels.numpy()
    found = engines(model, bundle)
    best = {name: 0.0 for name in found}
    top1: dict[str, np.ndarray] = {}
    for _ in range(rounds):
        for name, (forward, _) in found.items():
            ips, top1[name] = forward_pass(forward, store)
            best[name] = max(best[name], ips)
            print(f"  {backbone} {name}: {ips:.0f} img/s", flush=True)
    # Model.predict's runtimes; "openvino" there is bf16 where the CPU has it natively (precision auto).
    openvino_auto = "openvino bf16" if compute_dtype(torch.device("cpu"), "auto") == torch.bfloat16 else "openvino fp32"
    names = {"pytorch fp32": "torch", openvino_auto: "openvino", "onnx fp32": "onnx",
             **{f"{fmt} int8": runtime for runtime, fmt in INT8_RUNTIMES.items()}}
    rows = []
    for name, (_, file_bytes) in found.items():
        predict_ips = float("nan")
        if name in names:
            files = list(images.paths)
            model.predict(files[:BATCH], runtime=names[name])  # builds the runtime outside the timing
            start = time.perf_counter()
            model.predict(files, runtime=names[name])
            predict_ips = len(files) / (time.perf_counter() - start)
        rows.append(Row(backbone, name, best[name], predict_ips, float(np.mean(top1[name] == labels)),
                        float(np.mean(top1[name] == top1["pytorch fp32"])), file_bytes))
    return rows


def print_table(rows: list[Row]) -> None:
    print("\n| backbone | runtime | frozen forward img/s (batch 64) | predict img/s (end to end) | test top-1 "
          "| agreement with fp32 | file MB | file / fp32 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        fp32 = next(x for x in rows if x.backbone == r.backbone and x.runtime == "pytorch fp32")
        predict = "-" if np.isnan(r.predict_ips) else f"{r.predict_ips:.0f}"
        print(f"| {r.backbone} | {r.runtime} | {r.forward_ips:.0f} | {predict} | {r.accuracy:.4f} | "
              f"{r.agreement:.1%} | {r.file_bytes / 1e6:.1f} | {r.file_bytes / fp32.file_bytes:.0%} |")
    print("\nTargets (int8 rows): top-1 within 1 point of fp32, >= 1.5x the best non-int8 frozen forward, "
          "file <= 30% of fp32:")
    for backbone in dict.fromkeys(r.backbone for r in rows):
        mine = [r for r in rows if r.backbone == backbone]
        fp32 = next(r for r in mine if r.runtime == "pytorch fp32")
        best = max((r for r in mine if "int8" not in r.runtime), key=lambda r: r.forward_ips)
        same_format_fp32 = {r.runtime.split()[0]: r for r in mine if r.runtime.endswith("fp32")}
        for r in (r for r in mine if "int8" in r.runtime):
            drop = 100 * (fp32.accuracy - r.accuracy)
            speed = r.forward_ips / best.forward_ips
            ratio = r.file_bytes / same_format_fp32[r.runtime.split()[0]].file_bytes
            print(f"  {backbone} {r.runtime}: drop {drop:+.2f} points ({'ok' if drop <= 1 else 'MISSED'}); "
                  f"{speed:.2f}x {best.runtime} ({'ok' if speed >= 1.5 else 'MISSED'}); "
                  f"file {ratio:.0%} of {r.runtime.split()[0]} fp32 ({'ok' if ratio <= 0.3 else 'MISSED'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["tf_efficientnet_lite0", "tf_efficientnet_lite1"])
    parser.add_argument("--rounds", type=int, default=3, help="frozen-forward rounds; the best counts")
    parser.add_argument("--accuracy-aware", nargs="*", default=["openvino", "onnx"], metavar="FORMAT",
                        help="formats whose refused export is retried with --accuracy-aware (default both)")
    parser.add_argument("--keep-exports", action="store_true", help="measure the int8 models already in the bundles")
    args = parser.parse_args()
    data = first_per_class(ensure_data(), {"train": 300, "test": 100}, CACHE / "cifar-300-100")
    from imgclf.runtime.int8 import describe_int8_hardware

    rows: list[Row] = []
    for backbone in args.backbones:  # a table after each backbone, so a long run shows what it has
        rows += measure(backbone, data, args.rounds, export=not args.keep_exports, accuracy_aware=args.accuracy_aware)
        print(f"\nCIFAR-10 JPEG (3,000 train, 1,000 test), {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
              f"{describe_int8_hardware()}")
        print("\nint8 exports (gate: validation top-1, default runtime vs int8, at most 1 point lost):")
        for line in EXPORTS:
            print(f"  {line}")
        print_table(rows)


if __name__ == "__main__":
    main()
