"""The review page's routes for ``cinemae-serve`` (plain files shipped in ``page/``, no build step,
no third-party code) and the per-batch heatmap work the service does for ``?explain=1``."""

from __future__ import annotations

from typing import Any

import numpy as np

# the page loads nothing from elsewhere and may only talk to this service
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
              "app.css": "text/css; charset=utf-8"}
MAX_EXPLAIN_K = 16


def page_routes() -> list[Any]:
    """Starlette routes: ``GET /`` (the page) and ``GET /review/{app.js,app.css}``; anything else
    under /review is 404. The files are read once, here."""
    from starlette.responses import Response
    from starlette.routing import Route

    from . import page_file

    files = {name: (page_file(name), ctype) for name, ctype in PAGE_FILES.items()}
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

    def serve(name: str) -> Response:
        if name not in files:
            return Response(b'{"error": {"code": "not_found", "message": "no such file"}}', 404,
                            media_type="application/json")
        body, ctype = files[name]
        return Response(body, media_type=ctype, headers=headers)

    async def index(request: Any) -> Response:
        return serve("index.html")

    async def asset(request: Any) -> Response:
        name = request.path_params["name"]
        return serve(name if name != "index.html" else "")

    return [Route("/", index, methods=["GET"]), Route("/review/{name}", asset, methods=["GET"])]


def parse_explain(query: Any) -> tuple[bool, bool, int | None]:
    """``?explain=1[&png=1][&explain_k=N]`` -> (explain, png, explain_k). Raises ValueError with one
    sentence for a bad value."""
    def flag(name: str) -> bool:
        v = query.get(name)
        if v is None or v in ("0", "false", ""):
            return False
        if v in ("1", "true"):
            return True
        raise ValueError(f"{name} must be 0 or 1, got {v[:20]!r}")

    explain, png = flag("explain"), flag("png")
    k = query.get("explain_k")
    n = None
    if k is not None:
        if not k.isdigit() or not 1 <= int(k) <= MAX_EXPLAIN_K:
            raise ValueError(f"explain_k must be an integer in 1..{MAX_EXPLAIN_K}")
        n = int(k)
    return explain or png or n is not None, png, n


def batch_maps(detector: Any, batch: np.ndarray, bundle_lcas: np.ndarray | None,
               explain_ks: list[int | None | bool]) -> list[np.ndarray | None]:
    """Per item of a served batch: its [N, L] runs when it asked for a heatmap (``explain_ks[j]`` is
    False for no, True / None for the bundle's K, or N), else None. Items asking for the same N share
    the extra backend calls."""
    from . import explain_maps

    out: list[np.ndarray | None] = [None] * len(explain_ks)
    groups: dict[int | None, list[int]] = {}
    for j, want in enumerate(explain_ks):
        if want is not False:
            groups.setdefault(None if want is True else want, []).append(j)
    for n, idx in groups.items():
        base = bundle_lcas[idx] if bundle_lcas is not None else None
        maps = explain_maps(detector, batch[idx], base, n)
        for row, j in enumerate(idx):
            out[j] = maps[row]
    return out


def png_data_url(data: bytes, record: dict[str, Any], max_pixels: int | None = None) -> str:
    """The overlay of ``record`` on the encoded image ``data`` as a ``data:image/png;base64`` URL."""
    import base64

    from .files import display_image
    from .overlay import overlay_png

    png = overlay_png(display_image(data, max_pixels), record)
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
