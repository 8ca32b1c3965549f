"""Admission state: what the service holds right now (requests, body bytes, images).

This is the only state admission decisions read; the Prometheus metrics read it too (as gauges
computed at scrape time) but never drive it, so a metrics change cannot change who is served.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .config import ServeConfig
from .errors import RequestError


@dataclass
class Holding:
    """What one request holds; released once, by the request that took it."""

    request: bool = False
    body_bytes: int = 0
    images: int = 0
    decoding: int = 0


class Admission:
    """Service-wide budgets: requests being handled, request-body bytes held, images admitted.

    All methods are thread-safe and O(1). Every ``take_*`` either takes the whole amount or
    raises :class:`RequestError` 503 (with ``Retry-After``) and takes nothing.
    """

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.lock = threading.Lock()
        self.requests = 0  # POST /v1/detect requests being handled
        self.body_bytes = 0  # request-body bytes held by requests in flight
        self.images = 0  # images in the service (decoding, queued, running)
        self.decoding = 0  # admitted images not yet queued for the batcher

    def _overloaded(self, message: str) -> RequestError:
        return RequestError(503, "overloaded", message, {"Retry-After": str(self.cfg.retry_after_s)})

    def take_request(self, h: Holding) -> None:
        with self.lock:
            if self.requests >= self.cfg.max_requests:
                raise self._overloaded(f"{self.requests} requests in flight (the limit is "
                                       f"{self.cfg.max_requests}); retry later")
            self.requests += 1
            h.request = True

    def check_headers(self, content_length: int | None) -> None:
        """Refuse from the headers alone: no room for even one image, or a declared body larger
        than the free part of the byte budget. Nothing is taken (bytes are taken as they arrive)."""
        with self.lock:
            if self.images >= self.cfg.queue_size:
                raise self._overloaded(f"the queue is full ({self.cfg.queue_size} images); retry later")
            free = self.cfg.max_inflight_bytes - self.body_bytes
            if content_length is not None and content_length > free:
                raise self._overloaded("too many request bytes in flight; retry later")

    def take_bytes(self, h: Holding, n: int) -> None:
        with self.lock:
            if self.body_bytes + n > self.cfg.max_inflight_bytes:
                raise self._overloaded("too many request bytes in flight; retry later")
            self.body_bytes += n
            h.body_bytes += n

    def release_bytes(self, h: Holding) -> None:
        with self.lock:
            self.body_bytes -= h.body_bytes
            h.body_bytes = 0

    def take_images(self, h: Holding, n: int) -> None:
        with self.lock:
            if self.images + n > self.cfg.queue_size:
                raise self._overloaded(f"the queue is full ({self.cfg.queue_size} images); retry later")
            self.images += n
            self.decoding += n
            h.images += n
            h.decoding += n

    def decoded(self, h: Holding) -> None:
        """The request's images are decoded (queued for the batcher or failed)."""
        with self.lock:
            self.decoding -= h.decoding
            h.decoding = 0

    def release(self, h: Holding) -> None:
        """Give back everything ``h`` holds."""
        with self.lock:
            self.body_bytes -= h.body_bytes
            self.images -= h.images
            self.decoding -= h.decoding
            self.requests -= int(h.request)
            h.body_bytes = h.images = h.decoding = 0
            h.request = False
