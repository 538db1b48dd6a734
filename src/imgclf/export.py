"""Export a bundle to ONNX, TorchScript or OpenVINO, and prove the export gives the same answers.

The exported model takes the *preprocessed* tensor (float32 N x 3 x S x S, normalised as the
bundle's `preprocessing` says) and returns logits N x C; probabilities are
`softmax(logits / temperature)`. A JSON sidecar next to the export (`model.onnx.json`, ...) holds the
classes, preprocessing, temperature and the parity figures, so the export can be used without
imgclf.

Every export is checked against the eager PyTorch model on real images: the largest absolute
difference of the probabilities must stay within a tolerance (1e-3 by default, for fp32). An export
that fails the check is deleted and an `ExportError` says by how much it missed.

int8 (`export_int8`, `imgclf export --int8`) is checked differently, since int8 never matches fp32
to 1e-3: `imgclf.quantize` measures top-1 on the bundle's validation split against the default
runtime and refuses a drop over `max_drop` points. A passing model is written inside the bundle
(`BUNDLE/int8/`, see `imgclf.runtime.int8`), where `predict --runtime openvino-int8` finds it; a
refused one leaves every file as it was.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgclf.bundle import BUNDLE_JSON, Model
from imgclf.errors import ExportError, ImgclfError
from imgclf.files import TEMP_PREFIX, atomic_write_text, move_into_place
from imgclf.quantize import CALIBRATION_IMAGES, DEFAULT_MAX_DROP, Quantized, check_installed, gate_data, quantize_model
from imgclf.runtime.int8 import INT8_FILES, bundle_weights_sha256, int8_model_path, sidecar_path
from imgclf.runtime.onnx import INPUT_NAME, OUTPUT_NAME, module_to_onnx, onnx_session
from imgclf.version import __version__

FORMATS: dict[str, str] = {"onnx": ".onnx", "torchscript": ".pt", "openvino": ".xml"}
DEFAULT_TOLERANCE = 1e-3  # max |p_export - p_eager| for fp32; observed figures are ~1e-7
PARITY_IMAGES = 32  # images the parity check runs on: enough to hit every class of a small set


@dataclass
class ParityReport:
    """How closely an exported model matches the eager PyTorch model (probabilities, fp32)."""

    images: int
    image_source: str  # "files", "training data" or "generated"
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float  # share of images whose top-1 label is the same
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass
class ExportResult:
    format: str
    path: Path
    sidecar: Path
    parity: ParityReport


def export_model(
    model: Model | str | Path,
    *,
    format: str,
    out: str | Path | None = None,
    images: Sequence[str | Path] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportResult:
    """Export a bundle and check it against the eager model.

    Args:
        model: a loaded `Model` or a bundle folder.
        format: "onnx", "torchscript" or "openvino".
        out: the file to write; default `model.onnx`, `model.pt` or `model.xml` (+ `.bin`) in the
            bundle folder.
        images: image files or folders for the parity check; default the bundle's training folder
            when it still exists, else generated images.
        tolerance: the largest allowed absolute difference of any probability.

    Raises:
        ExportError: unknown format, missing runtime, or a parity check above `tolerance`.

    Example:
        >>> result = export_model("runs/pets", format="onnx", images=["pets/test"])  # doctest: +SKIP
        >>> result.parity.max_abs_diff < 1e-3  # doctest: +SKIP
        True
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}", expected=", ".join(FORMATS))
    if not tolerance > 0:
        raise ExportError(f"tolerance must be positive, got {tolerance}")
    bundle_dir = None
    if not isinstance(model, Model):
        bundle_dir = Path(model)
        model = Model.load(bundle_dir)
    path = _output_path(out, bundle_dir, format)
    batch, source = parity_batch(model, images, bundle_dir)

    _check_installed(format)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = model.preprocessing.image_size
    module = model.module.float().eval()
    if format == "onnx":
        module_to_onnx(module, size, path)
    elif format == "torchscript":
        module_to_torchscript(module, size).save(str(path))
    else:
        _save_openvino(module, size, path)

    report = check_parity(model, load_exported(path, format), batch, tolerance=tolerance, source=source)
    if not report.passed:
        for file in _artefacts(path, format):
            file.unlink(missing_ok=True)
        raise ExportError(
            f"the {format} export differs from the eager model by {report.max_abs_diff:.2e} "
            f"(max |probability difference| over {report.images} images, top-1 agreement "
            f"{report.top1_agreement:.1%}); the export was deleted",
            expected=f"at most {tolerance:.0e}",
            fix="report this as a bug with the backbone name; --tolerance raises the limit if you accept the gap",
        )
    sidecar = path.with_name(path.name + ".json")
    description = _sidecar(model, format, path, {"parity": report.to_dict()})
    sidecar.write_text(json.dumps(description, indent=2), encoding="utf-8")
    return ExportResult(format, path, sidecar, report)


