"""The frozen forward: a network in eval mode run over batches as fast as this machine allows.

`FrozenForward` picks the engine (OpenVINO on a CPU where it is installed, else PyTorch with
channels_last and autocast; ONNX on request), `stream_outputs` feeds it uint8 batches, and
`run_frozen` runs it over a whole `Store` (sharded under torchrun). The probe's features, the
final scores, the report, `evaluate` and `Model.predict` all go through here.

Part of the runtime layer (`imgclf.runtime`), above data and models, below training and the bundle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from imgclf import distributed
from imgclf.data.pipeline import Preprocessing, Store, normalize
from imgclf.errors import ConfigError
from imgclf.memory import limit_heap_growth
from imgclf.progress import progress
from imgclf.runtime.device import autocast, compute_dtype
from imgclf.runtime.onnx import onnx_runner
from imgclf.runtime.openvino import OpenVINONetwork, openvino_available


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
        self._openvino: OpenVINONetwork | None = None
        if runtime == "openvino":
            self._openvino = OpenVINONetwork(self.module, image_size, self.dtype, keep=keep_converted)
        elif runtime == "onnx":
            self._compiled = onnx_runner(self.module, image_size)
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
        # N x S x S x 3 input (the network transposes it): a Store's batches are channels_last,
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


def run_frozen(
    forward: FrozenForward, store: Store, *, batch_size: int, desc: str, shard: bool = False
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Run a frozen network over every readable image of `store`.

    Returns (outputs N x D float32, labels N, positions N): `positions` are the images' places in
    `store` (unreadable images are left out, see store.failed). With `shard` under torchrun, each
    rank runs its block of the images and every rank gets all the outputs, gathered in order (a
    collective: every rank must call it).
    """
    outputs, labels, where = [], [], []
    positions = distributed.shard_range(len(store)) if shard else np.arange(len(store))
    bar = progress(total=len(positions), desc=desc)
    for indices, out in stream_outputs(forward, store.batches(positions, batch_size), store.prep):
        outputs.append(out)
        labels.append(store.labels[torch.from_numpy(indices)])
        where.append(torch.from_numpy(np.asarray(indices, dtype=np.int64)))
        bar.update(len(indices))
    bar.close()
    local = ((torch.cat(outputs), torch.cat(labels), torch.cat(where)) if outputs
             else (torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)))
    if shard:
        local = (distributed.gather_rows(local[0]), distributed.gather_rows(local[1]),
                 distributed.gather_rows(local[2]))
    return local[0], local[1], local[2].numpy()


@dataclass
class StorePredictions:
    """What a model said about every readable image of a store."""

    logits: np.ndarray  # N x C float32, before any temperature
    labels: np.ndarray  # N int64 true labels
    positions: np.ndarray  # N int64 positions in store.images, to find the image again
    mirrored_logits: np.ndarray | None = None  # N x C logits of the mirrored images (TTA only)
