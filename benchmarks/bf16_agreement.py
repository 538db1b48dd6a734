"""Top-1 agreement of bf16 inference with fp32, on real images, for a trained bundle.

fp32 exports are checked for parity within 1e-3 (`imgclf export`); bf16 cannot meet that, so for
bf16 runtimes the measure is how often the top-1 label stays the same. Compared with the eager
fp32 PyTorch model on the same normalised inputs:

- `torch bf16`: PyTorch autocast to bf16 (what `FrozenForward` runs with `precision="bf16"`). On a
  CPU without native bf16 PyTorch emulates it: slow, but the rounding is real bf16, so the
  agreement figure holds for native hardware too (accumulation stays fp32 either way);
- `openvino bf16`: OpenVINO with `INFERENCE_PRECISION_HINT=bf16`. The table prints the precision
  OpenVINO actually chose: on a CPU without bf16 it runs f32, and the row says so.

Not a test. Usage:
    python benchmarks/bf16_agreement.py RUN_DIR DATA_FOLDER [--images 1000]
e.g. python benchmarks/bf16_agreement.py ~/.cache/imgclf-bench/runs/finetune ~/.cache/imgclf-bench/cifar10/test
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from imgclf.bundle import Model
from imgclf.data.pipeline import ImageStore, normalize
from imgclf.data.sources import load_eval_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("data")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()

    model = Model.load(args.bundle)
    images, _ = load_eval_split(args.data, model.classes)
    picks = np.random.default_rng(0).choice(len(images), size=min(args.images, len(images)), replace=False)
    store = ImageStore.decode(images.subset(np.sort(picks)), model.preprocessing, memory_budget=2**31,
                              description="decode")
    batches = [(store.labels[torch.from_numpy(i)], normalize(b, model.preprocessing))
               for i, b in store.batches(np.arange(len(store)), args.batch_size)]
    labels = torch.cat([y for y, _ in batches]).numpy()
    module = model.module.float().eval()

    def run(forward, name: str) -> tuple[np.ndarray, float]:  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        with torch.inference_mode():
            logits = torch.cat([forward(x).float() for _, x in batches])
        seconds = time.perf_counter() - start
        print(f"{name}: {len(labels) / seconds:.1f} img/s", flush=True)
        return torch.softmax(logits / model.temperature, 1).numpy(), seconds

    reference, _ = run(lambda x: module(x.contiguous(memory_format=torch.channels_last)), "torch fp32")

    def torch_bf16(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return module(x.contiguous(memory_format=torch.channels_last))

    rows = [("torch bf16 autocast", "bf16", *run(torch_bf16, "torch bf16"))]
    try:
        import openvino as ov

        with torch.no_grad():
            size = model.preprocessing.image_size
            ov_model = ov.convert_model(module, example_input=torch.zeros(1, 3, size, size))
        compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
        chosen = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        request = compiled.create_infer_request()
        probs, seconds = run(lambda x: torch.from_numpy(np.array(request.infer([x.numpy()])[0])), "openvino bf16")
        rows.append(("openvino, hint bf16", chosen, probs, seconds))
    except ImportError:
        print("openvino is not installed: its row is skipped")

    print(f"\n{len(labels)} images of {args.data}, bundle {args.bundle}, {model.preprocessing.image_size} px, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"fp32 accuracy {np.mean(reference.argmax(1) == labels):.4f}")
    print("| runtime | precision it ran | top-1 agreement with fp32 | max abs prob diff | accuracy | img/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, precision, probs, seconds in rows:
        agreement = np.mean(probs.argmax(1) == reference.argmax(1))
        print(f"| {name} | {precision} | {agreement:.4f} ({int(round(agreement * len(labels)))}/{len(labels)}) | "
              f"{np.abs(probs - reference).max():.4f} | {np.mean(probs.argmax(1) == labels):.4f} | "
              f"{len(labels) / seconds:.1f} |")


if __name__ == "__main__":
    main()