@dataclass
class Int8ExportResult:
    format: str
    path: Path
    sidecar: Path
    quantized: Quantized  # the gate's figures, the speed and the file sizes
    in_bundle: bool  # written where `--runtime openvino-int8` / `onnx-int8` finds it


def export_int8(
    model: Model | str | Path,
    *,
    format: str,
    out: str | Path | None = None,
    calibration: str | None = None,
    calibration_images: int = CALIBRATION_IMAGES,
    max_drop: float = DEFAULT_MAX_DROP,
    accuracy_aware: bool = False,
) -> Int8ExportResult:
    """Quantize a bundle to int8 and keep it only if its validation top-1 is within `max_drop` points.

    Args:
        model: a bundle folder (or a `Model` loaded from one).
        format: "openvino" (NNCF) or "onnx" (ONNX Runtime static quantization).
        out: the model file to write; default `BUNDLE/int8/model.xml` or `model.onnx`, where
            `predict --runtime openvino-int8` / `onnx-int8` look for it.
        calibration: images to calibrate on (DATA, or a folder of images); default a seeded subset
            of the bundle's training split.
        calibration_images: at most this many calibration images.
        max_drop: the largest allowed drop of validation top-1, in percentage points.
        accuracy_aware: use NNCF's `quantize_with_accuracy_control` (slower: it validates many times).

    Raises:
        GateError: the drop was over `max_drop`; nothing was written or removed.
        ExportError: a bad format or path, missing libraries, or the training data is gone.

    Example:
        >>> result = export_int8("runs/pets", format="openvino")  # doctest: +SKIP
        >>> result.quantized.gate.drop_points, result.path.name  # doctest: +SKIP
        (0.2, 'model.xml')
    """
    if format not in INT8_FILES:
        raise ExportError(f"int8 export is not available for {format!r}", expected=", ".join(INT8_FILES))
    check_installed(format)
    bundle_dir = model.folder if isinstance(model, Model) else Path(model)
    if bundle_dir is None:
        raise ExportError("int8 export needs a model loaded from its bundle folder", fix="pass the folder")
    model = model if isinstance(model, Model) else Model.load(bundle_dir)
    path = _output_path(out, bundle_dir, format) if out is not None else int8_model_path(bundle_dir, format)
    data = gate_data(model, calibration=calibration, calibration_images=calibration_images)
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX, dir=path.parent) as work:
            quantized = quantize_model(model, format, data, Path(work), max_drop=max_drop,
                                       accuracy_aware=accuracy_aware, bundle_name=str(bundle_dir))
            sidecar = _place_int8(model, quantized, path, bundle_dir)
    except BaseException:
        if created and not any(path.parent.iterdir()):
            path.parent.rmdir()  # a refused first export leaves no empty int8/ behind
        raise
    in_bundle = path.resolve() == int8_model_path(bundle_dir, format).resolve()
    return Int8ExportResult(format, path, sidecar, quantized, in_bundle)


