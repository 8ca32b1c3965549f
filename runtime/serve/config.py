"""The service's limits, timeouts and batching settings (one value per CLI flag)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    """Service limits and batching (the CLI flags, with their defaults).

    Sizes are bytes, times seconds unless the name says otherwise. Every limit is checked as
    early as the information exists: from the request line and headers (connection guard,
    admission), from each image's header (pixels), then while decoding.
    """

    # per request
    max_body: int = 32 * 1024 * 1024  # request-body bytes (413)
    max_pixels: int = 40_000_000  # decoded pixels per image, from its header (413 for that image)
    max_request_pixels: int = 500_000_000  # decoded pixels summed over a request's images (413 per image)
    max_images: int = 64  # images per request (413)
    # service-wide admission (503 + Retry-After, decided from the headers before the body is read)
    max_inflight_bytes: int = 256 * 1024 * 1024  # request-body bytes held at once (>= max_body)
    queue_size: int = 256  # images admitted at once (decoding + queued + running)
    max_requests: int = 512  # POST /v1/detect requests being handled at once
    retry_after_s: int = 1  # Retry-After on 503
    # batching and decoding
    max_batch: int = 16  # images per backend call
    max_wait_ms: float = 5.0  # how long the batcher waits to fill a batch (while images decode)
    decode_threads: int = 2  # decode + preprocess worker threads
    decode_per_request: int = 1  # of those, how many one request may use at once (fairness)
    # connection guard (the HTTP protocol, before the application sees a request)
    header_timeout_s: float = 10.0  # request line + headers must arrive within this
    max_header_bytes: int = 64 * 1024  # request line + headers (431)
    body_timeout_s: float = 10.0  # longest pause between two pieces of a request body (408)
    body_deadline_s: float = 120.0  # longest time to receive a whole request body (408)
    # lifecycle
    graceful_timeout_s: float = 30.0  # SIGTERM: time to finish requests in flight
    token: str | None = None
    warmup: bool = True
