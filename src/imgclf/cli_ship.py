"""The `export` and `serve` subcommands (registered in cli.COMMANDS)."""

from __future__ import annotations

import argparse

from imgclf.errors import ImgclfError

RUNTIMES = ["auto", "torch", "onnx", "openvino"]
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
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from imgclf.export import export_model

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
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from imgclf.serve import ServeSettings, run_server
    except ImportError as exc:
        raise ImgclfError(f"serving needs FastAPI and uvicorn ({exc})",
                          fix="pip install 'imgclf[serve]' (fastapi, uvicorn, python-multipart)") from None

    if args.top_k < 1 or args.max_concurrency < 1 or args.max_body_mb <= 0:
        raise ImgclfError("--top-k and --max-concurrency must be at least 1, --max-body-mb above 0")
    settings = ServeSettings(runtime=args.runtime, top_k=args.top_k, max_body_bytes=int(args.max_body_mb * 2**20),
                             max_concurrency=args.max_concurrency)
    run_server(args.model, host=args.host, port=args.port, allow_remote=args.allow_remote, settings=settings)
    return 0
