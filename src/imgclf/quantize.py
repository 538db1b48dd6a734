"""Post-training int8 quantization with an accuracy gate (issue 20).

int8 makes a CNN about 4x smaller, and faster on CPUs with int8 dot-product instructions
(AVX512-VNNI, AVX-VNNI, AMX-INT8), but it can also break a model (EfficientNet-B0 fell from 67.1% to
38.9% top-1 in one compiler's table). So nothing is kept unmeasured:

1. **Calibration**: a few hundred of the bundle's own training images (the training split of the
   data it was trained on, `calibration_images`, seeded), or the images of `calibration`.
2. **Quantization**, by the maintained tool of each format: NNCF's `nncf.quantize` for OpenVINO,
   ONNX Runtime's `quantize_static` (QDQ, per-channel int8 weights, uint8 activations) for ONNX.
   With `accuracy_aware`, NNCF's `quantize_with_accuracy_control` for either: it puts back in
   floating point the layers that cost the most accuracy until the drop is within the limit.
3. **The gate**: top-1 on the bundle's validation split (the same images training held out: same
   data, `val_fraction` and seed), int8 against the fp32 model (OpenVINO fp32, the eager model's
   answers to ~1e-6). Not against bf16: bf16 flips a few borderline answers either way (lite0 on
   CIFAR-10: 97.8% agreement with fp32), and NNCF's accuracy control measures against fp32, so a
   bf16 reference made `--accuracy-aware` stop short of what the gate then asked. If the drop is
   over `max_drop` points, a `GateError` gives both figures and the next step (`--accuracy-aware`).
4. **Speed**: int8 is timed against the runtime `predict` uses by default (OpenVINO bf16 where the
   CPU runs bf16 natively, else fp32) on the same images; where int8 is not faster the log says so
   (the default runtime stays that one either way; int8 runs only when asked for).

Writing the files (inside the bundle, see `imgclf.runtime.int8`) is `imgclf.export`'s job: this
module works in a folder it is given and leaves nothing in place.

The layer "explain | quantize | review": above evaluation and the bundle, below export and serve.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgclf.bundle import Model
from imgclf.data.dataset import ImageSet
from imgclf.data.pipeline import ImageStore, normalize
from imgclf.data.sources import collect_images, load_dataset
from imgclf.errors import DataError, ExportError
from imgclf.progress import log
from imgclf.runtime import FrozenForward, run_frozen, stream_outputs
from imgclf.runtime.int8 import INT8_FILES, Int8Forward, cpu_int8_flags, describe_int8_hardware

DEFAULT_MAX_DROP = 1.0  # points of top-1 the int8 model may lose on the validation split
CALIBRATION_IMAGES = 300  # NNCF's default subset size; more barely moves the ranges of a CNN
TIMING_IMAGES = 256  # images each runtime is timed on (the validation images, cycled), batch 64
FASTER_ENOUGH = 1.1  # int8 must run at least this many times the reference's images/s to count as faster
METHODS = {
    ("openvino", False): "NNCF post-training quantization (nncf.quantize)",
    ("onnx", False): "ONNX Runtime static quantization (quantize_static, QDQ, per-channel)",
    ("openvino", True): "NNCF accuracy-aware quantization (nncf.quantize_with_accuracy_control)",
    ("onnx", True): "NNCF accuracy-aware quantization (nncf.quantize_with_accuracy_control)",
}
NEEDED = {"openvino": ["nncf", "openvino"], "onnx": ["onnx", "onnxruntime"]}


@dataclass
class GateReport:
    """Top-1 of the int8 model against the reference runtime, on the same validation images."""

    reference_runtime: str  # the fp32 model, e.g. "openvino (fp32)"
    reference_accuracy: float  # 0..1
    int8_accuracy: float  # 0..1
    top1_agreement: float  # share of images where int8 and the reference give the same label
    validation_images: int
    validation_source: str
    max_drop_points: float
    method: str

    @property
    def drop_points(self) -> float:
        """Top-1 lost, in percentage points (negative when int8 scored higher)."""
        return round(100.0 * (self.reference_accuracy - self.int8_accuracy), 4)

    @property
    def passed(self) -> bool:
        return self.drop_points <= self.max_drop_points

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drop_points": self.drop_points, "passed": self.passed}


@dataclass
class SpeedReport:
    """Frozen-forward images/s of both runtimes on the same images, on this machine."""

    reference_images_per_second: float
    int8_images_per_second: float
    images: int
    batch_size: int
    cpu_int8_instructions: dict[str, bool] = field(default_factory=dict)
    reference_runtime: str = ""  # what predict runs by default, e.g. "openvino (bf16)"

    @property
    def speedup(self) -> float:
        return self.int8_images_per_second / max(self.reference_images_per_second, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": round(self.speedup, 3)}


@dataclass
class GateData:
    """The decoded images quantization needs: calibration (labels unused) and validation."""

    calibration: ImageStore
    calibration_source: str
    validation: ImageStore
    validation_source: str


@dataclass
class Quantized:
    """An int8 model that passed its gate, written in a working folder (not yet in place)."""

    format: str
    path: Path  # the model file (OpenVINO: the .xml, with its .bin beside it)
    files: list[Path]
    gate: GateReport
    speed: SpeedReport
    calibration: dict[str, Any]  # source and image count
    fp32_bytes: int  # the same network in fp32, same format
    int8_bytes: int


class GateError(ExportError):
    """The int8 model lost more top-1 than allowed; `report` holds the figures."""

    def __init__(self, report: GateReport, *, bundle: str) -> None:
        self.report = report
        r = report
        accuracy_aware = r.method.startswith("NNCF accuracy-aware")
        fix = (f"keep the fp32/bf16 model, or accept the loss with --max-drop {max(r.drop_points, 0) + 0.5:.1f}"
               if accuracy_aware else
               "run the same command with --accuracy-aware (NNCF's quantize_with_accuracy_control keeps the "
               "layers that cost accuracy in floating point), or keep the fp32/bf16 model")
        super().__init__(
            f"int8 refused: top-1 on {r.validation_images} validation images went from "
            f"{r.reference_accuracy:.2%} ({r.reference_runtime}) to {r.int8_accuracy:.2%} (int8, {r.method}), "
            f"a drop of {r.drop_points:.2f} points; nothing was written for {bundle!r}",
            expected=f"a drop of at most {r.max_drop_points:g} points (--max-drop)",
            fix=fix,
        )


# --------------------------------------------------------------------------------------------
# The images: calibration and validation


def gate_data(model: Model, *, calibration: str | None = None, calibration_images: int = CALIBRATION_IMAGES,
              seed: int = 0) -> GateData:
    """Decode the calibration images and the bundle's validation split.

    Args:
        model: the bundle; its `imgclf.json` names the training data, `val_fraction` and seed.
        calibration: other images to calibrate on (DATA as `imgclf train` takes it, or a folder of
            images); default the bundle's training split.
        calibration_images: how many to use at most (a seeded random subset).
        seed: the subset's seed.

    Raises:
        ExportError: the training data is gone or has other classes; no calibration images.

    Example:
        >>> data = gate_data(imgclf.load("runs/pets"))  # doctest: +SKIP
        >>> len(data.calibration), len(data.validation)  # doctest: +SKIP
        (300, 120)
    """
    if calibration_images < 1:
        raise ExportError(f"calibration_images must be at least 1, got {calibration_images}")
    info = model.info
    source = info.data_source
    if not source:
        raise ExportError("the bundle does not say which data it was trained on, so the gate has no validation split",
                          fix="re-train the bundle with this imgclf version")
    try:
        dataset = load_dataset(source, val_fraction=float(info.config.get("val_fraction", 0.1)),
                               seed=int(info.config.get("seed", 0)))
    except DataError as exc:
        raise ExportError(f"the bundle's training data {source!r} cannot be read: {exc.what}",
                          fix="put the data back where the bundle was trained from: the gate measures top-1 "
                              "on its validation split") from None
    if dataset.classes != model.classes:
        raise ExportError(f"the data at {source!r} now has other classes than the bundle",
                          expected=f"the bundle's classes: {', '.join(model.classes[:20])}",
                          fix="restore the data the bundle was trained on")
    calibration_set, calibration_source = dataset.train, f"{source} (training split)"
    if calibration is not None:
        calibration_set, calibration_source = _calibration_set(calibration), calibration
    if len(calibration_set) > calibration_images:
        rng = np.random.default_rng(seed)
        calibration_set = calibration_set.subset(np.sort(rng.choice(len(calibration_set), calibration_images,
                                                                    replace=False)))
    prep = model.preprocessing
    calibration_store = ImageStore.decode(calibration_set, prep, memory_budget=2**30, description="calibration")
    validation_store = ImageStore.decode(dataset.val, prep, memory_budget=2**30, description="validation")
    if len(calibration_store) == 0 or len(validation_store) == 0:
        raise ExportError(f"no readable {'calibration' if len(calibration_store) == 0 else 'validation'} images",
                          fix="check the data with `imgclf check DATA`")
    return GateData(calibration_store, calibration_source, validation_store, f"{source} (validation split)")


def _calibration_set(data: str) -> ImageSet:
    """`--calibration DATA`: the training images of a dataset (train and the share a run would hold out
    for validation; never test), else every image under a path. Labels are not used."""
    try:
        dataset = load_dataset(data)
    except DataError:
        dataset = None  # not a labelled dataset: a plain folder (or list) of images is enough to calibrate
    if dataset is not None:
        train, val = dataset.train, dataset.val
        arrays = None if train.arrays is None or val.arrays is None else np.concatenate([train.arrays, val.arrays])
        return ImageSet(paths=train.paths + val.paths, labels=np.concatenate([train.labels, val.labels]),
                        arrays=arrays)
    files = collect_images([data])
    if not files:
        raise ExportError(f"no images in --calibration {data!r}", expected="a folder of images, or DATA")
    return ImageSet(paths=[str(f) for f in files], labels=np.zeros(len(files), dtype=np.int64))


def _normalized_images(store: ImageStore) -> Iterator[np.ndarray]:
    """Each image of `store` as a normalised float32 1 x 3 x S x S array (NNCF's and ORT's input)."""
    for _, batch in store.batches(np.arange(len(store)), 16):
        for image in normalize(batch, store.prep).numpy():
            yield np.ascontiguousarray(image[None], dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Quantize, then gate


def quantize_model(model: Model, format: str, data: GateData, workdir: Path, *,
                   max_drop: float = DEFAULT_MAX_DROP, accuracy_aware: bool = False,
                   bundle_name: str = "the bundle") -> Quantized:
    """Quantize `model` to int8 in `format` ("openvino" or "onnx") inside `workdir`, then gate it.

    Raises:
        GateError: top-1 on the validation split dropped by more than `max_drop` points.
        ExportError: unknown format, or a library missing.

    Example:
        >>> model = imgclf.load("runs/pets")  # doctest: +SKIP
        >>> q = quantize_model(model, "openvino", gate_data(model), Path("/tmp/work"))  # doctest: +SKIP
        >>> q.gate.drop_points, round(q.speed.speedup, 1)  # doctest: +SKIP
        (0.3, 1.6)
    """
    check_installed(format)
    log(describe_int8_hardware())
    method = METHODS[(format, accuracy_aware)]
    log(f"quantizing to int8 ({method}) on {len(data.calibration)} calibration images from {data.calibration_source}")
    started = time.perf_counter()
    quantize = _quantize_openvino if format == "openvino" else _quantize_onnx
    # NNCF draws its progress bars on stdout; they go to stderr with imgclf's, so stdout keeps only results.
    with contextlib.redirect_stdout(sys.stderr):
        path, fp32_bytes = quantize(model, data, workdir, accuracy_aware=accuracy_aware, max_drop=max_drop)
    log(f"quantized in {time.perf_counter() - started:.1f} s; measuring top-1 on {len(data.validation)} "
        "validation images")
    # Accuracy against the trained model's own answers (fp32; NNCF's accuracy control measures
    # against fp32 too), speed against what predict runs by default (bf16 where the CPU has it).
    reference = model.forward_function("auto", "fp32")
    int8 = Int8Forward(model.module, path, format)
    ref_top1, int8_top1 = _top1(reference, data.validation), _top1(int8, data.validation)
    labels = data.validation.labels.numpy()
    gate = GateReport(
        reference_runtime=_describe_runtime(reference), reference_accuracy=float(np.mean(ref_top1 == labels)),
        int8_accuracy=float(np.mean(int8_top1 == labels)), top1_agreement=float(np.mean(ref_top1 == int8_top1)),
        validation_images=len(labels), validation_source=data.validation_source, max_drop_points=max_drop,
        method=method)
    log(f"gate: top-1 {gate.reference_accuracy:.2%} ({gate.reference_runtime}) -> {gate.int8_accuracy:.2%} "
        f"(int8): drop {gate.drop_points:.2f} points, limit {max_drop:g}: {'passed' if gate.passed else 'REFUSED'}")
    if 100.0 / len(labels) > max(max_drop, 0.0):
        log(f"note: with {len(labels)} validation images one image is {100.0 / len(labels):.2f} points, more than "
            f"--max-drop {max_drop:g}: the gate passes only if int8 gets at least as many right")
    if not gate.passed:
        raise GateError(gate, bundle=bundle_name)
    default = model.forward_function("auto")
    speed = SpeedReport(_images_per_second(default, data.validation), _images_per_second(int8, data.validation),
                        images=TIMING_IMAGES, batch_size=64, cpu_int8_instructions=cpu_int8_flags(),
                        reference_runtime=_describe_runtime(default))
    _log_speed(speed, speed.reference_runtime)
    files = [path, path.with_suffix(".bin")] if format == "openvino" else [path]
    return Quantized(format=format, path=path, files=files, gate=gate, speed=speed,
                     calibration={"source": data.calibration_source, "images": len(data.calibration)},
                     fp32_bytes=fp32_bytes, int8_bytes=sum(f.stat().st_size for f in files))


def check_installed(format: str) -> None:
    """Raise `ExportError` naming the pip command when `format`'s int8 tools are missing."""
    if format not in INT8_FILES:
        raise ExportError(f"int8 export is not available for {format!r}", expected=", ".join(INT8_FILES))
    missing = [name for name in NEEDED[format] if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"int8 {format} export needs {', '.join(missing)}, which is not installed",
                          fix="pip install 'imgclf[int8]'")


