"""Devices, precision and the fast frozen-forward path.

bf16 is used only where the hardware runs it natively (AMX or AVX512-BF16 on CPUs, and GPUs with
bf16 support): on a CPU without it, bf16 autocast is ~10x *slower* than fp32 (measured on an AMD
EPYC with AVX2: lite0 at 160 px, 46 img/s fp32 vs 5 img/s bf16).

For a frozen network on a CPU (probe features, evaluation, prediction) OpenVINO is used when it is
installed: on that same machine it ran lite0 at 208 img/s against PyTorch's 44 (see BENCHMARKS.md).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import hashlib
import platform
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgclf.data.pipeline import Preprocessing, normalize
from imgclf.distributed import openvino_properties
from imgclf.errors import ConfigError
from imgclf.files import TEMP_PREFIX, cache_dir, move_into_place, weights_digest


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
    run there (fp32, or bf16 where the CPU has it natively and precision allows), in throughput
    mode: several streams, each batch split across them. Otherwise it runs in PyTorch with
    channels_last and autocast. `runtime="onnx"` converts it to ONNX in memory and runs it in
    onnxruntime (fp32).

    Call it on normalised float batches, or use `stream` on uint8 batches: on OpenVINO the
    normalisation then runs inside the compiled network, whole batches go to the streams, and the
    next batch is decoded while they run (BENCHMARKS.md, "Probe speed").

    Example:
        >>> forward = FrozenForward(model, image_size=160)  # doctest: +SKIP
        >>> features = forward(batch)  # doctest: +SKIP
        >>> for indices, out in forward.stream(store.batches(order, 64), store.prep): ...  # doctest: +SKIP
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        image_size: int,
        device: torch.device | None = None,
        precision: str = "auto",
        runtime: str = "auto",
        keep_converted: bool = False,
    ) -> None:
        """`keep_converted`: store the OpenVINO conversion on disk for later runs (for weights
        that will be used again: a bundle's, a pretrained backbone's; not a network in training)."""
        limit_heap_growth()
        self.module = module.eval()
        self.device = device or torch.device("cpu")
        self.dtype = compute_dtype(self.device, precision)
        if runtime == "auto":
            runtime = "openvino" if self.device.type == "cpu" and openvino_available() else "torch"
        self.runtime = runtime
        self._compiled: Callable[[np.ndarray], Any] | None = None
        self._openvino: _OpenVINONetwork | None = None
        if runtime == "openvino":
            self._openvino = _OpenVINONetwork(self.module, image_size, self.dtype, keep=keep_converted)
        elif runtime == "onnx":
            self._compiled = _onnx_runner(self.module, image_size)
        elif runtime != "torch":
            raise ConfigError(f"unknown runtime {runtime!r}", expected="auto, torch, onnx or openvino")
        else:
            self.module.to(self.device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalised float N x 3 x S x S -> float32 outputs on the CPU."""
        # OpenVINO compiles its float-input network on the first call (`stream` needs only the uint8 one).
        compiled = self._openvino.runner(None) if self._openvino is not None else self._compiled
        if compiled is not None:
            array = np.ascontiguousarray(batch.float().numpy())
            return torch.from_numpy(np.asarray(compiled(array), dtype=np.float32))
        with torch.inference_mode(), autocast(self.device, self.dtype):
            x = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            return self.module(x).float().cpu()

    def stream(
        self, batches: Iterable[tuple[np.ndarray, torch.Tensor]], prep: Preprocessing
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(indices, uint8 N x 3 x S x S images) batches -> (indices, float32 outputs), in order."""
        if self._openvino is None:
            for indices, batch in batches:
                yield indices, self(normalize(batch, prep))
            return
        # N x S x S x 3 input (the network transposes it): ImageStore's batches are channels_last,
        # so their memory goes in as it is; other batches are copied into that layout.
        runner = self._openvino.runner(prep)
        arrays = ((indices, np.ascontiguousarray(batch.contiguous(memory_format=torch.channels_last)
                                                 .permute(0, 2, 3, 1).numpy()))  # no copy when channels_last
                  for indices, batch in batches)
        for indices, out in runner.pipelined(arrays):
            yield indices, torch.from_numpy(out)


def stream_outputs(
    forward: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[np.ndarray, torch.Tensor]],
    prep: Preprocessing,
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """`forward.stream(batches, prep)` where `forward` has it, else `forward(normalize(batch))` per batch.

    Example:
        >>> for indices, features in stream_outputs(forward, store.batches(order, 64), store.prep):
        ...     pass  # doctest: +SKIP
    """
    stream = getattr(forward, "stream", None)
    if stream is not None:
        yield from stream(batches, prep)
        return
    for indices, batch in batches:
        yield indices, forward(normalize(batch, prep))


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
# Above one decoded image (160 px: 77 KB) and below one batch (64 x 3 x 64 x 64: 786 KB). At 64 KiB
# every image buffer was mmapped and unmapped, with page faults and, with decode threads, TLB
# shootdowns: decoding CIFAR-10 at 160 px took 1.39 ms of CPU per image against 0.83 ms at 256 KiB,
# and memory grew the same 16 MB (the features) per 3,200 images either way (2026-11-27).
MMAP_THRESHOLD = 256 * 1024


@cache
def limit_heap_growth() -> None:
    """On glibc, serve allocations of `MMAP_THRESHOLD` and more with mmap, so freed batch buffers
    go back to the OS at once.

    glibc raises its mmap threshold after the first large frees and then serves batch-sized
    buffers from its heaps. In a streaming frozen pass (buffers allocated by decode threads, freed
    by the main thread) the heaps kept growing: 0.8 MB per image at 160 px, a 15.6 GB peak for a
    CIFAR-10 probe over 60,000 images; flat at ~1.3 GB with this setting (2026-11-27).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc after all: nothing to tune
        return


def _converted_network(module: nn.Module, image_size: int, *, keep: bool) -> Any:
    """`module` as an OpenVINO model taking N x 3 x S x S; with `keep`, converted once and kept on disk.

    Converting traces the network through PyTorch (~4 s for lite0, far more for VGG19), and
    `imgclf predict`, `serve` and every probe paid it on each start. With `keep` the converted
    model is stored in `$IMGCLF_CACHE/openvino/<key>.xml` (+ `.bin`, the fp32 weights), keyed by the
    weights' bytes, the module's structure, the input size and the library versions; a later run
    reads it back. Unreadable or unwritable files only cost the conversion.
    """
    import openvino as ov

    from imgclf.progress import log

    xml = _converted_path(module, image_size) if keep else None
    if xml is not None and xml.is_file() and xml.with_suffix(".bin").is_file():
        try:
            return ov.Core().read_model(str(xml))
        except Exception as exc:  # truncated or foreign: convert again, and replace it
            log(f"warning: ignoring the unreadable converted network {xml} ({type(exc).__name__}: {exc})")
    example = torch.zeros(1, 3, image_size, image_size)
    with torch.no_grad(), warnings.catch_warnings():
        # OpenVINO traces through torch.jit, which warns that it is deprecated.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        model = ov.convert_model(module, example_input=example)
    model.reshape({0: ov.PartialShape([-1, 3, image_size, image_size])})
    if xml is None:
        return model
    try:
        xml.parent.mkdir(parents=True, exist_ok=True)
        # save_model writes the pair; staged in a temporary folder, each file is moved into place.
        # Not flushed to disk: a pair lost in a crash is only converted again.
        with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX, dir=xml.parent) as folder:
            staged = Path(folder) / xml.name
            ov.save_model(model, str(staged), compress_to_fp16=False)
            move_into_place(staged.with_suffix(".bin"), xml.with_suffix(".bin"), durable=False)
            move_into_place(staged, xml, durable=False)  # the .xml last: where it exists, its .bin is whole
    except Exception as exc:  # a full or read-only disk: the run goes on without the file
        log(f"warning: could not keep the converted network in {xml.parent} ({exc})")
    return model


