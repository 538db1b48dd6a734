"""The `export` and `serve` subcommands (registered in cli.COMMANDS)."""

from __future__ import annotations

import argparse

from imgclf.errors import ImgclfError
from imgclf.runtime.int8 import INT8_RUNTIMES, read_gated_sidecar

RUNTIMES = ["auto", "torch", "onnx", "openvino", "openvino-int8", "onnx-int8"]  # *-int8: `export --int8` first
# The same as imgclf.serve.server's; repeated so that building the parser needs no FastAPI.
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def add_export(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("export", help="export a bundle to ONNX, TorchScript or OpenVINO, with a parity check")
    p.add_argument("model", metavar="DIR")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "openvino"])
    p.add_argument("--out", help="file to write (default DIR/model.onnx, model.pt or model.xml)")
    p.add_argument("--images", nargs="+", metavar="PATH",
                   help="images or folders for the parity check (default: the training folder, else generated)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="max |probability difference| (default 1e-3)")
    int8 = p.add_argument_group("int8 (openvino: NNCF; onnx: ONNX Runtime), kept only if validation top-1 holds")
    int8.add_argument("--int8", action="store_true",
                      help="quantize to int8 into DIR/int8/, where predict/evaluate/serve --runtime *-int8 find it")
    int8.add_argument("--calibration", metavar="DATA",
                      help="images to calibrate on (default: a subset of the bundle's training split)")
    int8.add_argument("--calibration-images", type=int, default=300, metavar="N", help="at most N (default 300)")
    int8.add_argument("--max-drop", type=float, default=1.0, metavar="POINTS",
                      help="refuse if validation top-1 drops by more (percentage points, default 1.0)")
    int8.add_argument("--accuracy-aware", action="store_true",
                      help="NNCF's quantize_with_accuracy_control: keeps costly layers in float (slower)")
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from imgclf.export import export_model

    if args.int8:
        return _export_int8(args)
    if args.calibration or args.accuracy_aware:
        raise ImgclfError("--calibration and --accuracy-aware are int8 options", fix="add --int8")
    result = export_model(args.model, format=args.format, out=args.out, images=args.images,
                          tolerance=args.tolerance)
    parity = result.parity
    print(f"parity on {parity.images} images ({parity.image_source}): max |dp| {parity.max_abs_diff:.2e} "
          f"(tolerance {parity.tolerance:.0e}), mean {parity.mean_abs_diff:.2e}, "
          f"top-1 agreement {parity.top1_agreement:.1%}")
    if parity.image_source == "generated":
        print("note: no real images were at hand; pass --images to check on yours")
    print(f"{result.format}: {result.path}")
    print(f"sidecar: {result.sidecar}")
    return 0


def _export_int8(args: argparse.Namespace) -> int:
    from imgclf.export import export_int8

    if args.format not in ("openvino", "onnx"):
        raise ImgclfError(f"--int8 is not available for --format {args.format}", expected="openvino or onnx")
    result = export_int8(args.model, format=args.format, out=args.out, calibration=args.calibration,
                         calibration_images=args.calibration_images, max_drop=args.max_drop,
                         accuracy_aware=args.accuracy_aware)
    q = result.quantized
    gate, speed = q.gate, q.speed
    print(f"gate on {gate.validation_images} validation images: top-1 {gate.reference_accuracy:.2%} "
          f"({gate.reference_runtime}) -> {gate.int8_accuracy:.2%} int8, drop {gate.drop_points:.2f} points "
          f"(limit {gate.max_drop_points:g}), agreement {gate.top1_agreement:.1%}")
    print(f"speed: {speed.int8_images_per_second:.0f} img/s int8 vs {speed.reference_images_per_second:.0f} "
          f"{speed.reference_runtime} ({speed.speedup:.2f}x); size: {q.int8_bytes / 2**20:.1f} MiB vs "
          f"{q.fp32_bytes / 2**20:.1f} MiB fp32 ({q.int8_bytes / q.fp32_bytes:.0%})")
    print(f"{result.format} int8: {result.path}")
    print(f"sidecar: {result.sidecar}")
    if result.in_bundle:
        print(f"use it: imgclf predict {args.model} PATH... --runtime {result.format}-int8")
    else:
        print("note: written outside the bundle, so --runtime *-int8 will not find it")
    return 0


def add_serve(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="serve a bundle over HTTP with a web page at /")
    p.add_argument("model", metavar="DIR")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST}, this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--allow-remote", action="store_true", help="allow a --host other machines can reach")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body in MiB (default 16)")
    p.add_argument("--max-concurrency", type=int, default=64,
                   help="requests in flight before new ones get 503 (default 64)")
    p.add_argument("--threshold", type=float, metavar="P",
                   help="multi-label: one threshold for every label instead of those stored in the bundle")
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from imgclf.serve import ServeSettings, run_server
    except ImportError as exc:
        raise ImgclfError(f"serving needs FastAPI and uvicorn ({exc})",
                          fix="pip install 'imgclf[serve]' (fastapi, uvicorn, python-multipart)") from None

    if args.top_k < 1 or args.max_concurrency < 1 or args.max_body_mb <= 0:
        raise ImgclfError("--top-k and --max-concurrency must be at least 1, --max-body-mb above 0")
    if args.runtime in INT8_RUNTIMES:  # fail now, not in the server's warm-up, if there is no gated int8 model
        read_gated_sidecar(args.model, INT8_RUNTIMES[args.runtime])
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ImgclfError(f"--threshold must be a probability between 0 and 1, got {args.threshold}")
    settings = ServeSettings(runtime=args.runtime, top_k=args.top_k, max_body_bytes=int(args.max_body_mb * 2**20),
                             max_concurrency=args.max_concurrency, threshold=args.threshold)
    run_server(args.model, host=args.host, port=args.port, allow_remote=args.allow_remote, settings=settings)
    return 0