def _top1(forward: FrozenForward, store: ImageStore) -> np.ndarray:
    logits, _, positions = run_frozen(forward, store, batch_size=64, desc="gate")
    top1 = np.empty(len(store), dtype=np.int64)
    top1[positions] = logits.argmax(1).numpy()
    return top1


def _images_per_second(forward: FrozenForward, store: ImageStore) -> float:
    """Frozen-forward images/s on `TIMING_IMAGES` of `store`'s images (cycled), after one warm-up batch."""
    order = np.resize(np.arange(len(store)), TIMING_IMAGES)
    for _ in stream_outputs(forward, store.batches(order[:64], 64), store.prep):
        pass  # compiles the uint8-input network and fills the caches
    start = time.perf_counter()
    for _ in stream_outputs(forward, store.batches(order, 64), store.prep):
        pass
    return TIMING_IMAGES / (time.perf_counter() - start)


def _describe_runtime(forward: FrozenForward) -> str:
    precision = "bf16" if forward.dtype == torch.bfloat16 else "fp32"
    return f"{forward.runtime} ({precision})"


def _log_speed(speed: SpeedReport, reference: str) -> None:
    figures = (f"{speed.int8_images_per_second:.0f} img/s int8 vs {speed.reference_images_per_second:.0f} "
               f"({reference}), {speed.speedup:.2f}x")
    if speed.speedup >= FASTER_ENOUGH:
        log(f"int8 speed: {figures}")
        return
    why = ("" if any(speed.cpu_int8_instructions.values())
           else "; this CPU has no VNNI or AMX int8 instructions")
    log(f"note: int8 is not faster here ({figures}{why}); the default runtime stays {reference}, "
        "int8 runs only with --runtime openvino-int8/onnx-int8 (its file is still about 4x smaller)")


