"""Reproducibility: deterministic kernels and fixed threads, and every global RNG's state.

`make_deterministic` is what `--deterministic` turns on: with it, two CPU runs with the same seed on
the same machine give bit-identical weights. `rng_states` / `set_rng_states` capture and restore
the torch, CUDA, numpy and Python generators, so that a resumed run draws the same numbers as one
that never stopped.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from imgclf.distributed import cpu_cores

MAX_DETERMINISTIC_THREADS = 4  # more threads than this rarely speed up a small model on a CPU


def deterministic_threads() -> int:
    """The fixed intra-op thread count of deterministic runs: min(cores, 4).

    Under torchrun, cores are this process's share of the machine (`distributed.cpu_cores`).

    Float sums are not associative, so a different thread count splits reductions differently and
    changes the last bits; a fixed count keeps two runs on one machine identical.
    """
    return max(1, min(cpu_cores(), MAX_DETERMINISTIC_THREADS))


def make_deterministic(seed: int) -> int:
    """Seed every generator and switch torch to deterministic kernels; returns the thread count.

    Example:
        >>> make_deterministic(0) >= 1  # doctest: +SKIP
        True
    """
    # cuBLAS needs a fixed workspace to be deterministic; it is read when CUDA initialises.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: a CUDA kernel without a deterministic version (e.g. some pooling backward passes)
    # warns instead of stopping the run; the CPU kernels this package uses all have one.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    threads = deterministic_threads()
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel op; intra-op count is what matters
        pass
    seed_everything(seed)
    return threads


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's global generator and Python's `random`."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_states() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON-able values) holding the state of every global generator."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # type: ignore[misc]
    version, internal, py_gauss = random.getstate()
    values = {
        "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss": py_gauss},
    }
    return tensors, values


def set_rng_states(tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
    """Restore what `rng_states` captured."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    n = values["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = values["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
