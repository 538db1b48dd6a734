"""Micro-batching: requests that arrive while the model is busy share its next forward pass.

No timer is involved, so a lone request never waits: the first request runs at once, and the
ones that queue up behind it are concatenated into one batch (up to `max_images`). Under load
this trades a little latency for far fewer forward passes; with small images the per-call
overhead, not the arithmetic, dominates a forward pass on a CPU.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np
import torch


class MicroBatcher:
    """Runs `predict` (uint8 N x 3 x S x S -> N x C) on `executor`, merging queued requests.

    Example:
        >>> batcher = MicroBatcher(predictor.predict, predictor.executor)  # doctest: +SKIP
        >>> probabilities = await batcher.submit(batch)  # doctest: +SKIP
    """

    def __init__(self, predict: Callable[[torch.Tensor], np.ndarray], executor: Executor, *,
                 max_images: int = 64) -> None:
        self.predict = predict
        self.executor = executor
        self.max_images = max_images
        self.pending: list[tuple[torch.Tensor, asyncio.Future[np.ndarray]]] = []
        self.running = False
        self._task: asyncio.Task[None] | None = None  # held so the event loop cannot drop it
        self.batches_run = 0  # forward passes, for /metadata and tests
        self.requests_run = 0

    async def submit(self, batch: torch.Tensor) -> np.ndarray:
        """Probabilities for `batch`, computed alone or together with other waiting requests."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self.pending.append((batch, future))
        if not self.running:
            self.running = True
            self._task = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                group: list[tuple[torch.Tensor, asyncio.Future[np.ndarray]]] = []
                images = 0
                # Always take at least one request, even one larger than max_images.
                while self.pending and (not group or images + len(self.pending[0][0]) <= self.max_images):
                    item = self.pending.pop(0)
                    group.append(item)
                    images += len(item[0])
                merged = torch.cat([b for b, _ in group]) if len(group) > 1 else group[0][0]
                try:
                    probs = await loop.run_in_executor(self.executor, self.predict, merged)
                except Exception as exc:  # every waiting request gets the error, the server goes on
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                self.batches_run += 1
                self.requests_run += len(group)
                start = 0
                for batch, future in group:
                    if not future.done():  # a cancelled request (client gone) is skipped
                        future.set_result(probs[start : start + len(batch)])
                    start += len(batch)
        finally:
            self.running = False
