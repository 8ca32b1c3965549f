"""``cinemae-serve [BUNDLE] --host 127.0.0.1 --port 8000``: the HTTP ingestion service.

Endpoints
    POST /v1/detect    one image as the raw body (any image content type, or
                       application/octet-stream), or several as multipart/form-data file parts.
    GET  /healthz      200 while the process runs.
    GET  /readyz       200 once the runtime is loaded and warmed up; 503 while starting or draining.
    GET  /metrics      Prometheus text format (prometheus-client): requests by outcome, images by
                       outcome, connections refused by the guard, batch sizes, queue depth, latency.
    GET  /openapi.json the OpenAPI 3.1 document.

Modules
    config     ServeConfig: every limit, timeout and batching setting.
    protocol   the connection guard (uvicorn's httptools protocol with a header deadline, a
               header size limit, JSON 400/408/431), before any request reaches the app.
    admission  what the service holds (requests, body bytes, images) and the 503 decisions;
               kept apart from the metrics, which only read it.
    metrics    prometheus-client registry of the service.
    decode     fair decode scheduling: round-robin across requests, per-request concurrency.
    batcher    dynamic batching onto the one inference thread.
    handler    one POST /v1/detect: headers -> admission -> body -> images -> decode -> batch -> JSON.
    app        the Starlette routes, JSON errors, lifespan.   cli   the command line.

Design
    * One runtime instance (:class:`~cinemae.runtime.detector.Detector`), owned by one inference
      thread. Images are decoded and preprocessed on ``decode_threads`` worker threads shared
      round-robin across requests (one request uses at most ``decode_per_request`` at once), then
      queued; the batcher takes up to ``max_batch`` images, waiting at most ``max_wait_ms`` after
      the oldest queued image arrived (and only while other admitted images are still decoding),
      and runs them in one backend call ([B, 3, S, S] -> logit [B]).
    * Admission from the headers, before any body byte is read: requests in flight
      (``max_requests``), room in the image queue (``queue_size``) and a declared Content-Length
      within the free in-flight byte budget (``max_inflight_bytes``); body bytes are taken from
      the budget as they arrive. Refusals are 503 with ``Retry-After``.
    * Limits: ``max_body`` bytes per request (413), ``max_pixels`` decoded pixels per image and
      ``max_request_pixels`` over a request's images, both from the image headers before any
      pixel is decoded (413), ``max_images`` per request (413); request line + headers within
      ``header_timeout_s`` and ``max_header_bytes`` (408 / 431, connection closed); a body that
      pauses ``body_timeout_s`` or takes ``body_deadline_s`` in all gets 408 and is dropped.
    * Errors are JSON: ``{"error": {"code", "message"}}``. Per-image errors use the runtime's
      InputError codes: empty / truncated / undecodable / bad_array -> 422, unsupported -> 415,
      too_large -> 413. A multipart request where some images fail is 200 with per-item
      ``error`` objects; the status is 4xx only when every image failed (the status of the first
      failed image) or the request itself is bad.
    * Optional bearer-token auth on /v1/detect (``--token`` or ``CINEMAE_TOKEN``); the health,
      readiness, metrics and OpenAPI endpoints stay open for probes and scrapers.
    * Graceful shutdown (SIGTERM / SIGINT): readiness turns 503, no new connections are taken,
      requests in flight are finished for up to ``--graceful-timeout`` s; those still running
      then are answered 503 JSON, and the process exits without waiting for a decode in flight.
    * A client that disconnects before its request is read is counted as
      ``outcome="client_disconnected"`` (status label 499), not as a server error.

Response of ``POST /v1/detect``: each result is the runtime's one record
(:meth:`~cinemae.runtime.detector.Result.to_record`) plus the service's own ``index``,
``sha256`` and, for an image that failed, its HTTP ``status``::

    {"request_id": "...",
     "model": {"id", "version", "manifest_sha256", "backend", "precision", "k", "threshold", "trained"},
     "results": [{"source": "a.jpg", "score": 0.93, "logit": 2.6, "verdict": "ai", "stats": [s1, s2, s3],
                  "error": null, "error_code": null, "model": {...},
                  "timings": {"decode_wait_ms", "decode_ms", "queue_ms", "inference_ms", "batch_size", ...},
                  "index": 0, "sha256": "..."},
                 {"source": "b.txt", "score": null, ..., "error": "not an image ...",
                  "error_code": "unsupported", "index": 1, "sha256": "...", "status": 415}],
     "timings": {"total_ms": 12.3}}

A request that fails as a whole answers ``{"request_id", "error": {"code", "message"}}``.
"""

from .app import create_app
from .cli import build_parser, main
from .config import ServeConfig

__all__ = ["ServeConfig", "build_parser", "create_app", "main"]
