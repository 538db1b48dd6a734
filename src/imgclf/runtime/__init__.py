"""The runtime layer: devices and precision, and the engines that run a frozen network.

Above data and models, below training, the bundle and everything that predicts. Modules:

- `device`: `pick_device`, `compute_dtype`, `autocast`, `cpu_has_native_bf16`;
- `frozen`: `FrozenForward` (the engine picker), `stream_outputs`, `run_frozen`;
- `openvino` and `onnx`: the two non-PyTorch engines (`onnx` also writes ONNX files for export).

The names below are the layer's public surface.

Example:
    >>> forward = FrozenForward(model, image_size=160)  # doctest: +SKIP
    >>> features, labels, positions = run_frozen(forward, store, batch_size=64, desc="features")  # doctest: +SKIP
"""

from __future__ import annotations

from imgclf.runtime.device import autocast, compute_dtype, cpu_has_native_bf16, pick_device
from imgclf.runtime.frozen import FrozenForward, StorePredictions, run_frozen, stream_outputs

__all__ = [
    "FrozenForward",
    "StorePredictions",
    "autocast",
    "compute_dtype",
    "cpu_has_native_bf16",
    "pick_device",
    "run_frozen",
    "stream_outputs",
]