def _place_int8(model: Model, quantized: Quantized, path: Path, bundle_dir: Path) -> Path:
    """Move the int8 files from the working folder onto `path`; the sidecar, the commit mark, last.

    The old sidecar goes first, so no reader pairs the new model with the old gate record.
    """
    sidecar = sidecar_path(path)
    sidecar.unlink(missing_ok=True)
    pairs = [(quantized.path, path)]
    if quantized.format == "openvino":  # the .bin before the .xml that names it
        pairs.insert(0, (quantized.path.with_suffix(".bin"), path.with_suffix(".bin")))
    for source, target in pairs:
        move_into_place(source, target)
    q = quantized
    int8 = {
        "method": q.gate.method,
        "bundle_weights_sha256": bundle_weights_sha256(bundle_dir),
        "gate": q.gate.to_dict(),
        "speed": q.speed.to_dict(),
        "calibration": q.calibration,
        "file_bytes": {"fp32": q.fp32_bytes, "int8": q.int8_bytes, "ratio": round(q.int8_bytes / q.fp32_bytes, 4)},
        "precision_hint": "f32",  # OpenVINO runs the operations left in floating point in fp32
    }
    description = _sidecar(model, quantized.format, path, {"int8": int8})
    atomic_write_text(sidecar, json.dumps(description, indent=2))
    return sidecar


# --------------------------------------------------------------------------------------------
# Conversion: module -> file (ONNX: `runtime.onnx`, shared with the in-memory ONNX engine)