def _converted_path(module: nn.Module, image_size: int) -> Path:
    """Where `_converted_network` keeps `module` converted for `image_size`."""
    import openvino as ov

    from imgclf import __version__

    versions = f"imgclf {__version__}, openvino {ov.get_version()}, torch {torch.__version__}"
    key = hashlib.blake2b(f"{versions}|{image_size}|{weights_digest(module)}|{module!r}".encode(), digest_size=16)
    return cache_dir() / "openvino" / f"{key.hexdigest()}.xml"


class _OpenVINONetwork:
    """A module converted to OpenVINO once, compiled per input kind: normalised float, or uint8
    with one `Preprocessing`'s normalisation built into the network."""

    def __init__(self, module: nn.Module, image_size: int, dtype: torch.dtype, *, keep: bool) -> None:
        self.model = _converted_network(module, image_size, keep=keep)
        # Throughput mode: 1.2x the latency mode's images/s for lite0 at 160 px on 2 cores (2
        # streams of 1 thread: depthwise convolutions parallelise poorly within one stream).
        # Under torchrun: this process's share of the cores (see imgclf.distributed).
        self.properties = {"INFERENCE_PRECISION_HINT": "bf16" if dtype == torch.bfloat16 else "f32",
                           "PERFORMANCE_HINT": "THROUGHPUT", **openvino_properties()}
        self._runners: dict[Any, _OpenVINORunner] = {}

    def runner(self, prep: Preprocessing | None) -> _OpenVINORunner:
        """The compiled network for normalised float N x 3 x S x S input (`prep` None), or for
        uint8 N x S x S x 3 input under `prep` (the network transposes and normalises it)."""
        import openvino as ov

        key = None if prep is None else (prep.mean, prep.std)
        if key not in self._runners:
            model = self.model
            if prep is not None:
                from openvino.preprocess import PrePostProcessor

                steps = PrePostProcessor(self.model.clone())
                steps.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
                steps.input().model().set_layout(ov.Layout("NCHW"))
                steps.input().preprocess().convert_element_type(ov.Type.f32) \
                    .mean([255.0 * m for m in prep.mean]).scale([255.0 * s for s in prep.std])
                model = steps.build()
            self._runners[key] = _OpenVINORunner(ov.Core().compile_model(model, "CPU", self.properties))
        return self._runners[key]


