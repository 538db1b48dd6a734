"""Devices, precision and the fast frozen-forward path.

bf16 is used only where the hardware runs it natively (AMX or AVX512-BF16 on CPUs, and GPUs with
bf16 support): on a CPU without it, bf16 autocast is ~10x *slower* than fp32 (measured on an AMD
EPYC with AVX2: lite0 at 160 px, 46 img/s fp32 vs 5 img/s bf16).

For a frozen network on a CPU (probe features, evaluation, prediction) OpenVINO is used when it is
installed: on that same machine it ran lite0 at 208 img/s against PyTorch's 44 (see BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import numpy as np
import torch
from torch import nn

from imgclf.distributed import openvino_properties
from imgclf.errors import ConfigError


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' -> the first CUDA device if there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(f"unknown device {requested!r}", expected="auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r} asked for, but CUDA is not available", fix="pass --device cpu")
    return device


@cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16 (e.g. Intel Sapphire Rapids)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability in ("AVX512_BF16", "AMX") or bool(
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        or getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    )


def compute_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The autocast dtype for `precision` ('auto', 'bf16', 'fp32') on `device`."""
    if precision == "fp32":
        return torch.float32
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = cpu_has_native_bf16()
    if precision == "bf16" or native:
        return torch.bfloat16
    return torch.float32


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except Exception:  # a broken install is as good as none
        return False
    return True


class FrozenForward:
    """Runs a frozen module (eval mode) on batches as fast as this machine allows.

    On a CPU with OpenVINO installed, the module is converted once for the given input size and
    run there (fp32, or bf16 where the CPU has it natively and precision allows). Otherwise it
    runs in PyTorch with channels_last and autocast. `runtime="onnx"` converts it to ONNX in
    memory and runs it in onnxruntime (fp32).

    Example:
        >>> forward = FrozenForward(model, image_size=160)  # doctest: +SKIP
        >>> features = forward(batch)  # doctest: +SKIP
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        image_size: int,
        device: torch.device | None = None,
        precision: str = "auto",
        runtime: str = "auto",
    ) -> None:
        self.module = module.eval()
        self.device = device or torch.device("cpu")
        self.dtype = compute_dtype(self.device, precision)
        if runtime == "auto":
            runtime = "openvino" if self.device.type == "cpu" and openvino_available() else "torch"
        self.runtime = runtime
        self._compiled: Callable[[np.ndarray], Any] | None = None
        if runtime == "openvino":
            import openvino as ov

            example = torch.zeros(1, 3, image_size, image_size)
            with torch.no_grad(), warnings.catch_warnings():
                # OpenVINO traces through torch.jit, which warns that it is deprecated.
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                ov_model = ov.convert_model(self.module, example_input=example)
            ov_model.reshape({0: ov.PartialShape([-1, 3, image_size, image_size])})
            hint = "bf16" if self.dtype == torch.bfloat16 else "f32"
            # Under torchrun: this process's share of the cores (see imgclf.distributed).
            properties = {"INFERENCE_PRECISION_HINT": hint, **openvino_properties()}
            compiled = ov.Core().compile_model(ov_model, "CPU", properties)
            self._compiled = _openvino_runner(compiled)
        elif runtime == "onnx":
            self._compiled = _onnx_runner(self.module, image_size)
        elif runtime != "torch":
            raise ConfigError(f"unknown runtime {runtime!r}", expected="auto, torch, onnx or openvino")
        else:
            self.module.to(self.device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalised float N x 3 x S x S -> float32 outputs on the CPU."""
        if self._compiled is not None:
            array = np.ascontiguousarray(batch.float().numpy())
            return torch.from_numpy(np.asarray(self._compiled(array), dtype=np.float32))
        with torch.inference_mode(), autocast(self.device, self.dtype):
            x = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            return self.module(x).float().cpu()


def _openvino_runner(compiled: Any) -> Callable[[np.ndarray], np.ndarray]:
    """One reused infer request whose output is copied out.

    Calling the compiled model directly (`compiled(array)`) grew memory by about one input batch
    per call in a long streaming run (0.35 MB per image at 160 px: 60,000 CIFAR images ran a
    24 GB machine out of memory); a single explicit request stays flat.
    """
    request = compiled.create_infer_request()

    def run(array: np.ndarray) -> np.ndarray:
        request.infer({0: array})
        return request.get_output_tensor(0).data.copy()

    return run


def _onnx_runner(module: nn.Module, image_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """Convert `module` to ONNX in memory; returns a function from input to first output."""
    import tempfile
    from pathlib import Path

    from imgclf.export import module_to_onnx, onnx_session

    with tempfile.TemporaryDirectory(prefix="imgclf-onnx-") as folder:
        path = Path(folder) / "model.onnx"
        module_to_onnx(module, image_size, path)
        session = onnx_session(path.read_bytes())
    name = session.get_inputs()[0].name
    return lambda array: session.run(None, {name: array})[0]