def module_to_torchscript(module: nn.Module, image_size: int) -> torch.jit.ScriptModule:
    """Trace `module` (fixed control flow, so tracing is exact) into a TorchScript module."""
    example = torch.zeros(1, 3, image_size, image_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
        traced = torch.jit.trace(module, example)
    return traced


def _save_openvino(module: nn.Module, image_size: int, path: Path) -> None:
    import openvino as ov

    example = torch.zeros(1, 3, image_size, image_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # OpenVINO traces through the deprecated torch.jit
        ov_model = ov.convert_model(module, example_input=example)
    ov_model.reshape({0: ov.PartialShape([-1, 3, image_size, image_size])})
    ov_model.inputs[0].get_tensor().set_names({INPUT_NAME})
    ov_model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    # Keep fp32 weights: the default fp16 compression costs ~1e-3 of probability.
    ov.save_model(ov_model, str(path), compress_to_fp16=False)


def load_exported(path: str | Path, format: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function float32 N x 3 x S x S -> logits N x C that runs an exported file.

    Example:
        >>> run = load_exported("runs/pets/model.onnx", "onnx")  # doctest: +SKIP
        >>> run(np.zeros((1, 3, 224, 224), np.float32)).shape  # doctest: +SKIP
        (1, 2)
    """
    path = str(path)
    if format == "onnx":
        session = onnx_session(path)
        name = session.get_inputs()[0].name
        return lambda x: np.asarray(session.run(None, {name: x})[0])
    if format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, not broken
            scripted = torch.jit.load(path, map_location="cpu").eval()

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return scripted(torch.from_numpy(x)).float().numpy()

        return run
    if format == "openvino":
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return lambda x: np.asarray(compiled(x)[0])
    raise ExportError(f"unknown export format {format!r}", expected=", ".join(FORMATS))


# --------------------------------------------------------------------------------------------
# Parity


def parity_batch(
    model: Model, images: Sequence[str | Path] | None, bundle_dir: Path | None
) -> tuple[np.ndarray, str]:
    """The normalised float32 batch for the parity check, and where its images came from."""
    from imgclf.data.decode import UnreadableImageError, open_image
    from imgclf.data.pipeline import image_to_tensor, normalize
    from imgclf.data.sources import collect_images

    prep = model.preprocessing
    files: list[Path] = []
    source = "files"
    if images:
        files = collect_images(list(images))
    else:
        data = str(model.info.data.get("source", ""))  # the training folder, when it was one
        if data and Path(data).is_dir():
            try:
                files, source = collect_images([data]), "training data"
            except ImgclfError:
                files = []
    if len(files) > PARITY_IMAGES:
        # Evenly spaced, so a folder sorted by class contributes every class.
        files = [files[int(i)] for i in np.linspace(0, len(files) - 1, PARITY_IMAGES)]
    tensors = []
    for file in files:
        try:
            img = open_image(file, draft_size=prep.image_size)
        except UnreadableImageError:
            continue
        tensors.append(image_to_tensor(img, prep.image_size, prep.interpolation))
    if images and not tensors:
        raise ExportError(f"none of the parity images could be read ({len(files)} tried)",
                          fix="pass readable images with --images")
    if not tensors:
        source = "generated"
        tensors = [image_to_tensor(img, prep.image_size, prep.interpolation) for img in generated_images(16)]
    batch = normalize(torch.stack(tensors), prep).contiguous()
    return np.ascontiguousarray(batch.numpy(), dtype=np.float32), source


def generated_images(count: int, *, size: int = 96, seed: int = 0) -> list[Any]:
    """Deterministic test pictures (gradients, blocks and noise) when no real images are at hand."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    out = []
    for _ in range(count):
        low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        array = low + np.outer(ramp, np.ones(size))[..., None] * (high - low)
        array = array + rng.normal(0, 20, (size, size, 3))
        x, y, w = *rng.integers(0, size // 2, 2), int(rng.integers(size // 8, size // 2))
        array[y : y + w, x : x + w] = rng.integers(0, 256, 3)
        out.append(Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)))
    return out


def check_parity(
    model: Model,
    run: Callable[[np.ndarray], np.ndarray],
    batch: np.ndarray,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    source: str = "files",
) -> ParityReport:
    """Compare `run` with the eager fp32 model on `batch` (normalised float32 N x 3 x S x S).

    Example:
        >>> check_parity(model, load_exported("m.onnx", "onnx"), batch).max_abs_diff  # doctest: +SKIP
        1.2e-07
    """
    with torch.inference_mode():
        eager_logits = model.module.float().eval()(torch.from_numpy(batch))
    # The model's own output function: softmax with the temperature, or a sigmoid per label (multi-label).
    eager = model.to_probabilities(eager_logits).numpy()
    exported = model.to_probabilities(torch.from_numpy(np.asarray(run(batch), dtype=np.float32)))
    exported_np = exported.numpy()
    if exported_np.shape != eager.shape:
        raise ExportError(f"the export returns shape {exported_np.shape}, the eager model {eager.shape}")
    diff = np.abs(exported_np - eager)
    return ParityReport(
        images=len(batch),
        image_source=source,
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        top1_agreement=float(np.mean(exported_np.argmax(1) == eager.argmax(1))),
        tolerance=tolerance,
    )


# --------------------------------------------------------------------------------------------


def _output_path(out: str | Path | None, bundle_dir: Path | None, format: str) -> Path:
    if out is not None:
        path = Path(out)
        if path.suffix.lower() != FORMATS[format]:
            raise ExportError(f"--out {str(out)!r} does not end in {FORMATS[format]}",
                              expected=f"a {format} file name like model{FORMATS[format]}")
        return path
    if bundle_dir is None:
        raise ExportError("no output path", fix="pass out= when exporting a loaded Model")
    return bundle_dir / f"model{FORMATS[format]}"


def _check_installed(format: str) -> None:
    needed = {"onnx": ["onnx", "onnxruntime"], "openvino": ["openvino"]}.get(format, [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"the {format} export needs {', '.join(missing)}, which is not installed",
                          fix="pip install 'imgclf[export]'" if format == "onnx" else f"pip install {missing[0]}")


def _artefacts(path: Path, format: str) -> list[Path]:
    return [path, path.with_suffix(".bin")] if format == "openvino" else [path]


def _sidecar(model: Model, format: str, path: Path, checks: dict[str, Any]) -> dict[str, Any]:
    """The export's description; `checks` holds how it was checked ("parity", or "int8" and its gate)."""
    size = model.preprocessing.image_size
    versions = {"imgclf": __version__, "torch": torch.__version__}
    for name in ("onnxruntime", "openvino", "nncf"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return {
        "format": format,
        "file": path.name,
        "files": [p.name for p in _artefacts(path, format)],
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32",
                  "layout": "NCHW RGB, normalised as in preprocessing"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(model.classes)], "dtype": "float32",
                   "probabilities": "sigmoid(logits); a label is present when >= its threshold"
                   if model.multilabel else "softmax(logits / temperature)"},
        "classes": model.classes,
        "temperature": model.temperature,
        **({"task": "multi-label", "thresholds": model.thresholds().tolist()} if model.multilabel else {}),
        "preprocessing": model.preprocessing.to_dict(),
        **checks,
        "source_bundle": BUNDLE_JSON,
        "backbone": asdict(model.info.backbone),
        "versions": versions,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
