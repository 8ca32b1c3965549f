"""Request handling: admission from the headers, the body read with timeouts, multipart
splitting, fair decoding, batching, and the JSON answer of ``POST /v1/detect``."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import logging
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .admission import Admission, Holding
from .batcher import Batcher
from .config import ServeConfig
from .decode import DecodeScheduler
from .errors import ERROR_STATUS, ClientGone, RequestError
from .metrics import ServiceMetrics

log = logging.getLogger("cinemae.serve")


def request_id(given: str | None) -> str:
    """The client's X-Request-Id when it is a sane token (<= 128 printable ASCII), else a new one."""
    if given and len(given) <= 128 and all(33 <= ord(c) < 127 for c in given):
        return given
    return uuid.uuid4().hex


def header_pixels(data: bytes) -> int | None:
    """Width x height from an image's header (no pixel decoded), or None when the header
    cannot be read (decoding then reports why)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Exception:  # noqa: BLE001 - any unreadable header is decode's to report
        return None
    return int(w) * int(h)


@dataclass
class PixelBudget:
    """Decoded pixels one request may still use (its images are charged from their headers)."""

    left: int
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, n: int, limit: int) -> None:
        from ..preprocess import InputError

        with self.lock:
            if n > self.left:
                raise InputError("too_large", f"this image's {n} pixels would take the request past its "
                                 f"limit of {limit} decoded pixels over all its images")
            self.left -= n


@dataclass
class Answer:
    """One response of ``POST /v1/detect`` and how it is counted."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    outcome: str


