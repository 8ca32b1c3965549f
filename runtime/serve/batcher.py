"""Dynamic batching: preprocessed images -> one backend call per batch, on one inference thread."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("cinemae.serve")


@dataclass
class _Item:
    result: Any  # the Result this image's score goes into (Detector.score_prepared fills it)
    array: np.ndarray  # [3, S, S] float32, preprocessed
    future: asyncio.Future
    t_enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Collects preprocessed images into batches and runs them on the one inference thread.

    A batch closes when it holds ``max_batch`` images, when ``max_wait_s`` has passed since the
    oldest queued image arrived, or at once when no admitted image is still being decoded
    (``decoding()`` is 0: nothing is on its way to join it, so a lone request is not delayed, and
    under load batches form from the images that queue up while the previous batch runs). A
    batch is scored by ``Detector.score_prepared`` (the runtime's one way to fill a Result:
    score, verdict under the provenance policy, stats, stage timings); each item's future then
    receives ``queue_s``, ``inference_s`` and ``batch_size``.
    """

    def __init__(self, detector: Any, metrics: Any, max_batch: int, max_wait_s: float,
                 decoding: Callable[[], int]) -> None:
        self.det = detector
        self.metrics = metrics
        self.decoding = decoding
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.pending: deque[_Item] = deque()
        self.wakeup = asyncio.Event()
        self.stopping = False
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cinemae-infer")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    def depth(self) -> int:
        return len(self.pending)

    def submit(self, result: Any, array: np.ndarray) -> asyncio.Future:
        """Queue one image [3, S, S] for ``result`` (filled in place when its batch has run)."""
        fut = asyncio.get_running_loop().create_future()
        self.pending.append(_Item(result, array, fut))
        self.wakeup.set()
        return fut

    async def stop(self) -> None:
        """Finish everything queued, then stop the loop and the inference thread."""
        self.stopping = True
        self.wakeup.set()
        if self.task is not None:
            await self.task
        self.executor.shutdown(wait=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                if self.stopping:
                    return
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            deadline = self.pending[0].t_enqueued + self.max_wait_s
            while len(self.pending) < self.max_batch and not self.stopping and self.decoding() > 0:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            n = min(self.max_batch, len(self.pending))
            items = [self.pending.popleft() for _ in range(n)]
            items = [it for it in items if not it.future.done()]  # requests cancelled meanwhile
            if not items:
                continue
            n = len(items)
            t_start = time.perf_counter()
            try:
                await loop.run_in_executor(self.executor, self.det.score_prepared, [it.result for it in items],
                                           [it.array for it in items], 0.0)
            except Exception as e:  # noqa: BLE001 - a failure fails this batch only
                log.exception("scoring failed on a batch of %d", n)
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(RuntimeError(f"scoring failed: {e}"))
                continue
            infer_s = time.perf_counter() - t_start
            self.metrics.batch_size.observe(n)
            self.metrics.inference.observe(infer_s)
            for it in items:
                q = t_start - it.t_enqueued
                self.metrics.queue_wait.observe(q)
                if not it.future.done():
                    it.future.set_result({"queue_s": q, "inference_s": infer_s, "batch_size": n})
