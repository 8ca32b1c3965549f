"""Request-level errors of the service and their JSON shape: ``{"error": {"code", "message"}}``."""

from __future__ import annotations

import json

# the runtime's InputError codes -> the HTTP status of that image
ERROR_STATUS = {"empty": 422, "truncated": 422, "undecodable": 422, "bad_array": 422,
                "unsupported": 415, "too_large": 413, "not_found": 422, "internal": 500}


class RequestError(Exception):
    """The whole request fails with ``status`` and a one-sentence ``message``.

    ``close`` asks for ``Connection: close`` (the rest of the request cannot be read or is not
    worth reading)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 close: bool = False) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})
        if close:
            self.headers["Connection"] = "close"


class ClientGone(Exception):
    """The client closed the connection before its request was read; nothing can be answered."""


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def error_bytes(code: str, message: str) -> bytes:
    return json.dumps(error_body(code, message)).encode()