# --------------------------------------------------------------------------------------------
# The quantizers


def _quiet_nncf() -> Any:
    """Import NNCF with its log at warnings; its torch backend's "No CUDA runtime" notice silenced."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import nncf

    # The logger's level only: nncf.set_log_level also sets the level of every handler attached to
    # it, which may be an application's (or pytest's) shared handler.
    logging.getLogger("nncf").setLevel(logging.WARNING)
    return nncf


def _quantize_openvino(model: Model, data: GateData, workdir: Path, *, accuracy_aware: bool,
                       max_drop: float) -> tuple[Path, int]:
    """NNCF on the OpenVINO conversion of the model; returns (the .xml in `workdir`, fp32 bytes)."""
    import openvino as ov

    from imgclf.runtime.openvino import converted_network

    nncf = _quiet_nncf()
    network = converted_network(model.module.float().eval(), model.preprocessing.image_size, keep=True)
    fp32 = workdir / "fp32.xml"
    ov.save_model(network, str(fp32), compress_to_fp16=False)  # only to know the fp32 file size
    fp32_bytes = fp32.stat().st_size + fp32.with_suffix(".bin").stat().st_size
    fp32.unlink()
    fp32.with_suffix(".bin").unlink()
    if accuracy_aware:
        quantized = _accuracy_aware(nncf, network, data, max_drop, _openvino_top1)
    else:
        calibration = nncf.Dataset(list(_normalized_images(data.calibration)))
        quantized = nncf.quantize(network, calibration, subset_size=len(data.calibration),
                                  target_device=nncf.TargetDevice.CPU)
    path = workdir / INT8_FILES["openvino"]
    ov.save_model(quantized, str(path), compress_to_fp16=False)
    return path, fp32_bytes


def _quantize_onnx(model: Model, data: GateData, workdir: Path, *, accuracy_aware: bool,
                   max_drop: float) -> tuple[Path, int]:
    """ONNX Runtime static quantization (or NNCF accuracy-aware) of the model's ONNX export."""
    from imgclf.runtime.onnx import module_to_onnx

    fp32 = workdir / "fp32.onnx"
    module_to_onnx(model.module.float().eval(), model.preprocessing.image_size, fp32)
    fp32_bytes = fp32.stat().st_size
    path = workdir / INT8_FILES["onnx"]
    try:
        if accuracy_aware:
            import onnx

            from imgclf.runtime.onnx import INPUT_NAME

            quantized = _accuracy_aware(_quiet_nncf(), onnx.load(str(fp32)), data, max_drop, _onnx_top1,
                                        feed=lambda image: {INPUT_NAME: image})
            onnx.save(quantized, str(path))
        else:
            _onnxruntime_static(fp32, path, data.calibration, workdir)
    finally:
        fp32.unlink(missing_ok=True)
    return path, fp32_bytes


