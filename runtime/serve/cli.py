"""``cinemae-serve [BUNDLE] --host 127.0.0.1 --port 8000``: the command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from .config import ServeConfig

log = logging.getLogger("cinemae.serve")


def build_parser() -> argparse.ArgumentParser:
    d = ServeConfig()
    ap = argparse.ArgumentParser(prog="cinemae-serve",
                                 description="HTTP ingestion service with dynamic batching.")
    ap.add_argument("bundle", nargs="?", help="bundle directory (default: the embedded bundle)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    from ..backends import backend_choices, device_help, precision_choices  # the backend registry

    ap.add_argument("--backend", default="auto", choices=backend_choices())
    ap.add_argument("--device", default="auto", help=device_help())
    ap.add_argument("--precision", default="fp32", choices=precision_choices())
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime")
    from ..commands import add_reship_arguments

    add_reship_arguments(ap)
    g = ap.add_argument_group("batching and decoding")
    g.add_argument("--max-batch", type=int, default=d.max_batch, help="images per backend call")
    g.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="longest wait for a batch to fill after its first image arrives (it waits "
                        "only while other admitted images are still decoding)")
    g.add_argument("--decode-threads", type=int, default=d.decode_threads, help="decode worker threads")
    g.add_argument("--decode-per-request", type=int, default=d.decode_per_request,
                   help="decode threads one request may use at once (the others stay free for other requests)")
    g = ap.add_argument_group("limits per request")
    g.add_argument("--max-body", type=int, default=d.max_body, help="bytes per request (413)")
    g.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help="decoded pixels per image, checked from its header before decoding (413)")
    g.add_argument("--max-request-pixels", type=int, default=d.max_request_pixels,
                   help="decoded pixels over all images of one request, from their headers (413 per image)")
    g.add_argument("--max-images", type=int, default=d.max_images, help="images per request")
    g = ap.add_argument_group("admission (503 + Retry-After, decided from the headers)")
    g.add_argument("--queue-size", type=int, default=d.queue_size,
                   help="images admitted at once; beyond it requests get 503 + Retry-After")
    g.add_argument("--max-inflight-bytes", type=int, default=d.max_inflight_bytes,
                   help="request-body bytes held at once; beyond it requests get 503 + Retry-After")
    g.add_argument("--max-requests", "--limit-concurrency", dest="max_requests", type=int, default=d.max_requests,
                   help="detect requests handled at once; beyond it 503 + Retry-After (JSON)")
    g.add_argument("--retry-after", type=int, default=d.retry_after_s, help="seconds, on 503")
    g = ap.add_argument_group("connections")
    g.add_argument("--header-timeout", type=float, default=d.header_timeout_s,
                   help="seconds for a request line + headers to arrive (408 and close)")
    g.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes,
                   help="request line + headers (431 and close)")
    g.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                   help="longest pause in a request body, seconds (408 and close)")
    g.add_argument("--body-deadline", type=float, default=d.body_deadline_s,
                   help="longest time to receive a whole request body, seconds (408 and close)")
    g.add_argument("--graceful-timeout", type=float, default=d.graceful_timeout_s,
                   help="seconds to finish requests in flight on SIGTERM; then they are answered 503 and "
                        "the process exits without waiting for decodes still running")
    ap.add_argument("--token", default=None,
                    help="require 'Authorization: Bearer TOKEN' on /v1/detect; prefer the env CINEMAE_TOKEN "
                         "(a command-line token shows in ps)")
    ap.add_argument("--log-level", default="info")
    return ap


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(max_body=args.max_body, max_inflight_bytes=max(args.max_inflight_bytes, args.max_body),
                       max_pixels=args.max_pixels, max_request_pixels=args.max_request_pixels,
                       max_images=args.max_images, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                       queue_size=args.queue_size, max_requests=args.max_requests, retry_after_s=args.retry_after,
                       decode_threads=args.decode_threads, decode_per_request=args.decode_per_request,
                       header_timeout_s=args.header_timeout, max_header_bytes=args.max_header_bytes,
                       body_timeout_s=args.body_timeout, body_deadline_s=args.body_deadline,
                       graceful_timeout_s=args.graceful_timeout,
                       token=args.token or os.environ.get("CINEMAE_TOKEN") or None)


def _raise_fd_limit() -> None:
    """Each connection is a file descriptor: take the hard limit (a 1024 soft limit is a
    denial of service at 1024 idle connections)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    except (ImportError, ValueError, OSError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        print("cinemae-serve: needs the serve extra: pip install 'cinemae[serve]'", file=sys.stderr)
        return 2
    from ..commands import open_detector
    from .app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    if min(cfg.queue_size, cfg.max_batch, cfg.max_images, cfg.max_requests, cfg.decode_threads,
           cfg.decode_per_request) < 1:
        print("cinemae-serve: --queue-size, --max-batch, --max-images, --max-requests, --decode-threads and "
              "--decode-per-request must be >= 1", file=sys.stderr)
        return 2
    if min(cfg.header_timeout_s, cfg.body_timeout_s, cfg.body_deadline_s) <= 0 or cfg.max_header_bytes < 1024:
        print("cinemae-serve: timeouts must be > 0 and --max-header-bytes >= 1024", file=sys.stderr)
        return 2
    det = open_detector("cinemae-serve", args.bundle, backend=args.backend, device=args.device,
                        precision=args.precision, batch_size=cfg.max_batch, threads=args.threads,
                        max_pixels=cfg.max_pixels, max_bytes=cfg.max_body, reship=args.reship,
                        reship_on=args.reship_on)
    if det is None:
        return 2
    import importlib.util

    _raise_fd_limit()
    app = create_app(det, cfg)
    svc = app.state.service
    if importlib.util.find_spec("httptools") is not None:
        from .protocol import guarded_protocol

        http: Any = guarded_protocol(cfg.header_timeout_s, cfg.max_header_bytes,
                                     on_refused=lambda reason: svc.metrics.connections_refused.labels(reason).inc())
        proto = "httptools with the header guard"
    else:  # h11 limits the header size itself; it has no header deadline
        http, proto = "h11", "h11 (no header deadline: pip install httptools)"
    loop = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    print(f"# serving on http://{args.host}:{args.port}; max batch {cfg.max_batch}, max wait "
          f"{cfg.max_wait_ms:g} ms, queue {cfg.queue_size} images, body limit {cfg.max_body} bytes, "
          f"auth {'on' if cfg.token else 'off'}; uvicorn with {proto}, {loop}", file=sys.stderr)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # readiness turns 503 at once
            svc.draining = True
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after its graceful shutdown (exit status -15); a clean
            # drain exits 0 instead, as supervisors expect of a service that stopped cleanly.
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, http=http,
                            loop=loop, timeout_graceful_shutdown=cfg.graceful_timeout_s, access_log=False,
                            limit_concurrency=None, timeout_keep_alive=5,
                            h11_max_incomplete_event_size=cfg.max_header_bytes, lifespan="on")
    server = _Server(config)
    server.run()
    code = 0 if server.started else 1
    busy = svc.decoder.busy()
    if busy:  # a decode cannot be interrupted; its request is already answered: do not wait for it
        log.warning("exiting with %d decode(s) still running (graceful timeout %g s)", busy, cfg.graceful_timeout_s)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
