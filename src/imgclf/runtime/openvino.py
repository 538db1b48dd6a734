"""The OpenVINO engine: a frozen module converted once (and kept on disk), compiled per input kind.

For a frozen network on a CPU (probe features, evaluation, prediction) OpenVINO is used when it is
installed: on an AMD EPYC with AVX2 it ran lite0 at 208 img/s against PyTorch's 44 (see
BENCHMARKS.md). `frozen.FrozenForward` picks it; nothing else imports this module.

Part of the runtime layer (`imgclf.runtime`).
"""

from __future__ import annotations

import collections
import hashlib
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgclf.data.pipeline import Preprocessing
from imgclf.distributed import openvino_properties
from imgclf.files import TEMP_PREFIX, cache_dir, move_into_place, weights_digest
from imgclf.progress import log
from imgclf.version import __version__


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except Exception:  # a broken install is as good as none
        return False
    return True


def converted_network(module: nn.Module, image_size: int, *, keep: bool) -> Any:
    """`module` as an OpenVINO model taking N x 3 x S x S; with `keep`, converted once and kept on disk.

    Converting traces the network through PyTorch (~4 s for lite0, far more for VGG19), and
    `imgclf predict`, `serve` and every probe paid it on each start. With `keep` the converted
    model is stored in `$IMGCLF_CACHE/openvino/<key>.xml` (+ `.bin`, the fp32 weights), keyed by the
    weights' bytes, the module's structure, the input size and the library versions; a later run
    reads it back. Unreadable or unwritable files only cost the conversion.
    """
    import openvino as ov

    xml = converted_path(module, image_size) if keep else None
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


def converted_path(module: nn.Module, image_size: int) -> Path:
    """Where `converted_network` keeps `module` converted for `image_size`."""
    import openvino as ov

    versions = f"imgclf {__version__}, openvino {ov.get_version()}, torch {torch.__version__}"
    key = hashlib.blake2b(f"{versions}|{image_size}|{weights_digest(module)}|{module!r}".encode(), digest_size=16)
    return cache_dir() / "openvino" / f"{key.hexdigest()}.xml"


class OpenVINONetwork:
    """A module converted to OpenVINO once, compiled per input kind: normalised float, or uint8
    with one `Preprocessing`'s normalisation built into the network."""

    def __init__(self, module: nn.Module, image_size: int, dtype: torch.dtype, *, keep: bool) -> None:
        self._setup(converted_network(module, image_size, keep=keep), "bf16" if dtype == torch.bfloat16 else "f32")

    @classmethod
    def from_file(cls, path: str | Path, *, precision_hint: str = "f32") -> OpenVINONetwork:
        """A network read from an OpenVINO IR file (`.xml` + `.bin`), such as a bundle's int8 model.

        `precision_hint` ("f32" or "bf16") is the precision of the operations the file leaves in
        floating point; quantized operations run in int8 either way.

        Example:
            >>> network = OpenVINONetwork.from_file("runs/pets/int8/model.xml")  # doctest: +SKIP
        """
        import openvino as ov

        network = cls.__new__(cls)
        network._setup(ov.Core().read_model(str(path)), precision_hint)
        return network

    def _setup(self, model: Any, precision_hint: str) -> None:
        self.model = model
        # Throughput mode: 1.2x the latency mode's images/s for lite0 at 160 px on 2 cores (2
        # streams of 1 thread: depthwise convolutions parallelise poorly within one stream).
        # Under torchrun: this process's share of the cores (see imgclf.distributed).
        self.properties = {"INFERENCE_PRECISION_HINT": precision_hint,
                           "PERFORMANCE_HINT": "THROUGHPUT", **openvino_properties()}
        self._runners: dict[Any, OpenVINORunner] = {}

    def runner(self, prep: Preprocessing | None) -> OpenVINORunner:
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
            self._runners[key] = OpenVINORunner(ov.Core().compile_model(model, "CPU", self.properties))
        return self._runners[key]


class OpenVINORunner:
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