def _onnxruntime_static(fp32: Path, path: Path, calibration: ImageStore, workdir: Path) -> None:
    """`onnxruntime.quantization.quantize_static`: QDQ, int8 weights per channel, uint8 activations (MinMax).

    Without VNNI, x86 int8 kernels can saturate on u8 x s8 products, so ONNX Runtime's documented
    remedy, 7-bit weights (`reduce_range`), is used there; with VNNI the full 8 bits are kept.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = workdir / "prepared.onnx"
    quant_pre_process(str(fp32), str(prepared))  # shape inference and graph fusions, as ORT recommends
    vnni = any(cpu_int8_flags().values())
    try:
        quantize_static(str(prepared), str(path), _CalibrationReader(_normalized_images(calibration)),
                        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=not vnni,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)


class _CalibrationReader:
    """ONNX Runtime's CalibrationDataReader protocol (a `get_next` returning feeds, then None)."""

    def __init__(self, images: Iterable[np.ndarray]) -> None:
        from imgclf.runtime.onnx import INPUT_NAME

        self._feeds = ({INPUT_NAME: image} for image in images)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _accuracy_aware(nncf: Any, network: Any, data: GateData, max_drop: float,
                    top1: Callable[[Any, Iterable[Any]], tuple[float, list[float]]],
                    feed: Callable[[np.ndarray], Any] | None = None) -> Any:
    """NNCF's `quantize_with_accuracy_control` with top-1 on the validation images as the metric.

    `feed` turns an image into the model's input (NNCF's ONNX backend wants {input name: array}).
    """
    validation = data.validation
    items = [(image, int(label)) for image, label in zip(_normalized_images(validation),
                                                         validation.labels.tolist(), strict=True)]
    calibration = nncf.Dataset(list(_normalized_images(data.calibration)), feed)
    return nncf.quantize_with_accuracy_control(
        network, calibration, nncf.Dataset(items), validation_fn=top1,
        max_drop=max_drop / 100.0, drop_type=nncf.DropType.ABSOLUTE,  # NNCF's metric is 0..1, ours points
        subset_size=len(data.calibration), target_device=nncf.TargetDevice.CPU)


def _openvino_top1(compiled: Any, items: Iterable[tuple[np.ndarray, int]]) -> tuple[float, list[float]]:
    """NNCF's validation_fn for OpenVINO: (top-1, one 0/1 per item) of a compiled model."""
    hits = [float(np.argmax(compiled(image)[0]) == label) for image, label in items]
    return float(np.mean(hits)) if hits else 0.0, hits


def _onnx_top1(model: Any, items: Iterable[tuple[np.ndarray, int]]) -> tuple[float, list[float]]:
    """NNCF's validation_fn for ONNX: the same, through an ONNX Runtime session of the ModelProto."""
    from imgclf.runtime.onnx import onnx_session

    session = onnx_session(model.SerializeToString())
    name = session.get_inputs()[0].name
    hits = [float(np.argmax(session.run(None, {name: image})[0]) == label) for image, label in items]
    return float(np.mean(hits)) if hits else 0.0, hits
