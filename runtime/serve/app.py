"""The Starlette application: routes, JSON errors, lifespan."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from .config import ServeConfig
from .errors import ClientGone, error_body
from .handler import Service

log = logging.getLogger("cinemae.serve")


def routes(svc: Service) -> list[Any]:
    """The service's routes. New endpoints (a review page, ``?explain=1`` handling) are added
    here, each a small function of ``svc`` and the request."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from ..explain.web import page_routes
    from .openapi import openapi_document

    async def detect(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            ans = await svc.detect(request)
        except ClientGone as e:  # nobody to answer: counted apart from errors, not logged as one
            log.info("client went away: %s", e)
            svc.metrics.count_request("client_disconnected", 499)
            return Response(status_code=400)  # not delivered: the connection is gone
        except asyncio.CancelledError:  # the graceful-shutdown timeout cancelled this request
            log.warning("request cancelled at the %g-s graceful-shutdown timeout", svc.cfg.graceful_timeout_s)
            svc.metrics.count_request("cancelled", 503)
            return JSONResponse(error_body("shutting_down", "the service shut down before this request "
                                           f"finished (graceful timeout {svc.cfg.graceful_timeout_s:g} s); "
                                           "retry"), status_code=503,
                                headers={"Retry-After": str(svc.cfg.retry_after_s), "Connection": "close"})
        except Exception as e:  # noqa: BLE001
            log.exception("unhandled error in /v1/detect")
            svc.metrics.count_request("server_error", 500)
            return JSONResponse(error_body("internal", f"{type(e).__name__}: {e}"), status_code=500)
        svc.metrics.count_request(ans.outcome, ans.status)
        svc.metrics.request_latency.observe(time.perf_counter() - t0)
        return JSONResponse(ans.body, status_code=ans.status, headers=ans.headers)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
        if svc.ready and not svc.draining:
            return JSONResponse({"status": "ready", "model": svc.model})
        return JSONResponse({"status": "draining" if svc.draining else "starting"}, status_code=503)

    async def metrics(request: Request) -> Response:
        body, ctype = svc.metrics.render()
        return Response(body, media_type=ctype)

    doc = openapi_document()

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(doc)

    return [Route("/v1/detect", detect, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            *page_routes()]  # the review page at / (runtime/explain/page)


def create_app(detector: Any, config: ServeConfig | None = None) -> Any:
    """The Starlette application around one Detector (which the app owns and closes)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    svc = Service(detector, config or ServeConfig())

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body("internal", "internal server error"), status_code=500)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await svc.startup()
        try:
            yield
        finally:
            await svc.shutdown()

    app = Starlette(routes=routes(svc), exception_handlers={HTTPException: http_error, Exception: server_error},
                    lifespan=lifespan)
    app.state.service = svc
    return app
