"""``cinemae-serve [BUNDLE] --host 127.0.0.1 --port 8000``: the HTTP ingestion service.

Endpoints
    POST /v1/detect   one image as the raw body (any image content type, or
                      application/octet-stream), or several as multipart/form-data file parts.
    GET  /healthz     200 while the process runs.
    GET  /readyz      200 once the runtime is loaded and warmed up; 503 while starting or draining.
    GET  /metrics     Prometheus text format: requests by outcome, images by outcome, batch sizes,
                      queue depth, latency histograms.

Design
    * One runtime instance (:class:`~cinemae.runtime.detector.Detector`), owned by one inference
      thread. Requests are decoded and preprocessed on a small thread pool, then queued; the
      batcher takes up to ``max_batch`` images, waiting at most ``max_wait_ms`` after the oldest
      queued image arrived (and only while other admitted images are still decoding), and runs
      them in one backend call ([B, 3, S, S] -> logit [B]).
    * Admission control: at most ``queue_size`` images are in the service at once (decoding,
      queued or running), and at most ``max_inflight_bytes`` of request bodies are held at once.
      A request that would exceed either is answered 503 with ``Retry-After``.
    * Limits: ``max_body`` bytes per request (413), ``max_pixels`` decoded pixels per image,
      checked from the header before any pixel is decoded (413), ``max_images`` per request (413).
    * Errors are JSON: ``{"error": {"code", "message"}}``. Per-image errors use the runtime's
      InputError codes: empty / truncated / undecodable / bad_array -> 422, unsupported -> 415,
      too_large -> 413. A multipart request where some images fail is 200 with per-item
      ``error`` objects; the status is 4xx only when every image failed (the status of the first
      failed image) or the request itself is bad.
    * Optional bearer-token auth on /v1/detect (``--token`` or ``CINEMAE_TOKEN``); the health,
      readiness and metrics endpoints stay open for probes and scrapers.
    * Graceful shutdown (SIGTERM / SIGINT): readiness turns 503, no new connections are taken,
      requests in flight are finished (up to ``--graceful-timeout`` s), then the runtime closes.

Response of ``POST /v1/detect``::

    {"request_id": "...", "model": {"id", "version", "backend", "k", "trained"},
     "results": [{"index": 0, "filename": "a.jpg", "sha256": "...", "score": 0.93, "logit": 2.6,
                  "verdict": "ai", "threshold": 0.5, "stats": [s1, s2, s3],
                  "model_id": "...", "model_version": "...",
                  "timings": {"decode_ms", "queue_ms", "inference_ms", "batch_size", ...}},
                 {"index": 1, "filename": "b.txt", "status": 415,
                  "error": {"code": "unsupported", "message": "..."}}],
     "timings": {"total_ms": 12.3}}
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import logging
import os
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("cinemae.serve")

ERROR_STATUS = {"empty": 422, "truncated": 422, "undecodable": 422, "bad_array": 422,
                "unsupported": 415, "too_large": 413, "not_found": 422, "internal": 500}


@dataclass
class ServeConfig:
    """Service limits and batching (the CLI flags, with their defaults)."""

    max_body: int = 32 * 1024 * 1024  # bytes per request
    max_inflight_bytes: int = 256 * 1024 * 1024  # request bodies held at once (>= max_body)
    max_pixels: int = 40_000_000  # decoded pixels per image (decompression-bomb guard)
    max_images: int = 64  # images per request
    max_batch: int = 16  # images per backend call
    max_wait_ms: float = 5.0  # how long the batcher waits to fill a batch (while images decode)
    queue_size: int = 256  # images admitted at once (decoding + queued + running)
    retry_after_s: int = 1  # Retry-After on 503
    decode_threads: int = 2
    token: str | None = None
    warmup: bool = True


# --------------------------------------------------------------------------------------------
# Prometheus metrics (text exposition format 0.0.4, no client library needed)
# --------------------------------------------------------------------------------------------

class _Histogram:
    def __init__(self, name: str, help_: str, buckets: Iterable[float]) -> None:
        self.name, self.help = name, help_
        self.buckets = sorted(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for b, c in zip(self.buckets, self.counts, strict=True):
            out.append(f'{self.name}_bucket{{le="{b:g}"}} {c}')
        out += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum:.6f}",
                f"{self.name}_count {self.count}"]
        return out


_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Counters, gauges and histograms of the service; thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.images: dict[str, int] = {}
        self.queue_depth = 0  # images queued for the batcher, not yet running
        self.admitted = 0  # images in the service (decoding, queued, running)
        self.decoding = 0  # admitted images not yet queued for the batcher
        self.inflight_requests = 0
        self.body_bytes = 0  # request-body bytes held by requests in flight
        self.batch_size = _Histogram("cinemae_batch_size", "Images per backend call.",
                                     (1, 2, 4, 8, 16, 32, 64, 128))
        self.request_latency = _Histogram("cinemae_request_duration_seconds",
                                          "POST /v1/detect wall time, body read to response.",
                                          _LATENCY_BUCKETS)
        self.queue_wait = _Histogram("cinemae_queue_wait_seconds",
                                     "Time an image waited in the batch queue.", _LATENCY_BUCKETS)
        self.inference = _Histogram("cinemae_inference_duration_seconds",
                                    "Backend time per batch.", _LATENCY_BUCKETS)
        self.decode = _Histogram("cinemae_decode_duration_seconds",
                                 "Decode + preprocess time per image.", _LATENCY_BUCKETS)

    def count_request(self, outcome: str, status: int) -> None:
        with self.lock:
            key = (outcome, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def count_image(self, outcome: str) -> None:
        with self.lock:
            self.images[outcome] = self.images.get(outcome, 0) + 1

    def observe(self, hist: _Histogram, v: float) -> None:
        with self.lock:
            hist.observe(v)

    def render(self, info: dict[str, str], ready: bool) -> str:
        with self.lock:
            lab = ",".join(f'{k}="{_esc(v)}"' for k, v in info.items())
            out = ["# HELP cinemae_model_info The bundle and backend this service runs.",
                   "# TYPE cinemae_model_info gauge", f"cinemae_model_info{{{lab}}} 1",
                   "# HELP cinemae_ready 1 when the service takes requests.",
                   "# TYPE cinemae_ready gauge", f"cinemae_ready {int(ready)}",
                   "# HELP cinemae_requests_total POST /v1/detect requests by outcome and status.",
                   "# TYPE cinemae_requests_total counter"]
            for (outcome, status), n in sorted(self.requests.items()):
                out.append(f'cinemae_requests_total{{outcome="{outcome}",status="{status}"}} {n}')
            out += ["# HELP cinemae_images_total Images by outcome (scored, or the error code).",
                    "# TYPE cinemae_images_total counter"]
            for outcome, n in sorted(self.images.items()):
                out.append(f'cinemae_images_total{{outcome="{outcome}"}} {n}')
            out += ["# HELP cinemae_queue_depth Images waiting for the batcher.",
                    "# TYPE cinemae_queue_depth gauge", f"cinemae_queue_depth {self.queue_depth}",
                    "# HELP cinemae_admitted_images Images in the service (decoding, queued, running).",
                    "# TYPE cinemae_admitted_images gauge", f"cinemae_admitted_images {self.admitted}",
                    "# HELP cinemae_inflight_requests Detect requests being handled.",
                    "# TYPE cinemae_inflight_requests gauge",
                    f"cinemae_inflight_requests {self.inflight_requests}",
                    "# HELP cinemae_inflight_body_bytes Request-body bytes held by requests in flight.",
                    "# TYPE cinemae_inflight_body_bytes gauge",
                    f"cinemae_inflight_body_bytes {self.body_bytes}"]
            for h in (self.batch_size, self.request_latency, self.queue_wait, self.inference,
                      self.decode):
                out += h.render()
        return "\n".join(out) + "\n"


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# --------------------------------------------------------------------------------------------
# Dynamic batching
# --------------------------------------------------------------------------------------------

@dataclass
class _Item:
    array: np.ndarray  # [3, S, S] float32, preprocessed
    future: asyncio.Future
    t_enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Collects preprocessed images into batches and runs them on the one inference thread.

    A batch closes when it holds ``max_batch`` images, when ``max_wait_s`` has passed since the
    oldest queued image arrived, or at once when no admitted image is still being decoded (then
    nothing is on its way to join it: a lone request is not delayed, and under load batches form
    from the images that queue up while the previous batch runs). Each item's future receives a
    dict with ``logit``, ``stats`` ([3]), ``queue_s``, ``inference_s``, ``batch_size`` and the
    backend stage timings.
    """

    def __init__(self, detector: Any, metrics: Metrics, max_batch: int, max_wait_s: float) -> None:
        self.det = detector
        self.metrics = metrics
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.pending: deque[_Item] = deque()
        self.wakeup = asyncio.Event()
        self.stopping = False
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cinemae-infer")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    def submit(self, array: np.ndarray) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append(_Item(array, fut))
        with self.metrics.lock:
            self.metrics.queue_depth = len(self.pending)
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
            while len(self.pending) < self.max_batch and not self.stopping and self.metrics.decoding > 0:
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
            with self.metrics.lock:
                self.metrics.queue_depth = len(self.pending)
            t_start = time.perf_counter()
            batch = np.stack([it.array for it in items])
            try:
                out = await loop.run_in_executor(self.executor, self.det.run_arrays, batch)
            except Exception as e:  # noqa: BLE001 - a backend failure fails this batch only
                log.exception("backend failed on a batch of %d", n)
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(RuntimeError(f"backend failed: {e}"))
                continue
            infer_s = time.perf_counter() - t_start
            self.metrics.observe(self.metrics.batch_size, n)
            self.metrics.observe(self.metrics.inference, infer_s)
            stages = {f"{k}_ms": 1000.0 * v / n for k, v in out.timings.items()}
            for j, it in enumerate(items):
                q = t_start - it.t_enqueued
                self.metrics.observe(self.metrics.queue_wait, q)
                if not it.future.done():
                    it.future.set_result({"logit": float(out.logit[j]),
                                          "stats": [float(x) for x in out.stats[j]],
                                          "queue_s": q, "inference_s": infer_s, "batch_size": n,
                                          "stages": stages})


