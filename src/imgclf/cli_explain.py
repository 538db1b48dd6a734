"""The `explain` subcommand (registered in cli.COMMANDS): Grad-CAM heatmaps as PNG files."""

from __future__ import annotations

import argparse
from pathlib import Path

from imgclf.errors import ImgclfError

METHOD_CHOICES = ["gradcam", "gradcam++", "eigencam"]  # imgclf.explain.METHODS; repeated so --help needs no torch
RUNTIME_CHOICES = ["auto", "torch", "onnx", "openvino"]  # onnx/openvino are refused with the reason (no gradients)
EXPORTED_SUFFIXES = {".onnx": "ONNX", ".xml": "OpenVINO", ".bin": "OpenVINO", ".pt": "TorchScript"}


def add_explain(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("explain", help="Grad-CAM heatmaps: where the model looks in each image (one PNG per image)")
    p.add_argument("model", metavar="BUNDLE", help="a bundle folder written by imgclf train")
    p.add_argument("paths", metavar="PATH", nargs="+", help="image files or folders")
    p.add_argument("--out", default="explanations", help="folder for the PNG files (default ./explanations)")
    p.add_argument("--method", choices=METHOD_CHOICES, default="gradcam",
                   help="gradcam (default), gradcam++, or eigencam (class-agnostic)")
    p.add_argument("--class", dest="class_name", metavar="LABEL",
                   help="explain this class in every image (default: each image's predicted class)")
    p.add_argument("--layer", metavar="NAME",
                   help="target layer, a dotted path in the backbone such as bn2 or blocks.-1.norm1 "
                   "(default: the backbone registry's)")
    p.add_argument("--runtime", choices=RUNTIME_CHOICES, default="auto",
                   help="explanations need gradients, so they run on PyTorch; onnx and openvino are refused")
    p.set_defaults(handler=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    from imgclf.api import load

    try:
        from imgclf.explain import write_explanations
    except ImportError as exc:  # grad-cam missing: imgclf.explain imports it lazily, but its deps may break
        raise ImgclfError(f"explanations need the grad-cam package ({exc})",
                          fix="pip install 'imgclf[explain]'") from None
    bundle = Path(args.model)
    kind = EXPORTED_SUFFIXES.get(bundle.suffix.lower())
    if kind and bundle.is_file():
        raise ImgclfError(
            f"{str(bundle)!r} is a {kind} export: it runs a frozen graph that cannot backpropagate, and Grad-CAM "
            "needs the gradient of the class score",
            expected="the bundle folder it was exported from (model.safetensors + imgclf.json)",
            fix=f"imgclf explain {bundle.parent} PATH ...",
        )
    model = load(bundle)
    written = write_explanations(model, args.paths, args.out, method=args.method, class_name=args.class_name,
                                 layer=args.layer, runtime=args.runtime)
    for explanation, path in written:
        about = "" if explanation.target == explanation.predicted else f", map for {explanation.target}"
        print(f"{explanation.source}\t{explanation.predicted} {explanation.probability:.3f}{about}\t{path}")
    print(f"{len(written)} explanation(s) in {args.out}")
    return 0
