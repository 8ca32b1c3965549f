"""The HTTP connection guard: uvicorn's httptools protocol with a header deadline, a header
size limit and JSON answers for requests the parser refuses.

uvicorn on its own waits forever for a request's headers (its keep-alive timer runs only
between requests), accepts any header size with httptools, and answers a malformed request
(``Content-Length: -1``) with plain text. Here:

* the request line and headers must arrive within ``header_timeout_s`` of the connection
  opening (or of the first byte of the next request on a kept-alive connection): otherwise the
  connection is answered 408 and closed;
* at most ``max_header_bytes`` of request line + headers: otherwise 431 and close, as soon as
  that many bytes have arrived (a 64 MB header costs its first few hundred kilobytes);
* a request the parser refuses gets a JSON 400 naming what was wrong.

Every refusal is counted in ``cinemae_connections_refused_total{reason}``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .errors import error_bytes

log = logging.getLogger("cinemae.serve")

_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}


def guarded_protocol(header_timeout_s: float, max_header_bytes: int, on_refused: Any = None) -> type:
    """A uvicorn HTTP protocol class (``uvicorn.Config(http=...)``) with the guard above.

    ``on_refused(reason)`` is called for each connection the guard answers and closes."""
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_bytes = 0
            self._head_pending = True  # a request line + headers are awaited
            self._began = False
            self._head_timer: asyncio.TimerHandle | None = None

        # the header deadline ----------------------------------------------------------------
        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self._head_pending and not self.transport.is_closing():
                self._refuse(408, "header_timeout", f"the request line and headers did not arrive within "
                             f"{header_timeout_s:g} s")

        def _refuse(self, status: int, code: str, message: str) -> None:
            self._disarm()
            if on_refused is not None:
                on_refused(code)
            body = error_bytes(code, message)
            head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
            self.transport.write(head + body)
            self.transport.close()

        # protocol and parser callbacks ---------------------------------------------------------
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return
            self._unset_keepalive_if_required()
            self._began = False  # set when a request head begins inside this chunk
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:  # as uvicorn does (this service has no websockets)
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
                return
            except httptools.HttpParserError as e:
                reason = str(e) or "malformed request"
                log.info("refused a malformed request: %s", reason)
                self._refuse(400, "bad_request", f"malformed HTTP request ({reason})")
                return
            if self._head_pending and not self._began and not self.transport.is_closing():
                # the whole chunk is head: count it (the chunk a head begins in may also carry the
                # previous request's body, so it is not counted: the limit is exceeded by at most
                # one read, <= 256 kB)
                self._head_bytes += len(data)
                if self._head_bytes > max_header_bytes:
                    self._refuse(431, "headers_too_large", f"the request line and headers exceed "
                                 f"{max_header_bytes} bytes")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._began = True
            self._head_pending = True
            self._head_bytes = 0
            self._arm()

        def on_headers_complete(self) -> None:
            self._head_pending = False
            self._head_bytes = 0
            self._disarm()
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:  # uvicorn's own path, if ever taken
            self._refuse(400, "bad_request", msg)

    return GuardedHttpToolsProtocol