# --------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------

def _request_id(given: str | None) -> str:
    """The client's X-Request-Id when it is a sane token (<= 128 printable ASCII), else a new one."""
    if given and len(given) <= 128 and all(33 <= ord(c) < 127 for c in given):
        return given
    return uuid.uuid4().hex


class _RequestError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class Service:
    """State of one service process: detector, batcher, decode pool, metrics, readiness."""

    def __init__(self, detector: Any, config: ServeConfig) -> None:
        self.det = detector
        self.cfg = config
        self.metrics = Metrics()
        self.ready = False
        self.draining = False
        self.batcher: Batcher | None = None
        self.decode_pool = ThreadPoolExecutor(max_workers=max(1, config.decode_threads),
                                              thread_name_prefix="cinemae-decode")
        b = detector.bundle
        self.model = {"id": b.model_id, "version": b.model_version, "backend": detector.backend_name,
                      "k": detector.k, "trained": b.trained}

    # lifecycle --------------------------------------------------------------------------------
    async def startup(self) -> None:
        self.batcher = Batcher(self.det, self.metrics, self.cfg.max_batch, self.cfg.max_wait_ms / 1000)
        self.batcher.start()
        if self.cfg.warmup:  # first calls pay for imports and session set-up: not a client
            import cv2

            loop = asyncio.get_running_loop()
            ok, png = cv2.imencode(".png", np.full((48, 64, 3), 128, np.uint8))
            arr, _ = await loop.run_in_executor(self.decode_pool, self._decode, png.tobytes())
            await loop.run_in_executor(self.batcher.executor, self.det.run_arrays, arr[None])
        self.ready = True
        log.info("ready: %s %s, %s", self.model["id"], self.model["version"], self.det.describe())

    async def shutdown(self) -> None:
        self.ready = False
        self.draining = True
        if self.batcher is not None:
            await self.batcher.stop()
        self.decode_pool.shutdown(wait=True)
        self.det.close()

    # helpers ----------------------------------------------------------------------------------
    def check_auth(self, headers: Any) -> None:
        if not self.cfg.token:
            return
        auth = headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 self.cfg.token.encode()):
            raise _RequestError(401, "unauthorized", "missing or wrong bearer token",
                                {"WWW-Authenticate": 'Bearer realm="cinemae"'})

    def _reserve_bytes(self, n: int, held: list[int]) -> None:
        """Count ``n`` more body bytes against the in-flight budget (503 when over it)."""
        with self.metrics.lock:
            if self.metrics.body_bytes + n > self.cfg.max_inflight_bytes:
                over = True
            else:
                self.metrics.body_bytes += n
                held[0] += n
                over = False
        if over:
            raise _RequestError(503, "overloaded", "too many request bytes in flight; retry later",
                                {"Retry-After": str(self.cfg.retry_after_s)})

    def release_bytes(self, held: list[int]) -> None:
        with self.metrics.lock:
            self.metrics.body_bytes -= held[0]
            held[0] = 0

    async def read_body(self, request: Any, held: list[int]) -> bytes:
        """The request body, within ``max_body`` (413) and the in-flight byte budget (503);
        ``held[0]`` accumulates the bytes reserved, which the caller releases."""
        limit = self.cfg.max_body
        cl = request.headers.get("content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                raise _RequestError(400, "bad_request", "invalid Content-Length") from None
            if n > limit:
                raise _RequestError(413, "too_large", f"request body of {n} bytes exceeds the "
                                    f"{limit}-byte limit")
            self._reserve_bytes(n, held)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _RequestError(413, "too_large", f"request body exceeds the {limit}-byte limit")
            if size > held[0]:  # no (or a wrong) Content-Length: reserve as it arrives
                self._reserve_bytes(size - held[0], held)
            chunks.append(chunk)
        return b"".join(chunks)

    async def split_images(self, request: Any, body: bytes) -> list[tuple[str | None, bytes]]:
        """The request's images as (filename or None, encoded bytes)."""
        ctype = request.headers.get("content-type", "")
        main = ctype.split(";", 1)[0].strip().lower()
        if main == "multipart/form-data":
            from starlette.datastructures import UploadFile
            from starlette.formparsers import MultiPartException, MultiPartParser

            async def replay() -> AsyncIterator[bytes]:
                yield body

            try:
                form = await MultiPartParser(request.headers, replay(), max_files=self.cfg.max_images + 1,
                                             max_fields=1000).parse()
            except MultiPartException as e:
                msg = str(getattr(e, "message", e))
                if "Too many files" in msg:
                    raise _RequestError(413, "too_many_images", f"more than {self.cfg.max_images} "
                                        "images in one request") from None
                raise _RequestError(400, "bad_multipart", f"malformed multipart body ({msg})") from None
            except Exception as e:  # noqa: BLE001 - the parser raises assorted errors on garbage
                raise _RequestError(400, "bad_multipart", f"malformed multipart body ({e})") from None
            items: list[tuple[str | None, bytes]] = []
            try:
                for _, v in form.multi_items():
                    if isinstance(v, UploadFile):
                        items.append((v.filename or "", await v.read()))
            finally:
                await form.close()
            if not items:
                raise _RequestError(422, "no_images", "the multipart body has no file parts "
                                    "(send each image as a file part)")
            return items
        # Any other Content-Type: the body is one image, recognised by its content (a declared
        # type is advisory: `curl --data-binary` sends x-www-form-urlencoded).
        return [(None, body)]

    def _decode(self, data: bytes) -> tuple[np.ndarray, float]:
        t = time.perf_counter()
        arr = self.det.preprocess(data)
        return arr, time.perf_counter() - t

    async def detect(self, request: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Handle one POST /v1/detect; returns (status, JSON body, extra headers)."""
        t0 = time.perf_counter()
        rid = _request_id(request.headers.get("x-request-id"))
        if self.draining or not self.ready or self.batcher is None:
            raise _RequestError(503, "unavailable", "the service is starting or shutting down",
                                {"Retry-After": str(self.cfg.retry_after_s)})
        self.check_auth(request.headers)
        held = [0]
        try:
            body = await self.read_body(request, held)
            images = await self.split_images(request, body)
            del body
            return await self._detect_images(images, rid, t0)
        finally:
            self.release_bytes(held)

    async def _detect_images(self, images: list[tuple[str | None, bytes]], rid: str, t0: float
                             ) -> tuple[int, dict[str, Any], dict[str, str]]:
        from .detector import sigmoid
        from .preprocess import InputError

        n = len(images)
        if n > self.cfg.max_images:
            raise _RequestError(413, "too_many_images", f"{n} images exceeds the limit of "
                                f"{self.cfg.max_images} per request")
        with self.metrics.lock:  # admission control: bounded images in the service
            if self.metrics.admitted + n > self.cfg.queue_size:
                admitted = False
            else:
                self.metrics.admitted += n
                self.metrics.decoding += n
                admitted = True
        if not admitted:
            raise _RequestError(503, "overloaded", f"the queue is full ({self.cfg.queue_size} "
                                "images); retry later", {"Retry-After": str(self.cfg.retry_after_s)})
        loop = asyncio.get_running_loop()
        results: list[dict[str, Any]] = []
        decoding = n
        try:
            decoded = await asyncio.gather(
                *(loop.run_in_executor(self.decode_pool, self._decode, data) for _, data in images),
                return_exceptions=True)
            with self.metrics.lock:  # queued below in this same step of the event loop
                self.metrics.decoding -= n
                decoding = 0
            self.batcher.wakeup.set()  # the batcher may stop waiting for these
            futures: list[asyncio.Future | None] = []
            for i, ((fname, data), dec) in enumerate(zip(images, decoded, strict=True)):
                r: dict[str, Any] = {"index": i}
                if fname is not None:
                    r["filename"] = fname
                r["sha256"] = hashlib.sha256(data).hexdigest() if data else None
                if isinstance(dec, BaseException):
                    code = dec.code if isinstance(dec, InputError) else "internal"
                    msg = str(dec) if isinstance(dec, InputError) else f"{type(dec).__name__}: {dec}"
                    r["status"] = ERROR_STATUS.get(code, 422)
                    r["error"] = {"code": code, "message": msg}
                    futures.append(None)
                else:
                    arr, dec_s = dec
                    self.metrics.observe(self.metrics.decode, dec_s)
                    r["timings"] = {"decode_ms": 1000 * dec_s}
                    futures.append(self.batcher.submit(arr))
                results.append(r)
            del images, decoded
            outs = await asyncio.gather(*(f for f in futures if f is not None), return_exceptions=True)
        finally:
            with self.metrics.lock:
                self.metrics.admitted -= n
                self.metrics.decoding -= decoding
        it = iter(outs)
        for r, f in zip(results, futures, strict=True):
            if f is None:
                self.metrics.count_image(r["error"]["code"])
                continue
            o = next(it)
            if isinstance(o, BaseException):
                r["status"] = 500
                r["error"] = {"code": "internal", "message": str(o)}
                r.pop("timings", None)
                self.metrics.count_image("internal")
                continue
            p = sigmoid(o["logit"])
            r.update(score=p, logit=o["logit"], verdict=self.det.verdict(p),
                     threshold=self.det.threshold, stats=o["stats"], model_id=self.model["id"],
                     model_version=self.model["version"])
            r["timings"].update(queue_ms=1000 * o["queue_s"], inference_ms=1000 * o["inference_s"],
                                batch_size=o["batch_size"], **o["stages"])
            self.metrics.count_image("scored")
        failed = [r for r in results if "error" in r]
        out: dict[str, Any] = {"request_id": rid, "model": self.model, "results": results}
        if failed and len(failed) == len(results):
            status = failed[0]["status"]
            out["error"] = dict(failed[0]["error"])
        else:
            status = 200
        out["timings"] = {"total_ms": 1000 * (time.perf_counter() - t0)}
        return status, out, {"X-Request-Id": rid}


def create_app(detector: Any, config: ServeConfig | None = None) -> Any:
    """The Starlette application around one Detector (which the app owns and closes)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    svc = Service(detector, config or ServeConfig())

    async def detect(request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        with svc.metrics.lock:
            svc.metrics.inflight_requests += 1
        try:
            status, body, headers = await svc.detect(request)
            outcome = "ok" if status == 200 and not any("error" in r for r in body["results"]) else \
                "partial" if status == 200 else "item_error"
        except _RequestError as e:
            status, headers = e.status, e.headers
            body = {"error": {"code": e.code, "message": e.message}}
            outcome = {401: "unauthorized", 503: "rejected"}.get(e.status, "bad_request")
        except Exception as e:  # noqa: BLE001
            log.exception("unhandled error in /v1/detect")
            status, headers, outcome = 500, {}, "server_error"
            body = {"error": {"code": "internal", "message": f"{type(e).__name__}: {e}"}}
        finally:
            with svc.metrics.lock:
                svc.metrics.inflight_requests -= 1
        svc.metrics.count_request(outcome, status)
        svc.metrics.observe(svc.metrics.request_latency, time.perf_counter() - t0)
        return JSONResponse(body, status_code=status, headers=headers)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
        if svc.ready and not svc.draining:
            return JSONResponse({"status": "ready", "model": svc.model})
        return JSONResponse({"status": "draining" if svc.draining else "starting"}, status_code=503)

    async def metrics(request: Request) -> PlainTextResponse:
        info = {"model_id": svc.model["id"], "model_version": svc.model["version"],
                "backend": svc.model["backend"]}
        return PlainTextResponse(svc.metrics.render(info, svc.ready and not svc.draining),
                                 media_type="text/plain; version=0.0.4")

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": {"code": "internal", "message": "internal server error"}},
                            status_code=500)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await svc.startup()
        try:
            yield
        finally:
            await svc.shutdown()

    app = Starlette(routes=[Route("/v1/detect", detect, methods=["POST"]),
                            Route("/healthz", healthz, methods=["GET"]),
                            Route("/readyz", readyz, methods=["GET"]),
                            Route("/metrics", metrics, methods=["GET"])],
                    exception_handlers={HTTPException: http_error, Exception: server_error},
                    lifespan=lifespan)
    app.state.service = svc
    return app


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    d = ServeConfig()
    ap = argparse.ArgumentParser(prog="cinemae-serve",
                                 description="HTTP ingestion service with dynamic batching.")
    ap.add_argument("bundle", nargs="?", help="bundle directory (default: the embedded bundle)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    from .backends import backend_choices, device_help, precision_choices  # the backend registry

    ap.add_argument("--backend", default="auto", choices=backend_choices())
    ap.add_argument("--device", default="auto", help=device_help())
    ap.add_argument("--precision", default="fp32", choices=precision_choices())
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime")
    ap.add_argument("--max-batch", type=int, default=d.max_batch, help="images per backend call")
    ap.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                    help="longest wait for a batch to fill after its first image arrives (it waits "
                         "only while other admitted images are still decoding)")
    ap.add_argument("--queue-size", type=int, default=d.queue_size,
                    help="images admitted at once; beyond it requests get 503 + Retry-After")
    ap.add_argument("--retry-after", type=int, default=d.retry_after_s, help="seconds, on 503")
    ap.add_argument("--max-body", type=int, default=d.max_body, help="bytes per request (413)")
    ap.add_argument("--max-inflight-bytes", type=int, default=d.max_inflight_bytes,
                    help="request-body bytes held at once; beyond it requests get 503 + Retry-After")
    ap.add_argument("--max-pixels", type=int, default=d.max_pixels,
                    help="decoded pixels per image, checked before decoding (413)")
    ap.add_argument("--max-images", type=int, default=d.max_images, help="images per request")
    ap.add_argument("--decode-threads", type=int, default=d.decode_threads)
    ap.add_argument("--token", default=None,
                    help="require 'Authorization: Bearer TOKEN' on /v1/detect; prefer the env CINEMAE_TOKEN "
                         "(a command-line token shows in ps)")
    ap.add_argument("--limit-concurrency", type=int, default=1024,
                    help="connections + tasks at once; beyond it uvicorn answers 503")
    ap.add_argument("--graceful-timeout", type=float, default=30.0,
                    help="seconds to finish requests in flight on SIGTERM")
    ap.add_argument("--log-level", default="info")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        print("cinemae-serve: needs the serve extra: pip install 'cinemae[serve]'", file=sys.stderr)
        return 2
    from .cli import open_detector

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = ServeConfig(max_body=args.max_body, max_inflight_bytes=max(args.max_inflight_bytes, args.max_body),
                      max_pixels=args.max_pixels, max_images=args.max_images,
                      max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                      queue_size=args.queue_size, retry_after_s=args.retry_after,
                      decode_threads=args.decode_threads,
                      token=args.token or os.environ.get("CINEMAE_TOKEN") or None)
    if cfg.queue_size < 1 or cfg.max_batch < 1 or cfg.max_images < 1:
        print("cinemae-serve: --queue-size, --max-batch and --max-images must be >= 1", file=sys.stderr)
        return 2
    det = open_detector("cinemae-serve", args.bundle, backend=args.backend, device=args.device,
                        precision=args.precision, batch_size=cfg.max_batch, threads=args.threads,
                        max_pixels=cfg.max_pixels, max_bytes=cfg.max_body)
    if det is None:
        return 2
    import importlib.util

    fast = [m for m in ("httptools", "uvloop") if importlib.util.find_spec(m) is not None]
    print(f"# serving on http://{args.host}:{args.port}; max batch {cfg.max_batch}, max wait "
          f"{cfg.max_wait_ms:g} ms, queue {cfg.queue_size} images, body limit {cfg.max_body} bytes, "
          f"auth {'on' if cfg.token else 'off'}; uvicorn with {', '.join(fast) or 'h11 + asyncio'}"
          + ("" if len(fast) == 2 else " (pip install httptools uvloop for ~2x throughput)"),
          file=sys.stderr)
    app = create_app(det, cfg)
    svc: Service = app.state.service

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # readiness turns 503 at once
            svc.draining = True
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after its graceful shutdown (exit status -15); a clean
            # drain exits 0 instead, as supervisors expect of a service that stopped cleanly.
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.graceful_timeout, access_log=False,
                            limit_concurrency=args.limit_concurrency,
                            lifespan="on")
    server = _Server(config)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
