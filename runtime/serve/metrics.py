"""Prometheus metrics of the service on ``prometheus-client``, in a registry of its own.

Counters and histograms are written by the request path; the gauges of what the service holds
are read from :class:`~.admission.Admission` at scrape time (metrics never drive admission).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .admission import Admission

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# request outcomes: ok, partial (some images failed), item_error (all failed), bad_request,
# unauthorized, rejected (503 overload), timeout (408 body too slow), client_disconnected
# (the client went away before its request was read; no response), cancelled (graceful-shutdown
# timeout), server_error
OUTCOMES = ("ok", "partial", "item_error", "bad_request", "unauthorized", "rejected", "timeout",
            "client_disconnected", "cancelled", "server_error")


class ServiceMetrics:
    """The service's metrics; ``render()`` gives the text exposition (format 0.0.4)."""

    def __init__(self, admission: Admission, queue_depth: Callable[[], int], ready: Callable[[], bool],
                 model: dict[str, Any]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = r = CollectorRegistry(auto_describe=True)
        info = Info("cinemae_model", "The bundle and backend this service runs.", registry=r)
        info.info({"model_id": str(model["id"]), "model_version": str(model["version"]),
                   "backend": str(model["backend"])})
        Gauge("cinemae_ready", "1 when the service takes requests.", registry=r).set_function(
            lambda: float(ready()))
        self.requests = Counter("cinemae_requests", "POST /v1/detect requests by outcome and status.",
                                ["outcome", "status"], registry=r)
        self.images = Counter("cinemae_images", "Images by outcome (scored, or the error code).",
                              ["outcome"], registry=r)
        self.connections_refused = Counter(
            "cinemae_connections_refused", "Connections closed by the HTTP guard before a request "
            "reached the application, by reason.", ["reason"], registry=r)
        gauges = {"cinemae_queue_depth": ("Images waiting for the batcher.", queue_depth),
                  "cinemae_admitted_images": ("Images in the service (decoding, queued, running).",
                                              lambda: admission.images),
                  "cinemae_decoding_images": ("Admitted images not yet decoded.", lambda: admission.decoding),
                  "cinemae_inflight_requests": ("Detect requests being handled.", lambda: admission.requests),
                  "cinemae_inflight_body_bytes": ("Request-body bytes held by requests in flight.",
                                                  lambda: admission.body_bytes)}
        for name, (doc, fn) in gauges.items():
            Gauge(name, doc, registry=r).set_function(lambda fn=fn: float(fn()))
        self.batch_size = Histogram("cinemae_batch_size", "Images per backend call.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.request_latency = Histogram("cinemae_request_duration_seconds",
                                         "POST /v1/detect wall time, headers to response.",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("cinemae_queue_wait_seconds", "Time an image waited in the batch queue.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("cinemae_inference_duration_seconds", "Backend time per batch.",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.decode = Histogram("cinemae_decode_duration_seconds", "Decode + preprocess time per image.",
                                buckets=LATENCY_BUCKETS, registry=r)

    def count_request(self, outcome: str, status: int) -> None:
        self.requests.labels(outcome=outcome, status=str(status)).inc()

    def count_image(self, outcome: str) -> None:
        self.images.labels(outcome=outcome).inc()

    def render(self) -> tuple[bytes, str]:
        """(exposition bytes, content type)."""
        from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
