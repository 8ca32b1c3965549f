"""What the re-shipping ensemble costs: images per second of ``Detector`` with and without
``reship``, end to end (encoded bytes to verdict: decode, views, preprocessing, one backend call
per batch), side by side in one run on the same files, interleaved batch by batch (the order alternates, so
both sides see the same load on a shared machine), with the process CPU time beside the wall time.

Both Detectors run ONNX Runtime on the CPU with provenance reading off, so the figure is the
pixel path's (reading provenance costs both sides the same and would only shrink the ratio).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def measure_cost(bundle: Any, data: str, limit: int, reship: str, threads: int | None,
                 log: Callable[[str], None], rounds: int = 3, batch: int = 16, on: str = "picture"
                 ) -> dict[str, Any]:
    """{rounds: [{plain_img_s, reship_img_s, ratio}], median ratio, ...}; an error is a row with it.
    ``on``: what a tiled bundle's views re-ship (``Detector(reship_on=...)``)."""
    from ..runtime.detector import Detector
    from .datasets import load_labeled

    try:
        files = [it.read() for it in load_labeled(data, limit)]
        plain = Detector(bundle, backend="onnxruntime", device="cpu", threads=threads, provenance=False)
        ens = Detector(bundle, backend="onnxruntime", device="cpu", threads=threads, provenance=False,
                       reship=reship, reship_on=on)
    except Exception as e:  # noqa: BLE001 - a failing measurement is a row with its error
        return {"error": f"{type(e).__name__}: {e}"}

    def timed(det: Detector, chunk: list[bytes]) -> tuple[float, float, int]:
        w, c = time.perf_counter(), time.process_time()
        unc = sum(r.verdict == "uncertain" for r in det.detect_batch(chunk))
        return time.perf_counter() - w, time.process_time() - c, unc

    import warnings

    out = []
    with plain, ens, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the embedded model's domain warning, once per Detector
        timed(plain, files[:batch]), timed(ens, files[:batch])  # warm-up (sessions, caches)
        for r in range(rounds):
            tot = {id(plain): [0.0, 0.0, 0], id(ens): [0.0, 0.0, 0]}
            for b, i in enumerate(range(0, len(files), batch)):  # batch by batch, order alternating
                for det in ((plain, ens) if (b + r) % 2 == 0 else (ens, plain)):
                    got = timed(det, files[i:i + batch])
                    t = tot[id(det)]
                    t[0], t[1], t[2] = t[0] + got[0], t[1] + got[1], t[2] + got[2]
            p, e = tot[id(plain)], tot[id(ens)]
            n = len(files)
            out.append({"plain_img_s": round(n / p[0], 2), "reship_img_s": round(n / e[0], 2),
                        "ratio": round(e[0] / p[0], 3), "plain_cpu_ms": round(1000 * p[1] / n, 2),
                        "reship_cpu_ms": round(1000 * e[1] / n, 2), "cpu_ratio": round(e[1] / p[1], 3),
                        "uncertain_plain": p[2], "uncertain_reship": e[2]})
            log(f"  reship cost round {r + 1}: plain {n / p[0]:.1f} img/s, ensemble {n / e[0]:.1f} img/s "
                f"({e[0] / p[0]:.2f}x the time; CPU time {e[1] / p[1]:.2f}x)")
        views = ens.reship.names if ens.reship else []
    return {"views": views, "views_on": on, "images": len(files), "batch": batch, "backend": "onnxruntime-cpu fp32",
            "provenance": False, "rows_per_image": 1 + len(views), "rounds": out,
            "median_slowdown": statistics.median(x["ratio"] for x in out),
            "median_cpu_ratio": statistics.median(x["cpu_ratio"] for x in out),
            "protocol": f"Detector.detect_batch on the encoded files, batches of {batch}, one warm-up batch each, "
                        f"{rounds} rounds over all files, plain and ensemble alternating batch by batch; slowdown = "
                        "ensemble wall time / plain wall time; CPU = process CPU time (all threads) per image"}