class _OpenVINORunner:
    """A compiled network's infer requests, one per stream, reused; each output is copied out.

    Calling the compiled model directly (`compiled(array)`) grew memory by about one input batch
    per call in a long streaming run (0.35 MB per image at 160 px: 60,000 CIFAR images ran a
    24 GB machine out of memory); explicit, reused requests stay flat.
    """

    def __init__(self, compiled: Any) -> None:
        try:
            count = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        except Exception:  # an OpenVINO without the property: one request
            count = 1
        self.requests = [compiled.create_infer_request() for _ in range(max(1, count))]

    def __call__(self, array: np.ndarray) -> np.ndarray:
        """One batch, split across the streams; returns when all of it is done."""
        parts = np.array_split(array, min(len(self.requests), max(1, len(array))))
        for request, part in zip(self.requests, parts, strict=False):
            request.start_async({0: part})  # the input is copied into the request
        outputs = []
        for request in self.requests[: len(parts)]:
            request.wait()
            outputs.append(request.get_output_tensor(0).data.copy())
        return np.concatenate(outputs)

    def pipelined(self, arrays: Iterable[tuple[Any, np.ndarray]]) -> Iterator[tuple[Any, np.ndarray]]:
        """Whole batches, one per stream at a time, the next prepared while they run; in order."""
        free = list(reversed(self.requests))
        running: collections.deque[tuple[Any, Any]] = collections.deque()
        for tag, array in arrays:
            if not free:
                request, done = running.popleft()
                request.wait()
                yield done, request.get_output_tensor(0).data.copy()
                free.append(request)
            request = free.pop()
            request.start_async({0: array})  # the input is copied into the request
            running.append((request, tag))
        while running:
            request, done = running.popleft()
            request.wait()
            yield done, request.get_output_tensor(0).data.copy()


def _onnx_runner(module: nn.Module, image_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """Convert `module` to ONNX in memory; returns a function from input to first output."""
    from imgclf.export import module_to_onnx, onnx_session

    with tempfile.TemporaryDirectory(prefix="imgclf-onnx-") as folder:
        path = Path(folder) / "model.onnx"
        module_to_onnx(module, image_size, path)
        session = onnx_session(path.read_bytes())
    name = session.get_inputs()[0].name
    return lambda array: session.run(None, {name: array})[0]
