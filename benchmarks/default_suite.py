"""The default command on every real image set at hand, with a fixed time budget.

Not a test: it takes (sets x budget) minutes. For each set it runs `imgclf train DATA --out OUT
--time-budget B` (the default recipe, nothing else set, except `--precision` when given) in its own
process and prints, from the bundle's `imgclf.json`: the probe's val accuracy, the first fine-tuned
epoch's and the best val accuracy, which model the bundle kept, its test accuracy and the wall time.

Sets:
- `digits`: scikit-learn's digits as `imgclf demo` writes them (1,437 train, 360 test, 8 px).
- `cifar2k`, `cifar10k`: the first 200 / 1,000 training images of every CIFAR-10 class, and the first
  200 test images of every class (2,000) as the test split; from ../shared/data/cifar10-jpg.zip,
  unzipped into $IMGCLF_BENCH_CACHE (default ~/.cache/imgclf-bench), copied once.

Usage:
    IMGCLF_OFFLINE=1 IMGCLF_PROGRESS=0 python benchmarks/default_suite.py [--budget 5] [--sets digits,cifar2k]
        [--precision auto|fp32|bf16] [--backbone NAME]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10 import CACHE, ensure_data, first_per_class  # noqa: E402

SETS = ("digits", "cifar2k", "cifar10k")


def digits_folder() -> Path:
    from imgclf.demo import write_digits

    folder = CACHE / "digits"
    if not (folder / "train").is_dir():
        write_digits(folder)
    return folder


def cifar_folder(train_per_class: int, test_per_class: int = 200) -> Path:
    """`CACHE/cifar-<n>-<m>/{train,test}/<class>/`: the first images of every class, copied once."""
    return first_per_class(ensure_data(), {"train": train_per_class, "test": test_per_class},
                           CACHE / f"cifar-{train_per_class}-{test_per_class}")


def folder_for(name: str) -> Path:
    if name == "digits":
        return digits_folder()
    return cifar_folder({"cifar2k": 200, "cifar10k": 1000}[name])


def run(name: str, budget: float, precision: str | None, out_root: Path, backbone: str | None = None
        ) -> dict[str, object]:
    data = folder_for(name)
    out = out_root / f"{name}-{precision or 'auto'}{'-' + backbone if backbone else ''}"
    command = [sys.executable, "-m", "imgclf", "train", str(data), "--out", str(out), "--time-budget", str(budget)]
    if precision:
        command += ["--precision", precision]
    if backbone:
        command += ["--backbone", backbone]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    meta = json.loads((out / "imgclf.json").read_text())
    history = meta.get("history", [])
    epochs = [r for r in history if r["epoch"] > 0]
    log = (out / "train.log").read_text()
    dtype = next((line.split("training precision: ")[1].split()[0] for line in log.splitlines()
                  if "training precision: " in line), meta["hardware"]["dtype"].replace("torch.", ""))
    return {
        "set": name,
        "backbone": meta["backbone"]["name"].replace("tf_efficientnet_", ""),
        "precision": precision or "auto",
        "train dtype": dtype,
        "size": meta["preprocessing"]["image_size"] if "preprocessing" in meta else "",
        "probe val": meta["probe"].get("selection", {}).get("val_accuracy", meta["probe"].get("val_accuracy")),
        "epoch-1 val": epochs[0]["val_accuracy"] if epochs else None,
        "best val": max((r["val_accuracy"] for r in history), default=None),
        "epochs": len(epochs),
        "kept": meta.get("selection", {}).get("chosen", meta["recipe"]),
        "test": meta["metrics"].get("test", {}).get("accuracy"),
        "wall s": round(wall),
    }


def cpu_description() -> str:
    """The CPU's model name and its bf16 instructions, from /proc/cpuinfo (Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(native) if native else 'no native bf16'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=5.0, help="--time-budget of every run, minutes")
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {', '.join(SETS)}")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None)
    parser.add_argument("--backbone", default=None, help="pass --backbone NAME to every run (default: none given)")
    parser.add_argument("--out", default=str(CACHE / "default-suite"), help="where the bundles go")
    args = parser.parse_args()
    rows = [run(name, args.budget, args.precision, Path(args.out), args.backbone) for name in args.sets.split(",")]
    print(f"\n{datetime.datetime.now():%Y-%m-%d %H:%M}, {cpu_description()}, budget {args.budget:g} min")
    columns = list(rows[0])
    print(" | ".join(columns))
    print(" | ".join("---" for _ in columns))
    for row in rows:
        print(" | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()))


if __name__ == "__main__":
    main()
