"""Running a bundle's int8 model: where it lives, whether it passed its gate, and the engine that runs it.

`imgclf export BUNDLE --format openvino|onnx --int8` (see `imgclf.quantize` and `imgclf.export`)
writes the int8 model inside the bundle, so that the bundle alone is enough to find it:

    BUNDLE/int8/model.xml, model.bin, model.xml.json    (OpenVINO, quantized by NNCF)
    BUNDLE/int8/model.onnx, model.onnx.json             (ONNX, quantized by ONNX Runtime or NNCF)

The `.json` sidecar is written last and is the commit mark: it holds the gate's figures
(`int8.gate`: reference and int8 top-1 on the bundle's validation split, the drop in points, the
limit) and the SHA-256 of the `model.safetensors` it was quantized from. `Model.forward_function`
(runtimes "openvino-int8" and "onnx-int8") runs the int8 model only when the sidecar says the gate
passed and the bundle's weights are still those; otherwise a `BundleError` names the export command.

Part of the runtime layer (`imgclf.runtime`), beside `openvino` and `onnx`, whose engines it reuses.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgclf.errors import BundleError
from imgclf.files import file_sha256
from imgclf.memory import limit_heap_growth
from imgclf.progress import log
from imgclf.runtime.frozen import FrozenForward
from imgclf.runtime.onnx import onnx_session
from imgclf.runtime.openvino import OpenVINONetwork

INT8_FOLDER = "int8"  # inside the bundle folder
INT8_RUNTIMES = {"openvino-int8": "openvino", "onnx-int8": "onnx"}  # runtime name -> export format
INT8_FILES = {"openvino": "model.xml", "onnx": "model.onnx"}  # the model file of each format
SIDECAR_SUFFIX = ".json"  # the sidecar is the model file's name + this, as for every export
WEIGHTS_FILE = "model.safetensors"  # the bundle's weights (the same name as bundle.WEIGHTS_FILE)
# The int8 instructions that make int8 fast on x86 (Linux /proc/cpuinfo flag -> name people know).
INT8_FLAGS = {"avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8"}


def int8_model_path(bundle: str | Path, format: str) -> Path:
    """Where the bundle's int8 model of `format` ("openvino" or "onnx") lives.

    Example:
        >>> int8_model_path("runs/pets", "openvino").as_posix()
        'runs/pets/int8/model.xml'
    """
    return Path(bundle) / INT8_FOLDER / INT8_FILES[format]


def sidecar_path(model_file: Path) -> Path:
    """The JSON sidecar of an exported model file (`model.xml` -> `model.xml.json`)."""
    return model_file.with_name(model_file.name + SIDECAR_SUFFIX)


def export_command(bundle: str | Path, format: str) -> str:
    """The command that writes the bundle's int8 model of `format`, for error messages."""
    return f"imgclf export {bundle} --format {format} --int8"


def bundle_weights_sha256(bundle: str | Path) -> str:
    """The SHA-256 (hex) of the bundle's `model.safetensors`: what an int8 model was made from."""
    return file_sha256(Path(bundle) / WEIGHTS_FILE).hex()


