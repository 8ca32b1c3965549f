"""``cinemae-bench --explain``: what heatmaps and provenance cost, measured side by side.

Rows (the same preprocessed batch, runners interleaved round-robin so load affects them alike):

* ``off``: the verdict only (``Detector.run_arrays``)
* ``map``: the verdict's own call with the per-patch map (``want_lcas``) + the heatmap record per image
* ``map explain-k N``: plus the extra N - K masked runs of ``--explain-k`` and the records
* ``overlay PNG``: rendering and encoding one overlay per image (on the decoded input)
* ``provenance``: ``read_provenance`` on the encoded input files (no C2PA in them: the cost every
  result pays; a C2PA-signed file adds the manifest validation, measured in the last row when
  c2pa-python and cryptography can make one)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def _timed(fns: dict[str, Callable[[], Any]], iters: int, warmup: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return times


def _signed_jpeg(data: bytes) -> bytes | None:
    """``data`` with a C2PA AI manifest signed by a throw-away chain (None without c2pa/cryptography)."""
    try:
        import c2pa  # noqa: F401
        import cryptography  # noqa: F401
    except ImportError:
        return None
    from .c2pa_fixture import make_chain, sign

    return sign(make_chain(), data)


def measure(detector: Any, pool: np.ndarray, sources: Sequence[bytes], batches: Sequence[int],
            explain_k: int = 8, iters: int = 10, warmup: int = 2,
            log: Callable[[str], None] = lambda m: None) -> list[dict[str, Any]]:
    """Rows {row, batch, p50_ms, p50_ms_per_image, vs_off} for each batch size (plus per-image
    overlay and provenance rows). ``pool`` [N, 3, S, S] preprocessed; ``sources`` encoded files."""
    from ..runtime.explain import explain_maps, explain_record
    from ..runtime.explain.overlay import overlay_png
    from ..runtime.preprocess import load_image
    from ..runtime.provenance import read_provenance

    rows: list[dict[str, Any]] = []
    size = (detector.bundle.backbone.img_size,) * 2
    for b in batches:
        x = pool[:b]

        def off(x: np.ndarray = x) -> Any:
            return detector.run_arrays(x)

        def with_map(x: np.ndarray = x) -> Any:
            out = detector.run_arrays(x, want_lcas=True)
            maps = explain_maps(detector, x, out.lcas, None)
            return [explain_record(detector, m, size) for m in maps]

        def with_explain_k(x: np.ndarray = x) -> Any:
            out = detector.run_arrays(x, want_lcas=True)
            maps = explain_maps(detector, x, out.lcas, explain_k)
            return [explain_record(detector, m, size) for m in maps]

        fns = {"off": off, "map": with_map, f"map explain-k {explain_k}": with_explain_k}
        log(f"explain cost: batch {b}")
        times = _timed(fns, iters, warmup)
        base = statistics.median(times["off"])
        for name, ts in times.items():
            p50 = statistics.median(ts)
            rows.append({"row": name, "batch": b, "p50_ms": 1e3 * p50, "p50_ms_per_image": 1e3 * p50 / b,
                         "vs_off": p50 / base})
    rgb = load_image(sources[0])
    out = detector.run_arrays(pool[:1], want_lcas=True)
    rec = explain_record(detector, explain_maps(detector, pool[:1], out.lcas, explain_k)[0],
                         (rgb.shape[1], rgb.shape[0]))
    signed = None
    try:
        signed = _signed_jpeg(sources[0])
    except Exception as e:  # noqa: BLE001 - a failing row is a row with its error
        rows.append({"row": "provenance (C2PA-signed file)", "batch": 1, "error": f"{type(e).__name__}: {e}"})
    per_image = {"overlay PNG": lambda: overlay_png(rgb, rec),
                 "provenance": lambda: [read_provenance(s) for s in sources[:8]]}
    if signed is not None:
        per_image["provenance (C2PA-signed file)"] = lambda: read_provenance(signed)
    times = _timed(per_image, iters, warmup)
    for name, ts in times.items():
        n = min(8, len(sources)) if name == "provenance" else 1
        p50 = statistics.median(ts)
        rows.append({"row": name, "batch": 1, "p50_ms": 1e3 * p50 / n, "p50_ms_per_image": 1e3 * p50 / n,
                     "vs_off": None})
    return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'explain cost':<32} {'B':>3} {'p50 ms':>9} {'ms/img':>9} {'x off':>6}"]
    for r in rows:
        if r.get("file"):
            lines.append(f"{r['row']:<32} {r['file']} (p(AI) {r['score']:.3f}, hottest patches "
                         + ", ".join(f"({h['row']},{h['col']})" for h in r["hottest"]) + ")")
            continue
        if r.get("error"):
            lines.append(f"{r['row']:<32} {r['batch']:>3}  error: {r['error']}")
            continue
        vs = f"{r['vs_off']:.2f}" if r.get("vs_off") else ""
        lines.append(f"{r['row']:<32} {r['batch']:>3} {r['p50_ms']:>9.3f} {r['p50_ms_per_image']:>9.3f} {vs:>6}")
    return "\n".join(lines)


def example_image(size: int = 256, seed: int = 0, cell: int = 8) -> np.ndarray:
    """A picture the project makes itself, [size, size, 3] uint8: a smooth scene (gradients and a
    soft disc) with one square of uniform noise in ``cell`` x ``cell`` blocks (coarse enough to
    survive the 32-px model's resize), the kind of region the MAE cannot predict."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    disc = np.exp(-(((xx - 0.35) ** 2 + (yy - 0.6) ** 2) / 0.02))
    img = np.stack([0.25 + 0.5 * xx + 0.2 * disc, 0.3 + 0.4 * yy + 0.1 * disc, 0.65 - 0.3 * xx * yy], -1)
    s = size // 4
    r0, c0 = size // 4, size // 2
    noise = np.random.default_rng(seed).random((s // cell, s // cell, 3))
    img[r0:r0 + s, c0:c0 + s] = noise.repeat(cell, 0).repeat(cell, 1)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def example_figure(detector: Any, path: str, explain_k: int = 8) -> dict[str, Any]:
    """Write the overlay of :func:`example_image` (scored by ``detector``) to ``path``; returns
    its heatmap record. The README's example picture is this figure."""
    from pathlib import Path

    from ..runtime.explain.overlay import overlay_png

    rgb = example_image()
    r = detector.detect(rgb, explain=True, explain_k=explain_k)
    Path(path).write_bytes(overlay_png(rgb, r.heatmap, min_side=256))
    return {"score": r.score, "verdict": r.verdict, "hottest": r.heatmap["hottest"][:4]}