class Service:
    """State of one service process: detector, batcher, decode scheduler, admission, metrics."""

    def __init__(self, detector: Any, config: ServeConfig) -> None:
        self.det = detector
        self.cfg = config
        self.ready = False
        self.draining = False
        # what produced the results (Detector.model: id, version, manifest_sha256, backend,
        # precision, k, threshold) and whether its head was trained
        self.model = {**detector.model, "trained": detector.bundle.trained}
        self.admission = Admission(config)
        self.batcher: Batcher | None = None
        self.decoder = DecodeScheduler(config.decode_threads, config.decode_per_request)
        self.metrics = ServiceMetrics(self.admission, lambda: self.batcher.depth() if self.batcher else 0,
                                      lambda: self.ready and not self.draining, self.model)

    # lifecycle --------------------------------------------------------------------------------
    async def startup(self) -> None:
        self.batcher = Batcher(self.det, self.metrics, self.cfg.max_batch, self.cfg.max_wait_ms / 1000,
                               decoding=lambda: self.admission.decoding)
        self.batcher.start()
        if self.cfg.warmup:  # first calls pay for imports and session set-up: not a client
            import cv2

            ok, png = cv2.imencode(".png", np.full((48, 64, 3), 128, np.uint8))
            arr = await self.decoder.run(self.decoder.new_key(), self.det.preprocess, png.tobytes())
            await asyncio.get_running_loop().run_in_executor(self.batcher.executor, self.det.run_arrays, arr[None])
        self.ready = True
        log.info("ready: %s %s, %s", self.model["id"], self.model["version"], self.det.describe())

    async def shutdown(self) -> None:
        """Stop: finish what is queued for the backend, drop decodes not started, and do not wait
        for a decode still running (after the graceful timeout its request is gone)."""
        self.ready = False
        self.draining = True
        self.decoder.shutdown(wait=False)
        if self.batcher is not None:
            await self.batcher.stop()
        self.det.close()

    # reading the request ----------------------------------------------------------------------
    def check_auth(self, headers: Any) -> None:
        if not self.cfg.token:
            return
        auth = headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 self.cfg.token.encode()):
            raise RequestError(401, "unauthorized", "missing or wrong bearer token",
                               {"WWW-Authenticate": 'Bearer realm="cinemae"'})

    def content_length(self, headers: Any) -> int | None:
        """The declared body size (None when absent: chunked), within ``max_body``."""
        cl = headers.get("content-length")
        if cl is None:
            return None
        if not cl.strip().isdigit():
            raise RequestError(400, "bad_request", f"invalid Content-Length {cl[:40]!r}", close=True)
        n = int(cl)
        if n > self.cfg.max_body:
            raise RequestError(413, "too_large", f"request body of {n} bytes exceeds the "
                               f"{self.cfg.max_body}-byte limit")
        return n

    async def read_body(self, receive: Callable[[], Awaitable[dict]], declared: int | None, h: Holding) -> bytes:
        """The request body, within ``max_body`` (413) and the in-flight byte budget (503, bytes
        taken as they arrive). A body that pauses longer than ``body_timeout_s`` or takes longer
        than ``body_deadline_s`` in all is answered 408 and its connection closed."""
        limit, cfg = self.cfg.max_body, self.cfg
        chunks: list[bytes] = []
        size = 0
        t0 = time.monotonic()
        deadline = t0 + cfg.body_deadline_s
        while True:
            wait = min(cfg.body_timeout_s, deadline - time.monotonic())
            try:
                if wait <= 0:
                    raise asyncio.TimeoutError
                msg = await asyncio.wait_for(receive(), wait)
            except asyncio.TimeoutError:
                of = f" of {declared}" if declared is not None else ""
                raise RequestError(408, "body_timeout", f"the request body stopped arriving ({size}{of} bytes "
                                   f"in {time.monotonic() - t0:.1f} s; a pause may last {cfg.body_timeout_s:g} s "
                                   f"and the whole body {cfg.body_deadline_s:g} s)", close=True) from None
            if msg["type"] == "http.disconnect":
                raise ClientGone(f"the client disconnected after {size} body bytes")
            chunk = msg.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise RequestError(413, "too_large", f"request body exceeds the {limit}-byte limit")
                self.admission.take_bytes(h, len(chunk))
                chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks)

    async def split_images(self, headers: Any, body: bytes) -> list[tuple[str | None, bytes]]:
        """The request's images as (filename or None, encoded bytes)."""
        from python_multipart.multipart import parse_options_header

        ctype, params = parse_options_header(headers.get("content-type", ""))
        if ctype.lower() != b"multipart/form-data":
            # Any other Content-Type: the body is one image, recognised by its content (a declared
            # type is advisory: `curl --data-binary` sends x-www-form-urlencoded).
            return [(None, body)]
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        boundary = params.get(b"boundary")
        if not boundary:
            raise RequestError(400, "bad_multipart", "multipart/form-data without a boundary parameter")
        if b"--" + boundary + b"--" not in body:
            raise RequestError(400, "bad_multipart", f"the multipart body ends without its closing boundary "
                               f"(--{boundary.decode('latin-1')}--): it was cut off or is malformed")

        async def replay() -> AsyncIterator[bytes]:
            yield body

        try:
            form = await MultiPartParser(headers, replay(), max_files=self.cfg.max_images + 1,
                                         max_fields=1000).parse()
        except MultiPartException as e:
            msg = str(getattr(e, "message", e))
            if "Too many files" in msg:
                raise RequestError(413, "too_many_images", f"more than {self.cfg.max_images} "
                                   "images in one request") from None
            raise RequestError(400, "bad_multipart", f"malformed multipart body ({msg})") from None
        except Exception as e:  # noqa: BLE001 - the parser raises assorted errors on garbage
            raise RequestError(400, "bad_multipart", f"malformed multipart body ({e})") from None
        items: list[tuple[str | None, bytes]] = []
        try:
            for _, v in form.multi_items():
                if isinstance(v, UploadFile):
                    items.append((v.filename or "", await v.read()))
        finally:
            await form.close()
        if not items:
            raise RequestError(422, "no_images", "the multipart body has no file parts "
                               "(send each image as a file part)")
        return items

    # decoding ---------------------------------------------------------------------------------
    def _decode(self, data: bytes, r: Any, budget: PixelBudget, t_submit: float) -> tuple[np.ndarray, float, float]:
        """Encoded bytes -> ([3, S, S] float32, seconds decoding, seconds waiting for a decode
        thread), reading the provenance into ``r`` first (``Detector.prepare``); runs on a
        decode thread."""
        t = time.perf_counter()
        px = header_pixels(data)
        if px is not None and px <= self.cfg.max_pixels:  # over max_pixels: preprocess says so
            budget.take(px, self.cfg.max_request_pixels)
        arr = self.det.prepare(data, r)
        return arr, time.perf_counter() - t, t - t_submit

    # the endpoint -----------------------------------------------------------------------------
    async def detect(self, request: Any) -> Answer:
        """Handle one POST /v1/detect. Everything the request takes is given back on return."""
        t0 = time.perf_counter()
        rid = request_id(request.headers.get("x-request-id"))
        h = Holding()
        try:
            if self.draining or not self.ready or self.batcher is None:
                raise RequestError(503, "unavailable", "the service is starting or shutting down",
                                   {"Retry-After": str(self.cfg.retry_after_s)})
            self.check_auth(request.headers)
            explain = self.parse_explain(request.query_params)
            self.admission.take_request(h)
            declared = self.content_length(request.headers)
            self.admission.check_headers(declared)  # refuse before reading the body
            body = await self.read_body(request.receive, declared, h)
            images = await self.split_images(request.headers, body)
            del body
            status, out = await self._detect_images(images, rid, t0, h, explain)
        except RequestError as e:
            outcome = {401: "unauthorized", 408: "timeout", 503: "rejected"}.get(e.status, "bad_request")
            return Answer(e.status, {"request_id": rid, "error": {"code": e.code, "message": e.message}},
                          {**e.headers, "X-Request-Id": rid}, outcome)
        finally:
            self.admission.release(h)
        outcome = "ok" if status == 200 and all(r["error"] is None for r in out["results"]) else \
            "partial" if status == 200 else "item_error"
        return Answer(status, out, {"X-Request-Id": rid}, outcome)

    @staticmethod
    def parse_explain(query: Any) -> tuple[bool, bool, int | None]:
        """``?explain=1[&explain_k=N][&png=1]`` -> (explain, png, explain_k); a bad value is a 400."""
        from ..explain.web import parse_explain

        try:
            return parse_explain(query)
        except ValueError as e:
            raise RequestError(400, "bad_query", str(e)) from None

    async def _detect_images(self, images: list[tuple[str | None, bytes]], rid: str, t0: float, h: Holding,
                             explain: tuple[bool, bool, int | None] = (False, False, None)
                             ) -> tuple[int, dict[str, Any]]:
        from ..detector import Result
        from ..preprocess import InputError

        n = len(images)
        if n > self.cfg.max_images:
            raise RequestError(413, "too_many_images", f"{n} images exceeds the limit of "
                               f"{self.cfg.max_images} per request")
        self.admission.take_images(h, n)
        key = self.decoder.new_key()
        budget = PixelBudget(self.cfg.max_request_pixels)
        results = [Result(source=fname if fname is not None else "<request body>", model=self.det.model,
                          want_heatmap=(explain[2] or True) if explain[0] else False)
                   for fname, _ in images]
        want_png = explain[1]
        kept = [data for _, data in images] if want_png else []  # the overlays are drawn on the uploads
        try:
            t_submit = time.perf_counter()
            decoded = await asyncio.gather(*(self.decoder.run(key, self._decode, data, r, budget, t_submit)
                                             for (_, data), r in zip(images, results, strict=True)),
                                           return_exceptions=True)
        finally:
            self.admission.decoded(h)
            self.batcher.wakeup.set()  # the batcher may stop waiting for these
        extras: list[dict[str, Any]] = []  # the service's own fields of each record
        futures: list[asyncio.Future | None] = []
        mine: list[dict[str, float]] = []  # the service's timings of each image
        for i, ((_, data), dec, r) in enumerate(zip(images, decoded, results, strict=True)):
            extras.append({"index": i, "sha256": hashlib.sha256(data).hexdigest() if data else None})
            if isinstance(dec, BaseException):
                if isinstance(dec, asyncio.CancelledError):
                    raise dec
                r.error_code = dec.code if isinstance(dec, InputError) else "internal"
                r.error = str(dec) if isinstance(dec, InputError) else f"{type(dec).__name__}: {dec}"
                futures.append(None)
                mine.append({})
            else:
                arr, dec_s, wait_s = dec
                self.metrics.decode.observe(dec_s)
                mine.append({"decode_wait_ms": 1000 * wait_s, "decode_ms": 1000 * dec_s})
                futures.append(self.batcher.submit(r, arr))
        del images, decoded
        outs = await asyncio.gather(*(f for f in futures if f is not None), return_exceptions=True)
        it = iter(outs)
        for r, f, t in zip(results, futures, mine, strict=True):
            if f is not None:
                o = next(it)
                if isinstance(o, BaseException):
                    r.error, r.error_code = str(o), "internal"
                    r.score = r.logit = r.verdict = r.stats = None
                elif r.ok:  # stage seconds per image from score_prepared -> the service's ms
                    t.update({f"{k}_ms": 1000.0 * v for k, v in r.timings.items() if k != "preprocess"},
                             queue_ms=1000 * o["queue_s"], inference_ms=1000 * o["inference_s"],
                             batch_size=o["batch_size"])
            r.timings = t if r.ok else {}
            self.metrics.count_image("scored" if r.ok else r.error_code)
        if want_png:  # &png=1: the overlay of each heatmap on its upload, drawn on the decode threads
            from ..explain.web import png_data_url

            todo = [(i, r) for i, r in enumerate(results) if r.heatmap is not None]
            pngs = await asyncio.gather(*(self.decoder.run(key, png_data_url, kept[i], r.heatmap, self.cfg.max_pixels)
                                          for i, r in todo), return_exceptions=True)
            for (i, _), png in zip(todo, pngs, strict=True):
                if isinstance(png, asyncio.CancelledError):
                    raise png
                extras[i]["heatmap_png"] = None if isinstance(png, BaseException) else png
            del kept
        records = [r.to_record(**x, **({} if r.ok else {"status": ERROR_STATUS.get(r.error_code, 422)}))
                   for r, x in zip(results, extras, strict=True)]
        out: dict[str, Any] = {"request_id": rid, "model": self.model, "results": records}
        failed = [x for x in records if x["error"] is not None]
        if failed and len(failed) == len(records):
            status = failed[0]["status"]
            out["error"] = {"code": failed[0]["error_code"], "message": failed[0]["error"]}
        else:
            status = 200
        out["timings"] = {"total_ms": 1000 * (time.perf_counter() - t0)}
        return status, out