def read_gated_sidecar(bundle: str | Path, format: str) -> dict[str, Any]:
    """The sidecar of the bundle's int8 model of `format`, if the model is there, passed its gate
    and was made from the bundle's current weights.

    Raises:
        BundleError: no int8 model, a refused or unreadable record, or weights that changed since;
            the message gives the export command to run.

    Example:
        >>> read_gated_sidecar("runs/pets", "openvino")["int8"]["gate"]["drop_points"]  # doctest: +SKIP
        0.2
    """
    model_file = int8_model_path(bundle, format)
    sidecar = sidecar_path(model_file)
    command = export_command(bundle, format)
    if not sidecar.is_file() or not model_file.is_file():
        raise BundleError(f"the bundle {str(bundle)!r} has no {format} int8 model ({model_file} is missing)",
                          fix=f"run `{command}`; it quantizes the model and checks its accuracy first")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        gate = meta["int8"]["gate"]
        passed, made_from = bool(gate["passed"]), str(meta["int8"]["bundle_weights_sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{sidecar} is not a readable int8 record ({type(exc).__name__}: {exc})",
                          fix=f"run `{command}` again") from None
    if not passed:
        raise BundleError(f"the {format} int8 model in {str(bundle)!r} did not pass its accuracy gate "
                          f"(drop {gate.get('drop_points')} points, limit {gate.get('max_drop_points')})",
                          fix=f"run `{command} --accuracy-aware`, or keep the default runtime")
    if made_from != bundle_weights_sha256(bundle):
        raise BundleError(f"the {format} int8 model in {str(bundle)!r} was made from other weights than the "
                          f"bundle's {WEIGHTS_FILE} (the bundle was re-trained since)",
                          fix=f"run `{command}` again")
    return meta


@cache
def cpu_int8_flags() -> dict[str, bool]:
    """Which int8 dot-product instructions this CPU has ({"AVX512-VNNI": True, ...}); {} where
    /proc/cpuinfo cannot tell (not Linux, or not x86).

    Example:
        >>> sorted(cpu_int8_flags())  # doctest: +SKIP
        ['AMX-INT8', 'AVX-VNNI', 'AVX512-VNNI']
    """
    try:
        return int8_flags(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return {}


def int8_flags(cpuinfo: str) -> dict[str, bool]:
    """`cpu_int8_flags` for the text of a /proc/cpuinfo.

    Example:
        >>> int8_flags("flags : fpu avx2 avx512_vnni avx512_bf16")
        {'AVX512-VNNI': True, 'AVX-VNNI': False, 'AMX-INT8': False}
    """
    text = cpuinfo
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):  # every core lists the same flags: the first line is enough
            flags = set(line.partition(":")[2].split())
            break
    if not flags:
        return {}
    return {name: flag in flags for flag, name in INT8_FLAGS.items()}


def describe_int8_hardware() -> str:
    """One line for the log: which int8 instructions this CPU has.

    Example:
        >>> describe_int8_hardware()  # doctest: +SKIP
        'CPU int8 instructions: AVX512-VNNI yes, AVX-VNNI no, AMX-INT8 no'
    """
    flags = cpu_int8_flags()
    if not flags:
        return "CPU int8 instructions: unknown (no /proc/cpuinfo flags to read)"
    listed = ", ".join(f"{name} {'yes' if present else 'no'}" for name, present in flags.items())
    hint = "" if any(flags.values()) else " (without them int8 runs on slower AVX2/AVX512 paths)"
    return f"CPU int8 instructions: {listed}{hint}"


class Int8Forward(FrozenForward):
    """A `FrozenForward` over an int8 model file (OpenVINO IR or ONNX) instead of a PyTorch module.

    It runs the file as it is: no gate check (use `gated_int8_forward` for a bundle's model).
    OpenVINO runs the non-quantized operations in fp32 (INFERENCE_PRECISION_HINT f32), the
    precision the gate measured them in; its uint8 `stream` path (normalisation inside the network)
    is the same as for the fp32 network. ONNX Runtime gets normalised float batches.

    Example:
        >>> forward = Int8Forward(model.module, "runs/pets/int8/model.xml", "openvino")  # doctest: +SKIP
        >>> forward(batch).shape  # doctest: +SKIP
        torch.Size([64, 10])
    """

    def __init__(self, module: nn.Module, path: str | Path, format: str) -> None:  # noqa: D107
        # FrozenForward's state, set here instead of by its __init__ (which would convert `module`).
        limit_heap_growth()
        self.module = module.eval()  # kept for callers that read it; the int8 file is what runs
        self.device = torch.device("cpu")
        self.dtype = torch.float32  # the operations left unquantized run in fp32
        self.runtime = f"{format}-int8"
        self._compiled = None
        self._openvino = None
        if format == "openvino":
            self._openvino = OpenVINONetwork.from_file(path, precision_hint="f32")
        elif format == "onnx":
            session = onnx_session(str(path))
            name = session.get_inputs()[0].name
            self._compiled = lambda array: np.asarray(session.run(None, {name: array})[0])
        else:
            raise BundleError(f"unknown int8 format {format!r}", expected=", ".join(INT8_FILES))


def gated_int8_forward(module: nn.Module, bundle: str | Path | None, runtime: str) -> Int8Forward:
    """The bundle's int8 model for `runtime` ("openvino-int8" or "onnx-int8"), if it passed its gate.

    Raises:
        BundleError: see `read_gated_sidecar`; also for a model not loaded from a bundle folder.

    Example:
        >>> forward = gated_int8_forward(model.module, "runs/pets", "openvino-int8")  # doctest: +SKIP
    """
    format = INT8_RUNTIMES[runtime]
    if bundle is None:
        raise BundleError(f"runtime {runtime!r} needs a model loaded from its bundle folder",
                          fix="load it with imgclf.load(folder)")
    int8 = read_gated_sidecar(bundle, format)["int8"]
    gate, speedup = int8["gate"], float(int8.get("speed", {}).get("speedup", 0.0))
    log(f"{runtime}: validation top-1 {gate['int8_accuracy']:.2%} against {gate['reference_accuracy']:.2%} "
        f"({gate['reference_runtime']}) when exported; {describe_int8_hardware()}")
    if 0 < speedup < 1.0:
        default = int8["speed"].get("reference_runtime", "the default runtime")
        log(f"note: when exported, int8 ran at {speedup:.2f}x the speed of {default}: it is smaller here, "
            "not faster; --runtime auto keeps the fp32/bf16 model")
    return Int8Forward(module, int8_model_path(bundle, format), format)
