"""Fair scheduling of decode work: a few worker threads shared round-robin across requests.

Decoding is the expensive, attacker-controlled part of a request (a 105 kB PNG can decode to
36 Mpx). With one FIFO pool, a request of 12 such images occupies every worker for its whole
duration and an unrelated one-image request waits behind all of them. Here each request has its
own queue; a free worker takes the next job from the next request in turn, and no request runs
more than ``per_request`` jobs at once, so with ``threads > per_request`` a worker is always
left for the others, and one request holds at most ``per_request`` decoded images in memory.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future as ThreadFuture
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class DecodeScheduler:
    """Run blocking decode jobs on ``threads`` threads, round-robin across request keys.

    Call from the event loop only (``run`` and the completion callbacks run there).
    """

    def __init__(self, threads: int, per_request: int) -> None:
        self.threads = max(1, int(threads))
        self.per_request = max(1, min(int(per_request), self.threads))
        self.executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="cinemae-decode")
        self.free = self.threads
        self.queues: OrderedDict[int, deque[tuple[Callable[..., Any], tuple, asyncio.Future]]] = OrderedDict()
        self.running: dict[int, int] = {}
        self._keys = itertools.count()

    def new_key(self) -> int:
        """A key for one request's jobs."""
        return next(self._keys)

    def busy(self) -> int:
        """Jobs running on the worker threads now."""
        return self.threads - self.free

    async def run(self, key: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on a worker when it is ``key``'s turn; its result or exception."""
        fut = asyncio.get_running_loop().create_future()
        self.queues.setdefault(key, deque()).append((fn, args, fut))
        self._pump()
        return await fut

    def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while self.free > 0:
            job = None
            for key in list(self.queues):  # in turn: the key served last is at the end
                q = self.queues[key]
                while q and q[0][2].done():  # cancelled before it started
                    q.popleft()
                if not q:
                    del self.queues[key]
                    continue
                if self.running.get(key, 0) >= self.per_request:
                    continue
                job = (key, q.popleft())
                self.queues.move_to_end(key)
                if not q:
                    del self.queues[key]
                break
            if job is None:
                return
            key, (fn, args, fut) = job
            self.free -= 1
            self.running[key] = self.running.get(key, 0) + 1
            cf = self.executor.submit(fn, *args)
            cf.add_done_callback(lambda cf, key=key, fut=fut: self._wake(loop, key, cf, fut))

    def _wake(self, loop: asyncio.AbstractEventLoop, key: int, cf: ThreadFuture, fut: asyncio.Future) -> None:
        try:
            loop.call_soon_threadsafe(self._done, key, cf, fut)
        except RuntimeError:  # the loop closed (shutdown abandoned this job): nobody waits for it
            pass

    def _done(self, key: int, cf: ThreadFuture, fut: asyncio.Future) -> None:
        self.free += 1
        n = self.running.get(key, 1) - 1
        if n:
            self.running[key] = n
        else:
            self.running.pop(key, None)
        if not fut.done():
            e = cf.exception()
            if e is not None:
                fut.set_exception(e)
            else:
                fut.set_result(cf.result())
        self._pump()

    def shutdown(self, wait: bool) -> None:
        """Stop taking jobs; queued ones are dropped. ``wait=False`` leaves running ones to finish
        on their own (their results are discarded)."""
        for q in self.queues.values():
            for _, _, fut in q:
                if not fut.done():
                    fut.cancel()
        self.queues.clear()
        self.executor.shutdown(wait=wait, cancel_futures=True)
